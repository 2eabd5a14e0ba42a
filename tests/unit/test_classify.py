"""Which exceptions the breaker counts and retry retries, with real exception objects."""

from __future__ import annotations

import asyncpg.exceptions
import django.db.utils
import psycopg.errors
import pymysql.err
import pytest
import sqlalchemy.exc
from sqlalchemy.dialects.postgresql.asyncpg import AsyncAdapt_asyncpg_dbapi

from poolguard._classify import (
    classify,
    is_checkout_timeout,
    is_connection_failure,
    is_transient,
    mark_pre_ping,
    server_refusal,
)


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


# -- every connection-level class, every driver ----------------------------------------------------------------


@pytest.mark.parametrize(
    "error",
    [
        psycopg.errors.InvalidPassword("password authentication failed"),
        psycopg.errors.InvalidAuthorizationSpecification('role "x" does not exist'),
        DriverError("28P01"),
        DriverError("28000"),
    ],
)
def test_postgres_auth_failures_are_connection_failures_but_not_transient(error: Exception) -> None:
    exc = wrapped(error, sqlalchemy.exc.OperationalError)
    assert is_connection_failure(exc)
    assert is_connection_failure(error, during_checkout=True)
    assert classify(exc) == "auth"
    assert not is_transient(exc)


@pytest.mark.parametrize("sqlstate", ["08003", "08004", "08P01", "57P02", "57P05"])
def test_more_postgres_connection_states_are_failures(sqlstate: str) -> None:
    assert is_connection_failure(wrapped(DriverError(sqlstate)))


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (asyncpg.exceptions.InvalidPasswordError("password authentication failed"), True),
        (asyncpg.exceptions.InvalidAuthorizationSpecificationError('role "x" does not exist'), True),
        (asyncpg.exceptions.TooManyConnectionsError("sorry, too many clients"), True),
        (asyncpg.exceptions.AdminShutdownError("terminating connection"), True),
        (asyncpg.exceptions.ConnectionDoesNotExistError("connection was closed"), True),
        (asyncpg.exceptions.UniqueViolationError("duplicate key"), False),
        (asyncpg.exceptions.PostgresSyntaxError("syntax error"), False),
    ],
)
def test_asyncpg_errors_raw_and_through_sqlalchemys_adapter(error: Exception, expected: bool) -> None:
    """SQLAlchemy's asyncpg adapter translates to its own Error (often the base class), copying the SQLSTATE."""
    assert is_connection_failure(error) is expected
    translated = AsyncAdapt_asyncpg_dbapi.Error(str(error), error)
    translated.__cause__ = error
    assert translated.sqlstate == error.sqlstate
    assert is_connection_failure(translated) is expected
    assert is_connection_failure(wrapped(translated)) is expected
    assert is_connection_failure(wrapped(translated), during_checkout=True) is expected


@pytest.mark.parametrize(
    ("orig", "verdict"),
    [
        # Real pymysql errors carry the server's SQLSTATE too; the error number decides.
        (pymysql.err.OperationalError(1045, "Access denied for user", sqlstate="28000"), "auth"),
        (pymysql.err.OperationalError(4151, "Access denied, this account is locked", sqlstate="HY000"), "auth"),
        (pymysql.err.OperationalError(1226, "has exceeded the 'max_user_connections'", sqlstate="42000"), "connection"),
        (
            pymysql.err.OperationalError(1203, "already has more than 'max_user_connections'", sqlstate="42000"),
            "connection",
        ),
        (pymysql.err.OperationalError(1927, "Connection was killed", sqlstate="70100"), "connection"),
        (pymysql.err.OperationalError(1053, "Server shutdown in progress", sqlstate="08S01"), "connection"),
        (pymysql.err.OperationalError(1205, "Lock wait timeout exceeded", sqlstate="HY000"), "transient"),
        (pymysql.err.IntegrityError(1062, "Duplicate entry", sqlstate="23000"), "application"),
        (pymysql.err.OperationalError(1044, "Access denied for user to database", sqlstate="42000"), "application"),
    ],
)
def test_mysql_error_numbers_decide_over_their_sqlstate(orig: Exception, verdict: str) -> None:
    assert classify(wrapped(orig, sqlalchemy.exc.OperationalError)) == verdict


def test_mysql_database_access_denied_counts_only_at_connect() -> None:
    """1044 at connect (the account may not use the database) is a failed checkout; later it is a missing grant."""
    exc = wrapped(
        pymysql.err.OperationalError(1044, "Access denied", sqlstate="42000"), sqlalchemy.exc.OperationalError
    )
    assert is_connection_failure(exc, during_checkout=True)
    assert not is_connection_failure(exc)


class _DjangoWrapper:
    """What ``DatabaseErrorWrapper`` needs of a DatabaseWrapper: the driver module and an error flag."""

    def __init__(self, database: object) -> None:
        self.Database = database
        self.errors_occurred = False


def django_wrapped(error: Exception, database: object) -> BaseException:
    """``error`` as Django raises it: its own class of the same name, ``from`` the driver's error."""
    try:
        with django.db.utils.DatabaseErrorWrapper(_DjangoWrapper(database)):
            raise error
    except django.db.utils.Error as exc:
        return exc
    raise AssertionError("not wrapped")


