"""The gate: the per-pool checkout path every pool kind reports into.

A pool module calls :meth:`Gate.checkout` around the pool's own checkout and reports the rest
(checkin, a new connection, a connection lost) through the :class:`~poolguard.pools.PoolEvents`
protocol, which the gate implements. For checkouts made inside a unit of work of its guard, the
gate decides whether the database may be asked at all (breaker) and whether a slot can be had
within the wait budget (admission); for every checkout, guarded or not, it records wait, use and
create times, pending waiters, timeouts and who holds what. :meth:`Gate.snapshot` is the one view
of all of it that health, ``guard.stats()``, OpenTelemetry and Prometheus read.

Whether a checkout belongs to a unit of work is carried by a contextvar of this gate, so a unit of
one guard never gates another guard's pool, and SQLAlchemy's lazy checkout deep inside a Session
(or inside its asyncio greenlet) still sees the request it belongs to.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Hashable
from contextvars import ContextVar
from threading import get_ident
from typing import Any, Protocol, TypeVar

from opentelemetry.context import get_current
from opentelemetry.trace import INVALID_SPAN, get_current_span

from poolguard._classify import counted_pool, is_checkout_timeout, is_connection_failure, mark_counted
from poolguard._types import Clock
from poolguard.admission import Admission
from poolguard.breaker import Breaker, BreakerState
from poolguard.errors import CircuitOpen, PoolSaturated, Unavailable
from poolguard.leaks import Holder, LeakTracker, capture_stack
from poolguard.pools import AwaitInGreenlet, PoolAdapter, Unit
from poolguard.stats import PoolStats, SlidingWindow
from poolguard.telemetry import PoolTelemetry

logger = logging.getLogger("poolguard")

T = TypeVar("T")


def _outcome(exc: BaseException) -> str:
    """The ``poolguard.outcome`` span attribute for a checkout that did not get a connection."""
    if isinstance(exc, Unavailable):
        return exc.reason
    return "timeout" if is_checkout_timeout(exc) else "error"


class CheckoutObserver(Protocol):
    """Receives every timed event of a pool (e.g. the Prometheus histograms); must be cheap and never raise."""

    def record_wait(self, seconds: float) -> None: ...

    def record_use(self, seconds: float, route: str | None) -> None: ...

    def record_create(self, seconds: float) -> None: ...

    def record_queue(self, seconds: float) -> None: ...


MEAN_USE_SAMPLES = 16
"""Use times admission averages to predict a wait: enough to smooth one slow query, few enough to follow a change."""

STALL_FLOOR = 0.25
"""Seconds without progress before a pool with work outstanding is suspected to have stalled, at least.

