"""The middleware through Django's test client (WSGI handler) and AsyncClient (ASGI handler)."""

from __future__ import annotations

import uuid

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.db import connections
from django.test import AsyncClient, Client, override_settings

from poolguard.django import PoolGuardMiddleware
from tests.django.conftest import row_exists
from tests.django.helpers import assert_503, state

BREAKER_AT_ONE = {"DATABASES": ["default", "down"], "BREAKER": {"CONSECUTIVE_FAILURES": 1, "OPEN_FOR": 30}}


def _name() -> str:
    return f"item-{uuid.uuid4().hex[:12]}"


def test_returning_view_commits_and_raising_view_rolls_back() -> None:
    client = Client(raise_request_exception=False)
    kept, dropped = _name(), _name()
    assert client.get("/write/", {"name": kept}).status_code == 200
    assert client.get("/write-fail/", {"name": dropped}).status_code == 500
    assert row_exists(kept)
    assert not row_exists(dropped)
    gate = state().guards["default"].gate
    assert gate.checkouts == 2
    assert gate.leaks.holders() == []
    assert gate.admission.in_use == 0


def test_application_errors_do_not_count_on_the_breaker() -> None:
    client = Client(raise_request_exception=False)
    for _ in range(6):  # more than the default consecutive_failures
        assert client.get("/duplicate/", {"name": _name()}).status_code == 500
    breaker = state().guards["default"].gate.breaker
    assert breaker is not None
    assert breaker.state.value == "closed"
    assert breaker.failure_rate == 0.0


@override_settings(POOLGUARD=BREAKER_AT_ONE)
def test_connection_failure_opens_the_breaker_and_db_free_views_keep_answering() -> None:
    client = Client(raise_request_exception=False)
    assert_503(client.get("/down/"), "circuit_open")  # the refused connect, counted, then the 503
    breaker = state().guards["down"].gate.breaker
    assert breaker is not None
    assert breaker.state.value == "open"
    seconds = assert_503(client.get("/down/"), "circuit_open")
    assert 1 <= seconds <= 30
    assert state().guards["down"].gate.shed["circuit_open"] == 1
    response = client.get("/nodb/")
    assert response.status_code == 200
    assert response.content == b"no database here"
    assert client.get("/write/", {"name": _name()}).status_code == 200  # the other alias is unaffected


@override_settings(POOLGUARD=BREAKER_AT_ONE)
def test_open_breaker_answers_before_touching_the_database() -> None:
    breaker = state().guards["down"].gate.breaker
    assert breaker is not None
    breaker.record_failure(0.0)
    client = Client()
    connections["down"].close()
    assert_503(client.get("/down/"), "circuit_open")
    assert connections["down"].connection is None


async def test_async_client_sync_views_commit_and_roll_back() -> None:
    client = AsyncClient(raise_request_exception=False)
    kept, dropped = _name(), _name()
    assert (await client.get("/write/", {"name": kept})).status_code == 200
    assert (await client.get("/write-fail/", {"name": dropped})).status_code == 500
    assert row_exists(kept)
    assert not row_exists(dropped)


async def test_async_view_commits_and_rolls_back() -> None:
    client = AsyncClient(raise_request_exception=False)
    kept, dropped = _name(), _name()
    assert (await client.get("/async/write/", {"name": kept})).status_code == 200
    assert (await client.get("/async/write/", {"name": dropped, "fail": "1"})).status_code == 500
    assert row_exists(kept)
    assert not row_exists(dropped)
    assert state().guards["default"].gate.leaks.holders() == []


@pytest.mark.parametrize("path", ["/down/", "/async/down/"])
async def test_async_breaker_open(path: str) -> None:
    with override_settings(POOLGUARD=BREAKER_AT_ONE):
        client = AsyncClient(raise_request_exception=False)
        assert_503(await client.get(path), "circuit_open")
        assert_503(await client.get(path), "circuit_open")
        assert state().guards["down"].gate.shed["circuit_open"] == 1
        response = await client.get("/async/nodb/")
        assert response.status_code == 200
        assert (await client.get("/nodb/")).status_code == 200


def test_middleware_refuses_to_start_with_invalid_settings() -> None:
    with override_settings(POOLGUARD={"MAX_WAIT": -1}), pytest.raises(ImproperlyConfigured, match="max_wait"):
        PoolGuardMiddleware(lambda request: None)
    with override_settings(POOLGUARD={"DATABASES": ["nope"]}), pytest.raises(ImproperlyConfigured, match="nope"):
        PoolGuardMiddleware(lambda request: None)


def test_state_is_rebuilt_on_override_and_restored() -> None:
    before = state()
    with override_settings(POOLGUARD={"DATABASES": ["default", "down"]}):
        inside = state()
        assert set(inside.guards) == {"default", "down"}
    after = state()
    assert after is not before
    assert after is not inside
    assert set(after.guards) == {"default"}
