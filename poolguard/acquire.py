"""The guarded acquire and release for a pool with no hook before its acquire waits (asyncpg).

SQLAlchemy's and Django's pools call the gate from inside their own checkout
(:meth:`~poolguard.gate.Gate.checkout`). asyncpg's pool has nowhere to call it from, so the unit of
work acquires itself: :func:`acquire` is the gate's checkout path in asyncio form (breaker, then
admission within the wait budget, then the pool's own acquire, timed, traced and registered as held,
all with the gate's own parts), and :func:`release` hands the connection back and accounts for it.
The wait is measured around admission and ``pool.acquire()`` with one clock read on each side, the
use from there to the release, as for every other pool.

:class:`AcquiredConnection` is ``guard.connection()`` over such a pool; adapters (Starlette's
``get_connection``) use :class:`RequestConnection` for a connection that lives as long as the request.
"""

from __future__ import annotations

import asyncio
from threading import get_ident
from types import TracebackType
from typing import Any

from opentelemetry.context import get_current
from opentelemetry.trace import INVALID_SPAN, get_current_span

from poolguard._classify import mark_counted
from poolguard.gate import Gate, _outcome
from poolguard.leaks import Holder, capture_stack
from poolguard.pools import AcquiringPool, Unit
from poolguard.work import RequestScope

__all__ = ["AcquiredConnection", "RequestConnection", "acquire", "failed", "release"]


async def acquire(gate: Gate, pool: AcquiringPool, unit: Unit) -> Any:
    """The pool's acquire, gated for ``unit`` and accounted for as :meth:`Gate.checkout` does a checkout.

    Refusals (``CircuitOpen``, ``PoolSaturated``) and failures are the checkout's: counted, traced,
    and a connection-level failure of the acquire recorded on the breaker. This is the hot path of
    an asyncpg guard; ``tests/profiling`` pins its calls.
    """
    telemetry = gate.telemetry
    start = gate.clock()
    if start >= gate._next_sweep:
        gate._periodic(start)
    span = None
    context = None
    if telemetry.tracing:
        context = get_current()
        parent = get_current_span(context)
        if parent is not INVALID_SPAN and parent.get_span_context().trace_flags.sampled:
            span = telemetry.start_checkout()
    else:
        parent = INVALID_SPAN
    try:
        breaker = gate.breaker
        if breaker is not None and not breaker.closed:
            gate._acquire_breaker(breaker)
        reserved = unit.reserved
        budget = gate.max_wait - unit.waited
        if reserved is not None:
            unit.reserved = None
            start -= reserved
            budget -= reserved
        else:
            try:
                if unit.queued and budget <= 0:
                    raise gate._too_late(unit)
                if not gate.admission.try_acquire():
                    await gate.admission.acquire_async(budget, unit.sheds)
                    budget -= gate.clock() - start  # what is left for the pool's own wait
            except BaseException as exc:
                gate._not_admitted(exc, unit, start)
                raise
        # No counter lock on this path: an asyncpg pool lives on one event loop, whose thread is the only one
        # that checks out from it (the watchdog's thread only reads).
        gate.pending += 1
        try:
            connection = await pool.acquire(budget)
        except BaseException as exc:
            gate._checkout_failed(exc, unit, start)
            raise
    except BaseException as exc:
        if span is not None:
            telemetry.end_checkout(span, _outcome(exc))
        raise
    now = gate.clock()
    wait = now - start
    gate.last_progress = now
    gate.pending -= 1
    gate.checkouts += 1
    gate.wait_times.append((wait, now))
    unit.waited += wait
    if breaker is not None:
        breaker.record_success(wait)
    if telemetry.metering:
        telemetry.record_wait(wait, span is not None, context)
    if span is not None:
        telemetry.end_checkout(span, "acquired")
    for observer in gate.observers:
        observer.record_wait(wait)
    holder = Holder(now, unit, connection, parent, get_ident())
    if span is not None:
        holder.sampled = True
    unit.held += 1
    if gate.capture_stacks:
        holder.stack = capture_stack()
    gate.leaks.by_key[id(connection)] = holder
    return connection


