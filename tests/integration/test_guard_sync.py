"""Guard on synchronous engines: psycopg on the real PostgreSQL server, and a SQLite file database.

Every test gets its guard from ``make_guard``, which fails the test if a connection is still checked
out afterwards (in the guard's accounting or in the engine's pool).
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy
from sqlalchemy import event, exc, text
from sqlalchemy.pool import NullPool

from poolguard import (
    Breaker,
    BreakerState,
    CircuitOpen,
    ConfigError,
    Guard,
    PoolGuardError,
    PoolSaturated,
    create_engine,
)
from tests.integration.helpers import assert_nothing_checked_out, assert_shed_within_budget
from tests.support import databases
from tests.support.contract import HEALTH_POOL_KEYS

pytestmark = pytest.mark.postgres

EngineFactory = Callable[..., sqlalchemy.Engine]
GuardFactory = Callable[..., Guard]


@pytest.fixture(params=["postgresql", "sqlite"])
def db_url(request: pytest.FixtureRequest, pg_url: str, tmp_path: Path) -> str:
    return pg_url if request.param == "postgresql" else f"sqlite:///{tmp_path / 'guard.db'}"


def _enable_sqlite_foreign_keys(engine: sqlalchemy.Engine) -> None:
    if engine.dialect.name == "sqlite":

        @event.listens_for(engine, "connect")
        def _foreign_keys_on(dbapi_connection: Any, record: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()


@pytest.fixture
def engine(db_url: str, make_sync_engine: EngineFactory) -> sqlalchemy.Engine:
    """The engine under guard: a QueuePool of 2 (SQLite file databases get a QueuePool too)."""
    engine = make_sync_engine(db_url, pool_size=2, max_overflow=0, pool_timeout=30)
    _enable_sqlite_foreign_keys(engine)
    return engine


@pytest.fixture
def observer(db_url: str, make_sync_engine: EngineFactory) -> sqlalchemy.Engine:
    """A second, unguarded engine (own connections) to see what was really committed."""
    return make_sync_engine(db_url, poolclass=NullPool)


@pytest.fixture
def table(observer: sqlalchemy.Engine) -> Iterator[str]:
    """A fresh table ``(id int primary key, parent int -> id, deferred)`` with a unique name."""
    name = f"pg_guard_{uuid.uuid4().hex[:10]}"
    with observer.begin() as connection:
        connection.execute(
            text(
                f"CREATE TABLE {name} (id integer PRIMARY KEY, "
                f"parent integer REFERENCES {name}(id) DEFERRABLE INITIALLY DEFERRED)"
            )
        )
    yield name
    with observer.begin() as connection:
        connection.execute(text(f"DROP TABLE {name}"))


def ids(observer: sqlalchemy.Engine, table: str) -> list[int]:
    with observer.connect() as connection:
        return [row[0] for row in connection.execute(text(f"SELECT id FROM {table} ORDER BY id"))]


def insert(table: str, id_: int, parent: int | None = None) -> Any:
    return text(f"INSERT INTO {table} (id, parent) VALUES (:id, :parent)").bindparams(id=id_, parent=parent)


def open_breaker(guard: Guard) -> None:
    """Opens the guard's breaker the way connection failures would (the breaker's own protocol)."""
    assert guard.breaker is not None
    while guard.breaker.state is not BreakerState.OPEN:
        guard.breaker.record_failure(0.0)


# -- session() and connection(): commit, rollback, always release ----------------------------------------


def test_session_commits_on_success(make_guard: GuardFactory, engine: sqlalchemy.Engine, observer: Any, table: str):
    guard = make_guard(engine)
    with guard.session() as session:
        assert isinstance(session, sqlalchemy.orm.Session)
        session.execute(insert(table, 1))
        assert engine.pool.checkedout() == 1  # type: ignore[attr-defined]
    assert ids(observer, table) == [1]
    assert_nothing_checked_out(guard, engine)


def test_session_rolls_back_when_the_body_raises(
    make_guard: GuardFactory, engine: sqlalchemy.Engine, observer: Any, table: str
):
    guard = make_guard(engine)

    def failing_unit() -> None:
        with guard.session() as session:
            session.execute(insert(table, 1))
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        failing_unit()
    assert ids(observer, table) == []
    assert_nothing_checked_out(guard, engine)


def test_session_returns_the_connection_when_commit_fails(
    make_guard: GuardFactory, engine: sqlalchemy.Engine, observer: Any, table: str
):
    guard = make_guard(engine)
    with pytest.raises(exc.IntegrityError), guard.session() as session:
        session.execute(insert(table, 1, parent=999))  # deferred: only the COMMIT fails
    assert_nothing_checked_out(guard, engine)
    assert ids(observer, table) == []
    # The failed commit is an application error: the pool still serves, the breaker did not count it.
    with guard.session() as session:
        session.execute(insert(table, 2))
    assert ids(observer, table) == [2]
    assert guard.breaker is not None
    assert guard.breaker.state is BreakerState.CLOSED
    assert guard.breaker.failure_rate == 0.0


def test_connection_commits_rolls_back_and_survives_a_failing_commit(
    make_guard: GuardFactory, engine: sqlalchemy.Engine, observer: Any, table: str
):
    guard = make_guard(engine)
    with guard.connection() as connection:
        assert isinstance(connection, sqlalchemy.Connection)
        connection.execute(insert(table, 1))
    assert ids(observer, table) == [1]

    def failing_unit() -> None:
        with guard.connection() as connection:
            connection.execute(insert(table, 2))
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        failing_unit()
    assert ids(observer, table) == [1]
    assert_nothing_checked_out(guard, engine)

    with pytest.raises(exc.IntegrityError), guard.connection() as connection:
        connection.execute(insert(table, 3, parent=999))
    assert_nothing_checked_out(guard, engine)
    assert ids(observer, table) == [1]
    with guard.connection() as connection:
        # The next borrower of the pooled connection must not inherit the failed unit's transaction.
        assert connection.execute(text(f"SELECT id FROM {table} ORDER BY id")).scalars().all() == [1]
    assert ids(observer, table) == [1]


# -- request_scope: lazy ----------------------------------------------------------------------------------


def test_request_scope_checks_out_nothing_until_the_session_is_used(
    make_guard: GuardFactory, engine: sqlalchemy.Engine
):
    guard = make_guard(engine)
    before = guard.stats()
    with guard.request_scope(route="/ping") as scope:
        pass
    assert not scope.has_session
    with guard.request_scope(route="/lazy") as scope:
        scope.session  # noqa: B018 - created, never used
        assert scope.has_session
        assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    after = guard.stats()
    assert after.checkouts == before.checkouts
    assert after.connections_created == before.connections_created

    with guard.request_scope(route="/used") as scope:
        assert scope.session.execute(text("SELECT 1")).scalar() == 1
    assert guard.stats().checkouts == before.checkouts + 1
    assert_nothing_checked_out(guard, engine)


def test_route_without_database_works_while_the_breaker_is_open(make_guard: GuardFactory, engine: sqlalchemy.Engine):
    guard = make_guard(engine, breaker=Breaker(consecutive_failures=1, open_for=60.0))
    open_breaker(guard)
    checkouts = guard.stats().checkouts

    with guard.request_scope(route="/about") as scope:
        answer = "static page"
    assert answer == "static page"
    assert not scope.has_session

    started = time.monotonic()
    with pytest.raises(CircuitOpen) as raised, guard.request_scope(route="/orders/{id}") as scope:
        scope.session.execute(text("SELECT 1"))
    assert time.monotonic() - started < 0.05
    assert 0 < raised.value.retry_after <= 60.0
    assert guard.stats().checkouts == checkouts
    assert_nothing_checked_out(guard, engine)


# -- saturation: shed fast, never queue for pool_timeout ----------------------------------------------------


def run_concurrently(count: int, work: Callable[[], None]) -> list[tuple[str, float, BaseException | None]]:
    """Runs ``work`` in ``count`` threads started together; returns (outcome, seconds, error) per thread."""
    barrier = threading.Barrier(count)
    results: list[tuple[str, float, BaseException | None]] = []
    lock = threading.Lock()

    def worker() -> None:
        barrier.wait()
        started = time.monotonic()
        outcome: tuple[str, float, BaseException | None]
        try:
            work()
        except PoolSaturated as error:
            outcome = ("saturated", time.monotonic() - started, error)
        except BaseException as error:
            outcome = ("error", time.monotonic() - started, error)
        else:
            outcome = ("ok", time.monotonic() - started, None)
        with lock:
            results.append(outcome)

    threads = [threading.Thread(target=worker, name=f"client-{i}") for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=45)
    assert not any(thread.is_alive() for thread in threads), "a client hung"
    return results


def test_saturated_pool_sheds_within_max_wait_and_keeps_the_breaker_closed(
    make_guard: GuardFactory, make_sync_engine: EngineFactory, pg_url: str
):
    engine = make_sync_engine(pg_url, pool_size=2, max_overflow=0, pool_timeout=30)
    guard = make_guard(engine, max_wait=0.5)

    def request() -> None:
        with guard.request_scope(route="/slow") as scope:
            scope.session.execute(text("SELECT pg_sleep(0.3)"))

    results = run_concurrently(20, request)

    served, _shed = assert_shed_within_budget(results, guard, engine)
    assert guard.stats().checkouts == len(served)


def test_stats_count_checkouts_waits_and_created_connections(make_guard: GuardFactory, engine: sqlalchemy.Engine):
    guard = make_guard(engine)
    empty = guard.stats()
    assert empty.checkouts == 0
    assert empty.wait_p50 is None
    assert empty.wait_p99 is None
    for _ in range(3):
        with guard.session() as session:
            session.execute(text("SELECT 1"))
    stats = guard.stats()
    assert stats.checkouts == 3
    assert stats.wait_p50 is not None
    assert stats.wait_p99 is not None
    assert 0 <= stats.wait_p50 <= stats.wait_p99
    assert stats.use_p50 is not None
    assert stats.connections_created == 1  # one after another: the pool reuses its connection
    assert (stats.size, stats.max_overflow, stats.checked_out, stats.idle) == (2, 0, 0, 1)
    assert stats.timeouts == 0
    assert stats.breaker_state == "closed"


# -- application errors never open the breaker ------------------------------------------------------------


def test_integrity_and_sql_errors_never_open_the_breaker(
    make_guard: GuardFactory, engine: sqlalchemy.Engine, table: str
):
    guard = make_guard(engine, breaker=Breaker(consecutive_failures=3, window_size=10, minimum_calls=5))
    with guard.session() as session:
        session.execute(insert(table, 1))
    for _ in range(20):
        with pytest.raises(exc.IntegrityError), guard.session() as session:
            session.execute(insert(table, 1))
    for _ in range(5):
        with pytest.raises(exc.DBAPIError), guard.connection() as connection:
            connection.execute(text("SELECT * FROM no_such_table_poolguard"))
    assert guard.breaker is not None
    assert guard.breaker.state is BreakerState.CLOSED
    assert guard.breaker.failure_rate == 0.0
    with guard.session() as session:
        assert session.execute(text(f"SELECT count(*) FROM {table}")).scalar() == 1
    assert_nothing_checked_out(guard, engine)


# -- leaks -------------------------------------------------------------------------------------------------


def leak_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "poolguard.leaks" and r.levelno == logging.WARNING]


def test_connection_held_past_the_threshold_is_reported_with_its_route(
    make_guard: GuardFactory, engine: sqlalchemy.Engine, fake_clock: Any, caplog: pytest.LogCaptureFixture
):
    caplog.set_level(logging.WARNING, logger="poolguard")
    guard = make_guard(engine, leak_threshold=5.0, clock=fake_clock)
    with guard.request_scope(route="/reports/{id}"):
        connection = engine.connect()
        try:
            fake_clock.advance(4.0)
            assert guard.stats().suspected_leaks == 0
            assert leak_records(caplog) == []
            fake_clock.advance(2.0)
            assert guard.stats().suspected_leaks == 1
            guard.stats()  # reported once, not on every sweep
        finally:
            connection.close()
    records = leak_records(caplog)
    assert len(records) == 1
    message = records[0].getMessage()
    assert "/reports/{id}" in message
    assert "'primary'" in message
    assert "checked out at" not in message  # no stack unless asked for
    assert guard.stats().suspected_leaks == 0


def test_leak_report_names_the_checkout_line_when_stacks_are_captured(
    make_guard: GuardFactory, engine: sqlalchemy.Engine, fake_clock: Any, caplog: pytest.LogCaptureFixture
):
    caplog.set_level(logging.WARNING, logger="poolguard")
    guard = make_guard(engine, leak_threshold=1.0, clock=fake_clock, capture_stacks=True)
    with guard.request_scope(route="/export"):
        line = inspect.currentframe().f_lineno + 1  # type: ignore[union-attr]
        connection = engine.connect()
        try:
            fake_clock.advance(2.0)
            with guard.session() as session:  # another checkout sweeps too
                session.execute(text("SELECT 1"))
        finally:
            connection.close()
    records = leak_records(caplog)
    assert len(records) == 1
    message = records[0].getMessage()
    assert "/export" in message
    assert f"{__file__}:{line} in test_leak_report_names_the_checkout_line_when_stacks_are_captured" in message


def test_connection_left_at_the_end_of_a_request_is_closed_and_reported(
    make_guard: GuardFactory, engine: sqlalchemy.Engine, caplog: pytest.LogCaptureFixture
):
    caplog.set_level(logging.WARNING, logger="poolguard")
    guard = make_guard(engine)
    with guard.request_scope(route="/forgetful"):
        forgotten = engine.connect()
        forgotten.execute(text("SELECT 1"))
        assert engine.pool.checkedout() == 1  # type: ignore[attr-defined]
    assert_nothing_checked_out(guard, engine)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "/forgetful" in r.getMessage()]
    assert len(warnings) == 1
    assert warnings[0].name.startswith("poolguard")
    forgotten.close()  # the owner finding out late must not break anything
    with guard.session() as session:
        assert session.execute(text("SELECT 1")).scalar() == 1
    assert_nothing_checked_out(guard, engine)


# -- health --------------------------------------------------------------------------------------------------


def test_health_is_ok_with_a_live_ping_and_the_documented_json(make_guard: GuardFactory, engine: sqlalchemy.Engine):
    guard = make_guard(engine, name="orders")
    with guard.session() as session:
        session.execute(text("SELECT 1"))
    report = guard.health()
    assert report.status == "ok"
    assert report.http_status == 200
    document = json.loads(json.dumps(report.to_dict()))
    assert set(document) == {"status", "pools", "issues"}
    assert document["status"] == "ok"
    assert document["issues"] == []
    [pool] = document["pools"]
    assert set(pool) == HEALTH_POOL_KEYS
    assert set(pool["wait_seconds"]) == {"p50", "p99"}
    assert set(pool["breaker"]) == {"state", "failure_rate", "retry_after"}
    assert pool["name"] == "orders"
    assert pool["status"] == "ok"
    assert pool["backend"] == engine.dialect.name
    assert (pool["size"], pool["max_overflow"], pool["checked_out"], pool["timeouts"]) == (2, 0, 0, 0)
    assert isinstance(pool["ping_seconds"], float)
    assert pool["ping_seconds"] > 0
    assert isinstance(pool["wait_seconds"]["p50"], float)
    assert pool["breaker"] == {"state": "closed", "failure_rate": 0.0, "retry_after": None}
    assert_nothing_checked_out(guard, engine)


def test_password_never_leaks_into_errors_health_or_logs(
    make_guard: GuardFactory, make_sync_engine: EngineFactory, caplog: pytest.LogCaptureFixture
):
    caplog.set_level(logging.DEBUG)
    password = "s3cret-pw"
    engine = make_sync_engine(
        databases.pg_url(password=password, port=databases.DEAD_PORT), pool_size=2, max_overflow=0, pool_timeout=2
    )
    guard = make_guard(engine, breaker=Breaker(consecutive_failures=2, open_for=30.0))
    seen: list[BaseException] = []
    for _ in range(2):
        with pytest.raises(exc.OperationalError) as refused, guard.session() as session:
            session.execute(text("SELECT 1"))
        seen.append(refused.value)
    open_breaker(guard)  # whether refusals count is test_guard_faults' business; here only the texts matter
    with pytest.raises(CircuitOpen) as circuit_open, guard.session() as session:
        session.execute(text("SELECT 1"))
    seen.append(circuit_open.value)
    with pytest.raises(ConfigError) as duplicate:
        Guard(engine)
    seen.append(duplicate.value)
    report = guard.health()
    assert report.status == "unavailable"
    texts = [str(error) for error in seen] + [repr(error) for error in seen]
    texts += [json.dumps(report.to_dict()), repr(guard), repr(guard.stats()), caplog.text]
    texts += [str(record.args) for record in caplog.records]
    for text_ in texts:
        assert password not in text_


# -- one guard per engine; close() undoes everything ---------------------------------------------------------


def test_a_second_guard_on_the_same_engine_is_a_config_error(make_guard: GuardFactory, engine: sqlalchemy.Engine):
    first = Guard(engine)  # closed here, not by the fixture
    try:
        with pytest.raises(ConfigError) as raised:
            Guard(engine, name="other")
        assert isinstance(raised.value, ValueError)
        assert "Guard" in raised.value.setting
    finally:
        first.close()
    again = make_guard(engine, name="again")  # close() released the engine
    with again.session() as session:
        assert session.execute(text("SELECT 1")).scalar() == 1
    assert again.stats().checkouts == 1


def test_close_removes_the_instrumentation(engine: sqlalchemy.Engine):
    guard = Guard(engine, breaker=Breaker(consecutive_failures=1, open_for=60.0))
    try:
        open_breaker(guard)
        with pytest.raises(CircuitOpen), guard.session() as session:
            session.execute(text("SELECT 1"))
        checkouts = guard.stats().checkouts
    finally:
        guard.close()

    assert "connect" not in vars(engine.pool)
    with pytest.raises(PoolGuardError, match="is closed"):  # never an ungated session, silently
        guard.session()
    with pytest.raises(PoolGuardError, match="is closed"):
        guard.request_scope()
    with engine.connect() as connection:  # no longer gated by the (still open) breaker
        connection.execute(text("SELECT 1"))
    assert guard.stats().checkouts == checkouts  # no longer counted either
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]


def test_close_twice_is_harmless(engine: sqlalchemy.Engine):
    guard = Guard(engine)
    guard.close()
    guard.close()  # e.g. an app's shutdown hook and a test teardown both close it


def test_closing_an_old_guard_again_leaves_a_newer_guard_intact(make_guard: GuardFactory, engine: sqlalchemy.Engine):
    old = Guard(engine, name="old")
    old.close()
    new = make_guard(engine, name="new", breaker=Breaker(consecutive_failures=1, open_for=60.0))
    with contextlib.suppress(AttributeError):  # that is test_close_twice_is_harmless's finding
        old.close()
    open_breaker(new)
    with pytest.raises(CircuitOpen), new.session() as session:
        session.execute(text("SELECT 1"))
    assert_nothing_checked_out(new, engine)


def test_guard_keeps_gating_after_engine_dispose(make_guard: GuardFactory, engine: sqlalchemy.Engine):
    guard = make_guard(engine, breaker=Breaker(consecutive_failures=1, open_for=60.0))
    with guard.session() as session:
        session.execute(text("SELECT 1"))
    engine.dispose()  # replaces the pool
    with guard.session() as session:
        session.execute(text("SELECT 1"))
    assert guard.stats().checkouts == 2
    open_breaker(guard)
    with pytest.raises(CircuitOpen), guard.session() as session:
        session.execute(text("SELECT 1"))
    assert_nothing_checked_out(guard, engine)


def test_every_way_back_to_the_pool_releases_the_slot_and_records_the_use(
    make_guard: GuardFactory, engine: sqlalchemy.Engine
):
    """Checkin, invalidation and detach all end in the pool's return path, which the guard watches."""
    guard = make_guard(engine)
    capacity = guard.gate.admission.capacity
    with guard.request_scope(route="/ways") as scope:
        with engine.connect() as connection:  # a plain checkin
            connection.exec_driver_sql("SELECT 1")
        invalidated = engine.connect()
        invalidated.invalidate()  # the connection is closed, its record goes back empty
        invalidated.close()
        detached = engine.connect()
        assert scope.held == 1
        detached.connection.detach()  # leaves the pool for good
        assert scope.held == 0
        assert guard.gate.held == 0
        detached.close()
    assert guard.gate.admission.in_use == 0
    assert guard.gate.admission.capacity == capacity
    assert guard.stats().checkouts == 3
    assert guard.stats().use_p50 is not None
    assert_nothing_checked_out(guard, engine)


