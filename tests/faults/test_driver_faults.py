"""The core with real drivers against the private server: auth failures, PgBouncer, cancellation,
a flapping database and a retry storm. Breaker intervals run on a fake clock; retries never sleep."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from typing import Any

import pytest
import sqlalchemy
from sqlalchemy import event, exc, text

import poolguard
from poolguard import Breaker, BreakerState, CircuitOpen, RetryBudget, Unavailable
from tests.faults.helpers import PASSWORD_ROLE, SECRET, Fleet, assert_clean, checked_out
from tests.support.clock import FakeClock
from tests.support.pgcluster import PgBouncer, PgCluster
from tests.support.tcpproxy import TcpProxy

pytestmark = pytest.mark.postgres


def select_one(guard: poolguard.Guard) -> Any:
    with guard.session() as session:
        return session.execute(text("SELECT 1")).scalar()


async def aselect_one(guard: poolguard.Guard) -> Any:
    async with guard.session() as session:
        return (await session.execute(text("SELECT 1"))).scalar()


def state_of(guard: poolguard.Guard) -> BreakerState:
    assert guard.breaker is not None
    return guard.breaker.state


# --- auth failure ------------------------------------------------------------------------------------


@pytest.mark.parametrize("driver", ["psycopg", "asyncpg"])
async def test_wrong_password_opens_the_breaker(
    driver: str, cluster: PgCluster, fleet: Fleet, caplog: pytest.LogCaptureFixture
) -> None:
    url = cluster.url(driver, user=PASSWORD_ROLE, password=f"{SECRET}-wrong")
    guard = fleet.guard(
        fleet.async_engine(url, connect_timeout=2) if driver == "asyncpg" else fleet.engine(url, connect_timeout=2),
        clock=FakeClock(),
    )
    errors: list[BaseException] = []
    for _ in range(5):
        started = time.monotonic()
        try:
            await (aselect_one(guard) if driver == "asyncpg" else asyncio.to_thread(select_one, guard))
        except Exception as error:
            errors.append(error)
        assert time.monotonic() - started < 3.0
    assert len(errors) == 5
    assert all(guard.unavailable_for(error) is not None for error in errors), [type(e).__name__ for e in errors]
    assert guard.breaker is not None
    assert guard.breaker.state is BreakerState.OPEN
    with pytest.raises(CircuitOpen):
        await (aselect_one(guard) if driver == "asyncpg" else asyncio.to_thread(select_one, guard))
    assert all(SECRET not in str(error) for error in errors)
    assert SECRET not in str(guard.health().to_dict())


async def test_right_password_works(cluster: PgCluster, fleet: Fleet) -> None:
    guard = fleet.guard(fleet.async_engine(cluster.url("asyncpg", user=PASSWORD_ROLE, password=SECRET)))
    assert await aselect_one(guard) == 1


# --- PgBouncer (transaction pooling) -----------------------------------------------------------------


def test_pgbouncer_transaction_mode_sync(bouncer: PgBouncer, fleet: Fleet) -> None:
    guard = fleet.guard(fleet.engine(bouncer.url("psycopg", password=SECRET), pgbouncer=True, workers=8))

    def work(n: int) -> int:
        total = 0
        for i in range(8):  # past psycopg's prepare threshold: prepared statements would break here
            with guard.session() as session:
                total += session.execute(
                    text("SELECT CAST(:n AS int) + CAST(:i AS int)"), {"n": n, "i": i}
                ).scalar_one()
        return total

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        totals = list(pool.map(work, range(16)))
    assert totals == [8 * n + 28 for n in range(16)]
    assert guard.health().status in ("ok", "degraded")
    assert guard.stats().checked_out == 0


async def test_pgbouncer_transaction_mode_asyncpg(bouncer: PgBouncer, fleet: Fleet) -> None:
    guard = fleet.guard(fleet.async_engine(bouncer.url("asyncpg", password=SECRET), pgbouncer=True, workers=8))

    async def work(n: int) -> int:
        total = 0
        for i in range(8):
            async with guard.session() as session:
                result = await session.execute(text("SELECT CAST(:n AS int) + CAST(:i AS int)"), {"n": n, "i": i})
                total += result.scalar_one()
        return total

    totals = await asyncio.gather(*(work(n) for n in range(16)))
    assert totals == [8 * n + 28 for n in range(16)]
    assert (await guard.ahealth()).status in ("ok", "degraded")


# --- asyncio cancellation --------------------------------------------------------------------------


async def test_cancelled_while_waiting_for_a_connection(cluster: PgCluster, fleet: Fleet) -> None:
    engine = fleet.async_engine(cluster.url("asyncpg", password=SECRET), pool_size=1, max_overflow=0)
    guard = fleet.guard(engine, max_wait=5.0)
    holding = asyncio.Event()
    release = asyncio.Event()

    async def holder() -> None:
        async with guard.session() as session:
            await session.execute(text("SELECT 1"))
            holding.set()
            await release.wait()

    held = asyncio.ensure_future(holder())
    await holding.wait()
    waiters = [asyncio.ensure_future(aselect_one(guard)) for _ in range(3)]
    await asyncio.sleep(0.1)  # they are queued for the one connection
    for waiter in waiters:
        waiter.cancel()
    results = await asyncio.gather(*waiters, return_exceptions=True)
    assert all(isinstance(result, asyncio.CancelledError) for result in results)
    release.set()
    await held
    started = time.monotonic()
    assert list(await asyncio.gather(aselect_one(guard), aselect_one(guard))) == [1, 1]  # no slot lost
    assert time.monotonic() - started < 1.0
    assert guard.stats().checked_out == 0
    assert guard.stats().pending == 0
    assert_clean(cluster, engine)


async def test_cancelled_while_connecting(cluster: PgCluster, proxy: TcpProxy, fleet: Fleet) -> None:
    engine = fleet.async_engine(cluster.url("asyncpg", password=SECRET, port=proxy.port), pool_size=1, max_overflow=0)
    guard = fleet.guard(engine)
    proxy.connect_delay = 1.0
    task = asyncio.ensure_future(aselect_one(guard))
    await asyncio.sleep(0.3)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    proxy.connect_delay = 0.0
    assert await aselect_one(guard) == 1
    assert guard.stats().checked_out == 0
    assert_clean(cluster, engine)


async def test_cancelled_while_releasing(cluster: PgCluster, proxy: TcpProxy, fleet: Fleet, table: str) -> None:
    engine = fleet.async_engine(cluster.url("asyncpg", password=SECRET, port=proxy.port), pool_size=1, max_overflow=0)
    # Half a second per packet lands the cancellation inside the release; the watchdog would take a
    # network that slow for a database that stopped answering (a fresh connect then takes over 1 s).
    guard = fleet.guard(engine, probe_interval=None)
    inserted = asyncio.Event()

    async def write() -> None:
        async with guard.session() as session:
            await session.execute(text(f"INSERT INTO {table} (name) VALUES ('cancelled')"))
            proxy.latency = 0.5  # the commit and the release are slow now
            inserted.set()

    task = asyncio.ensure_future(write())
    await inserted.wait()
    await asyncio.sleep(0.2)  # inside the commit or the release
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    proxy.latency = 0.0
    for _ in range(300):
        if guard.stats().checked_out == 0 and checked_out(engine) == 0:
            break
        await asyncio.sleep(0.01)
    assert guard.stats().checked_out == 0
    assert await aselect_one(guard) == 1
    rows = {row[0] for row in cluster.sql(f"SELECT name FROM {table}")}
    assert rows <= {"cancelled"}
    assert_clean(cluster, engine)


# --- a flapping database, a retry storm ------------------------------------------------------------


@pytest.mark.parametrize("guarded", [True, False], ids=["poolguard-engine", "plain-engine"])
def test_flapping_database(guarded: bool, cluster: PgCluster, proxy: TcpProxy, fleet: Fleet) -> None:
    clock = FakeClock()
    options: dict[str, Any] = {"connect_timeout": 2} if guarded else {"connect_args": {"connect_timeout": 2}}
    engine = fleet.engine(cluster.url(password=SECRET, port=proxy.port), guarded=guarded, pool_size=2, **options)
    guard = fleet.guard(engine, clock=clock, breaker=Breaker(consecutive_failures=2, open_for=5.0))
    outcomes: list[str] = []
    for _ in range(6):
        assert select_one(guard) == 1
        proxy.stop()
        for _ in range(3):
            started = time.monotonic()
            with pytest.raises((exc.DBAPIError, Unavailable)) as raised:
                select_one(guard)
            assert time.monotonic() - started < 3.0
            outcomes.append(type(raised.value).__name__)
        assert guard.breaker is not None
        assert state_of(guard) is BreakerState.OPEN
        proxy.restart()
        clock.advance(400.0)
        for _ in range(3):
            assert select_one(guard) == 1  # the half-open probes
        assert state_of(guard) is BreakerState.CLOSED
    assert "CircuitOpen" in outcomes
    assert guard.stats().checked_out == 0
    assert_clean(cluster, engine)


def test_retry_storm_during_an_outage_is_bounded(cluster: PgCluster, proxy: TcpProxy, fleet: Fleet) -> None:
    clock = FakeClock()
    engine = fleet.engine(cluster.url(password=SECRET, port=proxy.port), pool_size=4, max_overflow=0)
    guard = fleet.guard(engine, clock=clock)
    connects: list[float] = []
    event.listen(engine, "do_connect", lambda *args: connects.append(time.monotonic()))
    delays: list[float] = []
    budget = RetryBudget(clock=clock)

    @poolguard.retry(attempts=4, breaker=guard.breaker, budget=budget, sleep=delays.append)
    def fetch() -> Any:
        return select_one(guard)

    assert fetch() == 1
    connects.clear()
    proxy.stop()

    def caller(_: int) -> list[str]:
        outcomes = []
        for _ in range(5):
            started = time.monotonic()
            try:
                fetch()
                outcomes.append("ok")
            except Unavailable:
                outcomes.append("shed")
            except exc.DBAPIError:
                outcomes.append("error")
            assert time.monotonic() - started < 3.0
        return outcomes

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        outcomes = [o for result in pool.map(caller, range(16)) for o in result]
    calls = len(outcomes)
    assert outcomes.count("ok") == 0
    assert outcomes.count("shed") >= calls // 2, outcomes
    # Without poolguard: calls x attempts connects. With it: the breaker stops them, the budget caps retries.
    assert len(connects) <= 5 + 16 + 3 + calls // 10, f"{len(connects)} connects for {calls} calls"
    assert all(0 <= delay <= 2.0 for delay in delays)
    proxy.restart()
    clock.advance(400.0)
    assert fetch() == 1
    assert_clean(cluster, engine)


def test_plain_engine_through_the_guard_stopped_server(cluster: PgCluster, fleet: Fleet) -> None:
    engine: sqlalchemy.Engine = fleet.engine(cluster.url(password=SECRET), guarded=False, pool_size=2, max_overflow=0)
    clock = FakeClock()
    guard = fleet.guard(engine, clock=clock)
    assert select_one(guard) == 1
    cluster.stop()
    for _ in range(5):
        with pytest.raises(exc.OperationalError):
            select_one(guard)
    started = time.monotonic()
    with pytest.raises(CircuitOpen):
        select_one(guard)
    assert time.monotonic() - started < 0.05
    assert guard.health().status == "unavailable"
    cluster.start()
    clock.advance(400.0)
    assert [select_one(guard) for _ in range(3)] == [1, 1, 1]
    assert guard.health().status == "ok"
    assert_clean(cluster, engine)


async def select_one_async(guard: poolguard.Guard) -> Any:
    async with guard.session() as session:
        return (await session.execute(text("SELECT 1"))).scalar()


@pytest.mark.parametrize("driver", ["psycopg", "asyncpg"])
async def test_a_connect_to_a_silent_server_is_bounded_on_an_engine_made_elsewhere(
    driver: str, cluster: PgCluster, proxy: TcpProxy, fleet: Fleet, caplog: pytest.LogCaptureFixture
) -> None:
    """``Guard(create_engine(url))`` as Flask-SQLAlchemy makes it: no connect timeout, so a connect to a server
    that accepts and then says nothing waits for ever (libpq) or 60 s (asyncpg), and a connect under way
    cannot be aborted. The guard gives such connects poolguard's connect timeout (logged once); a timeout
    the app sets itself, 0 (none) included, stays."""
    caplog.set_level(logging.INFO, logger="poolguard")
    url = cluster.url(driver, port=proxy.port)
    engine: Any = fleet.async_engine(url, guarded=False) if driver == "asyncpg" else fleet.engine(url, guarded=False)
    guard = fleet.guard(engine)
    proxy.blackhole()
    started = time.monotonic()
    if driver == "asyncpg":
        with pytest.raises((exc.DBAPIError, OSError)):
            await select_one_async(guard)
    else:
        with pytest.raises(exc.OperationalError):
            select_one(guard)
    assert time.monotonic() - started < 4.0
    lines = [r.getMessage() for r in caplog.records if "sets no connect timeout" in r.getMessage()]
    assert len(lines) == 1, lines
    assert "2 s" in lines[0]