async def release(gate: Gate, pool: AcquiringPool, connection: Any, error: BaseException | None = None) -> None:
    """Gives ``connection`` back to the pool and ends its use; ``error`` is what its user raised, if anything.

    The connection is accounted as back even when the release fails or is cancelled (asyncpg shields
    it; a connection it cannot reset, it terminates).
    """
    if error is not None:
        failed(gate, pool, connection, error)
    try:
        await pool.release(connection)
    finally:
        gate.checkin(id(connection))


def failed(gate: Gate, pool: AcquiringPool, connection: Any, error: BaseException) -> None:
    """A connection-level ``error`` (lost, reset, asyncpg's own timeout) raised in use is recorded on the
    breaker, as the SQLAlchemy adapter's error hook does; an application error is not."""
    if gate.breaker is not None and pool.broken(connection, error):
        gate.breaker.record_failure(0.0)
        mark_counted(error, gate.name)


class AcquiredConnection:
    """``async with guard.connection() as conn`` over an acquiring pool: the pool's connection, always released.

    Inside a request it joins the request's unit of work (its wait budget, its route); outside one the
    block is a unit of work itself (the gate's :class:`~poolguard.pools.Unit`): a job's, which waits
    its whole budget. It is not made the context's unit: nothing below an asyncpg acquire asks for it.
    """

    __slots__ = ("_connection", "_gate", "_pool", "held", "queued", "reserved", "route", "sheds", "waited")

    def __init__(self, gate: Gate, pool: AcquiringPool) -> None:
        self._gate = gate
        self._pool = pool
        self._connection: Any = None
        self.route: str | None = None
        self.waited = 0.0
        self.queued = 0.0
        self.sheds = False
        self.reserved: float | None = None
        self.held = 0

    def __enter__(self) -> Any:
        raise TypeError("guard.connection() on an asyncpg pool is used with 'async with', not 'with'")

    def __exit__(self, *exc_info: object) -> None:  # pragma: no cover - __enter__ always raises
        return None

    async def __aenter__(self) -> Any:
        gate = self._gate
        self._connection = await acquire(gate, self._pool, gate.unit_var.get() or self)
        return self._connection

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        connection, self._connection = self._connection, None
        if exc is not None:
            failed(self._gate, self._pool, connection, exc)
        try:
            await self._pool.release(connection)
        finally:
            self._gate.checkin(id(connection))


class RequestConnection:
    """A connection for the length of one request's unit of work, acquired on first use.

    Concurrent first uses in one request (a task group) share one acquire.
    """

    __slots__ = ("_connection", "_gate", "_pending", "_pool", "_unit")

    def __init__(self, gate: Gate, pool: AcquiringPool, unit: RequestScope) -> None:
        self._gate = gate
        self._pool = pool
        self._unit = unit
        self._connection: Any = None
        self._pending: asyncio.Future[Any] | None = None

    async def get(self) -> Any:
        """The request's connection, acquired now if it was not yet."""
        connection = self._connection
        if connection is not None:
            return connection
        if self._pending is not None:
            return await asyncio.shield(self._pending)
        pending = self._pending = asyncio.get_running_loop().create_future()
        try:
            connection = await acquire(self._gate, self._pool, self._unit)
        except BaseException as exc:
            self._pending = None
            if isinstance(exc, asyncio.CancelledError):
                pending.cancel()
            else:
                pending.set_exception(exc)
                pending.exception()  # retrieved: only concurrent first users wait on it
            raise
        self._pending = None
        self._connection = connection
        pending.set_result(connection)
        return connection

    async def aclose(self, error: BaseException | None = None) -> None:
        """Releases the connection, if one was acquired."""
        connection, self._connection = self._connection, None
        if connection is not None:
            await release(self._gate, self._pool, connection, error)
