"""Which exceptions say "the database connection is failing" and which are safe to retry.

The breaker must count a refused, reset, refused-at-login or timed-out connection and never an
application error (a failed constraint, bad SQL), or one bug would take a healthy service offline.
Codes come from the servers' documented error classes so the rules hold across drivers:

- PostgreSQL SQLSTATE class 08 (connection exception), class 28 (invalid authorization: a wrong
  password is 28P01, an unknown role or one without LOGIN 28000), 53300 (too many connections),
  57P01-57P03 (shutdown, crash, cannot connect now) and 57P05 (idle session timeout: the server
  closed the connection). psycopg and psycopg2 carry it as ``sqlstate``/``pgcode``, asyncpg as
  ``sqlstate``, and SQLAlchemy's asyncpg adapter copies it onto the error it translates to.
- MySQL/MariaDB error numbers (``args[0]``) for lost, refused, killed and too many connections,
  and for a refused login (1045 access denied, 4151/3118 account locked, 1130 host not allowed).
  The number decides, not the SQLSTATE pymysql also carries: MySQL's SQLSTATEs are too coarse
  (1226 "max_user_connections exceeded" is 42000, a lock wait timeout HY000).

Auth failures are connection failures (every request fails until the credentials are fixed, so the
breaker should shed them with a 503) but not transient: retrying within a request cannot fix them.

Wrapped and chained errors. An error that carries a server code is the server's answer and its
code decides alone. An error without one (SQLAlchemy's and Django's wrappers, the asyncpg
adapter's translation, a driver's client-side error) is looked through, at most a few links deep
and never twice: to ``.orig`` and ``__cause__`` (explicit wrapping: ``raise X from driver_error``)
always, and to ``__context__`` (whatever was being handled when it was raised) only for errors
raised while getting a connection (``during_checkout``). That is the safe direction: SQLAlchemy's
psycopg pre-ping restores autocommit in a ``finally`` and raises ``ProgrammingError: can't change
'autocommit' now`` over the real ``OperationalError``, which is found in ``__context__``; but an
application error raised later, in code handling an unrelated connection error (a fallback query
with a wrong placeholder count, also a code-less ``ProgrammingError``), gets that connection error
as its ``__context__`` too, and must never count: outside checkout no application code's context
is trusted. Integrity, data and not-supported errors are application errors whatever their chain,
and an error that is not a database error (ValueError, a framework's exception) is never looked
through. An error the pre-ping raised (see :func:`mark_pre_ping`) is a connection failure: it only
ran ``SELECT 1`` on a connection the pool was about to hand out.
"""

from __future__ import annotations

import contextlib
import sys
from typing import TYPE_CHECKING, Literal, TypeGuard

if TYPE_CHECKING:
    import sqlalchemy.exc

_PG_CONNECTION_CLASSES = ("08",)  # connection exception
_PG_AUTH_CLASSES = ("28",)  # invalid authorization specification: 28000, 28P01
_PG_CONNECTION_STATES = frozenset({"53300", "57P01", "57P02", "57P03", "57P05"})
_PG_TRANSIENT_STATES = frozenset({"40001", "40P01"})  # serialization failure, deadlock
_MYSQL_CONNECTION_ERRNOS = frozenset(
    {
        1040,  # too many connections
        1053,  # server shutdown in progress
        1129,  # host blocked after too many connection errors
        1152,  # connection aborted
        1158,  # got an error reading communication packets
        1159,  # timeout reading communication packets
        1160,  # got an error writing communication packets
        1161,  # timeout writing communication packets
        1203,  # max_user_connections exceeded (MySQL)
        1226,  # an account resource limit exceeded (MariaDB's max_user_connections)
        1927,  # connection was killed (MariaDB)
        2002,  # can't connect through the socket
        2003,  # can't connect to the server
        2005,  # unknown server host
        2006,  # server has gone away
        2013,  # lost connection during query
        2026,  # SSL connection error
        2055,  # lost connection (with the system error)
    }
)
_MYSQL_AUTH_ERRNOS = frozenset(
    {
        1045,  # access denied (wrong user or password)
        1130,  # host not allowed to connect
        1251,  # client does not support the server's authentication protocol
        1698,  # access denied (no password given)
        1862,  # password expired, must be changed first
        3118,  # account locked (MySQL)
        4151,  # account locked (MariaDB)
    }
)
_MYSQL_TRANSIENT_ERRNOS = frozenset({1205, 1213})  # lock wait timeout, deadlock

