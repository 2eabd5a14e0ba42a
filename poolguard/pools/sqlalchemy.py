"""SQLAlchemy Engine and AsyncEngine pools behind the pool protocols.

SQLAlchemy has events for checkout, checkin and new connections, but none before a checkout
starts waiting, and that wait is what matters most. So the pool object gets a subclass of its own
class whose ``connect`` goes through the core's gate and whose ``_do_return_conn`` (the template method
every return path of a SQLAlchemy pool ends in: checkin, invalidation, detach) reports the checkin
(see :meth:`SQLAlchemyPool._guard_pool`). Both are on the per-request path, and a method of the
pool costs a fraction of an event dispatch. New connections and errors use the engine's dialect
events, which SQLAlchemy keeps across ``dispose()``. Async engines run the same code: their pool is
synchronous code inside a greenlet, and admission waits there through ``await_only`` without
blocking the event loop.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from contextvars import ContextVar
from types import MethodType
from typing import Any

import sqlalchemy
from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.engine.interfaces import DBAPIConnection, ExceptionContext
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.pool import ConnectionPoolEntry, Pool, PoolProxiedConnection, QueuePool

from poolguard import _pooler
from poolguard._classify import is_connection_failure, mark_pre_ping
from poolguard.errors import ConfigError
from poolguard.pools import (
    CONNECT_TIMEOUT,
    PoolCounts,
    PoolEvents,
    bound_connect,
    bound_probe_params,
    driver_fileno,
    shutdown_socket,
)

_log = logging.getLogger("poolguard")

_CONNECT_STARTED = "poolguard.connect_started"
_EVENTS_ATTRIBUTE = "_poolguard_events"
_LIBPQ_DRIVERS = frozenset({"psycopg", "psycopg_async", "psycopg2"})
_probe_timeout: ContextVar[float | None] = ContextVar("poolguard_probe_timeout", default=None)
"""Set while a probe connects, so the connect listener bounds that one connect (and only it)."""


_LIBPQ_READ_BOUNDS = (("tcp_user_timeout", "keepalives_idle"), "{'tcp_user_timeout': 10000, 'keepalives_idle': 10}")
_READ_BOUNDS: dict[str, tuple[tuple[str, ...], str]] = {
    # driver: (any of these connect arguments bounds a read on a silent server, what to add)
    "psycopg": _LIBPQ_READ_BOUNDS,
    "psycopg_async": _LIBPQ_READ_BOUNDS,
    "psycopg2": _LIBPQ_READ_BOUNDS,
    "asyncpg": (("command_timeout",), "{'command_timeout': 35}"),
    "pymysql": (("read_timeout",), "{'read_timeout': 35, 'write_timeout': 35}"),
}


def unbounded_reads(driver: str, cparams: dict[str, Any]) -> str | None:
    """The ``connect_args`` to suggest when nothing bounds a read on a silent server; None when something does."""
    known = _READ_BOUNDS.get(driver)
    if known is None:
        return None
    keys, suggestion = known
    return None if any(cparams.get(key) for key in keys) else suggestion


_PROBE_FAMILIES = {"psycopg": "libpq", "psycopg_async": "libpq", "psycopg2": "libpq", "asyncpg": "asyncpg",
                   "pymysql": "mysql", "mysqldb": "mysql"}  # fmt: skip
"""SQLAlchemy driver names by the family of connect arguments they take."""


def behind_pooler(dbapi_connection: Any, timeout: float | None = None) -> bool:
    """Whether a new PostgreSQL connection's startup pid is a pooler's: one round trip, on the connection.

    Called where SQLAlchemy connects, which for an asyncio driver is inside its greenlet; ``timeout``
    bounds the round trip there (libpq's connections have their TCP bounds).
    """
    driver_connection = getattr(dbapi_connection, "driver_connection", dbapi_connection)
    pid = _pooler.client_pid(driver_connection)
    if pid is None:
        return False
    if callable(getattr(driver_connection, "get_server_pid", None)):  # asyncpg
        same = sqlalchemy.util.await_only(_pooler.asyncpg_same_backend(driver_connection, pid, timeout))
    else:
        same = _pooler.dbapi_same_backend(dbapi_connection, pid)
    return not same


def connect_through_pooler(
    dialect: Any, pooler: _pooler.Pooler, direct: dict[str, Any], pooled: dict[str, Any]
) -> None:
    """Makes the engine's connections with ``pooled`` connect arguments behind a pooler, found at the first one.

    ``direct`` and ``pooled`` are the engine's ``connect_args`` without and with a pooler in front
    (see :func:`poolguard._pooler.connect_detecting`). The dialect's own ``connect`` is wrapped, an
    attribute of this engine's dialect instance: it runs after every ``do_connect`` listener (a
    guard's too) and before the pool's ``connect`` events, and only there can a connect the pooler
    refused be retried. Once decided it costs a dict copy per new connection.
    """
    real_connect = dialect.connect

    def connect(*cargs: Any, **cparams: Any) -> Any:
        return _pooler.connect_detecting(
            pooler,
            lambda params: real_connect(*cargs, **params),
            cparams,
            _pooler.pooled_params(cparams, direct, pooled),
            lambda connection: behind_pooler(connection, cparams.get("timeout")),  # asyncpg's connect timeout
        )

    dialect.connect = connect


def _record_key(connection: PoolProxiedConnection) -> int:
    """A checked-out connection's key: its pool record, which is what the pool's return path receives."""
    return id(connection._connection_record)


class SQLAlchemyPool:
    """Adapts a SQLAlchemy Engine or AsyncEngine (QueuePool, AsyncAdaptedQueuePool, NullPool, ...)."""

    def __init__(self, engine: Engine | AsyncEngine) -> None:
        self.engine = engine
        self.sync_engine: Engine = engine.sync_engine if isinstance(engine, AsyncEngine) else engine
        self.is_async = isinstance(engine, AsyncEngine)
        self.backend = self.sync_engine.dialect.name
        dialect = self.sync_engine.dialect
        self.db_system = "mariadb" if getattr(dialect, "is_mariadb", False) else dialect.name
        """The OpenTelemetry ``db.system.name`` value."""
        self._events: PoolEvents | None = None
        self._mid_checkout: dict[int, Any] = {}
        """DB-API connections in a pre-ping or being set up (the connect events' round trips) right now,
        by id: what :meth:`abort_connecting` reaches."""
        self._bounds_checked = False
        self._listeners: list[tuple[Any, str, Any]] = []
        self._guarded_class: type[Pool] | None = None
        self._pooler: _pooler.Pooler | None = getattr(dialect, _pooler.POOLER_ATTRIBUTE, None)
        if self._pooler is None and dialect.name == "postgresql" and dialect.driver in _PROBE_FAMILIES:
            # An engine made elsewhere: its first new connection tells, for health and a log line.
            url = self.sync_engine.url
            self._pooler = _pooler.Pooler(_pooler.target(url.host, url.port, url.database), adapts=False)
            setattr(dialect, _pooler.POOLER_ATTRIBUTE, self._pooler)

    @property
    def pooler(self) -> str | None:
        """The kind of connection pooler in front (``pgbouncer``, ``unidentified``), None when none is known."""
        return self._pooler.kind if self._pooler is not None else None

    def attach(self, events: PoolEvents) -> None:
        if getattr(self.sync_engine, _EVENTS_ATTRIBUTE, None) is not None:
            raise ConfigError(
                "Guard(engine)",
                self.sync_engine.url.render_as_string(hide_password=True),
                "an engine no other Guard watches; share one Guard per engine (guard.close() releases it)",
            )
        setattr(self.sync_engine, _EVENTS_ATTRIBUTE, events)
        self._events = events
        # First: an app's do_connect that connects itself gets the probe's bounds too, and a new
        # connection is within reach through every connect listener (the dialect's initialize too).
        self._listen_first_on_dialect("do_connect", self._before_connect)
        self._listen(self.sync_engine, "connect", self._setting_up, insert=True)
        self._listen(self.sync_engine, "connect", self._after_connect)
        self._listen(self.sync_engine, "handle_error", self._on_error)
        self._guard_pool(self.sync_engine.pool)
        self._watch_pings(self.sync_engine.dialect)

    def detach(self) -> None:
        """Idempotent, and it removes only its own hooks: a newer Guard on the engine stays intact."""
        if self._events is None:
            return
        for target, name, fn in self._listeners:
            event.remove(target, name, fn)
        self._listeners.clear()
        pool = self.sync_engine.pool
        if type(pool) is self._guarded_class:
            pool.__class__ = pool.__class__.__bases__[0]
        dialect = self.sync_engine.dialect
        if getattr(dialect.__dict__.get("do_ping"), _EVENTS_ATTRIBUTE, None) is self:
            del dialect.do_ping
        if getattr(self.sync_engine, _EVENTS_ATTRIBUTE, None) is self._events:
            delattr(self.sync_engine, _EVENTS_ATTRIBUTE)
        self._events = None
        self._guarded_class = None

    def _listen(self, target: Any, name: str, fn: Any, **options: Any) -> None:
        event.listen(target, name, fn, **options)
        self._listeners.append((target, name, fn))

    def _listen_first_on_dialect(self, name: str, fn: Any) -> None:
        """Listens to a dialect event ahead of the app's listeners of it.

        SQLAlchemy drops ``insert=True`` for dialect events (``DialectEvents._listen`` does not pass
        it on), so the listener is moved to the front of the engine's collection here.
        """
        self._listen(self.sync_engine, name, fn, insert=True)
        listeners = getattr(getattr(self.sync_engine.dialect.dispatch, name, None), "listeners", None)
        if isinstance(listeners, collections.deque) and fn in listeners and listeners[0] != fn:
            listeners.remove(fn)
            listeners.appendleft(fn)

    def _guard_pool(self, pool: Pool) -> None:
        """Routes the pool's checkouts and returns through the gate with a subclass of the pool's own class.

        A subclass, not events: SQLAlchemy has no event before a checkout waits, and an
        ``engine_disposed`` listener would switch every execution on the engine to its slower
        event-dispatching path. ``engine.dispose()`` builds the replacement pool from
        ``self.__class__``, so the replacement is guarded too. The subclass is per guard (it holds
        these events) and adds no state, so :meth:`detach` can hand the pool its class back.
        Connections are keyed by their pool record, which is what every return path hands back.
        """
        events = self._events
        assert events is not None
        base = type(pool)
        real_connect = base.connect
        real_return = base._do_return_conn
        await_in_greenlet = sqlalchemy.util.await_only if self.is_async else None
        checkout = events.checkout
        checkin = events.checkin
        mid_checkout = self._mid_checkout
        forget_closed = self._forget_closed

        def connect(pool: Pool) -> PoolProxiedConnection:
            try:
                connection: PoolProxiedConnection = checkout(
                    MethodType(real_connect, pool), await_in_greenlet, _record_key
                )
            except BaseException:
                if mid_checkout:
                    forget_closed()
                raise
            if mid_checkout:
                mid_checkout.pop(id(connection.dbapi_connection), None)
            return connection

        def _do_return_conn(pool: Pool, record: ConnectionPoolEntry) -> None:
            try:
                real_return(pool, record)
            finally:
                checkin(id(record))

        guarded = type(
            f"Guarded{base.__name__}",
            (base,),
            {"connect": connect, "_do_return_conn": _do_return_conn, "__module__": __name__},
        )
        pool.__class__ = guarded
        self._guarded_class = guarded

    def _watch_pings(self, dialect: Any) -> None:
        """Keeps the connections in a pre-ping within reach: a ping hung on a silent server holds its
        thread in the middle of a checkout, where no holder exists yet.

        An attribute of the engine's own dialect instance (SQLAlchemy calls ``self.do_ping``), so
        only pre-pings of this engine pay for it, and :meth:`detach` removes it.
        """
        real_ping = dialect.do_ping
        pinging = self._mid_checkout

        def do_ping(dbapi_connection: Any) -> bool:
            key = id(dbapi_connection)
            pinging[key] = dbapi_connection
            try:
                return bool(real_ping(dbapi_connection))
            finally:
                pinging.pop(key, None)

        setattr(do_ping, _EVENTS_ATTRIBUTE, self)
        dialect.do_ping = do_ping

    def abort_connecting(self) -> int:
        aborted = 0
        for connection in list(self._mid_checkout.values()):
            raw = getattr(connection, "driver_connection", connection)
            aborted += shutdown_socket(driver_fileno(raw))
        return aborted

    def _before_connect(self, dialect: Any, record: ConnectionPoolEntry | None, cargs: Any, cparams: Any) -> None:
        family = _PROBE_FAMILIES.get(dialect.driver, "")
        if not self._bounds_checked:
            self._first_connect(dialect.driver, family, cparams)
        if record is None:  # a probe's own connection, not the pool's
            timeout = _probe_timeout.get()
            if timeout is not None:
                bound_probe_params(family, cparams, timeout)
            return
        bound_connect(family, cparams)
        assert self._events is not None
        self._events.connecting()
        record.info[_CONNECT_STARTED] = self._events.clock()

    def _first_connect(self, driver: str, family: str, cparams: dict[str, Any]) -> None:
        """Says once what bounds the engine's connections lack: reads (a warning: only an outage the
        guard has confirmed ends them) and the connect (bounded here, see :func:`bound_connect`)."""
        self._bounds_checked = True
        name = self._events.name if self._events is not None else "?"
        suggestion = unbounded_reads(driver, cparams)
        if suggestion is not None:
            _log.warning(
                "poolguard: reads of pool %r on a silent (black-holed) database are unbounded with these connect "
                "arguments; poolguard aborts connections hung through an outage it has confirmed, but to bound "
                "every read create the engine with connect_args=%s (or with poolguard.create_engine)",
                name,
                suggestion,
            )
        if bound_connect(family, dict(cparams)):
            _log.info(
                "poolguard: pool %r: the engine sets no connect timeout, so poolguard gives its connects one of "
                "%d s (a connect under way cannot be aborted); a connect timeout in connect_args replaces it",
                name,
                CONNECT_TIMEOUT,
            )

    def _setting_up(self, dbapi_connection: DBAPIConnection, record: ConnectionPoolEntry) -> None:
        """A new connection is within :meth:`abort_connecting`'s reach until its checkout returns.

        Its connect events make round trips (SQLAlchemy's dialect initialize on the first, the
        pooler check, an app's own ``SET``), and an engine made elsewhere may leave reads unbounded:
        a server gone silent right after the connect would hang the checkout there.
        """
        self._mid_checkout[id(dbapi_connection)] = dbapi_connection

    def _forget_closed(self) -> None:
        """Drops the connections a failed checkout left: SQLAlchemy closes one whose connect events failed."""
        for key, connection in list(self._mid_checkout.items()):
            if driver_fileno(getattr(connection, "driver_connection", connection)) is None:
                self._mid_checkout.pop(key, None)

    def _after_connect(self, dbapi_connection: DBAPIConnection, record: ConnectionPoolEntry) -> None:
        events = self._events
        started = record.info.pop(_CONNECT_STARTED, None)
        if events is not None and started is not None:
            events.connected(events.clock() - started)
        if self._pooler is not None and not self._pooler.decided:
            self._detect_pooler(dbapi_connection)

    def _detect_pooler(self, dbapi_connection: DBAPIConnection) -> None:
        """Reports a pooler in front of an engine made elsewhere; a check that fails decides "none"."""
        assert self._pooler is not None
        try:
            behind = behind_pooler(dbapi_connection)
        except Exception as error:
            if not _pooler.server_answered(error):
                raise  # lost or timed out: the connect fails
            self._pooler.decide(None, f"the pid check failed ({type(error).__name__})")
            return
        self._pooler.decide_by_pid(behind)

    def _on_error(self, context: ExceptionContext) -> None:
        if context.is_pre_ping:  # raised on to the checkout, where the gate counts it
            mark_pre_ping(context.original_exception)
            return
        if self._events is None or context.connection is None:
            return
        if context.is_disconnect or is_connection_failure(context.original_exception):
            self._events.lost(context.sqlalchemy_exception or context.original_exception)

    @staticmethod
    def reclaim(handle: Any) -> None:
        """Closes a connection a request forgot: invalidated, so no half-done transaction is reused."""
        if isinstance(handle, PoolProxiedConnection) and handle.is_valid:
            handle.invalidate()

    @staticmethod
    def abort(handle: Any) -> bool:
        if not isinstance(handle, PoolProxiedConnection):
            return False
        raw = handle.dbapi_connection
        raw = getattr(raw, "driver_connection", raw)  # an asyncio driver's own connection
        return shutdown_socket(driver_fileno(raw))

    def discard_stale(self) -> None:
        """SQLAlchemy's own whole-pool invalidation: what it does itself after a disconnect error."""
        self.sync_engine.pool._invalidate_time = time.time()

    def counts(self) -> PoolCounts:
        pool = self.sync_engine.pool
        if isinstance(pool, QueuePool):
            max_overflow: int = getattr(pool, "_max_overflow", 0)
            return PoolCounts(
                size=pool.size(),
                max_overflow=max_overflow if max_overflow >= 0 else None,
                checked_out=pool.checkedout(),
                idle=pool.checkedin(),
                overflow=max(0, pool.overflow()),
            )
        held = self._events.held if self._events is not None else 0
        return PoolCounts(size=None, max_overflow=None, checked_out=held, idle=0, overflow=0)

    def probe(self, timeout: float) -> None:
        """``SELECT 1`` on a connection the engine's own creator makes, outside the pool.

        The creator keeps everything the user configured (URL, ``connect_args``, ``do_connect``
        listeners); the connect listener bounds it. An asyncio driver gets an event loop of its
        own in the probe's thread.
        """
        if self.is_async:
            from sqlalchemy.util import greenlet_spawn  # noqa: PLC0415

            asyncio.run(greenlet_spawn(self._probe_in_thread, timeout))
        else:
            self._probe_in_thread(timeout)

    def _probe_in_thread(self, timeout: float) -> None:
        pool = self.sync_engine.pool
        token = _probe_timeout.set(timeout)
        try:
            raw = pool._invoke_creator(None)  # type: ignore[arg-type]
        finally:
            _probe_timeout.reset(token)
        try:
            cursor = raw.cursor()
            cursor.execute("SELECT 1")
            cursor.fetchall()
            cursor.close()
            raw.rollback()  # the server sees the probe idle, not idle in a transaction, until the close arrives
        finally:
            raw.close()

    def reset_after_fork(self) -> list[object]:
        """In a forked child: a new pool for the engine, ``dispose(close=False)`` (SQLAlchemy's recipe).

        The replacement is built from the guarded pool's class, so it is guarded too. The parent's
        pool is returned for the child to keep referenced: its connections are never closed, reset
        or finalized there, which would act on sockets the parent still uses.
        """
        parents = self.sync_engine.pool
        self.sync_engine.dispose(close=False)
        return [parents]
