"""The circuit breaker: stop sending load to a database that is failing, then probe it back.

A failing database gets slower under retries and reconnect storms; refusing at once (503 +
Retry-After) lets it recover and keeps request threads free. The breaker is pure bookkeeping: it
never does I/O, never starts a timer or a thread, and reads time only through an injected clock, so
every transition can be tested by moving a fake clock. It never decides what counts as a failure:
the guard classifies exceptions (``poolguard._classify``) and calls ``record_*``.

States::

    CLOSED ──(failure/slow rate over the window, or N failures in a row)──> OPEN
    CLOSED ──(trip(): a stalled pool or a failed probe, judged by the guard)──> OPEN
    OPEN ──(open interval elapsed, noticed lazily on the next read)──> HALF_OPEN
    OPEN ──(probe_succeeded(): a fresh connection answered)──> HALF_OPEN
    HALF_OPEN ──(half_open_calls probes succeeded)──> CLOSED
    HALF_OPEN ──(a probe failed)──> OPEN, for a longer interval

``open_for`` is the fallback: a guard probes an open breaker's database actively and calls
:meth:`Breaker.probe_succeeded` as soon as it answers, so recovery follows the database, not a timer.

One ``threading.Lock`` guards the counters and is held only for that bookkeeping, never around a
listener or I/O, so the breaker is safe across threads and across asyncio tasks alike.
"""

from __future__ import annotations

import enum
import logging
import math
import threading
import time
from collections.abc import Callable

from poolguard._types import Clock
from poolguard.config import BreakerOptions
from poolguard.errors import CircuitOpen, ConfigError

__all__ = ["Breaker", "BreakerState"]

_log = logging.getLogger("poolguard.breaker")

Listener = Callable[["BreakerState", "BreakerState"], None]


