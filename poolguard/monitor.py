"""The per-pool core every pool kind reports into: gating, accounting and leak tracking.

Pool adapters call :meth:`PoolMonitor.checkout` around the pool's own checkout, and the
``on_*`` hooks from the pool's events. The monitor decides, for checkouts made inside one of
its guard's scopes, whether the database may be asked at all (breaker) and whether a slot can be
had within the wait budget (admission); for every checkout, guarded or not, it records wait, use
and create times, pending waiters, timeouts and who holds what.

Whether a checkout is "through the guard" is carried by a contextvar of this monitor, so a request
scope of one guard never gates another guard's pool, and SQLAlchemy's lazy checkout deep inside a
Session (or inside its asyncio greenlet) still sees the request it belongs to.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Awaitable, Callable, Hashable
from contextvars import ContextVar
from threading import get_ident
from typing import Any, Protocol, TypeVar

from opentelemetry.context import get_current
from opentelemetry.trace import INVALID_SPAN, get_current_span

from poolguard._classify import counted_pool, is_checkout_timeout, is_connection_failure, mark_counted
from poolguard._types import Clock
from poolguard.admission import Admission
from poolguard.breaker import Breaker
from poolguard.errors import CircuitOpen, PoolSaturated, Unavailable
from poolguard.leaks import Holder, LeakTracker, capture_stack
from poolguard.pools import PoolCounts
from poolguard.stats import PoolStats, SlidingWindow
from poolguard.telemetry import PoolTelemetry

logger = logging.getLogger("poolguard")

T = TypeVar("T")

AwaitInGreenlet = Callable[[Awaitable[Any]], Any]
"""Runs a coroutine to completion from synchronous code inside SQLAlchemy's asyncio greenlet."""


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


MEAN_USE_SAMPLES = 16
"""Use times admission averages to predict a wait: enough to smooth one slow query, few enough to follow a change."""


class GuardedScope:
    """What the monitor tracks of one unit of work made through the guard (a request, a session block)."""

    __slots__ = ("held", "route", "waited")

    def __init__(self, route: str | None) -> None:
        self.route = route
        self.waited = 0.0
        self.held = 0


