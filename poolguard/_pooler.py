"""Whether a connection pooler (PgBouncer, pgcat, Supavisor, Odyssey) stands between a client and PostgreSQL.

Behind a pooler in transaction mode, consecutive transactions of one client connection run on
different server connections: a statement prepared in one is missing in the next, and a startup
parameter is refused (or, ignored, silently lost) while a session ``SET`` would leak to other
clients. No client can ask the pooler, but the connection itself tells, cheaply:

- PgBouncer refuses a startup parameter it does not know with an error naming it
  ("unsupported startup parameter: options"; "... in options: statement_timeout" in newer
  versions), before anything is spent: :func:`refused_startup_parameter`.
- A pooler answers cancel requests itself, so the backend pid the client is given at startup (its
  cancel key) is the pooler's own, never the pid of the server process running the client's
  queries (``pg_backend_pid()``): :func:`dbapi_same_backend`, :func:`asyncpg_same_backend`. One
  round trip on the first connection, the server doing the comparison; it also catches a PgBouncer
  told to ignore the parameter (``ignore_startup_parameters = options``) and poolers of other
  kinds, which is the right answer for prepared statements: behind a session pooler turning them
  off costs only their reuse.

Nothing here imports a driver: connections are duck-typed (psycopg 3 and psycopg2
``info.backend_pid``, asyncpg ``get_server_pid()``), so the SQLAlchemy engines and an asyncpg pool
share it. :class:`Pooler` holds what one engine or pool learned, for its connects and its health.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol, TypeVar

__all__ = [
    "CHECK_TIMEOUT",
    "PGBOUNCER",
    "POOLER_ATTRIBUTE",
    "UNIDENTIFIED",
    "AsyncpgConnect",
    "Pooler",
    "asyncpg_same_backend",
    "client_pid",
    "connect_asyncpg",
    "connect_detecting",
    "dbapi_same_backend",
    "pooled_params",
    "refused_startup_parameter",
    "same_backend_query",
    "server_answered",
    "target",
]

_log = logging.getLogger("poolguard")


class _Connection(Protocol):
    def close(self) -> None: ...


C = TypeVar("C", bound=_Connection)

PGBOUNCER = "pgbouncer"
"""The pooler's kind when PgBouncer named itself (it refused a startup parameter) or the user said so."""

UNIDENTIFIED = "unidentified"
"""The pooler's kind when only its cancel key gave it away (PgBouncer ignoring the parameter, pgcat, ...)."""

CHECK_TIMEOUT = 5.0
"""Seconds the pid check may take on an asyncpg connection without a connect timeout of its own (libpq
connections are bounded by their TCP timeouts): a server that answers slower fails the connect."""


def same_backend_query(pid: int) -> str:
    """One row when the server process is ``pid``, none otherwise: a plain query (no parameter, nothing
    prepared), which a pooler runs whole on one server connection, outside any transaction."""
    return f"SELECT 1 WHERE pg_backend_pid() = {int(pid)}"


POOLER_ATTRIBUTE = "_poolguard_pooler"
"""Where a SQLAlchemy engine's :class:`Pooler` lives: an attribute of its dialect, which every copy of the
engine (``execution_options()``) and every pool after ``dispose()`` share."""

_REFUSED = re.compile(r"unsupported startup parameter(?: in options)?:\s*([A-Za-z_][A-Za-z0-9_.]*)?", re.IGNORECASE)


def refused_startup_parameter(error: BaseException) -> str | None:
    """The startup parameter a pooler refused to pass on (``"?"`` if unnamed); None for any other error."""
    match = _REFUSED.search(str(error))
    if match is None:
        return None
    return match.group(1) or "?"


def client_pid(connection: Any) -> int | None:
    """The backend pid a driver's connection was given at startup: the server's, or a pooler's own."""
    pid = getattr(getattr(connection, "info", None), "backend_pid", None)  # psycopg 3, psycopg2 >= 2.8
    for getter in ("get_server_pid", "get_backend_pid"):  # asyncpg, psycopg2
        get = getattr(connection, getter, None)
        if pid is None and callable(get):
            pid = get()
    return pid if isinstance(pid, int) else None


