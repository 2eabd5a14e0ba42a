"""Configures Django once for this directory, creates the test table and closes every connection after."""

from __future__ import annotations

from collections.abc import Iterator

import django
import psycopg
import pytest
from django.conf import settings
from django.db import connections

from tests.django import settings as test_settings
from tests.support.databases import PG_CONNINFO

if not settings.configured:
    settings.configure(**{name: getattr(test_settings, name) for name in dir(test_settings) if name.isupper()})
    django.setup()


@pytest.fixture(scope="session", autouse=True)
def items_table() -> Iterator[str]:
    table = settings.ITEMS_TABLE
    with connections["default"].cursor() as cursor:
        cursor.execute(f"CREATE TABLE {table} (id serial PRIMARY KEY, name text NOT NULL UNIQUE)")
    yield table
    with connections["default"].cursor() as cursor:
        cursor.execute(f"DROP TABLE IF EXISTS {table}")
    connections.close_all()
    connections["pooled"].close_pool()


@pytest.fixture(autouse=True)
def _close_connections() -> Iterator[None]:
    """The test client keeps a thread's connections open between requests; tests start and end clean."""
    yield
    connections.close_all()


def row_exists(name: str) -> bool:
    """Looked up on a connection of its own, so no test transaction can hide or show a row."""
    with psycopg.connect(PG_CONNINFO) as conn:
        row = conn.execute(f"SELECT count(*) FROM {settings.ITEMS_TABLE} WHERE name = %s", [name]).fetchone()
    return bool(row and row[0])
