"""create_engine / create_async_engine against real PostgreSQL, MariaDB and SQLite (no mocks)."""

from __future__ import annotations

import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy
from sqlalchemy import exc, pool, text
from sqlalchemy.ext.asyncio import AsyncEngine

import poolguard.engine as pg_engine
from poolguard.engine import CLIENT_MARGIN
from poolguard.errors import ConfigError
from poolguard.pools import TCP_TIMEOUT
from tests.support import databases

EngineFactory = Callable[..., sqlalchemy.Engine]
AsyncEngineFactory = Callable[..., AsyncEngine]


@pytest.fixture
def make_engine() -> Iterator[EngineFactory]:
    """poolguard.engine.create_engine, with every engine disposed after the test."""
    engines: list[sqlalchemy.Engine] = []

    def factory(*args: Any, **kwargs: Any) -> sqlalchemy.Engine:
        engine = pg_engine.create_engine(*args, **kwargs)
        engines.append(engine)
        return engine

    yield factory
    for engine in engines:
        engine.dispose()


@pytest.fixture
async def make_async_engine() -> AsyncIterator[AsyncEngineFactory]:
    engines: list[AsyncEngine] = []

    def factory(*args: Any, **kwargs: Any) -> AsyncEngine:
        engine = pg_engine.create_async_engine(*args, **kwargs)
        engines.append(engine)
        return engine

    yield factory
    for engine in engines:
        await engine.dispose()