def dbapi_same_backend(connection: Any, pid: int) -> bool:
    """Whether a DB-API connection (psycopg, psycopg2, SQLAlchemy's async adapters) runs on server process ``pid``.

    One round trip: autocommit for the query (set locally, no round trip), so no ``BEGIN`` or
    ``ROLLBACK`` is sent and the connection is handed on as it came.
    """
    autocommit = connection.autocommit
    connection.autocommit = True
    try:
        cursor = connection.cursor()
        try:
            cursor.execute(same_backend_query(pid))
            return len(cursor.fetchall()) == 1
        finally:
            cursor.close()
    finally:
        connection.autocommit = autocommit


async def asyncpg_same_backend(connection: Any, pid: int, timeout: float | None = None) -> bool:
    """Whether an asyncpg connection runs on server process ``pid``, within ``timeout`` (:data:`CHECK_TIMEOUT`).

    asyncpg's ``execute`` without arguments is the simple query protocol: one round trip, nothing
    prepared (a statement left on a pooled server connection would be found by the next client).
    """
    status = await connection.execute(same_backend_query(pid), timeout=timeout or CHECK_TIMEOUT)
    return bool(status == "SELECT 1")


def pooled_params(params: Mapping[str, Any], direct: Mapping[str, Any], pooled: Mapping[str, Any]) -> dict[str, Any]:
    """``params`` as they would be had ``pooled`` been given instead of ``direct``: only where the two differ.

    ``direct`` and ``pooled`` are the connect arguments computed for "no pooler" and "a pooler";
    ``params`` what the driver is about to get (the URL's, a probe's bounds, the user's), left as they are elsewhere.
    """
    shifted = dict(params)
    for key in direct.keys() - pooled.keys():
        shifted.pop(key, None)
    for key, value in pooled.items():
        if key not in direct or direct[key] != value:
            shifted[key] = value
    return shifted


class Pooler:
    """What one engine or pool knows of a pooler in front of it: decided at its first connection, then kept.

    ``kind`` is None (none, or not known yet), :data:`PGBOUNCER` or :data:`UNIDENTIFIED`;
    ``decided`` says whether it is known. ``target`` (host, port and database only) names the
    database in the one log line a decision makes; ``adapts`` whether the connections are then made
    for the pooler (poolguard's own engines and pools) or only reported (an engine made elsewhere).
    """

    __slots__ = ("_lock", "adapts", "decided", "kind", "target")

    def __init__(self, target: str, *, kind: str | None = None, decided: bool = False, adapts: bool = True) -> None:
        self.target = target
        self.kind = kind
        self.decided = decided
        self.adapts = adapts
        self._lock = threading.Lock()

    def decide_by_pid(self, behind: bool) -> None:
        """Records what the pid check found."""
        if behind:
            self.decide(UNIDENTIFIED, "its cancel key is not the server's pid")
        else:
            self.decide(None, "its cancel key is the server's pid")

    def decide(self, kind: str | None, why: str) -> None:
        """Records the answer once (concurrent first connections may each find it) and says so once."""
        with self._lock:
            if self.decided:
                return
            self.kind, self.decided = kind, True
        if kind is None:
            _log.debug("poolguard: %s: no connection pooler in front (%s)", self.target, why)
        elif self.adapts:
            _log.info(
                "poolguard: %s is reached through a connection pooler (%s, %s): prepared statements are off and "
                "statement_timeout is not sent at startup (set it on the role); pgbouncer=False turns detection off",
                self.target,
                kind,
                why,
            )
        else:
            _log.info(
                "poolguard: %s is reached through a connection pooler (%s, %s); in transaction pooling, prepared "
                "statements and startup parameters break: make the engine with poolguard.create_engine (without "
                "creator= or pool=), which adapts to it",
                self.target,
                kind,
                why,
            )


_CHECK_FAILED = "the pid check failed, so prepared statements stay on"


def server_answered(error: BaseException) -> bool:
    """An error with the server's own code: the connection works (only the check failed), unlike a lost or
    timed-out one, whose state nobody knows."""
    return bool(getattr(error, "sqlstate", None) or getattr(error, "pgcode", None))


