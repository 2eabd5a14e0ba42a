"""PgBouncer in transaction mode found without ``pgbouncer=True``: engines with poolguard's defaults work there.

Two PgBouncers in front of the private cluster: one as installed (it refuses the ``options`` and
``statement_timeout`` startup parameters: "unsupported startup parameter") and the fault suite's,
which ignores them (so only its cancel key gives it away). Both pool 4 server connections in
transaction mode, and 8 client connections share them, so a prepared statement breaks there.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import time
from typing import Any

import asyncpg
import psycopg
import pytest
import sqlalchemy
from sqlalchemy import event, exc, text

import poolguard
from poolguard import BreakerState, _pooler
from tests.faults.helpers import SECRET, Fleet
from tests.support.clock import FakeClock
from tests.support.pgcluster import DATABASE, HOST, PgBouncer, PgCluster
from tests.support.tcpproxy import TcpProxy

pytestmark = pytest.mark.postgres

DETECTED = "is reached through a connection pooler"
QUERY = text("SELECT CAST(:n AS int) + CAST(:i AS int)")
ROUNDS = 8  # past psycopg's prepare_threshold (5): prepared statements would break from the 6th on
TASKS = 16


@pytest.fixture(params=["refusing", "ignoring"])
def pooler(request: pytest.FixtureRequest) -> tuple[PgBouncer, str]:
    """A PgBouncer in transaction mode, and the kind health must show for it."""
    if request.param == "refusing":
        return request.getfixturevalue("default_bouncer"), _pooler.PGBOUNCER
    return request.getfixturevalue("bouncer"), _pooler.UNIDENTIFIED


def detections(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [record.getMessage() for record in caplog.records if DETECTED in record.getMessage()]


def run_sync(guard: poolguard.Guard) -> list[int]:
    def work(n: int) -> int:
        total = 0
        for i in range(ROUNDS):
            with guard.session() as session:
                total += session.execute(QUERY, {"n": n, "i": i}).scalar_one()
        return total

    with concurrent.futures.ThreadPoolExecutor(8) as threads:
        return list(threads.map(work, range(TASKS)))


async def run_async(guard: poolguard.Guard) -> list[int]:
    async def work(n: int) -> int:
        total = 0
        for i in range(ROUNDS):
            async with guard.session() as session:
                total += (await session.execute(QUERY, {"n": n, "i": i})).scalar_one()
        return total

    return list(await asyncio.gather(*(work(n) for n in range(TASKS))))


EXPECTED = [ROUNDS * n + ROUNDS * (ROUNDS - 1) // 2 for n in range(TASKS)]


async def run_asyncpg(acquire: Any) -> list[int]:
    """TASKS tasks, each ROUNDS parameterised queries, a connection from ``acquire()`` (an async context) each."""

    async def work(n: int) -> int:
        total = 0
        for i in range(ROUNDS):
            async with acquire() as connection:
                total += await connection.fetchval("SELECT $1::int + $2::int", n, i)
        return total

    return list(await asyncio.gather(*(work(n) for n in range(TASKS))))


def test_sync_engine_with_defaults_works_through_pgbouncer(
    pooler: tuple[PgBouncer, str], fleet: Fleet, caplog: pytest.LogCaptureFixture
) -> None:
    bouncer, kind = pooler
    guard = fleet.guard(fleet.engine(bouncer.url("psycopg", password=SECRET), service_name="orders", workers=8))
    with guard.session() as session:  # the first request
        assert session.execute(text("SELECT 1")).scalar() == 1
    assert run_sync(guard) == EXPECTED
    assert guard.breaker is not None
    assert guard.breaker.state is BreakerState.CLOSED
    report = guard.health().to_dict()
    assert report["pools"][0]["pooler"] == kind
    assert report["status"] == "ok"
    (line,) = detections(caplog)
    assert f"{HOST}:{bouncer.port}/{DATABASE}" in line
    assert kind in line
    with guard.session() as session:
        raw: Any = session.connection().connection.driver_connection
        assert raw.prepare_threshold is None
        assert session.execute(text("SELECT current_setting('application_name')")).scalar() == "orders"


def test_psycopg2_engine_with_defaults_works_through_pgbouncer(
    pooler: tuple[PgBouncer, str], fleet: Fleet, caplog: pytest.LogCaptureFixture
) -> None:
    """psycopg2 prepares nothing server-side; what PgBouncer refuses there is the ``options`` startup parameter."""
    bouncer, kind = pooler
    engine = fleet.engine(bouncer.url("psycopg2", password=SECRET), service_name="orders", workers=8)
    guard = fleet.guard(engine)
    assert run_sync(guard) == EXPECTED
    assert guard.breaker is not None
    assert guard.breaker.state is BreakerState.CLOSED
    assert guard.health().to_dict()["pools"][0]["pooler"] == kind
    assert len(detections(caplog)) == 1
    with guard.session() as session:
        assert session.execute(text("SELECT current_setting('application_name')")).scalar() == "orders"


def test_psycopg2_engine_made_elsewhere_is_reported(bouncer: PgBouncer, fleet: Fleet) -> None:
    guard = fleet.guard(fleet.engine(bouncer.url("psycopg2"), guarded=False))
    with guard.session() as session:
        session.execute(text("SELECT 1"))
    assert guard.health().to_dict()["pools"][0]["pooler"] == _pooler.UNIDENTIFIED


@pytest.mark.parametrize("driver", ["psycopg_async", "asyncpg"])
async def test_async_engine_with_defaults_works_through_pgbouncer(
    driver: str, pooler: tuple[PgBouncer, str], fleet: Fleet, caplog: pytest.LogCaptureFixture
) -> None:
    bouncer, kind = pooler
    guard = fleet.guard(fleet.async_engine(bouncer.url(driver, password=SECRET), workers=8))
    async with guard.session() as session:
        assert (await session.execute(text("SELECT 1"))).scalar() == 1
    assert await run_async(guard) == EXPECTED
    assert guard.breaker is not None
    assert guard.breaker.state is BreakerState.CLOSED
    assert (await guard.ahealth()).to_dict()["pools"][0]["pooler"] == kind
    assert len(detections(caplog)) == 1


def test_without_detection_prepared_statements_break_there(bouncer: PgBouncer, fleet: Fleet) -> None:
    """What the tests above would meet without detection (so they can fail): the hazard is real."""
    guard = fleet.guard(fleet.engine(bouncer.url("psycopg", password=SECRET), pgbouncer=False, workers=8))
    with pytest.raises(exc.DBAPIError, match="prepared statement"):
        run_sync(guard)


def test_pgbouncer_false_sends_the_startup_parameter_and_fails_there(
    default_bouncer: PgBouncer, fleet: Fleet, caplog: pytest.LogCaptureFixture
) -> None:
    url = default_bouncer.url("psycopg", password=SECRET)
    guard = fleet.guard(fleet.engine(url, pgbouncer=False), clock=FakeClock())
    for _ in range(5):
        with pytest.raises(exc.OperationalError, match="unsupported startup parameter: options"), guard.session() as s:
            s.execute(text("SELECT 1"))
    assert guard.breaker is not None
    assert guard.breaker.state is BreakerState.OPEN
    assert guard.health(ping=False).to_dict()["pools"][0]["pooler"] is None
    assert not detections(caplog)


def test_explicit_connect_args_win_behind_a_pooler(default_bouncer: PgBouncer, fleet: Fleet) -> None:
    # e.g. PgBouncer 1.21+ with max_prepared_statements on: the user keeps psycopg's prepares.
    engine = fleet.engine(default_bouncer.url("psycopg", password=SECRET), connect_args={"prepare_threshold": 7})
    with engine.connect() as connection:
        raw: Any = connection.connection.driver_connection
        assert raw.prepare_threshold == 7
        assert connection.execute(text("SHOW statement_timeout")).scalar() == "0"
    assert poolguard.Guard(engine).health(ping=False).pools[0].pooler == _pooler.PGBOUNCER


async def test_explicit_asyncpg_cache_wins_behind_a_pooler(default_bouncer: PgBouncer, fleet: Fleet) -> None:
    engine = fleet.async_engine(default_bouncer.url("asyncpg"), connect_args={"statement_cache_size": 50})
    async with engine.connect() as connection:
        raw: Any = (await connection.get_raw_connection()).driver_connection
        assert raw._stmt_cache.get_max_size() == 50


def test_the_users_own_startup_parameter_is_never_dropped(default_bouncer: PgBouncer, fleet: Fleet) -> None:
    """Only poolguard's own startup parameters are retried without; the user's stand, and PgBouncer says no."""
    engine = fleet.engine(default_bouncer.url("psycopg"), connect_args={"options": "-c search_path=public"})
    with pytest.raises(exc.OperationalError, match="unsupported startup parameter: options"):
        engine.connect()
    assert poolguard.Guard(engine).health(ping=False).pools[0].pooler is None


def test_an_engine_made_elsewhere_is_reported(
    bouncer: PgBouncer, fleet: Fleet, caplog: pytest.LogCaptureFixture
) -> None:
    """Guard(plain sqlalchemy engine): the pooler shows in health; nothing about the engine changes."""
    engine = fleet.engine(bouncer.url("psycopg"), guarded=False, connect_args={"prepare_threshold": None})
    guard = fleet.guard(engine)
    with guard.session() as session:
        session.execute(text("SELECT 1"))
        raw: Any = session.connection().connection.driver_connection
        assert raw.prepare_threshold is None
    assert guard.health().to_dict()["pools"][0]["pooler"] == _pooler.UNIDENTIFIED
    (line,) = detections(caplog)
    assert "poolguard.create_engine" in line


def test_a_creator_bypasses_detection_which_then_only_reports(bouncer: PgBouncer, fleet: Fleet) -> None:
    conninfo = f"host={HOST} port={bouncer.port} dbname={DATABASE} user=app"
    engine = fleet.engine(bouncer.url("psycopg"), creator=lambda: psycopg.connect(conninfo))
    guard = fleet.guard(engine)
    with guard.session() as session:
        session.execute(text("SELECT 1"))
        raw: Any = session.connection().connection.driver_connection
        assert raw.prepare_threshold == 5  # the creator's connection, as it made it
    assert guard.health().to_dict()["pools"][0]["pooler"] == _pooler.UNIDENTIFIED


@pytest.mark.parametrize("driver", ["psycopg", "psycopg2"])
def test_the_private_cluster_direct_is_no_pooler(driver: str, cluster: PgCluster, fleet: Fleet) -> None:
    guard = fleet.guard(fleet.engine(cluster.url(driver, password=SECRET), statement_timeout=4))
    with guard.session() as session:
        assert session.execute(text("SHOW statement_timeout")).scalar() == "4s"
    assert guard.health().to_dict()["pools"][0]["pooler"] is None


# --- the asyncpg pool's hook (create_asyncpg_pool wires it the same way) ---------------------------


@pytest.fixture
def asyncpg_kwargs() -> tuple[dict[str, Any], dict[str, Any]]:
    """Connect kwargs without and with a pooler in front, as an asyncpg pool factory computes them."""
    direct = {"server_settings": {"application_name": "orders", "statement_timeout": "30000"}}
    pooled = {"server_settings": {"application_name": "orders"}, "statement_cache_size": 0}
    return direct, pooled


@pytest.mark.parametrize("where", ["refusing", "ignoring", "direct"])
async def test_asyncpg_pool_connect_hook(
    where: str, request: pytest.FixtureRequest, asyncpg_kwargs: tuple[dict[str, Any], dict[str, Any]]
) -> None:
    server: PgBouncer | PgCluster = request.getfixturevalue(
        {"refusing": "default_bouncer", "ignoring": "bouncer", "direct": "cluster"}[where]
    )
    direct, pooled = asyncpg_kwargs
    pooler = _pooler.Pooler(_pooler.target(HOST, server.port, DATABASE))
    connect = _pooler.AsyncpgConnect(pooler, asyncpg.connect, direct, pooled)
    dsn = f"postgresql://app@{HOST}:{server.port}/{DATABASE}"
    async with asyncpg.create_pool(dsn, connect=connect, min_size=0, max_size=8, **direct) as pool:
        assert pool._connect is connect  # where a Guard over the pool finds the answer

        assert await run_asyncpg(pool.acquire) == EXPECTED
        async with pool.acquire() as connection:
            timeout = await connection.fetchval("SHOW statement_timeout")
    assert pooler.decided
    assert pooler.kind == {"refusing": _pooler.PGBOUNCER, "ignoring": _pooler.UNIDENTIFIED, "direct": None}[where]
    assert timeout == ("30s" if where == "direct" else "0")


def test_the_pid_check_is_one_plain_query(bouncer: PgBouncer, cluster: PgCluster) -> None:
    """Nothing prepared (a statement left on a pooled server connection would meet the next client), no
    transaction left open; the server compares, through the pooler and directly."""

    async def check(port: int) -> tuple[bool, int]:
        connection = await asyncpg.connect(f"postgresql://app@{HOST}:{port}/{DATABASE}", statement_cache_size=0)
        try:
            same = await _pooler.asyncpg_same_backend(connection, connection.get_server_pid())
            return same, await connection.fetchval("SELECT count(*) FROM pg_prepared_statements")
        finally:
            await connection.close()

    assert asyncio.run(check(bouncer.port)) == (False, 0)
    assert asyncio.run(check(cluster.port)) == (True, 0)
    for port, same in ((bouncer.port, False), (cluster.port, True)):
        with psycopg.connect(f"host={HOST} port={port} dbname={DATABASE} user=app") as connection:
            assert _pooler.dbapi_same_backend(connection, connection.info.backend_pid) is same
            assert connection.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
            assert not connection.autocommit


def test_a_plain_engine_is_checked_once(cluster: PgCluster, monkeypatch: pytest.MonkeyPatch) -> None:
    """One round trip on the first connection, none on the next ones."""
    calls: list[int] = []
    real = _pooler.dbapi_same_backend

    def counted(connection: Any, pid: int) -> bool:
        calls.append(1)
        return real(connection, pid)

    monkeypatch.setattr(_pooler, "dbapi_same_backend", counted)
    engine = poolguard.create_engine(cluster.url("psycopg"), workers=3)
    try:
        with engine.connect(), engine.connect(), engine.connect():
            pass
        engine.dispose()
        with engine.connect():
            pass
    finally:
        engine.dispose()
    assert calls == [1]
    assert isinstance(engine, sqlalchemy.Engine)


async def test_a_pid_check_on_a_silent_server_is_bounded(proxy: TcpProxy) -> None:
    """The server goes silent between the connect and the check: the connect fails within its timeout,
    undecided (the next connect checks again), and the connection is not left open."""
    pooler = _pooler.Pooler(_pooler.target(HOST, proxy.port, DATABASE))
    made: list[Any] = []

    async def connect_then_hang(params: dict[str, Any]) -> Any:
        connection = await asyncpg.connect(f"postgresql://app@{HOST}:{proxy.port}/{DATABASE}", **params)
        made.append(connection)
        proxy.blackhole()
        return connection

    started = time.monotonic()
    with pytest.raises(TimeoutError):
        await _pooler.connect_asyncpg(pooler, connect_then_hang, {"timeout": 0.5}, {"timeout": 0.5, "x": 1})
    assert time.monotonic() - started < 2.0
    assert not pooler.decided
    assert made[0].is_closed()


def test_a_connection_set_up_on_a_server_gone_silent_is_aborted(
    cluster: PgCluster, proxy: TcpProxy, fleet: Fleet
) -> None:
    """Guard(an engine made elsewhere, reads unbounded): the server goes silent right after the first connect,
    so SQLAlchemy's dialect initialize and the pooler check hang in the connect events. Once the watchdog has
    confirmed the outage it aborts that connection, as it aborts a pre-ping: a 503-able error in seconds.

    The app's own do_connect connects itself, as SQLAlchemy documents for replacing the DB-API connect;
    the watchdog's probes go through it too and must still be bounded. (The proxy's kernel acknowledges
    every packet, so no TCP timeout would ever fire here: only the abort ends the wait.)"""
    engine = fleet.engine(cluster.url("psycopg", port=proxy.port), guarded=False)
    silenced: list[bool] = []

    @event.listens_for(engine, "do_connect")
    def connect_then_go_silent(dialect: Any, record: Any, cargs: Any, cparams: Any) -> Any:
        connection = dialect.connect(*cargs, **cparams)
        if not silenced:
            silenced.append(True)
            proxy.blackhole()
        return connection

    guard = fleet.guard(engine)
    started = time.monotonic()
    with pytest.raises(exc.OperationalError), guard.session() as session:
        session.execute(text("SELECT 1"))
    assert time.monotonic() - started < 8.0
    assert guard.breaker is not None
    assert guard.breaker.state is BreakerState.OPEN
    adapter: Any = guard.pool
    assert not adapter._pooler.decided  # the next connection checks again
    assert not adapter._mid_checkout  # the aborted connection is not kept
    time.sleep(3.0)  # still silent: every probe must end within its own bounds, or recovery would wait on them
    ages = [round(guard.clock() - started, 2) for started in guard.prober._starts]
    assert all(age < 2.9 for age in ages), f"probes hung on the silent server for {ages} s"

    proxy.heal()
    healed = time.monotonic()
    while guard.breaker.state is not BreakerState.CLOSED:
        assert time.monotonic() - healed < 3.0, "not served again after the network healed"
        time.sleep(0.05)
        with contextlib.suppress(poolguard.Unavailable), guard.session() as session:
            session.execute(text("SELECT 1"))
    with guard.session() as session:
        assert session.execute(text("SELECT 1")).scalar() == 1
    assert adapter._pooler.decided
    assert guard.health(ping=False).pools[0].pooler is None  # decided: no pooler in front


async def test_create_asyncpg_pool_with_defaults_works_through_pgbouncer(
    pooler: tuple[PgBouncer, str], caplog: pytest.LogCaptureFixture
) -> None:
    """``create_asyncpg_pool(url)`` with nothing said about PgBouncer: guarded work there, past the point a
    statement cache would break, no statement_timeout sent, the pooler in health."""
    bouncer, kind = pooler
    caplog.set_level("INFO", logger="poolguard")
    pool = await poolguard.create_asyncpg_pool(
        bouncer.url("asyncpg", password=SECRET), service_name="orders", workers=8
    )
    guard = poolguard.Guard(pool, name="bounced")
    try:
        assert (await guard.ahealth(ping=False)).to_dict()["pools"][0]["pooler"] is None  # not known yet

        assert await run_asyncpg(guard.connection) == EXPECTED
        async with guard.connection() as connection:
            assert await connection.fetchval("SHOW statement_timeout") == "0"  # not sent through the pooler
        assert guard.breaker is not None
        assert guard.breaker.state is BreakerState.CLOSED
        assert (await guard.ahealth(ping=False)).to_dict()["pools"][0]["pooler"] == kind
        assert len(detections(caplog)) == 1
        assert SECRET not in caplog.text
    finally:
        guard.close()
        await pool.close()


async def test_create_asyncpg_pool_direct_keeps_its_statement_timeout(cluster: PgCluster) -> None:
    pool = await poolguard.create_asyncpg_pool(cluster.url("asyncpg", password=SECRET), statement_timeout=4)
    guard = poolguard.Guard(pool, name="direct")
    try:
        async with guard.connection() as connection:
            assert await connection.fetchval("SHOW statement_timeout") == "4s"
        assert (await guard.ahealth(ping=False)).to_dict()["pools"][0]["pooler"] is None
    finally:
        guard.close()
        await pool.close()


async def test_create_asyncpg_pool_pgbouncer_false_checks_nothing(default_bouncer: PgBouncer) -> None:
    """As a user asked: the startup parameter is sent, and PgBouncer as installed refuses it."""
    pool = await poolguard.create_asyncpg_pool(default_bouncer.url("asyncpg", password=SECRET), pgbouncer=False)
    try:
        with pytest.raises(asyncpg.PostgresError, match="unsupported startup parameter"):
            async with pool.acquire():
                pass
    finally:
        await pool.close()