class BreakerState(enum.Enum):
    """Where the breaker stands; ``value`` is the name used in health JSON."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"

    @property
    def metric_value(self) -> int:
        """The ``poolguard.breaker.state`` gauge value, ordered by severity so alerts can use ``> 0``."""
        return _METRIC_VALUES[self]


_METRIC_VALUES = {BreakerState.CLOSED: 0, BreakerState.HALF_OPEN: 1, BreakerState.OPEN: 2}
_DEFAULTS = BreakerOptions()

_Transition = tuple[BreakerState, BreakerState]


def _retry_text(seconds: float) -> str:
    # Rounded up to a tenth so a short remainder never reads as "0.0 s".
    return f"{math.ceil(seconds * 10) / 10:.1f} s"


class Breaker:
    """A count-based sliding-window circuit breaker.

    Callers follow one protocol per attempt: ``acquire()`` first (it raises ``CircuitOpen`` when
    the attempt must not reach the database), then exactly one of ``record_success``,
    ``record_failure`` or ``record_ignored``. A connection found dead while in use may be reported
    with ``record_failure`` alone.

    Every option is keyword-only and validated here, so a bad setting fails at startup:

    - ``failure_rate``: share of failed calls in the window that opens the breaker, in (0, 1].
    - ``consecutive_failures``: that many failures in a row open it even before ``minimum_calls``
      (a database that is plainly down should not need ``minimum_calls`` requests to notice); 0 turns
      this off.
    - ``slow_call_rate`` / ``slow_call_duration``: a call taking at least ``slow_call_duration`` seconds
      is slow; that share of slow calls opens the breaker (1.0: only when every call is slow).
    - ``window_size``: how many of the latest outcomes are weighed.
    - ``minimum_calls``: rates are not trusted on fewer calls than this (one failure is not 100 %).
    - ``open_for``: seconds the breaker stays open the first time; each re-open without a close in
      between multiplies it by ``open_for_multiplier``, up to ``max_open_for``, so a database that
      stays down is probed less and less often.
    - ``half_open_calls``: probes admitted at once while half-open, and successes needed to close.
    - ``clock``: monotonic seconds; ``time.monotonic`` unless injected.
    """

    def __init__(
        self,
        *,
        failure_rate: float = _DEFAULTS.failure_rate,
        consecutive_failures: int = _DEFAULTS.consecutive_failures,
        slow_call_rate: float = _DEFAULTS.slow_call_rate,
        slow_call_duration: float = _DEFAULTS.slow_call_duration,
        window_size: int = _DEFAULTS.window_size,
        minimum_calls: int = _DEFAULTS.minimum_calls,
        open_for: float = _DEFAULTS.open_for,
        max_open_for: float = _DEFAULTS.max_open_for,
        open_for_multiplier: float = _DEFAULTS.open_for_multiplier,
        half_open_calls: int = _DEFAULTS.half_open_calls,
        clock: Clock | None = None,
    ) -> None:
        self.options = options = BreakerOptions(
            failure_rate=failure_rate,
            consecutive_failures=consecutive_failures,
            slow_call_rate=slow_call_rate,
            slow_call_duration=slow_call_duration,
            window_size=window_size,
            minimum_calls=minimum_calls,
            open_for=open_for,
            max_open_for=max_open_for,
            open_for_multiplier=open_for_multiplier,
            half_open_calls=half_open_calls,
        )
        """The validated settings (what ``poolguard.config`` builds from a framework's settings)."""
        self._failure_rate = options.failure_rate
        self._consecutive_limit = options.consecutive_failures
        self._slow_call_rate = options.slow_call_rate
        self._slow_call_duration = options.slow_call_duration
        self._window_size = options.window_size
        self._minimum_calls = options.minimum_calls
        self._open_for = options.open_for
        self._max_open_for = options.max_open_for
        self._multiplier = options.open_for_multiplier
        self._half_open_calls = options.half_open_calls
        self._clock: Clock = _check_clock(clock) if clock is not None else time.monotonic

        self._lock = threading.Lock()
        self._state = BreakerState.CLOSED
        self.closed = True
        """``state is CLOSED``, as a plain attribute for the per-checkout path (``tests/profiling`` pins
        its calls); set only by :meth:`_set_state`."""
        # The window is a preallocated ring with running totals: recording is O(1) and allocates nothing.
        self._failed = bytearray(self._window_size)
        self._slow = bytearray(self._window_size)
        self._next = 0
        self._calls = 0
        self._failures = 0
        self._slows = 0
        self._in_a_row = 0
        self._next_open_for = self._open_for
        self._open_until = 0.0
        self._permits_out = 0
        self._probe_successes = 0
        self._opened_count = 0
        self._listeners: tuple[Listener, ...] = ()
        self.probed_every: float | None = None
        """Set by a guard that probes this breaker's database actively: ``retry_after`` then says
        when the next probe may let traffic back (about this often), not when ``open_for`` ends."""

    # -- reading ---------------------------------------------------------------------------------

    @property
    def state(self) -> BreakerState:
        """The current state; an elapsed open interval turns into HALF_OPEN here, since no timer runs."""
        with self._lock:
            transition = self._expire(self._clock())
            state = self._state
        if transition is not None:
            self._notify((transition,))
        return state

    @property
    def failure_rate(self) -> float:
        """Share of failed calls in the current window; 0.0 when the window is empty."""
        with self._lock:
            return self._failures / self._calls if self._calls else 0.0

    @property
    def retry_after(self) -> float | None:
        """Seconds until the breaker lets a probe through; None unless it is OPEN."""
        with self._lock:
            now = self._clock()
            transition = self._expire(now)
            remaining = self._remaining(now) if self._state is BreakerState.OPEN else None
        if transition is not None:
            self._notify((transition,))
        return remaining

    @property
    def opened_count(self) -> int:
        """How many times the breaker has opened since it was made (``reset()`` does not zero it)."""
        return self._opened_count

    @property
    def clock(self) -> Clock:
        """The clock in use, so collaborators (the guard) can tell whether one was injected."""
        return self._clock

    def use_clock(self, clock: Clock) -> None:
        """Replace the clock, for a Guard given a clock while its Breaker was built without one.

        A pending open deadline keeps its remaining time, carried over to the new clock's timeline.
        """
        clock = _check_clock(clock)
        with self._lock:
            if self._state is BreakerState.OPEN:
                remaining = self._open_until - self._clock()
                self._open_until = clock() + remaining
            self._clock = clock

    # -- the per-attempt protocol ------------------------------------------------------------------

    def acquire(self) -> None:
        """Admit one attempt or raise ``CircuitOpen``; while HALF_OPEN, an admitted attempt holds a permit."""
        # Fast path without the lock: a plain attribute read is atomic, and an attempt racing a trip by
        # a few microseconds would have been admitted anyway.
        if self._state is BreakerState.CLOSED:
            return
        with self._lock:
            now = self._clock()
            transition = self._expire(now)
            state = self._state
            error: CircuitOpen | None = None
            if state is BreakerState.OPEN:
                remaining = self._remaining(now)
                error = CircuitOpen(
                    f"database circuit breaker is open after repeated connection failures; "
                    f"retry in {_retry_text(remaining)}",
                    retry_after=remaining,
                )
            elif state is BreakerState.HALF_OPEN:
                if self._permits_out < self._half_open_calls:
                    self._permits_out += 1
                else:
                    wait = min(self._open_for, 1.0)
                    error = CircuitOpen(
                        f"database circuit breaker is open (half-open: all {self._half_open_calls} trial "
                        f"calls are in flight); retry in {_retry_text(wait)}",
                        retry_after=wait,
                    )
        if transition is not None:
            self._notify((transition,))
        if error is not None:
            raise error

    def record_success(self, duration: float) -> None:
        """The attempt reached the database and worked; ``duration`` (seconds) decides whether it was slow."""
        slow = duration >= self._slow_call_duration
        if not slow and self.closed and self._calls == self._window_size and not self._failures and not self._slows:
            # A success pushed into a full window of successes changes nothing (read without the lock,
            # like acquire(): every checkout comes here, and this is what almost all of them see).
            return
        with self._lock:
            now = self._clock()
            first = self._expire(now)
            second: _Transition | None = None
            if self._state is BreakerState.CLOSED:
                self._in_a_row = 0
                self._push(False, slow)
                second = self._maybe_trip(now)
            elif self._state is BreakerState.HALF_OPEN and self._permits_out > 0:
                # Without a permit out this is a straggler from before the breaker opened: not a probe.
                self._permits_out -= 1
                self._probe_successes += 1
                if self._probe_successes >= self._half_open_calls:
                    second = self._close()
        self._notify_pair(first, second)

    def record_failure(self, duration: float) -> None:
        """The attempt failed at the connection level (or a connection died in use, with no acquire())."""
        slow = duration >= self._slow_call_duration
        with self._lock:
            now = self._clock()
            first = self._expire(now)
            second: _Transition | None = None
            if self._state is BreakerState.CLOSED:
                self._in_a_row += 1
                self._push(True, slow)
                second = self._maybe_trip(now)
            elif self._state is BreakerState.HALF_OPEN:
                second = self._open(now)
        self._notify_pair(first, second)

    def record_ignored(self) -> None:
        """The attempt ended in an application error, which says nothing about the database's health.

        It is not counted; while HALF_OPEN its permit is handed back so another probe can run.
        """
        with self._lock:
            if self._state is BreakerState.HALF_OPEN and self._permits_out > 0:
                self._permits_out -= 1

    def trip(self) -> None:
        """Opens at once: the guard saw the database fail as a whole (a stalled pool, a failed probe).

        One such verdict is stronger evidence than one failed call, so it does not wait for the
        window; from OPEN it changes nothing (the open interval is not extended).
        """
        with self._lock:
            now = self._clock()
            first = self._expire(now)
            second = self._open(now) if self._state is not BreakerState.OPEN else None
        self._notify_pair(first, second)

    def probe_succeeded(self) -> None:
        """A probe on a fresh connection worked: OPEN lets trial calls through now (HALF_OPEN).

        While HALF_OPEN it counts as one successful trial, so an idle service's breaker closes
        without waiting for traffic.
        """
        with self._lock:
            first: _Transition | None = None
            second: _Transition | None = None
            if self._state is BreakerState.OPEN:
                self._set_state(BreakerState.HALF_OPEN)
                self._permits_out = self._probe_successes = 0
                first = (BreakerState.OPEN, BreakerState.HALF_OPEN)
            elif self._state is BreakerState.HALF_OPEN:
                self._probe_successes += 1
                if self._probe_successes >= self._half_open_calls:
                    second = self._close()
        self._notify_pair(first, second)

    # -- control -------------------------------------------------------------------------------------

    def reset(self) -> None:
        """Back to CLOSED with an empty window and the initial open interval (an operator override)."""
        with self._lock:
            transition = self._close()
        self._notify_pair(transition, None)

    def add_listener(self, callback: Listener) -> Callable[[], None]:
        """Call ``callback(old, new)`` on every transition; returns a function that removes it.

        Listeners run outside the lock, on whichever thread caused the transition; one that raises is
        logged and skipped, since telemetry must never break the breaker.
        """
        with self._lock:
            self._listeners = (*self._listeners, callback)
        removed = False

        def remove() -> None:
            nonlocal removed
            with self._lock:
                if removed:
                    return
                removed = True
                listeners = list(self._listeners)
                for index, listener in enumerate(listeners):
                    if listener is callback:
                        del listeners[index]
                        break
                self._listeners = tuple(listeners)

        return remove

    def __repr__(self) -> str:
        state = self.state
        return f"<Breaker state={state.value} failure_rate={self.failure_rate:.2f}>"

    # -- internals: called with the lock held -----------------------------------------------------------

    def _push(self, failed: bool, slow: bool) -> None:
        index = self._next
        if self._calls == self._window_size:
            self._failures -= self._failed[index]
            self._slows -= self._slow[index]
        else:
            self._calls += 1
        self._failed[index] = failed
        self._slow[index] = slow
        self._failures += failed
        self._slows += slow
        self._next = index + 1 if index + 1 < self._window_size else 0

    def _maybe_trip(self, now: float) -> _Transition | None:
        if self._consecutive_limit and self._in_a_row >= self._consecutive_limit:
            return self._open(now)
        calls = self._calls
        if calls >= self._minimum_calls and (
            self._failures / calls >= self._failure_rate or self._slows / calls >= self._slow_call_rate
        ):
            return self._open(now)
        return None

    def _open(self, now: float) -> _Transition:
        old = self._state
        interval = self._next_open_for
        self._next_open_for = min(interval * self._multiplier, self._max_open_for)
        self._open_until = now + interval
        self._set_state(BreakerState.OPEN)
        self._permits_out = 0
        self._probe_successes = 0
        self._opened_count += 1
        return (old, BreakerState.OPEN)

    def _close(self) -> _Transition | None:
        old = self._state
        self._set_state(BreakerState.CLOSED)
        self._failed[:] = bytes(self._window_size)
        self._slow[:] = bytes(self._window_size)
        self._next = self._calls = self._failures = self._slows = self._in_a_row = 0
        self._next_open_for = self._open_for
        self._permits_out = self._probe_successes = 0
        return None if old is BreakerState.CLOSED else (old, BreakerState.CLOSED)

    def _set_state(self, state: BreakerState) -> None:
        self._state = state
        self.closed = state is BreakerState.CLOSED

    def _remaining(self, now: float) -> float:
        remaining = self._open_until - now
        probed = self.probed_every
        return min(remaining, max(probed, 1.0)) if probed is not None else remaining

    def _expire(self, now: float) -> _Transition | None:
        if self._state is BreakerState.OPEN and now >= self._open_until:
            self._set_state(BreakerState.HALF_OPEN)
            self._permits_out = self._probe_successes = 0
            return (BreakerState.OPEN, BreakerState.HALF_OPEN)
        return None

    # -- internals: called without the lock --------------------------------------------------------------

    def _notify_pair(self, first: _Transition | None, second: _Transition | None) -> None:
        if first is None and second is None:
            return
        self._notify(tuple(t for t in (first, second) if t is not None))

    def _notify(self, transitions: tuple[_Transition, ...]) -> None:
        listeners = self._listeners
        for old, new in transitions:
            for listener in listeners:
                try:
                    listener(old, new)
                except Exception as exc:
                    # The class name only at ERROR: stack traces never go to INFO or above.
                    _log.error(
                        "breaker listener %r failed on %s -> %s: %s", listener, old.value, new.value, type(exc).__name__
                    )
                    _log.debug("breaker listener failure", exc_info=True)

    def reset_after_fork(self) -> None:
        """For a forked child: a fresh lock and no half-open trial permits out.

        A parent thread may have held the lock at the fork, and the trials the parent's threads were
        running never report back in the child. The state and the window are kept: they describe
        the database, which the child shares with its parent (an open breaker stays open, so freshly
        forked workers do not all hammer a database that is down).
        """
        self._lock = threading.Lock()
        self._permits_out = 0


def _check_clock(clock: Clock) -> Clock:
    if not callable(clock):
        raise ConfigError("Breaker.clock", clock, "a callable returning monotonic seconds")
    return clock