def connect_detecting(
    pooler: Pooler,
    connect: Callable[[dict[str, Any]], C],
    params: dict[str, Any],
    pooled: dict[str, Any],
    behind_pooler: Callable[[C], bool],
) -> C:
    """Connects with ``params``, or with ``pooled`` behind a pooler; until that is known, finds out.

    While undecided: a connect refused over a startup parameter is retried once with ``pooled`` (it
    was PgBouncer); a connect that succeeds is checked with ``behind_pooler`` (one round trip) and,
    behind a pooler, replaced by one made with ``pooled``. A check the server answered with an error
    decides "no pooler" (it cannot tell, and must not fail every connect); any other failure (lost,
    timed out) closes the connection and raises, undecided.
    """
    if pooler.decided:
        return connect(pooled if pooler.kind else params)
    try:
        connection = connect(params)
    except Exception as error:
        refused = refused_startup_parameter(error)
        if refused is None or pooled == params:
            raise
        connection = connect(pooled)
        pooler.decide(PGBOUNCER, f"it refused the startup parameter {refused!r}")
        return connection
    try:
        behind = behind_pooler(connection)
    except BaseException as error:
        if not isinstance(error, Exception) or not server_answered(error):
            connection.close()
            raise
        pooler.decide(None, _CHECK_FAILED)  # the server refused the query: the connection is as it was
        return connection
    pooler.decide_by_pid(behind)
    if not behind or pooled == params:
        return connection
    connection.close()
    return connect(pooled)


async def connect_asyncpg(
    pooler: Pooler,
    connect: Callable[[dict[str, Any]], Awaitable[Any]],
    params: dict[str, Any],
    pooled: dict[str, Any],
) -> Any:
    """:func:`connect_detecting` for an asyncpg connection (``connect`` returns one), e.g. an asyncpg pool's
    ``connect=`` hook; the check is :func:`asyncpg_same_backend` on ``get_server_pid()``, bounded by
    ``params["timeout"]`` (the connect timeout)."""
    if pooler.decided:
        return await connect(pooled if pooler.kind else params)
    try:
        connection = await connect(params)
    except Exception as error:
        refused = refused_startup_parameter(error)
        if refused is None or pooled == params:
            raise
        connection = await connect(pooled)
        pooler.decide(PGBOUNCER, f"it refused the startup parameter {refused!r}")
        return connection
    try:
        pid = client_pid(connection)
        behind = pid is not None and not await asyncpg_same_backend(connection, pid, params.get("timeout"))
    except BaseException as error:
        if not isinstance(error, Exception) or not server_answered(error) or connection.is_closed():
            connection.terminate()  # lost, timed out or cancelled: its state is unknown
            raise
        pooler.decide(None, _CHECK_FAILED)  # the server refused the query: the connection is as it was
        return connection
    pooler.decide_by_pid(behind)
    if not behind or pooled == params:
        return connection
    connection.terminate()  # nothing to wait for: it is idle
    return await connect(pooled)


class AsyncpgConnect:
    """An asyncpg pool's ``connect=`` hook that finds the pooler at the pool's first connection.

    ``connect`` is ``asyncpg.connect`` (passed in: this module imports no driver); ``direct`` and
    ``pooled`` are the pool's connect keyword arguments without and with a pooler in front. The pool
    calls the hook with its own arguments (``loop``, ``connection_class``, ``record_class``) and its
    connect keyword arguments, which are ``direct`` and what the user gave; behind a pooler the hook
    connects with them shifted to ``pooled`` (:func:`pooled_params`). ``pooler`` holds the answer,
    for health (an asyncpg pool keeps its hook as ``pool._connect``).
    """

    __slots__ = ("_connect", "direct", "pooled", "pooler")

    def __init__(
        self,
        pooler: Pooler,
        connect: Callable[..., Awaitable[Any]],
        direct: Mapping[str, Any],
        pooled: Mapping[str, Any],
    ) -> None:
        self.pooler = pooler
        self._connect = connect
        self.direct = direct
        self.pooled = pooled

    async def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return await connect_asyncpg(
            self.pooler,
            lambda params: self._connect(*args, **params),
            kwargs,
            pooled_params(kwargs, self.direct, self.pooled),
        )


def target(host: str | None, port: int | None, database: str | None) -> str:
    """How a log line names the database: host, port and database, never the user, password or options."""
    return f"{host or 'localhost'}:{port or 5432}/{database or ''}"
