"""Connection URLs for the real servers the integration tests run against (trust auth, no password)."""

from __future__ import annotations

import pytest

from tests.support import databases


@pytest.fixture
def pg_url() -> str:
    """PostgreSQL through psycopg 3 (sync, and async with create_async_engine)."""
    return databases.PG_URL


@pytest.fixture
def pg_async_url() -> str:
    """PostgreSQL through asyncpg."""
    return databases.PG_ASYNC_URL


@pytest.fixture
def mysql_url() -> str:
    """MariaDB (MySQL protocol) through pymysql."""
    return databases.MARIADB_URL


# --- Guard fixtures (test_guard_*.py) -----------------------------------------------------------------

from collections.abc import AsyncIterator, Callable, Iterator  # noqa: E402
from typing import Any  # noqa: E402

import sqlalchemy  # noqa: E402
from sqlalchemy.ext.asyncio import AsyncEngine  # noqa: E402
from sqlalchemy.ext.asyncio import create_async_engine as sa_create_async_engine  # noqa: E402

import poolguard  # noqa: E402
from tests.support.clock import FakeClock, drive_the_watchdog  # noqa: E402


@pytest.fixture
def fake_clock() -> FakeClock:
    return FakeClock()


def _left_checked_out(engine: sqlalchemy.Engine) -> str | None:
    pool = engine.pool
    checked_out = pool.checkedout() if hasattr(pool, "checkedout") else 0
    return f"{engine.url.render_as_string()} has {checked_out} connection(s) checked out" if checked_out else None


@pytest.fixture
def make_sync_engine() -> Iterator[Callable[..., sqlalchemy.Engine]]:
    """sqlalchemy.create_engine; after the test: nothing checked out, then every engine disposed."""
    engines: list[sqlalchemy.Engine] = []

    def factory(url: str | sqlalchemy.URL, **kwargs: Any) -> sqlalchemy.Engine:
        engine = sqlalchemy.create_engine(url, **kwargs)
        engines.append(engine)
        return engine

    yield factory
    problems = [p for p in (_left_checked_out(e) for e in engines) if p]
    for engine in engines:
        engine.dispose()
    assert not problems, problems


@pytest.fixture
async def make_async_engine_sa() -> AsyncIterator[Callable[..., AsyncEngine]]:
    """sqlalchemy's create_async_engine; after the test: nothing checked out, then every engine disposed."""
    engines: list[AsyncEngine] = []

    def factory(url: str | sqlalchemy.URL, **kwargs: Any) -> AsyncEngine:
        engine = sa_create_async_engine(url, **kwargs)
        engines.append(engine)
        return engine

    yield factory
    problems = [p for p in (_left_checked_out(e.sync_engine) for e in engines) if p]
    for engine in engines:
        await engine.dispose()
    assert not problems, problems


def _guard_factory() -> tuple[Callable[..., poolguard.Guard], Callable[[], None]]:
    guards: list[poolguard.Guard] = []

    def factory(engine: Any, **kwargs: Any) -> poolguard.Guard:
        guard = poolguard.Guard(engine, **drive_the_watchdog(kwargs))
        guards.append(guard)
        return guard

    def finish() -> None:
        problems: list[str] = []
        for guard in guards:
            try:
                checked_out = guard.stats().checked_out
                if checked_out:
                    problems.append(f"guard {guard.name!r}: stats().checked_out == {checked_out}")
                problem = _left_checked_out(guard.pool.sync_engine)
                if problem:
                    problems.append(f"guard {guard.name!r}: {problem}")
            finally:
                guard.close()
        assert not problems, problems

    return factory, finish


@pytest.fixture
def make_guard(make_sync_engine: Any) -> Iterator[Callable[..., poolguard.Guard]]:
    """poolguard.Guard for a sync engine; after the test: no connection checked out, guard closed."""
    factory, finish = _guard_factory()
    yield factory
    finish()


@pytest.fixture
def make_async_guard(make_async_engine_sa: Any) -> Iterator[Callable[..., poolguard.Guard]]:
    """poolguard.Guard for an AsyncEngine; checked (and closed) before the engines are disposed."""
    factory, finish = _guard_factory()
    yield factory
    finish()
