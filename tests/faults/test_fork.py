"""After os.fork() the child gets its own connections and full admission; the parent's stay usable.

Real forks: the child reports through a pipe as JSON and leaves with ``os._exit``; every wait is bounded.
"""

from __future__ import annotations

import gc
import json
import os
import select
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy

import poolguard
from tests.support import databases

CHILD_TIMEOUT = 20.0

BACKEND_PID = {"postgresql": "SELECT pg_backend_pid()", "mysql": "SELECT CONNECTION_ID()"}


def in_child(work: Callable[[], Any]) -> Any:
    """Runs ``work`` in a forked child and returns what it returned (or fails with what it raised)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover (the child)
        os.close(read_end)
        try:
            payload = {"result": work()}
        except BaseException as exc:
            payload = {"error": f"{type(exc).__name__}: {exc}"}
        gc.collect()  # the parent's objects the child dropped would be finalized here, if anything finalized them
        os.write(write_end, json.dumps(payload).encode())
        os._exit(0)
    os.close(write_end)
    chunks: list[bytes] = []
    deadline = time.monotonic() + CHILD_TIMEOUT
    try:
        while True:
            remaining = deadline - time.monotonic()
            ready, _, _ = select.select([read_end], [], [], max(remaining, 0))
            if not ready:
                pytest.fail(f"the forked child did not answer within {CHILD_TIMEOUT}s")
            chunk = os.read(read_end, 65536)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(read_end)
        for _ in range(100):
            if os.waitpid(pid, os.WNOHANG) != (0, 0):
                break
            time.sleep(0.05)
        else:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    answer = json.loads(b"".join(chunks))
    assert "error" not in answer, answer.get("error")
    return answer["result"]


@pytest.fixture(params=["postgresql", "mysql"])
def guard(request: pytest.FixtureRequest) -> Iterator[poolguard.Guard]:
    url = databases.PG_URL if request.param == "postgresql" else databases.MARIADB_URL
    engine = sqlalchemy.create_engine(url, pool_size=2, max_overflow=0, pool_pre_ping=True)
    guarded = poolguard.Guard(engine, name="forked", max_wait=0.0)
    yield guarded
    guarded.close()
    engine.dispose()


def backend_pid(connection: sqlalchemy.Connection) -> int:
    return int(connection.exec_driver_sql(BACKEND_PID[connection.dialect.name]).scalar_one())


def test_the_child_gets_its_own_connection_and_the_parents_stays_usable(guard: poolguard.Guard) -> None:
    with guard.connection() as connection:
        parent_pid = backend_pid(connection)
    pool = guard.engine.pool
    assert pool.checkedin() == 1  # type: ignore[attr-defined]

    def child() -> dict[str, Any]:
        with guard.connection() as connection:
            pid = backend_pid(connection)
        return {"pid": pid, "pool_is_new": guard.engine.pool is not pool, "guarded": type(guard.engine.pool).__name__}

    seen = in_child(child)
    assert seen["pid"] != parent_pid
    assert seen["pool_is_new"]
    assert seen["guarded"].startswith("Guarded")
    with guard.connection() as connection:  # the same pooled backend, still in a sane state
        assert backend_pid(connection) == parent_pid
        assert connection.exec_driver_sql("SELECT 1").scalar() == 1


def test_a_fork_during_a_held_checkout_leaves_the_child_full_capacity(guard: poolguard.Guard) -> None:
    holding = threading.Event()
    release = threading.Event()
    pids: list[int] = []

    def hold() -> None:
        with guard.connection() as connection:
            pids.append(backend_pid(connection))
            holding.set()
            release.wait(CHILD_TIMEOUT)
            connection.exec_driver_sql("SELECT 1")

    thread = threading.Thread(target=hold)
    thread.start()
    try:
        assert holding.wait(CHILD_TIMEOUT)
        assert guard.gate.admission.in_use == 1

        def child() -> dict[str, Any]:
            gate = guard.gate
            before = {"in_use": gate.admission.in_use, "held": gate.held, "pending": gate.pending}
            with guard.connection() as first, guard.connection() as second:  # max_wait 0: both slots must be free
                pids = [backend_pid(first), backend_pid(second)]
            return {**before, "pids": pids, "after": gate.admission.in_use}

        seen = in_child(child)
    finally:
        release.set()
        thread.join(CHILD_TIMEOUT)
    assert seen["in_use"] == 0
    assert seen["held"] == 0
    assert seen["pending"] == 0
    assert seen["after"] == 0
    assert pids[0] not in seen["pids"]
    assert guard.gate.admission.in_use == 0  # the parent's own accounting is untouched
    with guard.connection() as connection:
        assert connection.exec_driver_sql("SELECT 1").scalar() == 1


def test_the_child_probes_and_watches_on_threads_of_its_own_and_keeps_the_breaker() -> None:
    engine = sqlalchemy.create_engine(databases.PG_URL)
    guard = poolguard.Guard(engine, name="ping")
    try:
        assert guard.health().status == "ok"  # a probe thread ran; the watchdog's thread runs
        assert guard.breaker is not None
        guard.breaker.record_failure(0.0)

        def child() -> dict[str, Any]:
            assert guard.breaker is not None
            watchdogs = [t.name for t in threading.enumerate() if t.name.startswith("poolguard-watchdog")]
            report = guard.health(max_age=0.0)  # a probe of the child's own, now
            return {
                "status": report.status,
                "pinged": report.pools[0].ping is not None and report.pools[0].ping.seconds is not None,
                "failure_rate": guard.breaker.failure_rate,
                "watchdogs": watchdogs,
            }

        seen = in_child(child)
        assert seen["status"] == "ok"
        assert seen["pinged"]
        assert seen["failure_rate"] > 0
        assert "poolguard-watchdog-ping" in seen["watchdogs"]  # restarted in the child
    finally:
        guard.close()
        engine.dispose()


def test_a_closed_or_collected_guard_is_left_alone() -> None:
    engine = sqlalchemy.create_engine(databases.PG_URL)
    guard = poolguard.Guard(engine, name="closed")
    guard.close()
    pool = engine.pool
    assert in_child(lambda: engine.pool is pool)
    engine.dispose()