A suspicion only costs a probe (then none for a while if the database answers), so it can come early."""

STALL_FACTOR = 4.0
"""...or this many times the recent p99 use time, so a service of slow reports is not suspected for being slow."""


class Gate:
    """The checkout path of one pool: breaker, admission, timing and holders; built and owned by a Guard.

    It implements :class:`~poolguard.pools.PoolEvents`, what the pool reports into, and owns the
    pool's telemetry, which reads :meth:`snapshot`.
    """

    def __init__(
        self,
        pool: PoolAdapter,
        *,
        name: str,
        breaker: Breaker | None,
        max_wait: float,
        leak_threshold: float,
        capture_stacks: bool,
        clock: Clock,
        tracer_provider: Any = None,
        meter_provider: Any = None,
    ) -> None:
        self.name = name
        self.pool = pool
        self.breaker = breaker
        self.max_wait = max_wait
        self.capture_stacks = capture_stacks
        self.clock = clock
        self.unit_var: ContextVar[Unit | None] = ContextVar(f"poolguard_unit_{name}", default=None)
        """The unit of work of this gate's guard in the current context (set by the unit itself)."""
        self.wait_times = SlidingWindow()
        self.use_times = SlidingWindow()
        self.create_times = SlidingWindow(size=256)
        capacity = pool.counts().capacity
        self.admission = Admission(
            capacity, pool_name=name, mean_use=self._mean_use, clock=clock, next_release=self._next_release
        )
        self.leaks = LeakTracker(pool_name=name, threshold=leak_threshold, clock=clock, on_leak=self._on_leak)
        self.telemetry = PoolTelemetry(
            pool_name=name,
            db_system=pool.db_system,
            snapshot=self.snapshot,
            tracer_provider=tracer_provider,
            meter_provider=meter_provider,
        )
        self.observers: tuple[CheckoutObserver, ...] = ()
        # Leak checks on checkout run at most this often: overdue holders are found within a
        # fraction of the threshold without paying a lock per checkout.
        self._sweep_interval = min(1.0, leak_threshold / 4)
        self._next_sweep = clock()
        self._counter_lock = threading.Lock()
        self.pending = 0
        self.checkouts = 0
        self.timeouts = 0
        self.connections_created = 0
        self.shed: dict[str, int] = {CircuitOpen.reason: 0, PoolSaturated.reason: 0}
        self.last_progress = clock()
        """When a connection last came back, was handed out or was made: what a stall is measured from."""

    def add_observer(self, observer: CheckoutObserver) -> None:
        """Starts sending every wait, use and create time to ``observer`` as well."""
        self.observers = (*self.observers, observer)

    @property
    def held(self) -> int:
        return len(self.leaks.by_key)

    def _mean_use(self) -> float:
        """How long a held connection is expected to take still: the mean of the last few use times."""
        return self.use_times.mean_of_last(MEAN_USE_SAMPLES)

    def _next_release(self, mean_use: float) -> float | None:
        """Seconds until the longest-held connection is expected back, by the mean use time; None when none is held."""
        oldest = self.leaks.oldest()
        return None if oldest is None else max(0.0, mean_use - (self.clock() - oldest))

    def checkout(
        self,
        real_checkout: Callable[[], T],
        await_in_greenlet: AwaitInGreenlet | None = None,
        key_of: Callable[[T], Hashable] | None = None,
    ) -> T:
        """Runs the pool's own checkout, gated when inside a unit of this guard, and accounts for it.

        With ``key_of``, the connection is also registered as held, under ``key_of(connection)``:
        who took it, from which route, since when (what leak detection and use times start from).
        The pool reports its return with :meth:`checkin` and the same key. This is the per-checkout
        hot path; ``tests/profiling`` pins how many calls it makes.
        """
        unit = self.unit_var.get()
        telemetry = self.telemetry
        start = self.clock()
        if start >= self._next_sweep:
            self._periodic(start)
        span = None
        context = None
        if telemetry.tracing:
            context = get_current()  # once, for the span lookup and the wait-time record (its exemplar)
            parent = get_current_span(context)
            # Sampled: a span of its own (the flag is never set on the invalid span context).
            if parent is not INVALID_SPAN and parent.get_span_context().trace_flags.sampled:
                span = telemetry.start_checkout()
        else:
            parent = INVALID_SPAN
        try:
            if unit is not None:
                breaker = self.breaker
                if breaker is not None and not breaker.closed:
                    self._acquire_breaker(breaker)
                reserved = unit.reserved
                if reserved is not None:
                    unit.reserved = None  # the slot taken ahead is this checkout's
                    start -= reserved
                else:
                    budget = self.max_wait - unit.waited
                    try:
                        if unit.queued and budget <= 0:
                            raise self._too_late(unit)
                        self.admission.acquire(budget, await_in_greenlet, unit.sheds)
                    except BaseException as exc:
                        self._not_admitted(exc, unit, start)
                        raise
            with self._counter_lock:
                self.pending += 1
            try:
                connection = real_checkout()
            except BaseException as exc:
                self._checkout_failed(exc, unit, start)
                raise
        except BaseException as exc:
            if span is not None:
                telemetry.end_checkout(span, _outcome(exc))
            raise
        now = self.clock()
        wait = now - start
        self.last_progress = now
        with self._counter_lock:
            self.pending -= 1
            self.checkouts += 1
        self.wait_times.append((wait, now))
        if unit is not None:
            unit.waited += wait
            if self.breaker is not None:
                self.breaker.record_success(wait)
        if telemetry.metering:
            telemetry.record_wait(wait, span is not None, context)
        if span is not None:
            telemetry.end_checkout(span, "acquired")
        for observer in self.observers:
            observer.record_wait(wait)
        if key_of is not None:
            holder = Holder(now, unit, connection, parent, get_ident())
            if span is not None:
                holder.sampled = True
            if unit is not None:
                unit.held += 1
            if self.capture_stacks:
                holder.stack = capture_stack()
            self.leaks.by_key[key_of(connection)] = holder
        return connection

    def _acquire_breaker(self, breaker: Breaker) -> None:
        try:
            breaker.acquire()
        except CircuitOpen as exc:
            exc.pool = self.name
            self._count_shed(exc)
            raise

    async def areserve(self, unit: Unit) -> None:
        """Takes the unit's first admission slot now, on the event loop, ahead of its first checkout.

        A sync endpoint (FastAPI's ``def`` routes) waiting for a slot in its worker thread holds the
        thread that requests holding connections may need to finish. Refusals are the checkout's; with
        the breaker not closed nothing is taken ahead, and the checkout decides as always."""
        breaker = self.breaker
        if unit.reserved is not None or (breaker is not None and not breaker.closed):
            return
        start = self.clock()
        budget = self.max_wait - unit.waited
        try:
            if unit.queued and budget <= 0:
                raise self._too_late(unit)
            await self.admission.acquire_async(budget, unit.sheds)
        except BaseException as exc:
            self._not_admitted(exc, unit, start)
            raise
        unit.reserved = self.clock() - start

    def unreserve(self, unit: Unit) -> None:
        """The unit ended without using its slot taken ahead: it goes back."""
        unit.reserved = None
        self.admission.release()

    def _too_late(self, unit: Unit) -> PoolSaturated:
        """A request that queued in front of the app past its wait budget: whoever sent it has likely given
        up, and a free slot is better spent on a request that can still be answered in time."""
        return PoolSaturated(
            f"pool {self.name!r}: the request queued {unit.queued:.3f}s before it reached the app and has "
            f"waited {unit.waited:.3f}s in all, past the wait budget {self.max_wait:.3f}s",
            retry_after=1.0,
            pool=self.name,
        )

    def request_queued(self, seconds: float) -> None:
        """A request arrived having queued ``seconds`` in front of the app (``X-Request-Start``); once per request."""
        if self.telemetry.metering:
            self.telemetry.record_queue(seconds)
        for observer in self.observers:
            observer.record_queue(seconds)

    def _not_admitted(self, exc: BaseException, unit: Unit, start: float) -> None:
        """No slot within the budget (or the wait was cancelled): never a breaker failure; the permit goes back."""
        if self.breaker is not None:
            self.breaker.record_ignored()
        unit.waited += self.clock() - start
        if isinstance(exc, PoolSaturated):
            with self._counter_lock:
                self.timeouts += 1
            self._count_shed(exc)

    def _checkout_failed(self, exc: BaseException, unit: Unit | None, start: float) -> None:
        wait = self.clock() - start
        if isinstance(exc, Unavailable):
            # A pool may shed from inside the real checkout (the pool is full of work it cannot see).
            self._count_shed(exc)
        timed_out = is_checkout_timeout(exc) or isinstance(exc, PoolSaturated)
        with self._counter_lock:
            self.pending -= 1
            if timed_out:
                self.timeouts += 1
        if unit is None:
            return
        unit.waited += wait
        self.admission.release()
        if self.breaker is not None:
            if is_connection_failure(exc, during_checkout=True):
                self.breaker.record_failure(wait)
                mark_counted(exc, self.name)
            else:
                self.breaker.record_ignored()

    def _count_shed(self, exc: Unavailable) -> None:
        with self._counter_lock:
            self.shed[exc.reason] = self.shed.get(exc.reason, 0) + 1
        self.telemetry.request_shed(exc.reason)

    def _on_leak(self, holder: Holder) -> None:
        self.telemetry.leak_suspected(holder, self.clock() - holder.since)

    def _periodic(self, now: float) -> None:
        """At most once per sweep interval, on a checkout: overdue holders reported, providers rechecked."""
        self._next_sweep = now + self._sweep_interval
        self.leaks.sweep(now)
        self.telemetry.notice_providers()

    def checkin(self, key: Hashable) -> None:
        """A connection came back (or was detached): its use time, and the admission slot it held."""
        holder = self.leaks.by_key.pop(key, None)
        if holder is None:
            return
        now = self.clock()
        self.last_progress = now
        use = now - holder.since
        self.use_times.append((use, now))
        unit = holder.unit
        if unit is not None:  # the slot first: a waiter need not wait for the records (or a batch of them)
            unit.held -= 1
            self.admission.release()
        metering = self.telemetry.metering
        if metering or self.observers:
            route = holder.route  # only asked for when something records it (Django names it lazily)
            if metering:
                self.telemetry.record_use(use, route, holder.sampled)
            for observer in self.observers:
                observer.record_use(use, route)

    def connecting(self) -> None:
        breaker = self.breaker
        if breaker is None or breaker.closed or self.unit_var.get() is None:
            return
        if breaker.state is BreakerState.OPEN:
            self._acquire_breaker(breaker)

    def connected(self, seconds: float) -> None:
        now = self.clock()
        self.last_progress = now
        with self._counter_lock:
            self.connections_created += 1
        self.create_times.append((seconds, now))
        self.telemetry.record_create(seconds)
        for observer in self.observers:
            observer.record_create(seconds)

    def lost(self, exc: BaseException | None = None) -> None:
        """A connection of a guarded unit of work died in use (disconnect, server shutdown)."""
        if self.breaker is not None and self.unit_var.get() is not None:
            self.breaker.record_failure(0.0)
            if exc is not None:
                mark_counted(exc, self.name)

    def unavailable_for(self, exc: BaseException) -> Unavailable | None:
        """The Unavailable an exception escaping a request stands for, or None for an application error.

        ``Unavailable`` itself, or a connection failure this pool's breaker counted: that request
        failed because the database did, so it gets the same 503 as a refused one, with the
        breaker's remaining open time (or 1 s while it is still closed) as ``retry_after``.
        """
        if isinstance(exc, Unavailable):
            return exc
        if counted_pool(exc) != self.name:
            return None
        retry_after = self.breaker.retry_after if self.breaker is not None else None
        return CircuitOpen(
            f"the database of pool {self.name!r} failed at the connection level",
            retry_after=retry_after or 1.0,
            pool=self.name,
        )

    # -- stalls: outstanding work and no progress ------------------------------------------------------

    def stall_threshold(self, now: float) -> float:
        """How long without progress counts as a stall: :data:`STALL_FLOOR`, or longer for slow work."""
        p99 = self.use_times.quantiles(now, 0.99)
        return max(STALL_FLOOR, STALL_FACTOR * p99[0]) if p99 else STALL_FLOOR

    def stalled(self, now: float) -> bool:
        """Connections are held or awaited, and for :meth:`stall_threshold` none came back or was made.

        Overload is not a stall (connections come back at the usual rate); a black-holed database
        is (every read hangs, nothing comes back, no connect finishes). Only a suspicion: the
        guard confirms it with a probe on a fresh connection before it acts.
        """
        if not (self.leaks.by_key or self.pending or self.admission.waiting):
            return False
        quiet = now - self.last_progress
        return quiet >= STALL_FLOOR and quiet >= self.stall_threshold(now)

    def abort_stuck(self, now: float) -> int:
        """Shuts the sockets of connections held since before the stall began; returns how many.

        Called only once the outage is confirmed: a request blocked on such a connection then fails
        at once with a lost connection (a 503), instead of hanging until the network heals.
        """
        threshold = now - self.stall_threshold(now)
        aborted = self.pool.abort_connecting()
        for holder in list(self.leaks.by_key.values()):
            if holder.since <= threshold and holder.handle is not None and self.pool.abort(holder.handle):
                aborted += 1
        if aborted:
            logger.warning(
                "poolguard: pool %r stalled and its database does not answer; aborted %d connection(s) hung on it",
                self.name,
                aborted,
            )
        return aborted

    def reclaim_leftovers(self, unit: Unit) -> int:
        """Forces back every connection ``unit`` still holds at its end; returns how many there were."""
        leftovers = self.leaks.held_by(unit)
        for _key, holder in leftovers:
            logger.warning(
                "poolguard: route %s ended while still holding a connection of pool %r; closing it",
                unit.route or "(no request)",
                self.name,
            )
            self.leaks.reported_total += 1
            self._on_leak(holder)
            self.pool.reclaim(holder.handle)
        return len(leftovers)

    def snapshot(self) -> PoolStats:
        """The pool's state now: what health, ``guard.stats()``, OpenTelemetry and Prometheus all read."""
        counts = self.pool.counts()
        now = self.clock()
        wait = self.wait_times.quantiles(now, 0.5, 0.99)
        use = self.use_times.quantiles(now, 0.5, 0.99)
        create = self.create_times.quantiles(now, 0.5)
        capacity = counts.capacity
        utilization = counts.checked_out / capacity if capacity else 0.0
        with self._counter_lock:
            shed = dict(self.shed)
        return PoolStats(
            name=self.name,
            backend=self.pool.backend,
            size=counts.size,
            max_overflow=counts.max_overflow,
            checked_out=counts.checked_out,
            idle=counts.idle,
            overflow=counts.overflow,
            pending=self.pending + self.admission.waiting,
            utilization=round(min(utilization, 1.0), 4),
            wait_p50=wait[0] if wait else None,
            wait_p99=wait[1] if wait else None,
            use_p50=use[0] if use else None,
            use_p99=use[1] if use else None,
            checkouts=self.checkouts,
            timeouts=self.timeouts,
            connections_created=self.connections_created,
            create_p50=create[0] if create else None,
            suspected_leaks=self.leaks.suspected,
            shed=sum(shed.values()),
            breaker_state=self.breaker.state.value if self.breaker is not None else "disabled",
            shed_by_reason=shed,
            leaks_reported=self.leaks.reported_total,
        )

    def close(self) -> None:
        """Stops reporting the pool's telemetry (its queued samples recorded first)."""
        self.telemetry.close()

    def reset_after_fork(self) -> None:
        """In a forked child: full admission, no holders, nothing pending, fresh figures; the breaker keeps its state.

        The threads that held slots and connections in the parent do not exist in the child, so their
        slots would never come back (a fork during one checkout would leave the child a slot short
        for good). The child's figures describe the child's own pool from the fork on.
        """
        self._counter_lock = threading.Lock()
        self.admission.reset()
        self.leaks.reset()
        self.pending = self.checkouts = self.timeouts = self.connections_created = 0
        self.last_progress = self.clock()
        self.shed = dict.fromkeys(self.shed, 0)
        for window in (self.wait_times, self.use_times, self.create_times):
            window.clear()
        if self.breaker is not None:
            self.breaker.reset_after_fork()
