"""Which exceptions say "the database connection is failing" and which are safe to retry.

The breaker must count a refused, reset or timed-out connection and never an application error
(a failed constraint, bad SQL), or one bug would take a healthy service offline. Codes come from
the servers' documented error classes so the rules hold across drivers:

- PostgreSQL SQLSTATE class 08 (connection exception), 53300 (too many connections),
  57P01-57P03 (shutdown, crash, cannot connect now);
- MySQL/MariaDB error numbers for lost, refused and too many connections.
"""

from __future__ import annotations

import contextlib
import sys
from typing import TYPE_CHECKING, TypeGuard

if TYPE_CHECKING:
    import sqlalchemy.exc

_PG_CONNECTION_STATES = frozenset({"53300", "57P01", "57P02", "57P03"})
_PG_TRANSIENT_STATES = frozenset({"40001", "40P01"})  # serialization failure, deadlock
_MYSQL_CONNECTION_ERRNOS = frozenset({1040, 1053, 1129, 1152, 1158, 1159, 1160, 1161, 2002, 2003, 2006, 2013})
_MYSQL_TRANSIENT_ERRNOS = frozenset({1205, 1213})  # lock wait timeout, deadlock


_PEP249_CONNECTION_CLASSES = frozenset({"OperationalError", "InterfaceError"})


def _is_pep249_connection_class(exc: BaseException) -> bool:
    """An OperationalError/InterfaceError of SQLAlchemy or of any driver (the pool raises the driver's own).

    PEP 249 fixes these class names, so matching by name covers every DB-API driver without importing it.
    """
    return any(cls.__name__ in _PEP249_CONNECTION_CLASSES for cls in type(exc).__mro__)


def _is_pep249_error(exc: BaseException) -> bool:
    return any(cls.__name__ == "Error" and cls.__module__ != "builtins" for cls in type(exc).__mro__)


# SQLAlchemy's exception classes are looked up, not imported: a process that never loaded SQLAlchemy
# (a Django app without POOLGUARD["SQLALCHEMY"]) cannot raise one, and need not pay for loading it.


def _sqlalchemy_error(exc: BaseException, name: str) -> bool:
    errors = sys.modules.get("sqlalchemy.exc")
    return errors is not None and isinstance(exc, getattr(errors, name))


def _is_dbapi_error(exc: BaseException) -> TypeGuard[sqlalchemy.exc.DBAPIError]:
    return _sqlalchemy_error(exc, "DBAPIError")


def _driver_error(exc: BaseException) -> BaseException:
    if _is_dbapi_error(exc) and exc.orig is not None:
        return exc.orig
    return exc


def _sqlstate(error: BaseException) -> str | None:
    for attribute in ("sqlstate", "pgcode"):
        value = getattr(error, attribute, None)
        if isinstance(value, str):
            return value
    cause = error.__cause__
    if cause is not None and cause is not error:
        value = getattr(cause, "sqlstate", None)
        if isinstance(value, str):
            return value
    return None


def _mysql_errno(exc: BaseException) -> int | None:
    """The server's error number of a MySQL driver error (``args[0]``); None for any other exception."""
    if _is_dbapi_error(exc):
        error: BaseException | None = exc.orig
    else:
        error = exc if _is_pep249_error(exc) else None
    args = getattr(error, "args", ())
    if args and isinstance(args[0], int) and not isinstance(args[0], bool):
        return args[0]
    return None


def is_checkout_timeout(exc: BaseException) -> bool:
    """True when the pool gave up waiting for a free connection (SQLAlchemy's, psycopg_pool's or asyncio's)."""
    return (
        isinstance(exc, TimeoutError) or _sqlalchemy_error(exc, "TimeoutError") or type(exc).__name__ == "PoolTimeout"
    )


def is_connection_failure(exc: BaseException, *, during_checkout: bool = False) -> bool:
    """True when ``exc`` says the database or the network to it is failing.

    During checkout any driver-level operational or interface error is a connection failure, as is a
    pool timeout or an OS-level socket error: nothing application-specific has run yet. During use
    only errors that name a lost, refused or exhausted connection count.
    """
    if _sqlalchemy_error(exc, "TimeoutError"):
        return True
    if _is_dbapi_error(exc) and exc.connection_invalidated:
        return True
    if during_checkout and (isinstance(exc, OSError | TimeoutError) or _is_pep249_connection_class(exc)):
        return True
    error = _driver_error(exc)
    state = _sqlstate(error)
    if state is not None:
        return state.startswith("08") or state in _PG_CONNECTION_STATES
    errno = _mysql_errno(exc)
    if errno is not None and errno in _MYSQL_CONNECTION_ERRNOS:
        return True
    return isinstance(error, ConnectionError)


def is_transient(exc: BaseException) -> bool:
    """True when running the same work again may succeed: lost connections, deadlocks, serialization.

    A driver error without a server code (refused, reset, DNS) is transient; one with a code is only
    when the code is a connection, deadlock or serialization failure, so bad SQL is never retried.
    """
    if is_connection_failure(exc):
        return True
    error = _driver_error(exc)
    state = _sqlstate(error)
    if state is not None:
        return state in _PG_TRANSIENT_STATES
    errno = _mysql_errno(exc)
    if errno is not None:
        return errno in _MYSQL_TRANSIENT_ERRNOS
    return (
        _sqlalchemy_error(exc, "OperationalError")
        or _sqlalchemy_error(exc, "InterfaceError")
        or isinstance(error, OSError)
    )


_COUNTED_ATTRIBUTE = "_poolguard_counted_pool"


def mark_counted(exc: BaseException, pool: str) -> None:
    """Notes on ``exc`` (and the driver error it wraps) that ``pool``'s breaker counted it.

    Adapters turn such an error into the 503 when it escapes a view: the request failed because the
    database did, which is what 503 + Retry-After says, not a bug worth a 500.
    """
    for target in (exc, getattr(exc, "orig", None), exc.__cause__):
        if target is not None:
            with contextlib.suppress(AttributeError, TypeError):  # an exception class with __slots__
                setattr(target, _COUNTED_ATTRIBUTE, pool)


def counted_pool(exc: BaseException) -> str | None:
    """The pool whose breaker counted ``exc`` (or an error it wraps) as a connection failure, else None."""
    current: BaseException | None = exc
    for _ in range(5):
        if current is None:
            return None
        pool = getattr(current, _COUNTED_ATTRIBUTE, None)
        if isinstance(pool, str):
            return pool
        orig = getattr(current, "orig", None)
        current = orig if isinstance(orig, BaseException) else (current.__cause__ or current.__context__)
    return None
