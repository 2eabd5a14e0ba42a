"""The breaker against real network faults: PostgreSQL behind a TCP proxy that dies, hangs and comes back.

Breaker intervals run on an injected fake clock (``Guard(clock=...)`` hands it to the breaker), so
nothing here waits for ``open_for``; the only real waits are connect timeouts against a blackhole.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy
from sqlalchemy import exc, text
from sqlalchemy.ext.asyncio import AsyncEngine

from poolguard import Breaker, BreakerState, CircuitOpen, Guard
from tests.support.databases import DEAD_PORT, HOST, PG_PORT, pg_url
from tests.support.tcpproxy import TcpProxy

pytestmark = pytest.mark.postgres

EngineFactory = Callable[..., sqlalchemy.Engine]
GuardFactory = Callable[..., Guard]

FAILURES = 3
OPEN_FOR = 1.0


@pytest.fixture
def proxy() -> Iterator[TcpProxy]:
    with TcpProxy((HOST, PG_PORT)) as proxy:
        yield proxy


def proxied_url(proxy: TcpProxy, driver: str = "psycopg") -> str:
    return pg_url(driver, port=proxy.port)


def breaker() -> Breaker:
    return Breaker(consecutive_failures=FAILURES, open_for=OPEN_FOR, half_open_calls=2)


def query(guard: Guard) -> Any:
    with guard.session() as session:
        return session.execute(text("SELECT 1")).scalar()


def assert_opens_after_failures(guard: Guard) -> CircuitOpen:
    """FAILURES connection errors, then CircuitOpen at once; returns that CircuitOpen."""
    assert guard.breaker is not None
    for attempt in range(FAILURES):
        assert guard.breaker.state is BreakerState.CLOSED, f"opened early, after {attempt} failures"
        with pytest.raises(exc.OperationalError):
            query(guard)
    assert guard.breaker.state is BreakerState.OPEN
    started = time.monotonic()
    with pytest.raises(CircuitOpen) as raised:
        query(guard)
    assert time.monotonic() - started < 0.05
    assert 0 < raised.value.retry_after <= OPEN_FOR
    return raised.value


@pytest.fixture
def engine(proxy: TcpProxy, make_sync_engine: EngineFactory) -> sqlalchemy.Engine:
    return make_sync_engine(
        proxied_url(proxy),
        pool_size=2,
        max_overflow=0,
        pool_timeout=30,
        pool_pre_ping=True,
        connect_args={"connect_timeout": 1},
    )


def test_dead_server_opens_the_breaker_and_a_healed_one_closes_it(
    make_guard: GuardFactory, engine: sqlalchemy.Engine, proxy: TcpProxy, fake_clock: Any
):
    guard = make_guard(engine, breaker=breaker(), clock=fake_clock)
    assert query(guard) == 1

    proxy.stop()
    assert_opens_after_failures(guard)
    report = guard.health()
    assert report.status == "unavailable"
    assert report.http_status == 503
    [pool] = report.to_dict()["pools"]
    assert pool["breaker"]["state"] == "open"
    assert pool["breaker"]["retry_after"] > 0

    proxy.restart()
    with pytest.raises(CircuitOpen):  # still open: the server is back, but open_for has not elapsed
        query(guard)
    fake_clock.advance(OPEN_FOR + 0.1)
    assert guard.breaker is not None
    assert guard.breaker.state is BreakerState.HALF_OPEN
    assert query(guard) == 1
    assert query(guard) == 1  # half_open_calls=2 probes succeeded
    assert guard.breaker.state is BreakerState.CLOSED
    assert guard.health().status == "ok"


def test_blackholed_server_fails_within_the_connect_timeout_and_counts(
    make_guard: GuardFactory, engine: sqlalchemy.Engine, proxy: TcpProxy
):
    guard = make_guard(engine, breaker=Breaker(consecutive_failures=1, open_for=60.0))
    proxy.blackhole()
    started = time.monotonic()
    with pytest.raises(exc.OperationalError):
        query(guard)
    elapsed = time.monotonic() - started
    assert elapsed < 3.5, f"hung for {elapsed:.1f}s behind a blackhole"  # libpq/psycopg round 1 s up to 2 s
    assert guard.breaker is not None
    assert guard.breaker.state is BreakerState.OPEN
    started = time.monotonic()
    with pytest.raises(CircuitOpen):
        query(guard)
    assert time.monotonic() - started < 0.05
    proxy.heal()


def test_connection_killed_mid_use_counts_as_a_failure(
    make_guard: GuardFactory, engine: sqlalchemy.Engine, proxy: TcpProxy
):
    guard = make_guard(engine, breaker=Breaker(consecutive_failures=1, open_for=60.0))
    assert guard.breaker is not None

    def server_dies_mid_unit() -> None:
        with guard.session() as session:
            assert session.execute(text("SELECT 1")).scalar() == 1
            proxy.stop()
            session.execute(text("SELECT 2"))

    with pytest.raises(exc.OperationalError) as raised:
        server_dies_mid_unit()
    assert raised.value.connection_invalidated
    assert guard.breaker.state is BreakerState.OPEN
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    assert guard.stats().checked_out == 0


def test_unreachable_port_opens_the_breaker(make_guard: GuardFactory, make_sync_engine: EngineFactory, fake_clock: Any):
    engine = make_sync_engine(pg_url(port=DEAD_PORT), pool_size=2, max_overflow=0)
    guard = make_guard(engine, breaker=breaker(), clock=fake_clock)
    error = assert_opens_after_failures(guard)
    assert error.reason == "circuit_open"
    assert guard.health().status == "unavailable"


async def test_async_engine_breaker_opens_and_closes(
    make_async_guard: GuardFactory,
    make_async_engine_sa: Callable[..., AsyncEngine],
    proxy: TcpProxy,
    fake_clock: Any,
):
    engine = make_async_engine_sa(
        proxied_url(proxy, "asyncpg"),
        pool_size=2,
        max_overflow=0,
        pool_pre_ping=True,
        connect_args={"timeout": 2},
    )
    guard = make_async_guard(engine, breaker=breaker(), clock=fake_clock)
    assert guard.breaker is not None

    async def aquery() -> Any:
        async with guard.session() as session:
            return (await session.execute(text("SELECT 1"))).scalar()

    assert await aquery() == 1
    proxy.stop()
    for attempt in range(FAILURES):
        assert guard.breaker.state is BreakerState.CLOSED, f"opened early, after {attempt} failures"
        with pytest.raises((exc.DBAPIError, OSError)):
            await aquery()
    assert guard.breaker.state is BreakerState.OPEN
    started = time.monotonic()
    with pytest.raises(CircuitOpen) as raised:
        await aquery()
    assert time.monotonic() - started < 0.05
    assert raised.value.retry_after > 0
    assert (await guard.ahealth()).status == "unavailable"

    proxy.restart()
    fake_clock.advance(OPEN_FOR + 0.1)
    assert await aquery() == 1
    assert await aquery() == 1
    assert guard.breaker.state is BreakerState.CLOSED
    assert (await guard.ahealth()).status == "ok"