@pytest.fixture
def silent_server() -> Iterator[int]:
    """A port that completes the TCP handshake but never answers: what a hung server looks like."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        yield listener.getsockname()[1]


def _max_overflow(p: pool.Pool) -> int:
    assert isinstance(p, pool.QueuePool)
    return p._max_overflow


# --- PostgreSQL, psycopg ---------------------------------------------------------------------------


@pytest.mark.postgres
def test_psycopg_session_gets_service_name_and_statement_timeout(make_engine: EngineFactory, pg_url: str):
    engine = make_engine(pg_url, service_name="orders", workers=4, statement_timeout=2.5)
    with engine.connect() as conn:
        assert conn.scalar(text("SHOW statement_timeout")) == "2500ms"
        assert conn.scalar(text("SELECT current_setting('application_name')")) == "orders"
    assert isinstance(engine.pool, pool.QueuePool)
    assert engine.pool.size() == 4
    assert _max_overflow(engine.pool) == 2
    assert engine.pool.timeout() == 5.0
    assert engine.pool._pre_ping is True
    assert engine.pool._recycle == 1800.0


@pytest.mark.postgres
def test_psycopg_reads_on_a_silent_server_are_bounded_by_tcp_timeouts(make_engine: EngineFactory, pg_url: str):
    engine = make_engine(pg_url)
    with engine.connect() as conn:
        raw: Any = conn.connection.driver_connection
        parameters = raw.info.get_parameters()
    assert parameters["tcp_user_timeout"] == str(round(TCP_TIMEOUT * 1000))
    assert parameters["keepalives"] == "1"
    assert parameters["keepalives_idle"] == str(round(TCP_TIMEOUT))


@pytest.mark.postgres
def test_psycopg_statement_timeout_cancels_runaway_query(make_engine: EngineFactory, pg_url: str):
    engine = make_engine(pg_url, statement_timeout=0.2)
    with engine.connect() as conn, pytest.raises(exc.OperationalError, match="statement timeout"):
        conn.execute(text("SELECT pg_sleep(2)"))


@pytest.mark.postgres
def test_statement_timeout_none_leaves_server_default(make_engine: EngineFactory, pg_url: str):
    engine = make_engine(pg_url, statement_timeout=None)
    with engine.connect() as conn:
        assert conn.scalar(text("SHOW statement_timeout")) == "0"


@pytest.mark.postgres
def test_default_pool_sizing(make_engine: EngineFactory, pg_url: str):
    engine = make_engine(pg_url)
    assert engine.pool.size() == 5
    assert _max_overflow(engine.pool) == 2


@pytest.mark.postgres
def test_explicit_pool_sizing_wins(make_engine: EngineFactory, pg_url: str):
    engine = make_engine(pg_url, workers=10, pool_size=3, max_overflow=0, pool_timeout=0.5)
    assert engine.pool.size() == 3
    assert _max_overflow(engine.pool) == 0
    assert engine.pool.timeout() == 0.5


@pytest.mark.postgres
def test_user_connect_args_and_url_query_win(make_engine: EngineFactory, pg_url: str):
    from_args = make_engine(pg_url, service_name="orders", connect_args={"application_name": "mine"})
    from_query = make_engine(pg_url + "?application_name=fromurl", service_name="orders")
    for engine, expected in [(from_args, "mine"), (from_query, "fromurl")]:
        with engine.connect() as conn:
            assert conn.scalar(text("SELECT current_setting('application_name')")) == expected
            assert conn.scalar(text("SHOW statement_timeout")) == "30s"


@pytest.mark.postgres
def test_pgbouncer_turns_off_psycopg_prepares_and_startup_options(make_engine: EngineFactory, pg_url: str):
    engine = make_engine(pg_url, service_name="orders", workers=8, pgbouncer=True)
    assert engine.pool.size() == pg_engine.PGBOUNCER_POOL_SIZE
    assert _max_overflow(engine.pool) == 8 - pg_engine.PGBOUNCER_POOL_SIZE
    with engine.connect() as conn:
        raw = conn.connection.driver_connection
        assert raw is not None
        assert raw.prepare_threshold is None
        # Not sent as a startup option, which PgBouncer would reject.
        assert conn.scalar(text("SHOW statement_timeout")) == "0"
        assert conn.scalar(text("SELECT current_setting('application_name')")) == "orders"


@pytest.mark.postgres
async def test_psycopg_async_engine(make_async_engine: AsyncEngineFactory, pg_url: str):
    engine = make_async_engine(pg_url, service_name="orders-async", statement_timeout=1)
    async with engine.connect() as conn:
        assert await conn.scalar(text("SHOW statement_timeout")) == "1s"
        assert await conn.scalar(text("SELECT current_setting('application_name')")) == "orders-async"
    assert isinstance(engine.pool, pool.AsyncAdaptedQueuePool)


# --- PostgreSQL, asyncpg ---------------------------------------------------------------------------


@pytest.mark.postgres
async def test_asyncpg_session_gets_service_name_and_statement_timeout(
    make_async_engine: AsyncEngineFactory, pg_async_url: str
):
    engine = make_async_engine(pg_async_url, service_name="orders", workers=6, statement_timeout=3)
    async with engine.connect() as conn:
        assert await conn.scalar(text("SHOW statement_timeout")) == "3s"
        assert await conn.scalar(text("SELECT current_setting('application_name')")) == "orders"
        raw: Any = (await conn.get_raw_connection()).driver_connection
        assert raw._config.command_timeout == 3 + CLIENT_MARGIN  # asyncpg has no TCP timeouts: it bounds reads
    assert isinstance(engine.pool, pool.AsyncAdaptedQueuePool)
    assert engine.pool.size() == 6
    assert _max_overflow(engine.pool) == 3
    assert engine.pool._pre_ping is True


@pytest.mark.postgres
async def test_asyncpg_server_settings_are_merged(make_async_engine: AsyncEngineFactory, pg_async_url: str):
    engine = make_async_engine(
        pg_async_url, service_name="orders", connect_args={"server_settings": {"search_path": "public"}}
    )
    async with engine.connect() as conn:
        assert await conn.scalar(text("SHOW search_path")) == "public"
        assert await conn.scalar(text("SELECT current_setting('application_name')")) == "orders"


@pytest.mark.postgres
async def test_pgbouncer_turns_off_asyncpg_statement_caches(make_async_engine: AsyncEngineFactory, pg_async_url: str):
    engine = make_async_engine(pg_async_url, pgbouncer=True)
    assert engine.pool.size() == pg_engine.PGBOUNCER_POOL_SIZE
    async with engine.connect() as conn:
        raw = await conn.get_raw_connection()
        adapted: Any = raw.dbapi_connection
        assert adapted._prepared_statement_cache is None  # SQLAlchemy's cache
        assert adapted._connection._stmt_cache.get_max_size() == 0  # asyncpg's own
        assert adapted._prepared_statement_name_func().startswith("__poolguard_")
        assert await conn.scalar(text("SHOW statement_timeout")) == "0"
        assert await conn.scalar(text("SELECT 1")) == 1


# --- MariaDB, pymysql ------------------------------------------------------------------------------


@pytest.mark.mariadb
def test_mariadb_session_gets_statement_timeout_and_program_name(make_engine: EngineFactory, mysql_url: str):
    engine = make_engine(mysql_url, service_name="orders", workers=2, statement_timeout=2.5)
    with engine.connect() as conn:
        assert float(conn.scalar(text("SELECT @@SESSION.max_statement_time"))) == 2.5
        raw: Any = conn.connection.driver_connection
        assert raw._connect_attrs["program_name"] == "orders"
        assert raw.connect_timeout == 2.0
        assert raw._read_timeout == raw._write_timeout == 2.5 + CLIENT_MARGIN
    assert engine.pool.size() == 2
    assert _max_overflow(engine.pool) == 1


@pytest.mark.mariadb
def test_mariadb_statement_timeout_survives_reconnect(make_engine: EngineFactory, mysql_url: str):
    engine = make_engine(mysql_url, statement_timeout=4)
    engine.dispose()
    with engine.connect() as conn:
        assert float(conn.scalar(text("SELECT @@SESSION.max_statement_time"))) == 4.0


# --- SQLite ----------------------------------------------------------------------------------------


def test_sqlite_memory(make_engine: EngineFactory):
    engine = make_engine("sqlite://", service_name="orders", workers=8)
    assert isinstance(engine.pool, pool.SingletonThreadPool)
    with engine.connect() as conn:
        assert conn.scalar(text("SELECT 1")) == 1


def test_sqlite_file(make_engine: EngineFactory, tmp_path: Path):
    engine = make_engine(f"sqlite:///{tmp_path / 'db.sqlite'}", workers=3, statement_timeout=1)
    assert isinstance(engine.pool, pool.QueuePool)
    assert engine.pool.size() == 3
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE t (x INTEGER)"))
        conn.execute(text("INSERT INTO t VALUES (1)"))
    with engine.connect() as conn:
        assert conn.scalar(text("SELECT x FROM t")) == 1


def test_explicit_nullpool_gets_no_sizing(make_engine: EngineFactory, tmp_path: Path):
    engine = make_engine(f"sqlite:///{tmp_path / 'db.sqlite'}", poolclass=pool.NullPool, workers=3)
    assert isinstance(engine.pool, pool.NullPool)
    with engine.connect() as conn:
        assert conn.scalar(text("SELECT 1")) == 1


async def test_aiosqlite_memory(make_async_engine: AsyncEngineFactory):
    engine = make_async_engine("sqlite+aiosqlite://", workers=8)
    assert isinstance(engine.pool, pool.StaticPool)
    async with engine.connect() as conn:
        assert await conn.scalar(text("SELECT 1")) == 1


# --- Unreachable servers fail fast ------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [databases.pg_url(port=databases.DEAD_PORT), databases.mariadb_url(port=databases.DEAD_PORT)],
    ids=["postgresql+psycopg", "mysql+pymysql"],
)
def test_refused_connection_fails_fast(make_engine: EngineFactory, url: str):
    engine = make_engine(url, connect_timeout=1)
    start = time.monotonic()
    with pytest.raises(exc.OperationalError):
        engine.connect()
    assert time.monotonic() - start < 3


def test_psycopg_silent_server_fails_within_connect_timeout(make_engine: EngineFactory, silent_server: int):
    # pymysql is left out on purpose: its connect_timeout covers the TCP connect only (see engine.py).
    engine = make_engine(databases.pg_url(port=silent_server), connect_timeout=1)
    start = time.monotonic()
    with pytest.raises(exc.OperationalError):
        engine.connect()
    assert time.monotonic() - start < 4  # libpq rounds connect_timeout up to at least 2 s


async def test_asyncpg_silent_server_fails_within_connect_timeout(
    make_async_engine: AsyncEngineFactory, silent_server: int
):
    engine = make_async_engine(databases.pg_url("asyncpg", port=silent_server), connect_timeout=1)
    start = time.monotonic()
    with pytest.raises((TimeoutError, exc.OperationalError)):
        await engine.connect()
    assert time.monotonic() - start < 3


# --- Validation ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("service_name", ""),
        ("service_name", "x" * 64),
        ("service_name", "caf\u00e9"),
        ("service_name", 3),
        ("workers", 0),
        ("workers", 2.5),
        ("workers", True),
        ("pool_size", 0),
        ("max_overflow", -1),
        ("pool_timeout", 0),
        ("pool_timeout", float("inf")),
        ("pool_recycle", -1),
        ("pool_pre_ping", "yes"),
        ("connect_timeout", 0),
        ("connect_timeout", float("nan")),
        ("statement_timeout", 0),
        ("statement_timeout", 10**9),
        ("pgbouncer", 1),
        ("connect_args", ["not", "a", "mapping"]),
    ],
)
def test_bad_option_names_it(pg_url: str, option: str, value: object):
    with pytest.raises(ConfigError, match="accepted: ") as info:
        pg_engine.create_engine(pg_url, **{option: value})
    assert info.value.setting == f"create_engine.{option}"
    assert f"create_engine.{option}" in str(info.value)


def test_async_errors_name_the_async_constructor(pg_async_url: str):
    with pytest.raises(ConfigError) as info:
        pg_engine.create_async_engine(pg_async_url, pool_size=-3)
    assert info.value.setting == "create_async_engine.pool_size"


def test_pgbouncer_needs_postgresql():
    with pytest.raises(ConfigError) as info:
        pg_engine.create_engine("sqlite://", pgbouncer=True)
    assert info.value.setting == "create_engine.pgbouncer"


def test_driver_must_match_sync_or_async(pg_url: str, pg_async_url: str, mysql_url: str):
    with pytest.raises(ConfigError, match="create_async_engine") as info:
        pg_engine.create_engine(pg_async_url)
    assert info.value.setting == "create_engine.url"
    with pytest.raises(ConfigError) as info:
        pg_engine.create_async_engine(mysql_url)
    assert info.value.setting == "create_async_engine.url"


@pytest.mark.parametrize(
    "url",
    [
        "postgresql+psycopg://app:s3cret@db.internal:notaport/test",
        "nosuchdialect://app:s3cret@db.internal/test",
        "not a url s3cret",
        b"postgresql://app:s3cret@db/test",
    ],
)
def test_url_errors_never_show_the_password(url: object):
    with pytest.raises(ConfigError) as info:
        pg_engine.create_engine(url)  # type: ignore[arg-type]
    assert info.value.setting == "create_engine.url"
    assert "s3cret" not in str(info.value)
    assert "s3cret" not in repr(info.value.value)


def test_option_errors_never_show_the_password():
    with pytest.raises(ConfigError) as info:
        pg_engine.create_engine("postgresql+psycopg://app:s3cret@db.internal/test", workers=0)
    assert "s3cret" not in str(info.value)


def test_bound_parameters_stay_out_of_error_messages(pg_url):
    engine = pg_engine.create_engine(pg_url)
    try:
        with engine.connect() as connection, pytest.raises(sqlalchemy.exc.DataError) as raised:
            connection.execute(sqlalchemy.text("SELECT CAST(:secret AS text), 1 / 0"), {"secret": "hunter2"})
        assert "division by zero" in str(raised.value)
        assert "hunter2" not in str(raised.value)
    finally:
        engine.dispose()


# --- Pooler detection on a direct server (through PgBouncer: tests/faults/test_pooler.py) -----------


@pytest.mark.postgres
def test_direct_postgresql_is_no_pooler_and_keeps_everything(make_engine: EngineFactory, pg_url: str):
    import poolguard  # noqa: PLC0415

    engine = make_engine(pg_url, statement_timeout=2)
    guard = poolguard.Guard(engine)
    try:
        with guard.session() as session:
            assert session.execute(text("SHOW statement_timeout")).scalar() == "2s"
            raw: Any = session.connection().connection.driver_connection
            assert raw.prepare_threshold == 5  # psycopg's default: prepared statements stay on
        assert guard.health().to_dict()["pools"][0]["pooler"] is None
    finally:
        guard.close()


@pytest.mark.postgres
async def test_direct_postgresql_keeps_asyncpg_statement_caches(
    make_async_engine: AsyncEngineFactory, pg_async_url: str
):
    engine = make_async_engine(pg_async_url, statement_timeout=2)
    async with engine.connect() as conn:
        assert await conn.scalar(text("SHOW statement_timeout")) == "2s"
        adapted: Any = (await conn.get_raw_connection()).dbapi_connection
        assert adapted._prepared_statement_cache is not None
        assert adapted._connection._stmt_cache.get_max_size() == 100


def test_pgbouncer_none_detects_and_rejects_other_values(pg_url: str):
    for value in (1, "auto"):
        with pytest.raises(ConfigError, match="None") as info:
            pg_engine.create_engine(pg_url, pgbouncer=value)
        assert info.value.setting == "create_engine.pgbouncer"
    pg_engine.create_engine("sqlite://", pgbouncer=None).dispose()  # nothing to detect there, and no error


def test_what_the_user_says_is_shown_before_any_connection():
    import poolguard  # noqa: PLC0415

    for told, shown in ((True, "pgbouncer"), (False, None), (None, None)):
        engine = pg_engine.create_engine(databases.pg_url(port=databases.DEAD_PORT), pgbouncer=told)
        guard = poolguard.Guard(engine)
        try:
            assert guard.health(ping=False).to_dict()["pools"][0]["pooler"] == shown
        finally:
            guard.close()
            engine.dispose()
