"""Which exceptions the breaker counts and retry retries, with real exception objects."""

from __future__ import annotations

import psycopg.errors
import pymysql.err
import pytest
import sqlalchemy.exc

from poolguard._classify import is_checkout_timeout, is_connection_failure, is_transient


class DriverError(Exception):
    """A driver error carrying a PostgreSQL SQLSTATE, as asyncpg's and psycopg's errors do."""

    def __init__(self, sqlstate: str, message: str = "driver error") -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


def wrapped(orig: Exception, kind: type[sqlalchemy.exc.DBAPIError] = sqlalchemy.exc.DBAPIError) -> Exception:
    return kind("SELECT 1", None, orig)


# -- connection-level failures ---------------------------------------------------------------------------


def test_refused_connection_during_checkout_is_a_transient_failure() -> None:
    exc = wrapped(ConnectionRefusedError(111, "Connection refused"), sqlalchemy.exc.OperationalError)
    assert is_connection_failure(exc, during_checkout=True)
    assert is_connection_failure(exc)
    assert is_transient(exc)
    assert not is_checkout_timeout(exc)


def test_any_operational_error_during_checkout_is_a_failure() -> None:
    exc = wrapped(Exception("could not translate host name"), sqlalchemy.exc.OperationalError)
    assert is_connection_failure(exc, during_checkout=True)


def test_raw_socket_errors_during_checkout_are_failures() -> None:
    assert is_connection_failure(ConnectionResetError(104, "reset"), during_checkout=True)
    assert is_connection_failure(TimeoutError("connect timed out"), during_checkout=True)
    assert is_transient(ConnectionResetError(104, "reset"))


def test_invalidated_connection_is_a_failure() -> None:
    exc = sqlalchemy.exc.DBAPIError(
        "SELECT 1", None, Exception("server closed the connection"), connection_invalidated=True
    )
    assert is_connection_failure(exc)
    assert is_transient(exc)


def test_pool_timeout_is_a_checkout_timeout_and_a_failure() -> None:
    exc = sqlalchemy.exc.TimeoutError("QueuePool limit of size 5 overflow 10 reached")
    assert is_checkout_timeout(exc)
    assert is_connection_failure(exc)
    assert is_connection_failure(exc, during_checkout=True)
    assert is_transient(exc)


def test_a_builtin_timeout_is_a_checkout_timeout() -> None:
    assert is_checkout_timeout(TimeoutError())


@pytest.mark.parametrize(
    ("sqlstate", "meaning"),
    [
        ("08006", "connection failure"),
        ("08001", "cannot establish connection"),
        ("53300", "too many connections"),
        ("57P01", "admin shutdown"),
        ("57P03", "cannot connect now"),
    ],
)
def test_postgres_connection_states_are_failures(sqlstate: str, meaning: str) -> None:
    exc = wrapped(DriverError(sqlstate, meaning))
    assert is_connection_failure(exc), meaning
    assert is_transient(exc), meaning


@pytest.mark.parametrize(
    "error",
    [psycopg.errors.ConnectionFailure("x"), psycopg.errors.TooManyConnections("x"), psycopg.errors.AdminShutdown("x")],
)
def test_psycopg_connection_errors_are_failures(error: Exception) -> None:
    assert is_connection_failure(wrapped(error, sqlalchemy.exc.OperationalError))


def test_sqlstate_on_the_cause_of_an_adapted_error_is_seen() -> None:
    orig = Exception("adapted")
    orig.__cause__ = DriverError("57P01")
    assert is_connection_failure(wrapped(orig))


# -- application errors ---------------------------------------------------------------------------------


def test_unique_violation_is_neither_a_failure_nor_transient() -> None:
    exc = wrapped(DriverError("23505", "duplicate key"), sqlalchemy.exc.IntegrityError)
    assert not is_connection_failure(exc)
    assert not is_connection_failure(exc, during_checkout=True)
    assert not is_transient(exc)


