"""Guard on MariaDB through pymysql: units of work, shedding under saturation, health."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy
from sqlalchemy import exc, text
from sqlalchemy.pool import NullPool

from poolguard import Breaker, BreakerState, Guard, PoolSaturated
from tests.integration.helpers import assert_nothing_checked_out, assert_shed_within_budget
from tests.support.databases import DEAD_PORT, mariadb_url

pytestmark = pytest.mark.mariadb

EngineFactory = Callable[..., sqlalchemy.Engine]
GuardFactory = Callable[..., Guard]


@pytest.fixture
def engine(mysql_url: str, make_sync_engine: EngineFactory) -> sqlalchemy.Engine:
    return make_sync_engine(mysql_url, pool_size=2, max_overflow=0, pool_timeout=30)


@pytest.fixture
def observer(mysql_url: str, make_sync_engine: EngineFactory) -> sqlalchemy.Engine:
    return make_sync_engine(mysql_url, poolclass=NullPool)


@pytest.fixture
def table(observer: sqlalchemy.Engine) -> Iterator[str]:
    name = f"pg_guard_{uuid.uuid4().hex[:10]}"
    with observer.begin() as connection:
        connection.execute(text(f"CREATE TABLE {name} (id integer PRIMARY KEY) ENGINE=InnoDB"))
    yield name
    with observer.begin() as connection:
        connection.execute(text(f"DROP TABLE {name}"))


def ids(observer: sqlalchemy.Engine, table: str) -> list[int]:
    with observer.connect() as connection:
        return list(connection.execute(text(f"SELECT id FROM {table} ORDER BY id")).scalars())


def insert(table: str, id_: int) -> Any:
    return text(f"INSERT INTO {table} (id) VALUES (:id)").bindparams(id=id_)


def test_session_commits_and_rolls_back(
    make_guard: GuardFactory, engine: sqlalchemy.Engine, observer: sqlalchemy.Engine, table: str
):
    guard = make_guard(engine)
    with guard.session() as session:
        session.execute(insert(table, 1))

    def failing_session() -> None:
        with guard.session() as session:
            session.execute(insert(table, 2))
            raise RuntimeError("boom")

    def failing_connection() -> None:
        with guard.connection() as connection:
            connection.execute(insert(table, 4))
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        failing_session()
    assert ids(observer, table) == [1]
    with guard.connection() as connection:
        connection.execute(insert(table, 3))
    with pytest.raises(RuntimeError, match="boom"):
        failing_connection()
    assert ids(observer, table) == [1, 3]
    assert_nothing_checked_out(guard, engine)


def test_duplicate_keys_never_open_the_breaker(make_guard: GuardFactory, engine: sqlalchemy.Engine, table: str):
    guard = make_guard(engine, breaker=Breaker(consecutive_failures=3, window_size=10, minimum_calls=5))
    with guard.session() as session:
        session.execute(insert(table, 1))
    for _ in range(20):
        with pytest.raises(exc.IntegrityError), guard.session() as session:
            session.execute(insert(table, 1))
    assert guard.breaker is not None
    assert guard.breaker.state is BreakerState.CLOSED
    assert guard.breaker.failure_rate == 0.0
    assert_nothing_checked_out(guard, engine)


def test_saturated_pool_sheds_within_max_wait(make_guard: GuardFactory, engine: sqlalchemy.Engine):
    guard = make_guard(engine, max_wait=0.5)
    barrier = threading.Barrier(20)
    results: list[tuple[str, float, BaseException | None]] = []
    lock = threading.Lock()

    def client() -> None:
        barrier.wait()
        started = time.monotonic()
        outcome: tuple[str, float, BaseException | None]
        try:
            with guard.request_scope(route="/slow") as scope:
                scope.session.execute(text("SELECT SLEEP(0.3)"))
        except PoolSaturated as error:
            outcome = ("saturated", time.monotonic() - started, error)
        except BaseException as error:
            outcome = ("error", time.monotonic() - started, error)
        else:
            outcome = ("ok", time.monotonic() - started, None)
        with lock:
            results.append(outcome)

    threads = [threading.Thread(target=client) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=45)
    assert not any(thread.is_alive() for thread in threads)

    assert_shed_within_budget(results, guard, engine)


def test_health_is_ok(make_guard: GuardFactory, engine: sqlalchemy.Engine):
    guard = make_guard(engine, name="mariadb")
    report = guard.health()
    assert report.status == "ok"
    assert report.http_status == 200
    [pool] = report.to_dict()["pools"]
    assert pool["name"] == "mariadb"
    assert pool["backend"] == "mysql"
    assert isinstance(pool["ping_seconds"], float)
    assert pool["ping_seconds"] > 0
    assert pool["breaker"]["state"] == "closed"
    assert_nothing_checked_out(guard, engine)


def test_unreachable_server_opens_the_breaker(make_guard: GuardFactory, make_sync_engine: EngineFactory):
    engine = make_sync_engine(mariadb_url(port=DEAD_PORT), pool_size=2, max_overflow=0)
    guard = make_guard(engine, breaker=Breaker(consecutive_failures=2, open_for=30.0))
    for _ in range(2):
        with pytest.raises(exc.OperationalError), guard.session() as session:
            session.execute(text("SELECT 1"))
    assert guard.breaker is not None
    assert guard.breaker.state is BreakerState.OPEN
    assert guard.health().status == "unavailable"
