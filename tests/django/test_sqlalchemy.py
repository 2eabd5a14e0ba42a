"""POOLGUARD["SQLALCHEMY"]: a request-scoped SQLAlchemy session beside Django's ORM."""

from __future__ import annotations

import json
import uuid

import pytest
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.test import AsyncClient, Client, override_settings

from tests.django.conftest import row_exists
from tests.django.helpers import state

WITH_SA = {"SQLALCHEMY": {"URL": settings.SA_URL, "POOL_SIZE": 2}, "HEALTH_DETAIL": "always"}


def _name() -> str:
    return f"sa-{uuid.uuid4().hex[:12]}"


@override_settings(POOLGUARD=WITH_SA)
def test_session_commits_and_rolls_back() -> None:
    client = Client(raise_request_exception=False)
    kept, dropped = _name(), _name()
    assert client.get("/sa/write/", {"name": kept}).status_code == 200
    assert client.get("/sa/write/", {"name": dropped, "fail": "1"}).status_code == 500
    assert row_exists(kept)
    assert not row_exists(dropped)
    guard = state().guard
    assert guard is not None
    stats = guard.stats()
    assert stats.checked_out == 0
    assert stats.size == 2
    health = json.loads(client.get("/health/db").content)
    assert [pool["name"] for pool in health["pools"]] == ["default", "sqlalchemy"]


@override_settings(POOLGUARD=WITH_SA)
async def test_session_under_the_asgi_handler() -> None:
    client = AsyncClient(raise_request_exception=False)
    kept, dropped = _name(), _name()
    assert (await client.get("/sa/write/", {"name": kept})).status_code == 200
    assert (await client.get("/sa/write/", {"name": dropped, "fail": "1"})).status_code == 500
    assert row_exists(kept)
    assert not row_exists(dropped)
    guard = state().guard
    assert guard is not None
    assert guard.stats().checked_out == 0


def test_get_session_without_sqlalchemy_says_what_to_set() -> None:
    response = Client(raise_request_exception=True)
    with pytest.raises(ImproperlyConfigured, match=r"POOLGUARD\['SQLALCHEMY'\]"):
        response.get("/sa/write/", {"name": _name()})


def test_engine_disposed_on_rebuild() -> None:
    with override_settings(POOLGUARD=WITH_SA):
        guard = state().guard
        assert guard is not None
        Client().get("/sa/write/", {"name": _name()})
        pool = guard.engine.pool
        assert pool.checkedin() >= 1  # type: ignore[attr-defined]
    assert state().guard is None
    assert guard.engine.pool.checkedin() == 0  # type: ignore[attr-defined]
