"""Guard: the object a user holds; the composition root of breaker, admission, leaks and stats.

One Guard watches one pool. It installs the pool instrumentation once (so every checkout through
the engine is accounted for, in a request or not) and hands out units of work: request scopes for
adapters, and ``session()`` / ``connection()`` blocks for everything else. Checkouts made inside one
of its units of work are the ones it gates: breaker first, then admission within the wait budget,
then the pool's own checkout.

A unit of work always ends the same way: commit when the body returned, rollback when it raised,
and the connection back in the pool in every case (also when commit fails or, with asyncio, when
the task is cancelled).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import logging
import sys
import time
from collections.abc import Awaitable, Callable
from contextvars import Token
from types import TracebackType
from typing import TYPE_CHECKING, Any, Generic, TypeVar, cast

from opentelemetry.metrics import MeterProvider
from opentelemetry.trace import TracerProvider

from poolguard import _context
from poolguard._types import Clock
from poolguard._validate import non_negative_float, positive_float
from poolguard.breaker import Breaker, BreakerState
from poolguard.errors import ConfigError, Unavailable
from poolguard.health import HealthReport, PingResult, PoolHealth, assess
from poolguard.monitor import GuardedScope, PoolMonitor
from poolguard.pools import PoolAdapter
from poolguard.stats import PoolStats
from poolguard.telemetry import PoolTelemetry
from poolguard.telemetry import unregister as unregister_telemetry

if TYPE_CHECKING:
    # SQLAlchemy is imported where a guard over an engine needs it, not here: a Django app that guards
    # only its own connections never loads it (about 18 MB and a quarter of a second per process).
    from sqlalchemy import Connection, Engine
    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession
    from sqlalchemy.orm import Session

logger = logging.getLogger("poolguard")

S = TypeVar("S", "Session", "AsyncSession")
C = TypeVar("C", "Connection", "AsyncConnection")


def _is_engine(engine: object) -> bool:
    """A SQLAlchemy Engine or AsyncEngine (without SQLAlchemy loaded, nothing can be one)."""
    if "sqlalchemy" not in sys.modules:
        return False
    from sqlalchemy import Engine  # noqa: PLC0415
    from sqlalchemy.ext.asyncio import AsyncEngine  # noqa: PLC0415

    return isinstance(engine, Engine | AsyncEngine)


class Guard:
    """Guards one pool: a SQLAlchemy Engine or AsyncEngine, or any :class:`~poolguard.pools.PoolAdapter`.

    Sessions and connection blocks need a SQLAlchemy engine; health, stats, the breaker and
    admission work for every pool kind (Django's connections use them through their adapter).

    Options (keyword-only): ``name`` names the pool in health, metrics and logs; ``max_wait`` is the
    most a unit of work waits for connections in total before PoolSaturated (0: never wait);
    ``breaker`` a :class:`Breaker` (default: a new one) or ``False`` for none; ``leak_threshold``
    the seconds after which a held connection is reported; ``capture_stacks`` records the checkout
    stack for leak reports (costly: off by default); ``session_factory`` a sessionmaker or
    async_sessionmaker (default: one bound to the engine with ``expire_on_commit=False``, so objects
    stay readable after the block commits); ``clock`` a monotonic clock for tests;
    ``ping_timeout`` bounds the health ping; ``tracer_provider`` / ``meter_provider`` replace the
    global OpenTelemetry providers for this guard's spans and metrics.
    """

    def __init__(
        self,
        engine: Engine | AsyncEngine | PoolAdapter,
        *,
        name: str = "primary",
        max_wait: float = 1.0,
        breaker: Breaker | bool | None = None,
        leak_threshold: float = 30.0,
        capture_stacks: bool = False,
        session_factory: Callable[[], Session] | Callable[[], AsyncSession] | None = None,
        clock: Clock | None = None,
        ping_timeout: float = 1.0,
        tracer_provider: TracerProvider | None = None,
        meter_provider: MeterProvider | None = None,
    ) -> None:
        is_engine = _is_engine(engine)
        if not is_engine and not isinstance(engine, PoolAdapter):
            raise ConfigError(
                "Guard(engine)", type(engine).__name__, "a sqlalchemy Engine or AsyncEngine, or a pool adapter"
            )
        if not isinstance(name, str) or not name:
            raise ConfigError("Guard.name", name, "a non-empty string")
        if not isinstance(capture_stacks, bool):
            raise ConfigError("Guard.capture_stacks", capture_stacks, "True or False")
        if clock is not None and not callable(clock):
            raise ConfigError("Guard.clock", clock, "a callable returning monotonic seconds")
        self.name = name
        self.max_wait = non_negative_float("Guard.max_wait", max_wait)
        self.leak_threshold = positive_float("Guard.leak_threshold", leak_threshold)
        self.ping_timeout = positive_float("Guard.ping_timeout", ping_timeout)
        self.clock: Clock = clock or time.monotonic
        self.breaker = self._make_breaker(breaker, clock)
        self.pool: PoolAdapter
        if is_engine:
            from poolguard.pools.sqlalchemy import SQLAlchemyPool  # noqa: PLC0415

            self._engine: Engine | AsyncEngine | None = cast("Engine | AsyncEngine", engine)
            self.session_factory = self._make_session_factory(self._engine, session_factory)
            self.pool = SQLAlchemyPool(self._engine)
        else:
            self._engine = None
            self.session_factory = _no_sessions
            self.pool = cast("PoolAdapter", engine)
        self.is_async = self.pool.is_async
        self.telemetry = PoolTelemetry(
            pool_name=name,
            db_system=self.pool.db_system,
            counts=self.pool.counts,
            tracer_provider=tracer_provider,
            meter_provider=meter_provider,
        )
        self._monitor = PoolMonitor(
            name=name,
            capacity=self.pool.counts().capacity,
            breaker=self.breaker,
            max_wait=self.max_wait,
            leak_threshold=self.leak_threshold,
            capture_stacks=capture_stacks,
            clock=self.clock,
            telemetry=self.telemetry,
        )
        self.telemetry.monitor = self._monitor
        self.pool.attach(self._monitor)
        self._remove_breaker_listener = self.breaker.add_listener(self._on_transition) if self.breaker else None
        self._ping_executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._running_ping: concurrent.futures.Future[float] | None = None
        self._closed = False

    def unavailable_for(self, exc: BaseException) -> Unavailable | None:
        """What adapters answer 503 for: ``Unavailable``, or a connection failure this guard's breaker counted."""
        return self._monitor.unavailable_for(exc)

    @property
    def monitor(self) -> PoolMonitor:
        """The pool's gating and accounting core (adapters of other pool kinds report into it)."""
        return self._monitor

    @property
    def engine(self) -> Engine | AsyncEngine:
        """The SQLAlchemy engine this guard watches (a TypeError for a guard over another pool kind)."""
        if self._engine is None:
            raise TypeError(f"Guard {self.name!r} watches a {type(self.pool).__name__}, not a SQLAlchemy engine")
        return self._engine

    @staticmethod
    def _make_breaker(breaker: Breaker | bool | None, clock: Clock | None) -> Breaker | None:
        if breaker is None or breaker is True:
            return Breaker(clock=clock)
        if breaker is False:
            return None
        if not isinstance(breaker, Breaker):
            raise ConfigError("Guard.breaker", breaker, "a poolguard.Breaker, or False for no breaker")
        if clock is not None and breaker.clock is time.monotonic:
            breaker.use_clock(clock)
        return breaker

    @staticmethod
    def _make_session_factory(
        engine: Engine | AsyncEngine,
        factory: Callable[[], Session] | Callable[[], AsyncSession] | None,
    ) -> Callable[[], Session] | Callable[[], AsyncSession]:
        if factory is None:
            from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker  # noqa: PLC0415
            from sqlalchemy.orm import sessionmaker  # noqa: PLC0415

            if isinstance(engine, AsyncEngine):
                return async_sessionmaker(engine, expire_on_commit=False)
            return sessionmaker(engine, expire_on_commit=False)
        if not callable(factory):
            raise ConfigError("Guard.session_factory", factory, "a sessionmaker or async_sessionmaker")
        return factory

    def _on_transition(self, old: BreakerState, new: BreakerState) -> None:
        self.telemetry.breaker_transition(old, new)
        if new is BreakerState.OPEN:
            retry_after = self.breaker.retry_after if self.breaker else None
            logger.warning(
                "poolguard: circuit breaker of pool %r opened (was %s); failing fast for %.1fs",
                self.name,
                old.value,
                retry_after or 0.0,
            )
        else:
            logger.info("poolguard: circuit breaker of pool %r is now %s (was %s)", self.name, new.value, old.value)

    def __repr__(self) -> str:
        return f"<Guard {self.name!r} {self.pool.backend} breaker={self.breaker!r}>"

    # -- units of work ---------------------------------------------------------------------------

    def request_scope(self, route: str | None = None) -> RequestScope:
        """A unit of work for one request: nothing touches the pool until the session is used."""
        return RequestScope(self, route)

    def session(self) -> SessionBlock[Any]:
        """``with guard.session() as s`` (or ``async with`` for an AsyncEngine): commit, rollback, close."""
        return SessionBlock(self, self.session_factory)

    def connection(self) -> ConnectionBlock[Any]:
        """``with guard.connection() as c`` (``async with`` for an AsyncEngine): a guarded raw connection."""
        return ConnectionBlock(self)

    def _enter_scope(self) -> tuple[GuardedScope, RequestScope | None]:
        """The current scope of this guard, or a new anonymous one (returned second, to close)."""
        scope = self._monitor.scope_var.get()
        if scope is not None:
            return scope, None
        own = RequestScope(self, None)
        own.open()
        return own, own

    # -- observation -----------------------------------------------------------------------------

    def stats(self) -> PoolStats:
        """A snapshot of the pool's counts, wait/use quantiles, timeouts, leaks and breaker state."""
        return self._monitor.snapshot(self.pool.counts(), self.pool.backend)

    def health(self, *, ping: bool = True) -> HealthReport:
        """The pool's health, with a live ping bounded by ``ping_timeout`` (sync engines)."""
        if ping and self.is_async:
            raise TypeError(
                "Guard.health() cannot ping an AsyncEngine from synchronous code; use 'await guard.ahealth()'"
            )
        stats = self.stats()
        result = self._ping_blocking() if ping and not self._saturated(stats) else None
        return HealthReport.of([self._assess(stats, result)])

    async def ahealth(self, *, ping: bool = True) -> HealthReport:
        """The pool's health without blocking the event loop; works for sync and async engines."""
        stats = self.stats()
        result: PingResult | None = None
        if ping and not self._saturated(stats):
            if self.is_async:
                result = await self._ping_async()
            else:
                result = await asyncio.get_running_loop().run_in_executor(None, self._ping_blocking)
        return HealthReport.of([self._assess(stats, result)])

    @staticmethod
    def _saturated(stats: PoolStats) -> bool:
        """A full pool would make the ping queue behind requests; its numbers already tell the story."""
        return stats.idle == 0 and stats.size is not None and stats.utilization >= 1.0

    def _assess(self, stats: PoolStats, ping: PingResult | None) -> PoolHealth:
        breaker = self.breaker
        return assess(
            stats,
            ping=ping,
            max_wait=self.max_wait,
            breaker_failure_rate=round(breaker.failure_rate, 4) if breaker else None,
            breaker_retry_after=_rounded(breaker.retry_after) if breaker else None,
        )

    def _ping_blocking(self) -> PingResult:
        """Pings in a worker thread so a hung connect cannot hold the caller past ``ping_timeout``."""
        if self._running_ping is not None and not self._running_ping.done():
            return PingResult(None, "PingStillRunning")
        if self._ping_executor is None:
            self._ping_executor = concurrent.futures.ThreadPoolExecutor(
                1, thread_name_prefix=f"poolguard-ping-{self.name}"
            )
        self._running_ping = future = self._ping_executor.submit(self._timed, self.pool.ping)
        try:
            return PingResult(future.result(timeout=self.ping_timeout))
        except concurrent.futures.TimeoutError:
            return PingResult(None, "PingTimeout")
        except Exception as exc:
            return PingResult(None, type(exc).__name__)

    async def _ping_async(self) -> PingResult:
        started = self.clock()
        # A fresh context: a ping made while a request scope is active must not be gated or counted as its own.
        task = asyncio.get_running_loop().create_task(self.pool.aping(), context=contextvars.Context())
        try:
            await asyncio.wait_for(task, self.ping_timeout)
        except TimeoutError:
            return PingResult(None, "PingTimeout")
        except Exception as exc:
            return PingResult(None, type(exc).__name__)
        return PingResult(self.clock() - started)

    def _timed(self, action: Callable[[], None]) -> float:
        started = self.clock()
        action()
        return self.clock() - started

    @property
    def closed(self) -> bool:
        """True once :meth:`close` ran: the guard no longer watches its pool or reports metrics."""
        return self._closed

    def close(self) -> None:
        """Removes the instrumentation from the engine (it stays usable) and stops the ping thread."""
        self._closed = True
        self.pool.detach()
        unregister_telemetry(self.telemetry)
        if self._remove_breaker_listener is not None:
            self._remove_breaker_listener()
            self._remove_breaker_listener = None
        if self._ping_executor is not None:
            self._ping_executor.shutdown(wait=False, cancel_futures=True)
            self._ping_executor = None


def _no_sessions() -> Session:
    raise TypeError("guard.session() needs a Guard over a SQLAlchemy engine; this one watches another pool kind")


def _rounded(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds, 3)


class RequestScope(GuardedScope):
    """One request's unit of work: a lazily created session, and the bookkeeping of its checkouts.

    Use as ``with`` / ``async with``, or call :meth:`open` and then :meth:`close` / :meth:`aclose`
    from a framework's before/after hooks. The session is created on first access of
    :attr:`session` and only checks out a connection when first used, so a route that never touches
    the database never waits for, or is refused, a connection.
    """

    __slots__ = ("_failure", "_scope_token", "_session", "_unit_token", "guard")

    def __init__(self, guard: Guard, route: str | None) -> None:
        super().__init__(route)
        self.guard = guard
        self._session: Session | AsyncSession | None = None
        self._failure: BaseException | None = None
        self._scope_token: Token[GuardedScope | None] | None = None
        self._unit_token: Token[_context.UnitOfWork | None] | None = None

    @property
    def session(self) -> Any:
        """The request's Session (AsyncSession for an AsyncEngine), created on first access."""
        if self._session is None:
            self._session = self.guard.session_factory()
        return self._session

    @property
    def has_session(self) -> bool:
        return self._session is not None

    def in_transaction(self) -> bool:
        return self._session is not None and self._session.in_transaction()

    def open(self) -> RequestScope:
        self._scope_token = self.guard._monitor.scope_var.set(self)
        self._unit_token = _context.current_unit.set(self)
        return self

    def fail(self, error: BaseException) -> None:
        """Marks the request as failed, so its work is rolled back even though no exception escapes.

        For errors a framework turns into a response before the adapter sees them (``abort(409)``,
        FastAPI's ``HTTPException``): the endpoint raised, so its writes must not be committed.
        """
        if self._failure is None:
            self._failure = error

    def finish(self, error: BaseException | None = None) -> None:
        """Ends the transaction now: commit (rollback on ``error`` or after :meth:`fail`).

        Adapters call it when the endpoint returns, before a streamed body is sent, so no connection
        sits idle in a transaction while a slow client reads. The session stays usable: work done
        later (a background task) starts a new transaction, which :meth:`close` ends.
        """
        session: Any = self._session  # Any, not cast(): a call less on every request
        if session is not None:
            end_transaction(session, error or self._failure)

    async def afinish(self, error: BaseException | None = None) -> None:
        """The asyncio form of :meth:`finish` (an async guard's sessions are AsyncSessions)."""
        session: Any = self._session
        if session is None:
            return
        if self.guard.is_async:
            await aend_transaction(session, error or self._failure)
        else:
            end_transaction(session, error or self._failure)

    def close(self, error: BaseException | None = None) -> None:
        """Ends the request: last commit (or rollback), session closed, leftovers reclaimed, context left."""
        session: Any
        session, self._session = self._session, None
        try:
            if session is not None:
                finish_session(session, error or self._failure)
        finally:
            self._release()

    async def aclose(self, error: BaseException | None = None) -> None:
        """The asyncio form of :meth:`close`."""
        session: Any
        session, self._session = self._session, None
        try:
            if session is not None:
                if self.guard.is_async:
                    await afinish_session(session, error or self._failure)
                else:
                    finish_session(session, error or self._failure)
        finally:
            if self.held > 0 and self.guard.is_async:
                # Closing an asyncio driver connection needs SQLAlchemy's greenlet.
                from sqlalchemy.util import greenlet_spawn  # noqa: PLC0415 (leftovers only: not every request)

                await greenlet_spawn(self._release)
            else:
                self._release()

    def reclaim(self) -> int:
        """Closes and reports every connection this request still holds; returns how many there were.

        :meth:`close` does it too; adapters call it earlier, once the response is complete, so the
        leak is reported on the request's span while that is still open. Not before a streamed
        body: the stream may legitimately hold a connection until it ends.
        """
        return self.guard._monitor.reclaim_leftovers(self) if self.held > 0 else 0

    async def areclaim(self) -> int:
        """The asyncio form of :meth:`reclaim` (closing an asyncio driver connection needs SQLAlchemy's greenlet)."""
        if self.held == 0:
            return 0
        if self.guard.is_async:
            from sqlalchemy.util import greenlet_spawn  # noqa: PLC0415 (an async guard watches an AsyncEngine)

            reclaimed: int = await greenlet_spawn(self.reclaim)
            return reclaimed
        return self.reclaim()

    def _release(self) -> None:
        try:
            if self.held > 0:
                self.reclaim()
        finally:
            _reset(self.guard._monitor.scope_var, self._scope_token)
            _reset(_context.current_unit, self._unit_token)
            self._scope_token = self._unit_token = None

    def __enter__(self) -> RequestScope:
        return self.open()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close(exc)

    async def __aenter__(self) -> RequestScope:
        return self.open()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose(exc)


def _reset(var: contextvars.ContextVar[Any], token: Token[Any] | None) -> None:
    """Undoes a contextvar set; a framework may end a request in a copy of its context, so fall back."""
    if token is None:
        return
    try:
        var.reset(token)
    except ValueError:
        var.set(token.old_value if token.old_value is not Token.MISSING else None)


def has_work(session: Session | AsyncSession) -> bool:
    """Whether ending the session's unit of work would do anything: a transaction begun, or changes pending.

    Pending changes are read the way ``Session.flush`` reads them (``_is_clean``), not through
    ``new``/``dirty``/``deleted``, which build three sets on every call: this runs twice a request.
    """
    if session.in_transaction():
        return True
    # An AsyncSession runs on a Session of its own; a Session is its own.
    sync_session: Session = getattr(session, "sync_session", session)  # type: ignore[arg-type]
    return not sync_session._is_clean()


def end_transaction(session: Session, error: BaseException | None) -> None:
    """Commit on success, rollback on error; a failed commit is rolled back before it propagates.

    A failing rollback never hides ``error``: the caller's exception is the one worth reporting.
    A session with nothing begun and nothing pending is left alone: no round trip, no greenlet.
    """
    if not has_work(session):
        return
    try:
        if error is None:
            session.commit()
        else:
            session.rollback()
    except Exception:
        if error is None:
            _quietly(session.rollback)
            raise
        logger.debug("poolguard: rollback after an error failed too", exc_info=True)


def finish_session(session: Session, error: BaseException | None) -> None:
    """:func:`end_transaction`, then close always."""
    try:
        end_transaction(session, error)
    finally:
        session.close()


async def aend_transaction(session: AsyncSession, error: BaseException | None) -> None:
    """The asyncio form of :func:`end_transaction`; nothing is sent to a cancelled request's connection."""
    if isinstance(error, asyncio.CancelledError) or not has_work(session):
        return
    try:
        if error is None:
            await session.commit()
        else:
            await session.rollback()
    except Exception:
        if error is None:
            await _aquietly(session.rollback())
            raise
        logger.debug("poolguard: rollback after an error failed too", exc_info=True)


async def afinish_session(session: AsyncSession, error: BaseException | None) -> None:
    """The asyncio form: on cancellation the close runs shielded, so the connection always goes back."""
    try:
        await aend_transaction(session, error)
    finally:
        await close_surely(session.close)


async def close_surely(close: Callable[[], Awaitable[None]]) -> None:
    """Closes even under cancellation: shielded then (a task, so not on the common path), plain otherwise."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        await asyncio.shield(close())
        return
    try:
        await close()
    except asyncio.CancelledError:
        await asyncio.shield(close())
        raise


def _quietly(action: Callable[[], object]) -> None:
    try:
        action()
    except Exception:
        logger.debug("poolguard: cleanup step failed", exc_info=True)


async def _aquietly(awaitable: Any) -> None:
    try:
        await awaitable
    except Exception:
        logger.debug("poolguard: cleanup step failed", exc_info=True)


class _UnitBlock:
    """What session and connection blocks share: the unit of work they open and leave."""

    __slots__ = ("_guard", "_own_scope", "_tx")

    def __init__(self, guard: Guard) -> None:
        self._guard = guard
        self._own_scope: RequestScope | None = None
        self._tx: Token[int] | None = None

    def _open_unit(self) -> None:
        """Joins the current scope of this guard (a request) or opens one of its own; marks a transaction."""
        _, self._own_scope = self._guard._enter_scope()
        self._tx = _context.enter_transaction()

    def _leave(self) -> None:
        self._leave_transaction()
        if self._own_scope is not None:
            self._own_scope.close()

    async def _aleave(self) -> None:
        self._leave_transaction()
        if self._own_scope is not None:
            await self._own_scope.aclose()

    def _leave_transaction(self) -> None:
        if self._tx is not None:
            _context.leave_transaction(self._tx)
            self._tx = None


class SessionBlock(_UnitBlock, Generic[S]):
    """What ``guard.session()`` returns: usable with ``with`` (sync engine) or ``async with`` (async)."""

    __slots__ = ("_factory", "_session")

    def __init__(self, guard: Guard, factory: Callable[[], Any]) -> None:
        super().__init__(guard)
        self._factory = factory
        self._session: Any = None

    def _enter(self) -> Any:
        self._open_unit()
        self._session = self._factory()
        return self._session

    def __enter__(self) -> Session:
        if self._guard.is_async:
            raise TypeError("guard.session() on an AsyncEngine is used with 'async with'")
        return cast("Session", self._enter())

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            finish_session(self._session, exc)
        finally:
            self._leave()

    async def __aenter__(self) -> AsyncSession:
        if not self._guard.is_async:
            raise TypeError("guard.session() on a synchronous Engine is used with 'with', not 'async with'")
        return cast("AsyncSession", self._enter())

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            await afinish_session(self._session, exc)
        finally:
            await self._aleave()


class ConnectionBlock(_UnitBlock, Generic[C]):
    """What ``guard.connection()`` returns: a Connection (AsyncConnection) with the same guarantees."""

    __slots__ = ("_connection",)

    def __init__(self, guard: Guard) -> None:
        super().__init__(guard)
        self._connection: Any = None

    def __enter__(self) -> Connection:
        if self._guard.is_async:
            raise TypeError("guard.connection() on an AsyncEngine is used with 'async with'")
        self._open_unit()
        try:
            self._connection = cast("Engine", self._guard.engine).connect()
        except BaseException:
            self._leave()
            raise
        return cast("Connection", self._connection)

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        connection: Connection = self._connection
        try:
            if connection.in_transaction():
                if exc is None:
                    try:
                        connection.commit()
                    except Exception:
                        # A failed COMMIT may leave the transaction open (SQLite does): never pool it so.
                        _quietly(connection.rollback)
                        raise
                else:
                    _quietly(connection.rollback)
        finally:
            try:
                connection.close()
            finally:
                self._leave()

    async def __aenter__(self) -> AsyncConnection:
        if not self._guard.is_async:
            raise TypeError("guard.connection() on a synchronous Engine is used with 'with', not 'async with'")
        self._open_unit()
        try:
            self._connection = await cast("AsyncEngine", self._guard.engine).connect()
        except BaseException:
            await self._aleave()
            raise
        return cast("AsyncConnection", self._connection)

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        connection: AsyncConnection = self._connection
        try:
            if connection.in_transaction() and not isinstance(exc, asyncio.CancelledError):
                if exc is None:
                    try:
                        await connection.commit()
                    except Exception:
                        await _aquietly(connection.rollback())
                        raise
                else:
                    await _aquietly(connection.rollback())
        finally:
            try:
                await close_surely(connection.close)
            finally:
                await self._aleave()