class PoolMonitor:
    """Gating and accounting for one pool; built and owned by a Guard."""

    def __init__(
        self,
        *,
        name: str,
        capacity: int | None,
        breaker: Breaker | None,
        max_wait: float,
        leak_threshold: float,
        capture_stacks: bool,
        clock: Clock,
        telemetry: PoolTelemetry | None = None,
    ) -> None:
        self.name = name
        self.telemetry = telemetry
        self.breaker = breaker
        self.max_wait = max_wait
        self.capture_stacks = capture_stacks
        self.clock = clock
        self.scope_var: ContextVar[GuardedScope | None] = ContextVar(f"poolguard_scope_{name}", default=None)
        self.wait_times = SlidingWindow()
        self.use_times = SlidingWindow()
        self.create_times = SlidingWindow(size=256)
        self.admission = Admission(capacity, pool_name=name, mean_use=self._mean_use, clock=clock)
        self.leaks = LeakTracker(
            pool_name=name, threshold=leak_threshold, clock=clock, on_leak=self._on_leak if telemetry else None
        )
        # Checkout and checkin store and pop holders in the tracker's dict directly (each atomic, see
        # LeakTracker): its methods would cost a call each on every checkout.
        self._holders = self.leaks.by_key
        self.reclaim: Callable[[Any], None] | None = None
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

    def add_observer(self, observer: CheckoutObserver) -> None:
        """Starts sending every wait, use and create time to ``observer`` as well."""
        self.observers = (*self.observers, observer)

    def _mean_use(self) -> float:
        """How long a held connection is expected to take still: the mean of the last few use times."""
        return self.use_times.mean_of_last(MEAN_USE_SAMPLES)

    def checkout(
        self,
        real_checkout: Callable[[], T],
        await_in_greenlet: AwaitInGreenlet | None = None,
        key_of: Callable[[T], Hashable] | None = None,
    ) -> T:
        """Runs the pool's own checkout, gated when inside a scope of this guard, and accounts for it.

        With ``key_of``, the connection is also registered as held, under ``key_of(connection)``:
        who took it, from which route, since when (what leak detection and use times start from).
        The pool adapter reports its return with :meth:`on_checkin` and the same key.
        This is the per-checkout hot path: its common case (breaker closed, a slot free) makes as
        few Python calls as it can.
        """
        scope = self.scope_var.get()
        telemetry = self.telemetry
        start = self.clock()
        if start >= self._next_sweep:
            self._periodic(start)
        span = None
        context = None
        if telemetry is not None and telemetry.tracing:
            context = get_current()  # once, for the span lookup and the wait-time record (its exemplar)
            parent = get_current_span(context)
            # Sampled: a span of its own (the flag is never set on the invalid span context).
            if parent is not INVALID_SPAN and parent.get_span_context().trace_flags.sampled:
                span = telemetry.start_checkout()
        else:
            parent = INVALID_SPAN
        try:
            if scope is not None:
                breaker = self.breaker
                if breaker is not None and not breaker.closed:
                    self._acquire_breaker(breaker)
                try:
                    self.admission.acquire(self.max_wait - scope.waited, await_in_greenlet)
                except BaseException as exc:
                    self._not_admitted(exc, scope, start)
                    raise
            with self._counter_lock:
                self.pending += 1
            try:
                connection = real_checkout()
            except BaseException as exc:
                self._checkout_failed(exc, scope, start)
                raise
        except BaseException as exc:
            if span is not None:
                PoolTelemetry.end_checkout(span, _outcome(exc))
            raise
        now = self.clock()
        wait = now - start
        with self._counter_lock:
            self.pending -= 1
            self.checkouts += 1
        self.wait_times.append((wait, now))
        if scope is not None:
            scope.waited += wait
            if self.breaker is not None:
                self.breaker.record_success(wait)
        if telemetry is not None:
            if telemetry.metering:
                telemetry.record_wait(wait, span is not None, context)
            if span is not None:
                telemetry.end_checkout(span, "acquired")
        for observer in self.observers:
            observer.record_wait(wait)
        if key_of is not None:
            holder = Holder(now, scope, connection, parent, get_ident())
            if span is not None:
                holder.sampled = True
            if scope is not None:
                scope.held += 1
            if self.capture_stacks:
                holder.stack = capture_stack()
            self._holders[key_of(connection)] = holder
        return connection

    def _acquire_breaker(self, breaker: Breaker) -> None:
        try:
            breaker.acquire()
        except CircuitOpen as exc:
            exc.pool = self.name
            self._count_shed(exc)
            raise

    def _not_admitted(self, exc: BaseException, scope: GuardedScope, start: float) -> None:
        """No slot within the budget (or the wait was cancelled): never a breaker failure; the permit goes back."""
        if self.breaker is not None:
            self.breaker.record_ignored()
        scope.waited += self.clock() - start
        if isinstance(exc, PoolSaturated):
            with self._counter_lock:
                self.timeouts += 1
            self._count_shed(exc)

    def _checkout_failed(self, exc: BaseException, scope: GuardedScope | None, start: float) -> None:
        wait = self.clock() - start
        if isinstance(exc, Unavailable):
            # A pool adapter may shed from inside the real checkout (the pool is full of work it cannot see).
            self._count_shed(exc)
        timed_out = is_checkout_timeout(exc) or isinstance(exc, PoolSaturated)
        with self._counter_lock:
            self.pending -= 1
            if timed_out:
                self.timeouts += 1
        if scope is None:
            return
        scope.waited += wait
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
        if self.telemetry is not None:
            self.telemetry.request_shed(exc.reason)

    def _on_leak(self, holder: Holder) -> None:
        if self.telemetry is not None:
            self.telemetry.leak_suspected(holder, self.clock() - holder.since)

    def _periodic(self, now: float) -> None:
        """At most once per sweep interval, on a checkout: overdue holders reported, providers rechecked."""
        self._next_sweep = now + self._sweep_interval
        self.leaks.sweep(now)
        if self.telemetry is not None:
            self.telemetry.notice_providers()

    def on_checkin(self, key: Hashable) -> None:
        """A connection came back (or was detached): its use time, and the admission slot it held."""
        holder = self._holders.pop(key, None)
        if holder is None:
            return
        now = self.clock()
        use = now - holder.since
        self.use_times.append((use, now))
        scope = holder.scope
        if scope is not None:  # the slot first: a waiter need not wait for the records (or a batch of them)
            scope.held -= 1
            self.admission.release()
        telemetry = self.telemetry if self.telemetry is not None and self.telemetry.metering else None
        if telemetry is not None or self.observers:
            route = holder.current_route  # only asked for when something records it (Django's is lazy)
            if telemetry is not None:
                telemetry.record_use(use, route, holder.sampled)
            for observer in self.observers:
                observer.record_use(use, route)

    def on_connection_created(self, seconds: float) -> None:
        with self._counter_lock:
            self.connections_created += 1
        self.create_times.add(seconds, self.clock())
        if self.telemetry is not None:
            self.telemetry.record_create(seconds)
        for observer in self.observers:
            observer.record_create(seconds)

    def on_connection_lost(self, exc: BaseException | None = None) -> None:
        """A connection of a guarded unit of work died in use (disconnect, server shutdown)."""
        if self.breaker is not None and self.scope_var.get() is not None:
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

    def reclaim_leftovers(self, scope: GuardedScope) -> int:
        """Forces back every connection ``scope`` still holds at its end; returns how many there were."""
        leftovers = self.leaks.held_by(scope)
        for _key, holder in leftovers:
            logger.warning(
                "poolguard: route %s ended while still holding a connection of pool %r; closing it",
                scope.route or "(no request)",
                self.name,
            )
            self.leaks.reported_total += 1
            self._on_leak(holder)
            if self.reclaim is not None:
                self.reclaim(holder.handle)
        return len(leftovers)

    def snapshot(self, counts: PoolCounts, backend: str) -> PoolStats:
        """A consistent-enough PoolStats for health and ``guard.stats()``."""
        now = self.clock()
        wait = self.wait_times.quantiles(now, 0.5, 0.99)
        use = self.use_times.quantiles(now, 0.5, 0.99)
        create = self.create_times.quantiles(now, 0.5)
        capacity = counts.capacity
        utilization = counts.checked_out / capacity if capacity else 0.0
        return PoolStats(
            name=self.name,
            backend=backend,
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
            shed=sum(self.shed.values()),
            breaker_state=self.breaker.state.value if self.breaker is not None else "disabled",
        )
