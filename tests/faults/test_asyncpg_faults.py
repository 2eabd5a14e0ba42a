"""A Guard over an asyncpg pool (made by ``create_asyncpg_pool``) against the private server: a stopped
server opens the breaker and refusals come at once, the database's return is noticed within about a
second (the watchdog's probe), a black-holed server never hangs a query, and PgBouncer in transaction
mode works with ``pgbouncer=True``."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import asyncpg
import pytest

import poolguard
from poolguard import BreakerState, CircuitOpen, Guard
from tests.support.pgcluster import PgBouncer, PgCluster
from tests.support.tcpproxy import TcpProxy

pytestmark = pytest.mark.postgres


@pytest.fixture
async def guarded() -> AsyncIterator[Callable[..., Any]]:
    """``await guarded(url, **create_asyncpg_pool_options)``: (guard, pool); closed after the test."""
    made: list[tuple[Guard, asyncpg.Pool]] = []

    async def factory(url: str, **options: Any) -> tuple[Guard, asyncpg.Pool]:
        pool = await poolguard.create_asyncpg_pool(url, **{"connect_timeout": 1.0, "workers": 2, **options})
        guard = Guard(pool, name="faults")
        made.append((guard, pool))
        return guard, pool

    yield factory
    for guard, pool in made:
        held = guard.gate.held
        guard.close()
        pool.terminate()
        assert held == 0


def plain_dsn(cluster: PgCluster, proxy: TcpProxy) -> str:
    """The private server through the proxy, as asyncpg's own ``create_pool`` takes it."""
    return cluster.url("asyncpg", port=proxy.port).replace("postgresql+asyncpg", "postgresql")


async def select_one(guard: Guard) -> Any:
    async with guard.connection() as conn:
        return await conn.fetchval("SELECT 1")


async def until_open(guard: Guard) -> list[BaseException]:
    """Uses the guard until it refuses with CircuitOpen; each failed use is bounded."""
    errors: list[BaseException] = []
    for _ in range(20):
        started = time.monotonic()
        try:
            await select_one(guard)
        except CircuitOpen:
            return errors
        except Exception as exc:
            errors.append(exc)
        assert time.monotonic() - started < 2.5
    raise AssertionError(f"the breaker never opened: {[type(e).__name__ for e in errors]}")