def test_a_plain_engine_gets_one_warning_that_reads_are_unbounded(
    make_guard: GuardFactory, make_sync_engine: Any, caplog: pytest.LogCaptureFixture
):
    guard = make_guard(make_sync_engine(databases.PG_URL))
    with caplog.at_level(logging.WARNING, logger="poolguard"):
        for _ in range(3):
            with guard.session() as session:
                session.execute(text("SELECT 1"))
        guard.engine.dispose()
        with guard.session() as session:  # new connections: still one warning
            session.execute(text("SELECT 1"))
    [warning] = [record.getMessage() for record in caplog.records]
    assert "unbounded" in warning
    assert "connect_args={'tcp_user_timeout': 10000, 'keepalives_idle': 10}" in warning


def test_poolguards_engine_bounds_reads_and_says_nothing(make_guard: GuardFactory, caplog: pytest.LogCaptureFixture):
    engine = create_engine(databases.PG_URL)
    try:
        guard = make_guard(engine)
        with caplog.at_level(logging.WARNING, logger="poolguard"), guard.session() as session:
            session.execute(text("SELECT 1"))
    finally:
        engine.dispose()
    assert not caplog.records


@pytest.mark.postgres
@pytest.mark.parametrize(
    ("connect_args", "seen"),
    [({}, 2), ({"connect_timeout": 7}, 7), ({"connect_timeout": 0}, 0)],
    ids=["none: poolguard's", "the app's", "the app's 0 (none)"],
)
def test_an_engine_made_elsewhere_connects_with_a_timeout(connect_args: dict[str, Any], seen: int) -> None:
    """What the engine's connect is given, as the app's own do_connect listener sees it: poolguard's connect
    timeout only where the engine sets none."""
    engine = sqlalchemy.create_engine(databases.PG_URL, connect_args=connect_args)
    given: list[Any] = []

    @event.listens_for(engine, "do_connect")
    def record(dialect: Any, connection_record: Any, cargs: Any, cparams: dict[str, Any]) -> None:
        given.append(cparams.get("connect_timeout"))

    guard = Guard(engine, probe_interval=None)
    try:
        with guard.session() as session:
            assert session.execute(text("SELECT 1")).scalar() == 1
    finally:
        guard.close()
        engine.dispose()
    assert given == [seen]
