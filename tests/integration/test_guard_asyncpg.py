"""Guard over an ``asyncpg.Pool`` on the real PostgreSQL server: the connection block, release on every
path, admission, leaks, the breaker's view of errors, and health."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import asyncpg
import pytest

import poolguard
from poolguard import BreakerState, ConfigError, Guard, PoolSaturated
from poolguard.acquire import acquire
from tests.support.clock import FakeClock, drive_the_watchdog
from tests.support.databases import DATABASE, HOST, PG_PORT, USER

pytestmark = pytest.mark.postgres

DSN = f"postgresql://{USER}@{HOST}:{PG_PORT}/{DATABASE}"

PoolFactory = Callable[..., Any]


@pytest.fixture
async def make_pool() -> AsyncIterator[Callable[..., Any]]:
    """``await make_pool(**create_pool_kwargs)``: an asyncpg pool (max 2); after the test nothing is held."""
    pools: list[asyncpg.Pool] = []

    async def factory(**kwargs: Any) -> asyncpg.Pool:
        pool = await asyncpg.create_pool(DSN, **{"min_size": 0, "max_size": 2, **kwargs})
        pools.append(pool)
        return pool

    yield factory
    held = [pool.get_size() - pool.get_idle_size() for pool in pools]
    for pool in pools:
        await pool.close()
    assert held == [0] * len(pools), f"connections left acquired: {held}"


@pytest.fixture
def guards() -> AsyncIterator[Callable[..., Guard]] | Any:
    made: list[Guard] = []

    def factory(pool: asyncpg.Pool, **options: Any) -> Guard:
        guard = Guard(pool, **drive_the_watchdog(options))
        made.append(guard)
        return guard

    yield factory
    for guard in made:
        assert guard.gate.held == 0, f"{guard.name}: {guard.gate.held} held"
        guard.close()


async def test_connection_gives_the_asyncpg_connection_and_takes_it_back(make_pool: Any, guards: Any) -> None:
    pool = await make_pool()
    guard = guards(pool)
    async with guard.connection() as conn:
        assert isinstance(conn, asyncpg.Connection)
        assert await conn.fetchval("SELECT 41 + 1") == 42
        assert guard.stats().checked_out == 1
    stats = guard.stats()
    assert (stats.backend, stats.size, stats.max_overflow, stats.checked_out, stats.checkouts) == (
        "postgresql",
        2,
        0,
        0,
        1,
    )
    assert stats.wait_p50 is not None
    assert stats.use_p50 is not None
    assert stats.connections_created == 1
    assert pool.get_idle_size() == 1


async def test_application_errors_release_and_are_not_counted(make_pool: Any, guards: Any) -> None:
    pool = await make_pool()
    guard = guards(pool)
    table = f"pg_asyncpg_{uuid.uuid4().hex[:10]}"
    async with guard.connection() as conn:
        await conn.execute(f"CREATE TEMP TABLE {table} (id integer PRIMARY KEY)")  # dropped with the session
        await conn.execute(f"INSERT INTO {table} VALUES (1)")
        with pytest.raises(asyncpg.UniqueViolationError):
            await conn.execute(f"INSERT INTO {table} VALUES (1)")

    async def run(query: str) -> None:
        async with guard.connection() as conn:
            await conn.execute(query)

    for error, query in (
        (asyncpg.UniqueViolationError, "DO $$ BEGIN RAISE unique_violation; END $$"),
        (asyncpg.PostgresSyntaxError, "SELEC 1"),
    ):
        with pytest.raises(error) as raised:
            await run(query)
        assert guard.unavailable_for(raised.value) is None
    assert guard.breaker is not None
    assert guard.breaker.failure_rate == 0.0
    assert pool.get_size() - pool.get_idle_size() == 0


@pytest.mark.parametrize("when", ["in a query", "between queries"])
async def test_a_connection_lost_in_use_is_counted_and_answers_503(make_pool: Any, guards: Any, when: str) -> None:
    pool = await make_pool()
    guard = guards(pool)

    async def terminate(pid: int) -> None:
        killer = await asyncpg.connect(DSN)
        try:
            await killer.execute("SELECT pg_terminate_backend($1)", pid)
        finally:
            await killer.close()

    async def use() -> None:
        async with guard.connection() as conn:
            pid = await conn.fetchval("SELECT pg_backend_pid()")
            if when == "in a query":
                query = asyncio.ensure_future(conn.fetchval("SELECT pg_sleep(5)"))
                await asyncio.sleep(0.1)
                await terminate(pid)
                await query
            else:
                await terminate(pid)
                await asyncio.sleep(0.1)
                await conn.fetchval("SELECT 1")

    with pytest.raises(asyncpg.PostgresError if when == "in a query" else asyncpg.InterfaceError) as raised:
        await use()
    assert guard.breaker is not None
    assert guard.breaker.failure_rate > 0
    unavailable = guard.unavailable_for(raised.value)
    assert unavailable is not None
    assert unavailable.reason == "circuit_open"
    async with guard.connection() as conn:  # the dead one was dropped by the pool
        assert await conn.fetchval("SELECT 1") == 1


async def test_asyncpgs_own_command_timeout_counts_an_application_timeout_does_not(make_pool: Any, guards: Any) -> None:
    pool = await make_pool()
    guard = guards(pool)
    assert guard.breaker is not None

    async def app_timeout() -> None:
        async with guard.connection(), asyncio.timeout(0.05):
            await asyncio.sleep(1)

    async def command_timeout() -> None:
        async with guard.connection() as conn:
            await conn.fetchval("SELECT pg_sleep(2)", timeout=0.1)

    with pytest.raises(TimeoutError):
        await app_timeout()
    assert guard.breaker.failure_rate == 0.0
    with pytest.raises(TimeoutError):
        await command_timeout()
    assert guard.breaker.failure_rate > 0


async def test_released_when_the_task_is_cancelled_in_use_or_waiting(make_pool: Any, guards: Any) -> None:
    pool = await make_pool()
    guard = guards(pool, max_wait=5.0)
    holding = asyncio.Event()

    async def hold() -> None:
        async with guard.connection() as conn:
            holding.set()
            await conn.fetchval("SELECT pg_sleep(30)")

    users = [asyncio.create_task(hold()) for _ in range(2)]
    await asyncio.wait_for(holding.wait(), 5)
    await asyncio.sleep(0.1)
    waiter = asyncio.create_task(hold())  # no slot: waits in admission
    await asyncio.sleep(0.1)
    assert guard.gate.admission.waiting == 1
    started = time.monotonic()
    for task in (*users, waiter):
        task.cancel()
    results = await asyncio.gather(*users, waiter, return_exceptions=True)
    assert all(isinstance(result, asyncio.CancelledError) for result in results)
    assert time.monotonic() - started < 2.0
    assert guard.gate.held == 0
    assert guard.gate.admission.waiting == 0
    assert guard.gate.admission.in_use == 0
    assert guard.breaker is not None
    assert guard.breaker.failure_rate == 0.0
    await asyncio.sleep(0.05)  # asyncpg's shielded release (it cancels the sleeping query) finishes
    assert pool.get_size() - pool.get_idle_size() == 0
    async with guard.connection() as conn:
        assert await conn.fetchval("SELECT 1") == 1


async def test_admission_sheds_the_excess_of_a_pool_of_two_fast(make_pool: Any, guards: Any) -> None:
    pool = await make_pool()
    guard = guards(pool, max_wait=0.5)

    async def user() -> tuple[str, float, BaseException | None]:
        started = time.monotonic()
        try:
            async with guard.connection() as conn:
                await conn.fetchval("SELECT pg_sleep(0.3)")
        except PoolSaturated as exc:
            return "saturated", time.monotonic() - started, exc
        return "ok", time.monotonic() - started, None

    results = await asyncio.gather(*(user() for _ in range(20)))
    served = [seconds for outcome, seconds, _ in results if outcome == "ok"]
    shed = [seconds for outcome, seconds, _ in results if outcome == "saturated"]
    assert len(served) >= 2
    assert len(shed) >= 10
    assert max(shed) < 1.0
    assert guard.stats().timeouts == len(shed)
    assert guard.breaker is not None
    assert guard.breaker.state is BreakerState.CLOSED
    assert guard.breaker.failure_rate == 0.0


async def test_a_connection_held_past_the_threshold_is_reported(make_pool: Any, guards: Any) -> None:
    pool = await make_pool()
    clock = FakeClock()
    guard = guards(pool, clock=clock, leak_threshold=2.0)
    async with guard.connection():
        clock.advance(3.0)
        assert guard.stats().suspected_leaks == 1
    assert guard.stats().suspected_leaks == 0
    assert guard.stats().leaks_reported == 1


async def test_a_connection_a_unit_forgot_is_closed_and_its_slot_returned(
    make_pool: Any, guards: Any, caplog: pytest.LogCaptureFixture
) -> None:
    pool = await make_pool()
    guard = guards(pool)
    assert guard.acquiring is not None
    async with guard.request_scope(route="/forgetful") as scope:
        conn = await acquire(guard.gate, guard.acquiring, scope)
        assert await conn.fetchval("SELECT 1") == 1
    assert "route /forgetful ended while still holding a connection" in caplog.text
    assert guard.gate.held == 0
    assert guard.gate.admission.in_use == 0
    assert guard.stats().leaks_reported == 1
    await asyncio.sleep(0.01)
    assert pool.get_size() - pool.get_idle_size() == 0
    async with guard.connection() as again:
        assert await again.fetchval("SELECT 2") == 2


async def test_health_probes_without_a_pool_slot(make_pool: Any, guards: Any) -> None:
    pool = await make_pool()
    guard = guards(pool)
    async with guard.connection(), guard.connection():
        report = await guard.ahealth(max_age=0)
    pool_health = report.to_dict()["pools"][0]
    assert report.status != "unavailable"
    assert pool_health["backend"] == "postgresql"
    assert pool_health["size"] == 2
    assert pool_health["checked_out"] == 2
    assert pool_health["ping_seconds"] is not None
    assert (await guard.ahealth()).status == "ok"


async def test_session_and_sync_use_fail_with_the_way_to_do_it(make_pool: Any, guards: Any) -> None:
    guard = guards(await make_pool())
    with pytest.raises(TypeError, match=r"asyncpg pool.*async with guard\.connection\(\) as conn"):
        guard.session()
    with pytest.raises(TypeError, match="'async with', not 'with'"), guard.connection():
        pass
    with pytest.raises(ConfigError, match=r"Guard\.session_factory.*connections, not sessions"):
        Guard(await make_pool(), session_factory=lambda: None)


async def test_one_guard_per_pool_and_close_lets_go(make_pool: Any) -> None:
    pool = await make_pool()
    connect = pool._connect
    guard = Guard(pool, probe_interval=None)
    with pytest.raises(ConfigError, match="no other Guard watches"):
        Guard(pool, probe_interval=None)
    guard.close()
    assert pool._connect is connect
    second = Guard(pool, probe_interval=None)
    second.close()


def test_guard_refuses_other_objects_naming_asyncpg_pools() -> None:
    with pytest.raises(ConfigError, match=r"an asyncpg\.Pool"):
        poolguard.Guard(object())


def test_a_guard_over_an_engine_never_loads_asyncpg() -> None:
    code = (
        "import sys, sqlalchemy, poolguard; "
        "guard = poolguard.Guard(sqlalchemy.create_engine('sqlite://'), probe_interval=None); guard.close(); "
        "poolguard.Guard; sys.exit(1 if 'asyncpg' in sys.modules else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code], timeout=60, check=False).returncode == 0


async def test_the_probe_connects_as_the_pool_does_and_is_not_a_pool_connection(make_pool: Any, guards: Any) -> None:
    calls: list[str] = []

    async def connect(*args: Any, **kwargs: Any) -> asyncpg.Connection:
        calls.append("connect")
        return await asyncpg.connect(*args, **kwargs)

    pool = await make_pool(connect=connect)
    guard = guards(pool)
    assert (await guard.ahealth(max_age=0)).status == "ok"
    assert calls == ["connect"]  # the pool's own connect function, with its arguments
    assert guard.stats().connections_created == 0
    assert pool.get_size() == 0


async def test_connections_held_outside_the_guard_bound_its_wait_with_pool_saturated(
    make_pool: Any, guards: Any
) -> None:
    """Admission counts the guard's own units only; asyncpg has no timeout of its own: a pool emptied by
    direct ``pool.acquire()`` calls must not leave a guarded unit waiting without end."""
    pool = await make_pool()
    guard = guards(pool, max_wait=0.3)
    outside = [await pool.acquire(), await pool.acquire()]
    try:
        started = time.monotonic()
        with pytest.raises(PoolSaturated, match="outside the guard") as raised:
            async with guard.connection():
                pass
        assert time.monotonic() - started < 1.0
        assert raised.value.reason == "pool_saturated"
        assert guard.breaker is not None
        assert guard.breaker.failure_rate == 0.0
        assert guard.stats().timeouts == 1
        assert guard.gate.admission.in_use == 0

        async def give_one_back() -> None:
            await asyncio.sleep(0.1)
            await pool.release(outside.pop())

        returning = asyncio.ensure_future(give_one_back())
        async with guard.connection() as conn:  # waits for the one coming back, within the budget
            assert await conn.fetchval("SELECT 1") == 1
        await returning
    finally:
        for connection in outside:
            await pool.release(connection)


async def test_a_release_after_a_bounded_wait_keeps_its_own_bound(make_pool: Any, guards: Any) -> None:
    """asyncpg keeps an acquire's timeout as its release's: the wait bounded because a connection was held
    outside the guard must not cut the release's reset at that budget (a TimeoutError, the connection lost)."""
    slow: list[bool] = []

    async def reset(connection: asyncpg.Connection) -> None:
        if slow:
            await asyncio.sleep(0.4)

    pool = await make_pool(max_size=1, reset=reset)
    guard = guards(pool, max_wait=0.3)
    outside = await pool.acquire()

    async def give_it_back() -> None:
        await asyncio.sleep(0.05)
        await pool.release(outside)

    returning = asyncio.ensure_future(give_it_back())
    async with guard.connection() as conn:  # none free: the wait is bounded by the budget
        pid = await conn.fetchval("SELECT pg_backend_pid()")
        slow.append(True)
    await returning
    slow.clear()
    assert pool.get_idle_size() == 1
    async with pool.acquire() as again:
        assert await again.fetchval("SELECT pg_backend_pid()") == pid  # reset and kept, not terminated
    assert guard.breaker is not None
    assert guard.breaker.failure_rate == 0.0


async def test_a_wait_in_admission_then_in_the_pool_shares_one_budget(make_pool: Any, guards: Any) -> None:
    """A unit that waited for its slot, then finds the connection taken by a direct ``pool.acquire()``, waits
    for the pool only what is left of its budget: the two waits together stay within ``max_wait``."""
    pool = await make_pool(max_size=1)
    guard = guards(pool, max_wait=1.0)
    outcome: list[tuple[str, float]] = []

    async def unit() -> None:
        started = time.monotonic()
        try:
            async with guard.connection():
                outcome.append(("served", time.monotonic() - started))
        except PoolSaturated:
            outcome.append(("saturated", time.monotonic() - started))

    async with guard.connection():
        waiting = asyncio.ensure_future(unit())
        await asyncio.sleep(0.6)  # the unit waits for the one slot
        assert guard.gate.admission.waiting == 1
    outside = await pool.acquire()  # the slot goes to the unit, the connection here first
    try:
        await waiting
    finally:
        await pool.release(outside)
    ((result, seconds),) = outcome
    assert result == "saturated"
    assert 0.9 < seconds < 1.4
