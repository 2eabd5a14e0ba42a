"""asyncpg's own pool (``asyncpg.Pool``) behind the pool protocols.

asyncpg has no hook before an acquire starts waiting (its ``on_acquire`` wait-time hook is an open
request upstream), so nothing here intercepts the pool: a guarded unit of work acquires through
:meth:`AsyncpgPool.acquire` and releases through :meth:`AsyncpgPool.release`, and the core measures the
wait and the use around those two calls. An ``asyncpg.Pool`` has ``__slots__``: the only thing
installed on it is a wrapper of its connect function (``Pool._connect``, asyncpg 0.30+), for the
create times, for aborting a connect hung on a silent server and for refusing a second guard;
:meth:`detach` puts the original back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from poolguard._classify import is_connection_failure
from poolguard._pooler import Pooler
from poolguard.errors import ConfigError, PoolSaturated
from poolguard.pools import PoolCounts, PoolEvents, bound_probe_params, driver_fileno, shutdown_socket

_log = logging.getLogger("poolguard")

_EVENTS_ATTRIBUTE = "_poolguard_events"


def _raw(connection: Any) -> Any:
    """The driver's connection under asyncpg's pool proxy (None once the proxy was released)."""
    return connection._con if isinstance(connection, PoolConnectionProxy) else connection


class AsyncpgPool:
    """Adapts an ``asyncpg.Pool``: counts, probe, abort and reclaim, and the acquire/release the core gates."""

    backend = "postgresql"
    db_system = "postgresql"
    is_async = True

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool
        self._events: PoolEvents | None = None
        self._real_connect: Callable[..., Awaitable[Any]] | None = None
        self._connecting: dict[asyncio.Task[Any], asyncio.AbstractEventLoop] = {}
        """Connects under way, each a task of its own on its loop: what :meth:`abort_connecting` cancels."""
        self._aborted: set[asyncio.Task[Any]] = set()
        self._made: dict[int, Any] = {}
        """Connections made but perhaps not yet the pool's, by id: the pool's ``init`` may be making round trips
        on them, which :meth:`abort_connecting` reaches (see :meth:`_forget_settled`)."""
        self._acquire: Callable[[float | None], Awaitable[Any]] = getattr(pool, "_acquire", None) or (
            lambda timeout: pool.acquire(timeout=timeout)
        )
        """The coroutine behind ``pool.acquire()``, without the context object that call makes for each acquire
        (the public call where an asyncpg keeps it elsewhere)."""
        self.release: Callable[[Any], Awaitable[None]] = pool.release
        """The pool's own release, itself: cancellation-safe (asyncpg shields it) and, as a bare release,
        without a timeout of its own (one costs a timer per release): the reset's round trip is bounded by
        the connection's ``command_timeout`` (``create_asyncpg_pool`` sets one), and a release hung on a
        silent server still counts as held, which the watchdog aborts."""

    def attach(self, events: PoolEvents) -> None:
        connect = getattr(self.pool, "_connect", None)
        if getattr(connect, _EVENTS_ATTRIBUTE, None) is not None:
            raise ConfigError(
                "Guard(pool)",
                "<asyncpg.Pool>",
                "a pool no other Guard watches; share one Guard per pool (guard.close() releases it)",
            )
        self._events = events
        self._warn_unbounded_reads(events.name)
        if connect is None:  # asyncpg before 0.30: no create times
            return
        clock = events.clock
        connecting = self._connecting
        aborted = self._aborted
        made = self._made
        forget_settled = self._forget_settled

        async def timed_connect(*args: Any, **kwargs: Any) -> Any:
            events.connecting()
            started = clock()
            forget_settled()
            # A task of its own, so the watchdog's thread can cancel it: a connect to a silent server is
            # bounded only by asyncpg's connect timeout (60 s unless the pool says otherwise).
            attempt = asyncio.ensure_future(connect(*args, **kwargs))
            connecting[attempt] = asyncio.get_running_loop()
            try:
                connection = await attempt
            except asyncio.CancelledError:
                if attempt not in aborted:  # the caller was cancelled, and the attempt with it
                    raise
                raise ConnectionAbortedError(
                    f"pool {events.name!r}: connect aborted, the database does not answer"
                ) from None
            finally:
                connecting.pop(attempt, None)
                aborted.discard(attempt)
            made[id(connection)] = connection
            events.connected(clock() - started)
            return connection

        setattr(timed_connect, _EVENTS_ATTRIBUTE, events)
        self._real_connect = connect
        self.pool._connect = timed_connect

    def _warn_unbounded_reads(self, name: str) -> None:
        """Once per guard: a pool whose connections have no ``command_timeout`` waits on a silent server for
        as long as the network lets it, in every query (held connections are aborted once an outage is
        confirmed, but a pool's ``init`` or ``setup`` callback is not reached)."""
        if (getattr(self.pool, "_connect_kwargs", None) or {}).get("command_timeout"):
            return
        _log.warning(
            "poolguard: reads of pool %r on a silent (black-holed) database are unbounded without a "
            "command_timeout; create the pool with asyncpg.create_pool(..., command_timeout=35) "
            "(or with poolguard.create_asyncpg_pool)",
            name,
        )

    @property
    def pooler(self) -> str | None:
        """The connection pooler found in front (``pgbouncer``, ``unidentified``), None when none is known:
        what ``create_asyncpg_pool``'s ``connect=`` hook learned at the first connection."""
        found = getattr(self._real_connect or getattr(self.pool, "_connect", None), "pooler", None)
        return found.kind if isinstance(found, Pooler) else None

    def detach(self) -> None:
        """Idempotent; puts asyncpg's connect function back."""
        if self._real_connect is not None:
            if getattr(self.pool._connect, _EVENTS_ATTRIBUTE, None) is self._events:
                self.pool._connect = self._real_connect
            self._real_connect = None
        self._events = None

    def acquire(self, budget: float) -> Awaitable[Any]:
        """The pool's own acquire; bounded by ``budget`` seconds only when it would wait.

        With a connection free (asyncpg's queue of free holders is not empty) the acquire takes it at
        once, and goes without a timeout (asyncpg runs one through ``wait_for``, a task per acquire).
        Admission keeps a guard's own units within the pool's size, so only connections held outside the
        guard (``pool.acquire()`` called directly) leave none free: then the wait is bounded, and running
        out of it is ``PoolSaturated``, not a failure of the database.
        """
        try:
            if self.pool._queue._queue:
                acquiring: Awaitable[Any] = self._acquire(None)
                return acquiring
        except AttributeError:  # a pool not initialized yet (or an asyncpg that keeps them elsewhere)
            pass
        return self._acquire_within(budget)

    async def _acquire_within(self, budget: float) -> Any:
        try:
            connection = await self._acquire(max(budget, 0.001))
        except TimeoutError:
            events = self._events
            name = events.name if events is not None else "?"
            raise PoolSaturated(
                f"pool {name!r}: all {self.pool.get_max_size()} connections are held, some of them outside the "
                f"guard (pool.acquire() called directly), and none came back within the wait budget {budget:.3f}s",
                retry_after=1.0,
                pool=name,
            ) from None
        # asyncpg keeps an acquire's timeout as the default of its release, which would then cut the reset
        # (and terminate the connection) at what was left of this wait; the reset has command_timeout.
        connection._holder._timeout = None
        return connection

    @staticmethod
    def broken(connection: Any, exc: BaseException) -> bool:
        """Whether ``exc``, raised while ``connection`` was in use, says the connection failed.

        A lost or refused connection, or a client-side timeout of asyncpg's own (``command_timeout``:
        the server did not cancel the statement itself a margin earlier, so it does not answer). A
        timeout from the application's own code is not the database's failure.
        """
        if isinstance(exc, asyncio.CancelledError):
            return False
        if is_connection_failure(exc):
            return True
        if isinstance(exc, asyncpg.InterfaceError | OSError):
            raw = _raw(connection)  # None: asyncpg saw the connection die and took it back itself
            if raw is None or raw.is_closed():
                return True
        return isinstance(exc, TimeoutError) and _raised_in_asyncpg(exc)

    def counts(self) -> PoolCounts:
        pool = self.pool
        size = pool.get_size()
        idle = pool.get_idle_size()
        return PoolCounts(
            size=pool.get_max_size(), max_overflow=0, checked_out=max(0, size - idle), idle=idle, overflow=0
        )

    def probe(self, timeout: float) -> None:
        """``SELECT 1`` on a connection of its own, made as the pool makes one (its connect function and
        arguments, bounded by ``timeout``), on an event loop of its own in the probe's thread."""
        asyncio.run(self._probe(timeout))

    async def _probe(self, timeout: float) -> None:
        params = dict(getattr(self.pool, "_connect_kwargs", None) or {})
        for key in ("connection_class", "record_class", "loop"):
            params.pop(key, None)
        bound_probe_params("asyncpg", params, timeout)
        args = getattr(self.pool, "_connect_args", None) or ()
        # The pool's own connect function (a ``connect=`` that fetches a token, say), not the timed one.
        connect = self._real_connect or getattr(self.pool, "_connect", None) or asyncpg.connect
        connection = await connect(*args, **params)
        try:
            await connection.fetchval("SELECT 1")
        finally:
            try:
                await connection.close(timeout=timeout)
            except Exception:
                connection.terminate()

    def abort(self, handle: Any) -> bool:
        """Shuts the socket down, from the watchdog's thread: asyncpg's own ``terminate`` is not thread-safe."""
        raw = _raw(handle)
        return raw is not None and shutdown_socket(driver_fileno(raw))

    def abort_connecting(self) -> int:
        """Cancels the connects under way (asyncpg pings nothing at acquire); each then fails with
        ``ConnectionAbortedError``, a connection failure. Shuts the sockets of connections made but not yet
        the pool's (its ``init`` is making round trips on them) and of those in its ``setup`` (run at every
        acquire, before the guard holds the connection). Called from the watchdog's thread."""
        attempts = list(self._connecting.items())
        for attempt, loop in attempts:
            self._aborted.add(attempt)
            with contextlib.suppress(RuntimeError):  # its loop has closed: nothing is waiting on it
                loop.call_soon_threadsafe(attempt.cancel)
        self._forget_settled()
        setting_up = list(self._made.values()) + self._in_setup()
        return len(attempts) + sum(shutdown_socket(driver_fileno(connection)) for connection in setting_up)

    def _in_setup(self) -> list[Any]:
        """Connections the pool's ``setup`` callback is running on: asyncpg has handed their holder a proxy
        and not yet marked it in use (that comes after ``setup``), so the guard does not hold them yet."""
        if getattr(self.pool, "_setup", None) is None:
            return []
        return [
            holder._con
            for holder in list(getattr(self.pool, "_holders", None) or ())
            if getattr(holder, "_proxy", None) is not None
            and getattr(holder, "_in_use", False) is None
            and getattr(holder, "_con", None) is not None
        ]

    def _forget_settled(self) -> None:
        """Drops the made connections the pool now holds (their ``init`` is done) and the closed ones; what is
        left is being set up. Run at each connect, so it holds at most a pool's worth."""
        holders = getattr(self.pool, "_holders", None) or ()
        owned = {id(holder._con) for holder in list(holders) if getattr(holder, "_con", None) is not None}
        for key, connection in list(self._made.items()):
            if key in owned or connection.is_closed():
                self._made.pop(key, None)

    def discard_stale(self) -> None:
        """What ``Pool.expire_connections()`` does (a coroutine; this runs in the breaker's thread): connections
        made before now are closed at their release and replaced."""
        self.pool._generation += 1

    def reclaim(self, handle: Any) -> None:
        """Closes a connection a unit of work still held at its end (terminated: no half-done transaction is
        reused) and gives its slot back to the pool."""
        events = self._events
        if events is not None:
            events.checkin(id(handle))
        raw = _raw(handle)
        if raw is None:
            return
        raw.terminate()  # asyncpg's cleanup returns the holder to the pool


def _raised_in_asyncpg(exc: BaseException) -> bool:
    """Whether the innermost frame of ``exc``'s traceback is asyncpg's (its ``command_timeout``)."""
    tb = exc.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    module = tb.tb_frame.f_globals.get("__name__", "")
    return isinstance(module, str) and (module == "asyncpg" or module.startswith("asyncpg."))
