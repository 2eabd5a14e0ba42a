"""Django 5.1+'s psycopg pool (OPTIONS["pool"], max_size=1): counts, admission, saturation within MAX_WAIT."""

from __future__ import annotations

import json
import threading
import time

import pytest
from django.db import connections
from django.test import Client, override_settings

from poolguard.errors import ConfigError
from tests.django.helpers import assert_503, state

POOLED = {"DATABASES": ["pooled"], "MAX_WAIT": 0.3, "HEALTH_DETAIL": "always"}


def _request_in_thread(path: str, results: dict[str, object], key: str) -> threading.Thread:
    def run() -> None:
        try:
            results[key] = Client(raise_request_exception=False).get(path)
        finally:
            connections.close_all()  # the test client leaves the thread's connection open; hand it back

    thread = threading.Thread(target=run)
    thread.start()
    return thread


@override_settings(POOLGUARD=POOLED)
def test_saturated_pool_sheds_within_the_wait_budget() -> None:
    gate = state().guards["pooled"].gate
    assert gate.admission.capacity == 1
    results: dict[str, object] = {}
    holder = _request_in_thread("/pooled/?sleep=1.5", results, "holder")
    deadline = time.monotonic() + 5
    while gate.admission.in_use < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert gate.admission.in_use == 1

    started = time.monotonic()
    shed = _request_in_thread("/pooled/", results, "shed")
    shed.join()
    elapsed = time.monotonic() - started
    assert_503(results["shed"], "pool_saturated")
    assert elapsed < 0.3 + 0.5, elapsed  # MAX_WAIT, never psycopg_pool's timeout (10 s here)
    assert gate.shed["pool_saturated"] == 1

    counts = state().pools["pooled"].counts()
    assert (counts.size, counts.checked_out, counts.idle) == (1, 1, 0)
    health = json.loads(Client().get("/health/db").content)
    assert health["status"] == "degraded"  # full pool: not pinged, utilization 100 %
    assert health["pools"][0]["checked_out"] == 1

    holder.join()
    assert getattr(results["holder"], "status_code", None) == 200
    assert gate.admission.in_use == 0
    assert gate.leaks.holders() == []

    after = _request_in_thread("/pooled/", results, "after")
    after.join()
    assert getattr(results["after"], "status_code", None) == 200
    counts = state().pools["pooled"].counts()
    assert (counts.checked_out, counts.idle) == (0, 1)


@override_settings(POOLGUARD=POOLED)
def test_pooled_health_and_ping() -> None:
    response = Client().get("/health/db")
    assert response.status_code == 200
    (pool,) = json.loads(response.content)["pools"]
    assert pool["name"] == "pooled"
    assert pool["size"] == 1
    assert pool["max_overflow"] == 0
    assert pool["ping_seconds"] is not None
    assert pool["checked_out"] == 0


def test_guarded_aliases_connect_with_bounds_unless_options_set_them() -> None:
    """Django sets no connect timeout: a silent database would hold a connecting thread for minutes."""
    from poolguard.pools import LIBPQ_TCP_BOUNDS  # noqa: PLC0415
    from poolguard.pools.django import CONNECT_TIMEOUT  # noqa: PLC0415

    with override_settings(POOLGUARD={"DATABASES": ["default", "down"]}):
        state()  # the guards of both aliases
        default = connections["default"].get_connection_params()
        assert default["connect_timeout"] == CONNECT_TIMEOUT
        assert {key: default[key] for key in LIBPQ_TCP_BOUNDS} == dict(LIBPQ_TCP_BOUNDS)
        assert connections["down"].get_connection_params()["connect_timeout"] == 2  # OPTIONS wins
        connections["default"].ensure_connection()  # psycopg took them: a real connection has them
        raw = connections["default"].connection
        assert raw.info.get_parameters()["tcp_user_timeout"] == str(LIBPQ_TCP_BOUNDS["tcp_user_timeout"])


@override_settings(POOLGUARD={"DATABASES": ["persistent"], "MAX_WAIT": 0.3, "CAPACITY": 1})
def test_per_thread_connections_get_a_capacity_and_shed_beyond_it() -> None:
    """CONN_MAX_AGE, no pool: one connection per thread, so only a capacity below the threads sheds."""
    gate = state().guards["persistent"].gate
    assert gate.admission.capacity == 1
    assert state().pools["persistent"].counts().capacity == 1
    results: dict[str, object] = {}
    holder = _request_in_thread("/persistent/?sleep=1.5", results, "holder")
    deadline = time.monotonic() + 5
    while gate.admission.in_use < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert gate.admission.in_use == 1

    shed = _request_in_thread("/persistent/", results, "shed")
    shed.join()
    assert_503(results["shed"], "pool_saturated")
    holder.join()
    assert getattr(results["holder"], "status_code", None) == 200
    assert gate.admission.in_use == 0
    after = _request_in_thread("/persistent/", results, "after")
    after.join()
    assert getattr(results["after"], "status_code", None) == 200


def test_per_thread_capacity_follows_the_servers_threads_when_known(monkeypatch: pytest.MonkeyPatch) -> None:
    from poolguard.django.conf import configure_settings, per_thread_capacity  # noqa: PLC0415

    monkeypatch.delenv("GUNICORN_CMD_ARGS", raising=False)
    assert per_thread_capacity(configure_settings({"DATABASES": ["persistent"]}, environ={})) is None  # unknown
    monkeypatch.setenv("GUNICORN_CMD_ARGS", "--threads 6")
    assert per_thread_capacity(configure_settings({"DATABASES": ["persistent"]}, environ={})) == 6
    assert per_thread_capacity(configure_settings({"THREADS": 3}, environ={})) == 3
    assert per_thread_capacity(configure_settings({"THREADS": 3, "CAPACITY": 2}, environ={})) == 2
    assert per_thread_capacity(configure_settings({}, environ={"POOLGUARD_CAPACITY": "4"})) == 4
    with pytest.raises(ConfigError, match="CAPACITY"):
        configure_settings({"CAPACITY": 0}, environ={})
