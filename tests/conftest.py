"""Fixtures every part of the suite may use; a module's own fixture of the same name takes precedence."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import sqlalchemy
from sqlalchemy.pool import NullPool

from tests.support.databases import PG_URL


@pytest.fixture
def observer() -> Iterator[sqlalchemy.Engine]:
    """An unguarded engine on PostgreSQL with its own connections, to see what was really committed."""
    engine = sqlalchemy.create_engine(PG_URL, poolclass=NullPool)
    yield engine
    engine.dispose()