@pytest.mark.parametrize(
    ("error", "database", "expected"),
    [
        (psycopg.errors.AdminShutdown("terminating connection"), psycopg, True),
        (psycopg.errors.InvalidPassword("password authentication failed"), psycopg, True),
        (psycopg.errors.UniqueViolation("duplicate key"), psycopg, False),
        (pymysql.err.OperationalError(2013, "Lost connection", sqlstate=None), pymysql, True),
        (pymysql.err.OperationalError(1045, "Access denied", sqlstate="28000"), pymysql, True),
        (pymysql.err.IntegrityError(1062, "Duplicate entry", sqlstate="23000"), pymysql, False),
    ],
)
def test_djangos_wrappers_are_looked_through(error: Exception, database: object, expected: bool) -> None:
    exc = django_wrapped(error, database)
    assert type(exc).__module__ == "django.db.utils"
    assert exc.__cause__ is error
    assert is_connection_failure(exc) is expected


# -- chains: __cause__ always, __context__ only during checkout -----------------------------------------------


def pre_ping_over_a_reset() -> psycopg.ProgrammingError:
    """What SQLAlchemy's psycopg pre-ping raises when the reset leaves the connection not yet closed."""
    try:
        try:
            raise psycopg.OperationalError("consuming input failed: server closed the connection unexpectedly")
        finally:
            raise psycopg.ProgrammingError("can't change 'autocommit' now: connection in transaction status ACTIVE")
    except psycopg.ProgrammingError as exc:
        return exc


def test_an_error_masking_a_connection_failure_during_checkout_counts() -> None:
    exc = pre_ping_over_a_reset()
    assert isinstance(exc.__context__, psycopg.OperationalError)
    assert is_connection_failure(exc, during_checkout=True)
    assert is_connection_failure(wrapped(exc, sqlalchemy.exc.ProgrammingError), during_checkout=True)


def raise_while_handling(handled: Exception, error: Exception) -> None:
    try:
        raise handled
    except Exception:
        raise error  # noqa: B904 (the point: implicit chaining sets __context__)


def test_an_application_error_raised_while_handling_a_connection_error_never_counts() -> None:
    """Outside checkout ``__context__`` is whatever the application was handling: never trusted."""
    lost = psycopg.OperationalError("server closed the connection unexpectedly")
    for app_error in (
        psycopg.ProgrammingError("the query has 1 placeholder but 2 parameters were passed"),  # client-side, no code
        psycopg.errors.SyntaxError("syntax error at or near SELEC"),
        psycopg.errors.UniqueViolation("duplicate key"),
    ):
        with pytest.raises(psycopg.Error) as raised:
            raise_while_handling(lost, app_error)
        exc = raised.value
        assert exc.__context__ is lost
        assert not is_connection_failure(exc)
        assert not is_connection_failure(wrapped(exc, sqlalchemy.exc.ProgrammingError))
        assert not is_transient(wrapped(exc, sqlalchemy.exc.ProgrammingError))
    integrity = psycopg.errors.IntegrityError("violates a constraint")  # no code, application class
    integrity.__context__ = lost
    assert not is_connection_failure(integrity, during_checkout=True)


def test_a_coded_error_decides_alone() -> None:
    exc = psycopg.errors.SyntaxError("syntax error")
    exc.__cause__ = psycopg.errors.AdminShutdown("terminating connection")
    assert not is_connection_failure(exc, during_checkout=True)


def test_raise_from_none_hides_the_context() -> None:
    exc = psycopg.ProgrammingError("replaced")
    exc.__context__ = psycopg.OperationalError("lost")
    exc.__suppress_context__ = True
    assert not is_connection_failure(exc, during_checkout=True)


def test_a_non_database_error_is_never_looked_through() -> None:
    exc = RuntimeError("the payment service failed")
    exc.__cause__ = psycopg.errors.AdminShutdown("terminating connection")
    assert not is_connection_failure(exc)
    assert not is_connection_failure(exc, during_checkout=True)
    assert not is_transient(exc)


def test_cyclic_and_deep_chains_end() -> None:
    first = psycopg.ProgrammingError("a")
    second = psycopg.ProgrammingError("b")
    first.__context__, second.__context__ = second, first
    assert not is_connection_failure(first, during_checkout=True)
    deep: BaseException = psycopg.errors.AdminShutdown("terminating connection")
    for index in range(100):
        outer = psycopg.ProgrammingError(f"link {index}")
        outer.__cause__ = deep
        deep = outer
    assert not is_connection_failure(deep)  # too deep to be the same failure; and no RecursionError
    near = psycopg.ProgrammingError("near")
    near.__cause__ = psycopg.errors.AdminShutdown("terminating connection")
    assert is_connection_failure(wrapped(near))


def test_a_pre_ping_error_is_a_connection_failure() -> None:
    error = psycopg.ProgrammingError("whatever the pre-ping raised")
    assert not is_connection_failure(error, during_checkout=True)
    mark_pre_ping(error)
    assert is_connection_failure(error, during_checkout=True)
    assert is_connection_failure(wrapped(error, sqlalchemy.exc.ProgrammingError))


# -- server_refusal: did a server answer a failed connect? ------------------------------------------------


def test_server_refusal_reads_libpq_connect_errors_without_a_sqlstate() -> None:
    too_many = psycopg.OperationalError(
        'connection failed: connection to server at "127.0.0.1", port 5432 failed: '
        'FATAL:  too many connections for role "app"'
    )
    assert server_refusal(too_many) == "53300"
    no_role = psycopg.OperationalError('connection failed: ... failed: FATAL:  role "nosuchrole" does not exist')
    assert server_refusal(no_role) == "FATAL"
    refused = psycopg.OperationalError("connection failed: ... failed: Connection refused")
    assert server_refusal(refused) is None
    assert server_refusal(TimeoutError()) is None
