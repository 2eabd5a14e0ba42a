"""Units of work: a request scope, ``guard.session()`` and ``guard.connection()`` blocks, and how each ends.

A unit of work is what the gate gates, against its wait budget and its breaker. Every adapter
opens one :class:`RequestScope` per request (and per guarded Django alias) and ends it here: commit
when the body returned, rollback when it raised, every connection back in every case.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections.abc import Awaitable, Callable
from contextvars import Token
from types import TracebackType
from typing import TYPE_CHECKING, Any, Generic, Self, TypeVar, cast

from poolguard import _context
from poolguard.gate import Gate

if TYPE_CHECKING:
    # SQLAlchemy is imported where a guard over an engine needs it, not here: a Django app that guards
    # only its own connections never loads it (about 18 MB and a quarter of a second per process).
    from sqlalchemy import Connection, Engine
    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession
    from sqlalchemy.orm import Session

__all__ = ["ConnectionBlock", "RequestScope", "SessionBlock"]

logger = logging.getLogger("poolguard")

S = TypeVar("S", "Session", "AsyncSession")
C = TypeVar("C", "Connection", "AsyncConnection")

Offload = Callable[[Callable[[], None]], Awaitable[None]]
"""Runs blocking work off the event loop (Starlette's ``run_in_threadpool``, asgiref's ``sync_to_async``)."""


class RequestScope:
    """One unit of work: a lazily created session, and what the gate keeps of its checkouts.

    Use as ``with`` / ``async with``, or :meth:`open` then :meth:`close` / :meth:`aclose` from a
    framework's hooks. The session checks out a connection only when first used, so a route that never
    touches the database is never refused one. ``waited``, ``held`` are the gate's bookkeeping;
    ``queued``: how long the request queued in front of the app (``X-Request-Start``).
    """

    __slots__ = (
        "_failure",
        "_session",
        "_unit_token",
        "_work_token",
        "gate",
        "held",
        "is_async",
        "queued",
        "reserved",
        "route",
        "session_factory",
        "sheds",
        "waited",
    )

    def __init__(
        self,
        gate: Gate,
        session_factory: Callable[[], Any] | None,
        *,
        is_async: bool = False,
        route: str | None = None,
        queued: float = 0.0,
    ) -> None:
        self.gate = gate
        self.session_factory = session_factory
        self.is_async = is_async
        self.route = route
        self.queued = queued
        self.waited = queued
        self.held = 0
        self.reserved: float | None = None
        self.sheds = True  # a request: under sustained overload its wait is cut short (poolguard.admission)
        self._session: Session | AsyncSession | None = None
        self._failure: BaseException | None = None
        self._unit_token: Token[Any] | None = None
        self._work_token: Token[_context.UnitOfWork | None] | None = None

    @property
    def session(self) -> Any:
        """The unit's Session (AsyncSession for an AsyncEngine), created on first access."""
        if self._session is None:
            if self.session_factory is None:
                raise TypeError(f"pool {self.gate.name!r} is not a SQLAlchemy engine: its units have no session")
            self._session = self.session_factory()
        return self._session

    @property
    def has_session(self) -> bool:
        return self._session is not None

    def in_transaction(self) -> bool:
        return self._session is not None and self._session.in_transaction()

    def open(self) -> Self:
        """Makes this the unit of work of its guard in the current context, and, when it can have a
        session, the one ``retry`` asks whether a transaction is open."""
        self._unit_token = self.gate.unit_var.set(self)
        if self.session_factory is not None:
            self._work_token = _context.current_unit.set(self)
        return self

    def fail(self, error: BaseException) -> None:
        """Marks the unit as failed, so its work is rolled back even though no exception escapes.

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
        session: Any = self._session
        if session is not None:
            end_transaction(session, error or self._failure)

    async def afinish(self, error: BaseException | None = None, *, offload: Offload | None = None) -> None:
        """The asyncio form of :meth:`finish`: awaited for an AsyncSession; a Session's commit goes
        through ``offload`` when given (it blocks), and only when there is something to commit."""
        session: Any = self._session
        if session is None:
            return
        error = error or self._failure
        if self.is_async:
            await aend_transaction(session, error)
        elif offload is None:
            end_transaction(session, error)
        else:
            await _end_offloaded(session, error, offload)

    def close(self, error: BaseException | None = None, *, reclaim: bool = True) -> None:
        """Ends the unit: last commit (or rollback), session closed, leftovers reclaimed, context left.

        ``reclaim=False`` leaves the leftovers for a later :meth:`reclaim`: for an adapter whose app
        returns connections of its own after the unit ends (Flask-SQLAlchemy's session removal at
        the end of the app context).
        """
        session: Any
        session, self._session = self._session, None
        try:
            if session is not None:
                finish_session(session, error or self._failure)
        finally:
            if reclaim:
                self._release()
            else:
                self.leave()

    async def aclose(self, error: BaseException | None = None, *, offload: Offload | None = None) -> None:
        """The asyncio form of :meth:`close`; a Session's last commit goes through ``offload`` as in :meth:`afinish`."""
        session: Any
        session, self._session = self._session, None
        error = error or self._failure
        try:
            if session is None:
                pass
            elif self.is_async:
                await afinish_session(session, error)
            else:
                try:
                    if offload is not None:
                        await _end_offloaded(session, error, offload)
                finally:
                    finish_session(session, error)
        finally:
            if self.held > 0 and self.is_async:
                # Closing an asyncio driver connection needs SQLAlchemy's greenlet.
                from sqlalchemy.util import greenlet_spawn  # noqa: PLC0415 (leftovers only: not every request)

                await greenlet_spawn(self._release)
            else:
                self._release()

    def reclaim(self) -> int:
        """Closes and reports every connection this unit still holds; returns how many there were.

        :meth:`close` does it too; adapters call it earlier, once the response is complete, so the
        leak is reported on the request's span while that is still open. Not before a streamed
        body: the stream may legitimately hold a connection until it ends.
        """
        return self.gate.reclaim_leftovers(self) if self.held > 0 else 0

    async def areclaim(self) -> int:
        """The asyncio form of :meth:`reclaim` (closing an asyncio driver connection needs SQLAlchemy's greenlet)."""
        if self.held == 0:
            return 0
        if self.is_async:
            from sqlalchemy.util import greenlet_spawn  # noqa: PLC0415 (an async guard watches an AsyncEngine)

            reclaimed: int = await greenlet_spawn(self.reclaim)
            return reclaimed
        return self.reclaim()

    def leave(self) -> None:
        """Leaves the context without reclaiming: for a unit whose pool takes its connections back later.

        Django's own connections go back when Django ends the request, after the middleware has left.
        """
        _reset(self.gate.unit_var, self._unit_token)
        self._failure = None  # its traceback holds the request's frames, and they this unit: a cycle for the GC
        if self.reserved is not None:
            self.gate.unreserve(self)
        if self._work_token is not None:
            _reset(_context.current_unit, self._work_token)
        self._unit_token = self._work_token = None

    def _release(self) -> None:
        try:
            if self.held > 0:
                self.reclaim()
        finally:
            self.leave()

    def __enter__(self) -> Self:
        return self.open()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close(exc)

    async def __aenter__(self) -> Self:
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