_MYSQL_CLIENT_ERRNOS = 2000  # MySQL error numbers from here on are the client library's, not the server's
_MAX_LINKS = 8
"""How deep a chain of wrapped errors is followed: SQLAlchemy over a driver over asyncpg is three."""

_PEP249_CONNECTION_CLASSES = frozenset({"OperationalError", "InterfaceError"})
_PEP249_APPLICATION_CLASSES = frozenset({"IntegrityError", "DataError", "NotSupportedError"})

Verdict = Literal["connection", "auth", "transient", "application", "unknown"]
"""What an error says: the connection fails (``auth``: the login is refused), a retry may succeed,
the application's own error (the server answered with a code of another class), or nothing known."""


def _mro_names(exc: BaseException) -> set[str]:
    return {cls.__name__ for cls in type(exc).__mro__}


def _is_pep249_connection_class(exc: BaseException) -> bool:
    """An OperationalError/InterfaceError of SQLAlchemy or of any driver (the pool raises the driver's own).

    PEP 249 fixes these class names, so matching by name covers every DB-API driver without importing it.
    """
    return not _PEP249_CONNECTION_CLASSES.isdisjoint(_mro_names(exc))


def _is_pep249_error(exc: BaseException) -> bool:
    return any(cls.__name__ == "Error" and cls.__module__ != "builtins" for cls in type(exc).__mro__)


# SQLAlchemy's exception classes are looked up, not imported: a process that never loaded SQLAlchemy
# (a Django app without POOLGUARD["SQLALCHEMY"]) cannot raise one, and need not pay for loading it.


def _sqlalchemy_error(exc: BaseException, name: str) -> bool:
    errors = sys.modules.get("sqlalchemy.exc")
    return errors is not None and isinstance(exc, getattr(errors, name))


def _is_dbapi_error(exc: BaseException) -> TypeGuard[sqlalchemy.exc.DBAPIError]:
    return _sqlalchemy_error(exc, "DBAPIError")


def _sqlstate(error: BaseException) -> str | None:
    """The SQLSTATE an error carries itself: ``sqlstate`` (psycopg, asyncpg, its SQLAlchemy adapter), ``pgcode``."""
    for attribute in ("sqlstate", "pgcode"):
        value = getattr(error, attribute, None)
        if isinstance(value, str) and value:
            return value
    return None


def _mysql_errno(error: BaseException, *, is_driver_error: bool) -> int | None:
    """The server's error number of a MySQL driver error (``args[0]``); None for any other exception."""
    if isinstance(error, OSError) or not (is_driver_error or _is_pep249_error(error)):
        return None  # an OSError's args[0] is the system's errno
    args = error.args
    if args and isinstance(args[0], int) and not isinstance(args[0], bool):
        return args[0]
    return None


def _code_of(error: BaseException, *, is_driver_error: bool) -> str | int | None:
    """A MySQL error number, else a SQLSTATE: the server's answer, when the error carries one."""
    errno = _mysql_errno(error, is_driver_error=is_driver_error)
    return errno if errno is not None else _sqlstate(error)


def _verdict_of_code(code: str | int) -> Verdict:
    if isinstance(code, int):
        if code in _MYSQL_AUTH_ERRNOS:
            return "auth"
        if code in _MYSQL_CONNECTION_ERRNOS:
            return "connection"
        return "transient" if code in _MYSQL_TRANSIENT_ERRNOS else "application"
    if code.startswith(_PG_AUTH_CLASSES):
        return "auth"
    if code.startswith(_PG_CONNECTION_CLASSES) or code in _PG_CONNECTION_STATES:
        return "connection"
    return "transient" if code in _PG_TRANSIENT_STATES else "application"


def _chain(exc: BaseException, *, follow_context: bool) -> tuple[list[BaseException], str | int | None]:
    """``exc`` and the errors it stands for, outermost first, and the first server code on the way.

    The walk stops at an error with a code (it decides), at an application-class error, and at an
    error that is not a database error; see the module docstring for which links are followed.
    """
    links: list[BaseException] = []
    seen: set[int] = set()
    current: BaseException | None = exc
    is_driver_error = False
    while current is not None and id(current) not in seen and len(links) < _MAX_LINKS:
        seen.add(id(current))
        links.append(current)
        code = _code_of(current, is_driver_error=is_driver_error)
        if code is not None:
            return links, code
        names = _mro_names(current)
        if not _PEP249_APPLICATION_CLASSES.isdisjoint(names):
            break
        if _is_dbapi_error(current):
            current, is_driver_error = current.orig or current.__cause__, True
            continue
        if not (is_driver_error or _is_pep249_error(current)):
            break
        is_driver_error = False
        if current.__cause__ is not None:
            current = current.__cause__
        elif follow_context and not current.__suppress_context__:
            current = current.__context__
        else:
            break
    return links, None


