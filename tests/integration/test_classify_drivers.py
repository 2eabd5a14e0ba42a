"""Connection-level failures from real drivers reach the breaker (503), application errors do not (500).

The shared servers trust every login from 127.0.0.1, so a wrong password is accepted by PostgreSQL:
28000 (an unknown role, a role without LOGIN) is what a refused login gives there. MariaDB checks
passwords, so 1045 is the real thing.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pymysql
import pytest
import sqlalchemy
from sqlalchemy.ext.asyncio import create_async_engine

import poolguard
from poolguard._classify import classify, is_connection_failure, is_transient
from tests.support import databases


@pytest.fixture
def nologin_role() -> Iterator[str]:
    """A PostgreSQL role that exists but may not log in (28000), dropped after the test."""
    name = f"poolguard_nologin_{uuid.uuid4().hex[:8]}"
    admin = sqlalchemy.create_engine(databases.PG_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.exec_driver_sql(f"CREATE ROLE {name} NOLOGIN")
    try:
        yield name
    finally:
        with admin.connect() as connection:
            connection.exec_driver_sql(f"DROP ROLE IF EXISTS {name}")
        admin.dispose()


@pytest.fixture
def mariadb_user() -> Iterator[str]:
    """A MariaDB account with the password ``right``, dropped after the test."""
    name = f"pg_{uuid.uuid4().hex[:8]}"
    admin = pymysql.connect(host=databases.HOST, port=databases.MARIADB_PORT, user="root", database="test")
    with admin.cursor() as cursor:
        cursor.execute(f"CREATE USER '{name}'@'%' IDENTIFIED BY 'right'")
        cursor.execute(f"GRANT ALL ON test.* TO '{name}'@'%'")
    try:
        yield name
    finally:
        with admin.cursor() as cursor:
            cursor.execute(f"DROP USER IF EXISTS '{name}'@'%'")
        admin.close()


def pg_url_for(driver: str, role: str) -> str:
    return f"postgresql+{driver}://{role}@{databases.HOST}:{databases.PG_PORT}/{databases.DATABASE}"


def refused_through_guard(guard: poolguard.Guard) -> BaseException:
    """Uses the guard like a request would until the breaker opens; returns the first failure."""
    failures: list[BaseException] = []
    for _ in range(10):
        try:
            if guard.is_async:

                async def use() -> None:
                    async with guard.connection() as connection:
                        await connection.exec_driver_sql("SELECT 1")

                asyncio.run(use())
            else:
                with guard.connection() as connection:
                    connection.exec_driver_sql("SELECT 1")
        except poolguard.CircuitOpen:
            break
        except Exception as exc:
            failures.append(exc)
    else:
        pytest.fail("the breaker never opened")
    assert failures, "the first use should fail on the database, not on the breaker"
    return failures[0]


@pytest.mark.parametrize("driver", ["psycopg", "asyncpg"])
@pytest.mark.parametrize("role", ["nologin", "unknown"])
def test_a_refused_postgres_login_is_a_503(driver: str, role: str, nologin_role: str) -> None:
    name = nologin_role if role == "nologin" else f"poolguard_unknown_{uuid.uuid4().hex[:8]}"
    url = pg_url_for(driver, name)
    engine: Any = create_async_engine(url) if driver == "asyncpg" else sqlalchemy.create_engine(url)
    guard = poolguard.Guard(engine, name="auth", breaker=poolguard.Breaker(consecutive_failures=2, minimum_calls=2))
    try:
        first = refused_through_guard(guard)
        unavailable = guard.unavailable_for(first)
        assert isinstance(unavailable, poolguard.CircuitOpen), repr(first)
        assert guard.breaker is not None
        assert guard.breaker.state is poolguard.BreakerState.OPEN
        if (
            driver == "asyncpg"
        ):  # psycopg's connect error carries no SQLSTATE (so it reads as transient); asyncpg's is 28000
            assert classify(first) == "auth"
            assert not is_transient(first)
    finally:
        guard.close()
        if driver == "asyncpg":
            asyncio.run(engine.dispose())
        else:
            engine.dispose()


def test_a_wrong_mariadb_password_is_a_503(mariadb_user: str) -> None:
    url = f"mysql+pymysql://{mariadb_user}:wrong@{databases.HOST}:{databases.MARIADB_PORT}/{databases.DATABASE}"
    engine = sqlalchemy.create_engine(url)
    guard = poolguard.Guard(engine, name="auth", breaker=poolguard.Breaker(consecutive_failures=2, minimum_calls=2))
    try:
        first = refused_through_guard(guard)
        assert isinstance(guard.unavailable_for(first), poolguard.CircuitOpen)
        assert classify(first) == "auth"
        assert "wrong" not in str(guard.unavailable_for(first))
    finally:
        guard.close()
        engine.dispose()


def test_a_mariadb_lock_wait_timeout_is_transient_not_a_failure() -> None:
    """1205 arrives with SQLSTATE HY000: the error number is what says "retry"."""
    engine = sqlalchemy.create_engine(databases.MARIADB_URL)
    table = f"pg_lock_{uuid.uuid4().hex[:8]}"
    try:
        with engine.begin() as connection:
            connection.exec_driver_sql(f"CREATE TABLE {table} (id INT PRIMARY KEY) ENGINE=InnoDB")
            connection.exec_driver_sql(f"INSERT INTO {table} VALUES (1)")
        with engine.connect() as holder, engine.connect() as waiter:
            holder.exec_driver_sql(f"SELECT * FROM {table} WHERE id = 1 FOR UPDATE")
            waiter.exec_driver_sql("SET SESSION innodb_lock_wait_timeout = 1")
            with pytest.raises(sqlalchemy.exc.OperationalError) as raised:
                waiter.exec_driver_sql(f"UPDATE {table} SET id = 2 WHERE id = 1")
            holder.rollback()
        assert raised.value.orig.args[0] == 1205
        assert not is_connection_failure(raised.value)
        assert is_transient(raised.value)
    finally:
        with engine.begin() as connection:
            connection.exec_driver_sql(f"DROP TABLE IF EXISTS {table}")
        engine.dispose()


class _ResetDuringPing:
    """A psycopg connection whose next pre-ping meets a connection reset, as SQLAlchemy's ping sees it.

    Only the failure is simulated: the ``SELECT 1`` starts a transaction and then the network "fails";
    SQLAlchemy's real ``do_ping`` then restores autocommit on the real connection, and psycopg raises
    its real ``ProgrammingError: can't change 'autocommit' now`` over the ``OperationalError``.
    """

    def __init__(self, connection: Any) -> None:
        self._connection = connection

    @property
    def autocommit(self) -> bool:
        return bool(self._connection.autocommit)

    @autocommit.setter
    def autocommit(self, value: bool) -> None:
        self._connection.autocommit = value

    @property
    def closed(self) -> bool:
        return bool(self._connection.closed)

    def cursor(self) -> _ResetDuringPing:
        return self

    def execute(self, _sql: str) -> None:
        self._connection.execute("BEGIN")
        raise psycopg.OperationalError("consuming input failed: server closed the connection unexpectedly")

    def close(self) -> None:
        pass


def test_a_pre_ping_error_masking_a_reset_is_a_503(monkeypatch: pytest.MonkeyPatch) -> None:
    engine = sqlalchemy.create_engine(databases.PG_URL, pool_pre_ping=True, pool_size=1, max_overflow=0)
    guard = poolguard.Guard(engine, name="reset")
    try:
        with guard.connection() as connection:  # one pooled connection, pinged on its next checkout
            connection.exec_driver_sql("SELECT 1")
        real_do_ping = engine.dialect.do_ping
        monkeypatch.setattr(engine.dialect, "do_ping", lambda dbapi: real_do_ping(_ResetDuringPing(dbapi)))
        with pytest.raises(sqlalchemy.exc.ProgrammingError) as raised, guard.connection() as connection:
            connection.exec_driver_sql("SELECT 1")
        assert "autocommit" in str(raised.value)
        assert isinstance(raised.value.orig.__context__, psycopg.OperationalError)
        assert isinstance(guard.unavailable_for(raised.value), poolguard.CircuitOpen)
        assert guard.breaker is not None
        assert guard.breaker.failure_rate > 0
        monkeypatch.undo()
        with guard.connection() as connection:  # the broken connection was discarded
            assert connection.exec_driver_sql("SELECT 1").scalar() == 1
    finally:
        guard.close()
        engine.dispose()