def _has_work(session: Session | AsyncSession) -> bool:
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
    if not _has_work(session):
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


async def _end_offloaded(session: Session, error: BaseException | None, offload: Offload) -> None:
    """:func:`end_transaction` through ``offload`` (it blocks), only when there is something to end."""
    if _has_work(session):
        await offload(lambda: end_transaction(session, error))


def finish_session(session: Session, error: BaseException | None) -> None:
    """:func:`end_transaction`, then close always."""
    try:
        end_transaction(session, error)
    finally:
        session.close()


async def aend_transaction(session: AsyncSession, error: BaseException | None) -> None:
    """The asyncio form of :func:`end_transaction`; nothing is sent to a cancelled request's connection."""
    if isinstance(error, asyncio.CancelledError) or not _has_work(session):
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


class _Block:
    """What ``guard.session()`` and ``guard.connection()`` blocks share: the unit of work they join or open."""

    __slots__ = ("_gate", "_is_async", "_own", "_tx")
    _kind = "guard.block"
    """How the block was asked for, in error messages."""

    def __init__(self, gate: Gate, *, is_async: bool) -> None:
        self._gate = gate
        self._is_async = is_async
        self._own: RequestScope | None = None
        self._tx: Token[int] | None = None

    def _open(self, form: str) -> None:
        if self._is_async != form.startswith("async"):
            engine = "an AsyncEngine" if self._is_async else "a synchronous Engine"
            right = "async with" if self._is_async else "with"
            raise TypeError(f"{self._kind}() on {engine} is used with '{right}', not '{form}'")
        # Joins the unit of work running here (a request), or opens one of its own, closed on leaving.
        if self._gate.unit_var.get() is None:
            own = self._own = RequestScope(self._gate, None, is_async=self._is_async)
            own.sheds = False  # a job's unit, outside any request: it waits its whole budget
            own.open()
        self._tx = _context.enter_transaction()  # for retry: the block is one transaction

    def _leave_transaction(self) -> None:
        if self._tx is not None:
            _context.leave_transaction(self._tx)
            self._tx = None

    def _leave(self) -> None:
        self._leave_transaction()
        if self._own is not None:
            self._own.close()

    async def _aleave(self) -> None:
        self._leave_transaction()
        if self._own is not None:
            await self._own.aclose()


class SessionBlock(_Block, Generic[S]):
    """What ``guard.session()`` returns: usable with ``with`` (sync engine) or ``async with`` (async)."""

    __slots__ = ("_factory", "_session")
    _kind = "guard.session"

    def __init__(self, gate: Gate, factory: Callable[[], Any], *, is_async: bool) -> None:
        super().__init__(gate, is_async=is_async)
        self._factory = factory
        self._session: Any = None

    def __enter__(self) -> Session:
        self._open("with")
        self._session = self._factory()
        return cast("Session", self._session)

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            finish_session(self._session, exc)
        finally:
            self._leave()

    async def __aenter__(self) -> AsyncSession:
        self._open("async with")
        self._session = self._factory()
        return cast("AsyncSession", self._session)

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            await afinish_session(self._session, exc)
        finally:
            await self._aleave()


class ConnectionBlock(_Block, Generic[C]):
    """What ``guard.connection()`` returns: a Connection (AsyncConnection) with the same guarantees."""

    __slots__ = ("_connection", "_engine")
    _kind = "guard.connection"

    def __init__(self, gate: Gate, engine: Engine | AsyncEngine, *, is_async: bool) -> None:
        super().__init__(gate, is_async=is_async)
        self._engine = engine
        self._connection: Any = None

    def __enter__(self) -> Connection:
        self._open("with")
        try:
            self._connection = cast("Engine", self._engine).connect()
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
        self._open("async with")
        try:
            self._connection = await cast("AsyncEngine", self._engine).connect()
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