TOO_MANY_CONNECTIONS = frozenset({"53300", "1040", "1203", "1226"})
"""Server codes for "no connection slot left" (PostgreSQL, MySQL/MariaDB server-wide and per account)."""


def server_refusal(exc: BaseException) -> str | None:
    """The code with which the server itself refused, as a string; None when no server answered.

    A refused login, too many connections or a server starting up all prove the server is up and
    answering, which is what tells a probe refused by a busy database from one that met a silent
    network. Client-side codes (PostgreSQL class 08 raised by a driver, MySQL's 2000 range) are not
    the server's answer.
    """
    links, code = _chain(exc, follow_context=True)
    if isinstance(code, int):
        return str(code) if code < _MYSQL_CLIENT_ERRNOS else None
    if code is None:
        return _libpq_refusal(links)
    return None if code.startswith(_PG_CONNECTION_CLASSES) else code


def _libpq_refusal(links: list[BaseException]) -> str | None:
    """libpq reports a refused connect with no SQLSTATE, only the server's ``FATAL:`` text in the message."""
    for link in links:
        message = str(link)
        if "FATAL:" in message:
            lowered = message.lower()
            return "53300" if "too many connections" in lowered or "too many clients" in lowered else "FATAL"
    return None


_PRE_PING_ATTRIBUTE = "_poolguard_pre_ping"


def mark_pre_ping(exc: BaseException) -> None:
    """Notes that the pool's pre-ping raised ``exc``: whatever it is, the connection failed its ``SELECT 1``."""
    with contextlib.suppress(AttributeError, TypeError):  # an exception class with __slots__
        setattr(exc, _PRE_PING_ATTRIBUTE, True)


def classify(exc: BaseException, *, during_checkout: bool = False) -> Verdict:
    """What ``exc`` says about the database connection (see the module docstring for the rules)."""
    if _sqlalchemy_error(exc, "TimeoutError"):
        return "connection"
    if _is_dbapi_error(exc) and exc.connection_invalidated:
        return "connection"
    links, code = _chain(exc, follow_context=during_checkout)
    if any(getattr(link, _PRE_PING_ATTRIBUTE, False) is True for link in links):
        return "connection"
    verdict = _verdict_of_code(code) if code is not None else "unknown"
    if verdict == "auth":
        return verdict
    if during_checkout and any(
        isinstance(link, OSError | TimeoutError) or _is_pep249_connection_class(link) for link in links
    ):
        return "connection"
    if verdict == "unknown" and any(isinstance(link, ConnectionError) for link in links):
        return "connection"
    return verdict


def is_checkout_timeout(exc: BaseException) -> bool:
    """True when the pool gave up waiting for a free connection (SQLAlchemy's, psycopg_pool's or asyncio's)."""
    return (
        isinstance(exc, TimeoutError) or _sqlalchemy_error(exc, "TimeoutError") or type(exc).__name__ == "PoolTimeout"
    )


def is_connection_failure(exc: BaseException, *, during_checkout: bool = False) -> bool:
    """True when ``exc`` says the database or the network to it is failing, or the login is refused.

    During checkout any driver-level operational or interface error is a connection failure, as is a
    pool timeout or an OS-level socket error: nothing application-specific has run yet. During use
    only errors that name a lost, refused or exhausted connection count.
    """
    return classify(exc, during_checkout=during_checkout) in ("connection", "auth")


def is_transient(exc: BaseException) -> bool:
    """True when running the same work again may succeed: lost connections, deadlocks, serialization.

    A driver error without a server code (refused, reset, DNS) is transient; one with a code is only
    when the code is a connection, deadlock or serialization failure, so bad SQL is never retried,
    and neither is a refused login (a retry within the request cannot fix the credentials).
    """
    verdict = classify(exc)
    if verdict != "unknown":
        return verdict in ("connection", "transient")
    links, _code = _chain(exc, follow_context=False)
    return (
        _sqlalchemy_error(exc, "OperationalError")
        or _sqlalchemy_error(exc, "InterfaceError")
        or any(isinstance(link, OSError) for link in links)
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