def test_psycopg_unique_violation_is_neither() -> None:
    exc = wrapped(psycopg.errors.UniqueViolation("duplicate key"), sqlalchemy.exc.IntegrityError)
    assert not is_connection_failure(exc)
    assert not is_transient(exc)


def test_deadlock_is_transient_but_not_a_connection_failure() -> None:
    exc = wrapped(DriverError("40P01", "deadlock detected"), sqlalchemy.exc.OperationalError)
    assert not is_connection_failure(exc)
    assert is_transient(exc)


def test_serialization_failure_is_transient_but_not_a_failure() -> None:
    exc = wrapped(psycopg.errors.SerializationFailure("could not serialize"), sqlalchemy.exc.OperationalError)
    assert not is_connection_failure(exc)
    assert is_transient(exc)


@pytest.mark.parametrize("orig", [DriverError("42601", "syntax error"), psycopg.errors.SyntaxError("syntax error")])
def test_syntax_error_is_neither(orig: Exception) -> None:
    exc = wrapped(orig, sqlalchemy.exc.ProgrammingError)
    assert not is_connection_failure(exc)
    assert not is_transient(exc)


def test_query_cancelled_by_statement_timeout_is_neither() -> None:
    exc = wrapped(psycopg.errors.QueryCanceled("canceling statement"), sqlalchemy.exc.OperationalError)
    assert not is_connection_failure(exc)
    assert not is_transient(exc)


def test_plain_application_errors_are_neither() -> None:
    for exc in (ValueError("bad input"), KeyError("id"), RuntimeError("boom")):
        assert not is_connection_failure(exc)
        assert not is_connection_failure(exc, during_checkout=True)
        assert not is_transient(exc)


# -- MySQL / MariaDB ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "orig",
    [
        pymysql.err.OperationalError(2013, "Lost connection to MySQL server during query"),
        pymysql.err.OperationalError(2006, "MySQL server has gone away"),
        pymysql.err.OperationalError(1040, "Too many connections"),
        pymysql.err.OperationalError(2003, "Can't connect to MySQL server"),
    ],
)
def test_mysql_lost_or_refused_connections_are_failures(orig: Exception) -> None:
    exc = wrapped(orig, sqlalchemy.exc.OperationalError)
    assert is_connection_failure(exc)
    assert is_transient(exc)


@pytest.mark.parametrize(
    "orig",
    [
        pymysql.err.OperationalError(1213, "Deadlock found when trying to get lock"),
        pymysql.err.OperationalError(1205, "Lock wait timeout exceeded"),
    ],
)
def test_mysql_deadlocks_are_transient_only(orig: Exception) -> None:
    exc = wrapped(orig, sqlalchemy.exc.OperationalError)
    assert not is_connection_failure(exc)
    assert is_transient(exc)


@pytest.mark.parametrize(
    ("orig", "kind"),
    [
        (pymysql.err.IntegrityError(1062, "Duplicate entry '1' for key 'PRIMARY'"), sqlalchemy.exc.IntegrityError),
        (pymysql.err.ProgrammingError(1064, "You have an error in your SQL syntax"), sqlalchemy.exc.ProgrammingError),
    ],
)
def test_mysql_application_errors_are_neither(orig: Exception, kind: type[sqlalchemy.exc.DBAPIError]) -> None:
    exc = wrapped(orig, kind)
    assert not is_connection_failure(exc)
    assert not is_transient(exc)


def test_mysql_style_plain_orig_objects() -> None:
    class MySQLError(Exception):
        pass

    assert is_connection_failure(wrapped(MySQLError(2013, "Lost connection")))
    deadlock = wrapped(MySQLError(1213, "Deadlock"))
    assert not is_connection_failure(deadlock)
    assert is_transient(deadlock)
    duplicate = wrapped(MySQLError(1062, "Duplicate"))
    assert not is_connection_failure(duplicate)
    assert not is_transient(duplicate)