async def served_again_within(guard: Guard, seconds: float) -> float:
    back = time.monotonic()
    while True:
        try:
            assert await select_one(guard) == 1
            return time.monotonic() - back
        except (CircuitOpen, OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
            assert time.monotonic() - back < seconds, "not served again after the database came back"
            await asyncio.sleep(0.02)


async def test_a_stopped_server_opens_the_breaker_then_its_return_is_noticed(cluster: PgCluster, guarded: Any) -> None:
    guard, _pool = await guarded(cluster.url("asyncpg"))
    assert await select_one(guard) == 1
    cluster.stop()
    errors = await until_open(guard)
    assert errors, "dead connections and refused connects are failures first"
    for _ in range(5):
        started = time.monotonic()
        with pytest.raises(CircuitOpen):
            await select_one(guard)
        assert time.monotonic() - started < 0.05
    assert (await guard.ahealth()).status == "unavailable"
    cluster.start()
    assert await served_again_within(guard, 2.0) < 2.0
    assert guard.breaker is not None
    assert guard.breaker.state is not BreakerState.OPEN


async def test_a_blackholed_server_never_hangs_a_query(cluster: PgCluster, proxy: TcpProxy, guarded: Any) -> None:
    guard, _pool = await guarded(cluster.url("asyncpg", port=proxy.port))
    assert await select_one(guard) == 1
    proxy.blackhole()
    started = time.monotonic()
    with pytest.raises((asyncpg.ConnectionDoesNotExistError, asyncpg.InterfaceError, OSError)):
        await select_one(guard)  # hangs on the silent socket until the watchdog aborts it
    assert time.monotonic() - started < 3.5
    assert guard.breaker is not None
    assert guard.breaker.state is BreakerState.OPEN
    started = time.monotonic()
    with pytest.raises(CircuitOpen):
        await select_one(guard)
    assert time.monotonic() - started < 0.05
    proxy.heal()
    assert await served_again_within(guard, 2.5) < 2.5


async def test_pgbouncer_in_transaction_mode_with_prepared_statements_off(bouncer: PgBouncer, guarded: Any) -> None:
    guard, pool = await guarded(bouncer.url("asyncpg"), pgbouncer=True, workers=8)
    assert pool.get_max_size() == 8

    async def work(n: int) -> int:
        async with guard.connection() as conn:
            assert conn._stmt_cache.get_max_size() == 0
            async with conn.transaction():
                value: int = await conn.fetchval("SELECT $1::int + 1", n)
            return value

    for _ in range(5):
        assert await asyncio.gather(*(work(n) for n in range(8))) == [n + 1 for n in range(8)]
    assert guard.breaker is not None
    assert guard.breaker.failure_rate == 0.0


async def test_a_pool_made_elsewhere_never_waits_out_a_connect_to_a_silent_server(
    cluster: PgCluster, proxy: TcpProxy, caplog: pytest.LogCaptureFixture
) -> None:
    """``Guard(asyncpg.create_pool(...))`` with asyncpg's defaults: a connect to a silent server waits out
    asyncpg's 60 s connect timeout, and nothing bounds a read. The connect under way is aborted once the
    watchdog has confirmed the outage, and the guard says once what to add for the reads."""
    pool = await asyncpg.create_pool(plain_dsn(cluster, proxy), min_size=0, max_size=2)
    guard = Guard(pool, name="elsewhere")
    try:
        assert await select_one(guard) == 1
        await pool.expire_connections()  # the next acquire connects anew
        proxy.blackhole()
        started = time.monotonic()
        with pytest.raises(ConnectionAbortedError, match="connect aborted, the database does not answer"):
            await select_one(guard)
        assert time.monotonic() - started < 3.5
        assert guard.breaker is not None
        assert guard.breaker.state is BreakerState.OPEN
        proxy.heal()
        assert await served_again_within(guard, 2.5) < 2.5
    finally:
        guard.close()
        pool.terminate()
    warnings = [r.getMessage() for r in caplog.records if "command_timeout" in r.getMessage()]
    assert len(warnings) == 1, warnings


@pytest.mark.parametrize("callback", ["init", "setup"])
async def test_a_pool_callback_hung_on_a_silent_server_is_aborted(
    callback: str, cluster: PgCluster, proxy: TcpProxy
) -> None:
    """A pool's ``init`` (each new connection: a type codec, a ``SET``) or ``setup`` (each acquire) makes round
    trips before the guard holds the connection: a server gone silent then leaves the acquire hanging in it,
    until the watchdog has confirmed the outage and aborts that connection too."""
    silence = asyncio.Event()

    async def set_up(connection: Any) -> None:
        if silence.is_set():
            proxy.blackhole()
        await connection.execute("SET application_name = 'faults'")

    pool = await asyncpg.create_pool(plain_dsn(cluster, proxy), min_size=1, max_size=2, **{callback: set_up})
    guard = Guard(pool, name=callback)
    try:
        assert await select_one(guard) == 1
        if callback == "init":
            await pool.expire_connections()  # the next acquire makes a new connection, and runs init on it
        silence.set()
        started = time.monotonic()
        with pytest.raises((asyncpg.ConnectionDoesNotExistError, asyncpg.InterfaceError, OSError)):
            await select_one(guard)
        assert time.monotonic() - started < 3.5
        silence.clear()
        proxy.heal()
        assert await served_again_within(guard, 2.5) < 2.5
    finally:
        guard.close()
        pool.terminate()
