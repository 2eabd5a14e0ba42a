"""Guard on AsyncEngines: asyncpg on the real PostgreSQL server, and aiosqlite on a file database."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy
from sqlalchemy import event, exc, text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession
from sqlalchemy.pool import NullPool

from poolguard import Breaker, BreakerState, CircuitOpen, Guard, PoolSaturated
from tests.integration.helpers import assert_nothing_checked_out, assert_shed_within_budget

pytestmark = pytest.mark.postgres

AsyncEngineFactory = Callable[..., AsyncEngine]
GuardFactory = Callable[..., Guard]


@pytest.fixture(params=["asyncpg", "aiosqlite"])
def async_url(request: pytest.FixtureRequest, pg_async_url: str, tmp_path: Path) -> str:
    return pg_async_url if request.param == "asyncpg" else f"sqlite+aiosqlite:///{tmp_path / 'guard.db'}"


@pytest.fixture
def engine(async_url: str, make_async_engine_sa: AsyncEngineFactory) -> AsyncEngine:
    engine = make_async_engine_sa(async_url, pool_size=2, max_overflow=0, pool_timeout=30)
    if engine.dialect.name == "sqlite":

        @event.listens_for(engine.sync_engine, "connect")
        def _foreign_keys_on(dbapi_connection: Any, record: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

    return engine


@pytest.fixture
def observer(async_url: str, make_async_engine_sa: AsyncEngineFactory) -> AsyncEngine:
    """An unguarded engine with its own connections, to see what was really committed."""
    return make_async_engine_sa(async_url, poolclass=NullPool)


@pytest.fixture
async def table(observer: AsyncEngine) -> AsyncIterator[str]:
    name = f"pg_guard_async_{uuid.uuid4().hex[:10]}"
    async with observer.begin() as connection:
        await connection.execute(
            text(
                f"CREATE TABLE {name} (id integer PRIMARY KEY, "
                f"parent integer REFERENCES {name}(id) DEFERRABLE INITIALLY DEFERRED)"
            )
        )
    yield name
    async with observer.begin() as connection:
        await connection.execute(text(f"DROP TABLE {name}"))


async def ids(observer: AsyncEngine, table: str) -> list[int]:
    async with observer.connect() as connection:
        result = await connection.execute(text(f"SELECT id FROM {table} ORDER BY id"))
        return list(result.scalars())


def insert(table: str, id_: int) -> Any:
    return text(f"INSERT INTO {table} (id) VALUES (:id)").bindparams(id=id_)


async def test_session_commits_on_success(
    make_async_guard: GuardFactory, engine: AsyncEngine, observer: AsyncEngine, table: str
):
    guard = make_async_guard(engine)
    async with guard.session() as session:
        assert isinstance(session, AsyncSession)
        await session.execute(insert(table, 1))
    assert await ids(observer, table) == [1]
    assert_nothing_checked_out(guard, engine)


async def test_session_rolls_back_when_the_body_raises(
    make_async_guard: GuardFactory, engine: AsyncEngine, observer: AsyncEngine, table: str
):
    guard = make_async_guard(engine)

    async def failing_unit() -> None:
        async with guard.session() as session:
            await session.execute(insert(table, 1))
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        await failing_unit()
    assert await ids(observer, table) == []
    assert_nothing_checked_out(guard, engine)


async def test_connection_commits_and_rolls_back(
    make_async_guard: GuardFactory, engine: AsyncEngine, observer: AsyncEngine, table: str
):
    guard = make_async_guard(engine)
    async with guard.connection() as connection:
        assert isinstance(connection, AsyncConnection)
        await connection.execute(insert(table, 1))

    async def failing_unit() -> None:
        async with guard.connection() as connection:
            await connection.execute(insert(table, 2))
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        await failing_unit()
    assert await ids(observer, table) == [1]
    assert_nothing_checked_out(guard, engine)


async def test_failing_commit_returns_a_clean_connection(
    make_async_guard: GuardFactory, engine: AsyncEngine, observer: AsyncEngine, table: str
):
    guard = make_async_guard(engine)
    bad = text(f"INSERT INTO {table} (id, parent) VALUES (1, 999)")  # deferred: only the COMMIT fails
    with pytest.raises(exc.IntegrityError):
        async with guard.session() as session:
            await session.execute(bad)
    assert_nothing_checked_out(guard, engine)
    with pytest.raises(exc.IntegrityError):
        async with guard.connection() as connection:
            await connection.execute(bad)
    assert_nothing_checked_out(guard, engine)
    for _ in range(2):  # the next borrowers must not inherit the failed unit's open transaction
        async with guard.connection() as connection:
            rows = await connection.execute(text(f"SELECT id FROM {table}"))
            assert list(rows.scalars()) == []
    assert await ids(observer, table) == []


async def test_integrity_errors_never_open_the_breaker(make_async_guard: GuardFactory, engine: AsyncEngine, table: str):
    guard = make_async_guard(engine, breaker=Breaker(consecutive_failures=3, window_size=10, minimum_calls=5))
    async with guard.session() as session:
        await session.execute(insert(table, 1))
    for _ in range(20):
        with pytest.raises(exc.IntegrityError):
            async with guard.session() as session:
                await session.execute(insert(table, 1))
    assert guard.breaker is not None
    assert guard.breaker.state is BreakerState.CLOSED
    assert guard.breaker.failure_rate == 0.0
    assert_nothing_checked_out(guard, engine)


async def test_request_scope_is_lazy_and_serves_static_routes_while_open(
    make_async_guard: GuardFactory, engine: AsyncEngine
):
    guard = make_async_guard(engine, breaker=Breaker(consecutive_failures=1, open_for=60.0))
    async with guard.request_scope(route="/about") as scope:
        scope.session  # noqa: B018 - created, never used
    assert guard.stats().checkouts == 0
    assert guard.breaker is not None
    guard.breaker.record_failure(0.0)
    assert guard.breaker.state is BreakerState.OPEN
    async with guard.request_scope(route="/about"):
        pass
    started = time.monotonic()
    with pytest.raises(CircuitOpen) as raised:
        async with guard.request_scope(route="/orders") as scope:
            await scope.session.execute(text("SELECT 1"))
    assert time.monotonic() - started < 0.05
    assert raised.value.retry_after > 0
    assert guard.stats().checkouts == 0
    assert_nothing_checked_out(guard, engine)


async def test_saturated_pool_sheds_within_max_wait_and_keeps_the_breaker_closed(
    make_async_guard: GuardFactory, make_async_engine_sa: AsyncEngineFactory, pg_async_url: str
):
    engine = make_async_engine_sa(pg_async_url, pool_size=2, max_overflow=0, pool_timeout=30)
    guard = make_async_guard(engine, max_wait=0.5)

    async def request() -> tuple[str, float, BaseException | None]:
        started = time.monotonic()
        try:
            async with guard.request_scope(route="/slow") as scope:
                await scope.session.execute(text("SELECT pg_sleep(0.3)"))
        except PoolSaturated as error:
            return ("saturated", time.monotonic() - started, error)
        except Exception as error:
            return ("error", time.monotonic() - started, error)
        return ("ok", time.monotonic() - started, None)

    results = await asyncio.wait_for(asyncio.gather(*(request() for _ in range(20))), 45)

    assert_shed_within_budget(results, guard, engine)


async def test_cancelled_task_gives_its_connection_back(
    make_async_guard: GuardFactory, make_async_engine_sa: AsyncEngineFactory, pg_async_url: str
):
    engine = make_async_engine_sa(pg_async_url, pool_size=2, max_overflow=0, pool_timeout=30)
    guard = make_async_guard(engine)
    started = asyncio.Event()

    async def slow_request() -> None:
        async with guard.session() as session:
            started.set()
            await session.execute(text("SELECT pg_sleep(5)"))

    task = asyncio.create_task(slow_request())
    await asyncio.wait_for(started.wait(), 5)
    await asyncio.sleep(0.2)
    assert engine.sync_engine.pool.checkedout() == 1  # type: ignore[attr-defined]
    cancelled_at = time.monotonic()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert time.monotonic() - cancelled_at < 2.0
    assert_nothing_checked_out(guard, engine)
    for _ in range(3):  # the pool still serves, on either of its connections
        async with guard.session() as session:
            assert (await session.execute(text("SELECT 1"))).scalar() == 1
    assert guard.breaker is not None
    assert guard.breaker.state is BreakerState.CLOSED
    assert_nothing_checked_out(guard, engine)


async def test_connection_left_at_the_end_of_a_request_is_closed(
    make_async_guard: GuardFactory, engine: AsyncEngine, caplog: pytest.LogCaptureFixture
):
    caplog.set_level("WARNING", logger="poolguard")
    guard = make_async_guard(engine)
    async with guard.request_scope(route="/forgetful"):
        forgotten = await engine.connect()
        await forgotten.execute(text("SELECT 1"))
    assert_nothing_checked_out(guard, engine)
    assert any("/forgetful" in record.getMessage() for record in caplog.records)
    await forgotten.close()
    async with guard.session() as session:
        assert (await session.execute(text("SELECT 1"))).scalar() == 1


async def test_ahealth_is_ok_with_a_ping(make_async_guard: GuardFactory, engine: AsyncEngine):
    guard = make_async_guard(engine)
    report = await guard.ahealth()
    assert report.status == "ok"
    assert report.http_status == 200
    [pool] = report.to_dict()["pools"]
    assert isinstance(pool["ping_seconds"], float)
    assert pool["ping_seconds"] > 0
    assert pool["backend"] == engine.dialect.name
    assert pool["breaker"]["state"] == "closed"
    assert_nothing_checked_out(guard, engine)


def test_sync_health_on_an_async_engine_probes_on_a_loop_of_its_own(
    make_async_guard: GuardFactory, engine: AsyncEngine
):
    guard = make_async_guard(engine)
    pool = guard.health().to_dict()["pools"][0]
    assert pool["status"] == "ok"
    assert pool["ping_seconds"] is not None
    without_ping = guard.health(ping=False)
    assert without_ping.to_dict()["pools"][0]["ping_seconds"] is None


async def test_sync_blocks_on_an_async_engine_are_refused(make_async_guard: GuardFactory, engine: AsyncEngine):
    guard = make_async_guard(engine)
    with pytest.raises(TypeError, match="async with"), guard.session():
        pass
    with pytest.raises(TypeError, match="async with"), guard.connection():
        pass
    assert isinstance(engine.sync_engine, sqlalchemy.Engine)
