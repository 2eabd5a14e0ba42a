"""The bulkhead: at most ``capacity`` connections in use through the guard, with bounded waiting.

Without it, overload turns into a queue inside the pool: every request waits up to ``pool_timeout``
(30 s by default) and then fails, so the service answers nothing in time. Admission keeps the queue
short instead. A request gets a slot at once if one is free; otherwise it may wait in FIFO order, but
only as long as its remaining wait budget, and not at all when the predicted wait (queue length times
the live mean use time, spread over the capacity) already exceeds that budget. Shedding early is
what lets the pool keep serving its capacity at full speed while the excess gets a fast 503.

A budget of ``max_wait`` (1 s) is right for a burst, which the pool works off, but under sustained
overload it lets a standing queue form in which every admitted request waits most of a second. So
the queue is watched as CoDel watches a router's (Nichols and Jacobson; Facebook's "Fail at Scale"
applies it to request queues): when for a whole :data:`INTERVAL` no request got a slot without
waiting more than :data:`TARGET`, the queue is standing, and newcomers may wait only
:data:`OVERLOAD_WAIT` (the controlled delay); those who cannot get a slot within it are refused at
once (a request's, not a ``guard.session()`` block's outside one: a job's tasks wait their whole
budget). Requests already waiting keep the budget they came with, so a burst is served. The short
budget holds until an interval in which fewer requests arrived than the pool serves in one
(capacity x interval / mean use): demand is back below capacity. (Ending it on the first interval
with a free slot made it flap under Poisson arrivals, and every flap let a queue of 1 s budgets form.)

Waiters of both kinds share one queue: threads park on a lock of their own, asyncio tasks on a
future of their loop. The bookkeeping lock is held for a few operations, never while waiting.
"""

from __future__ import annotations

import asyncio
import math
import threading
from collections import deque
from collections.abc import Awaitable, Callable

from poolguard._types import Clock
from poolguard.errors import PoolSaturated

_MIN_RETRY_AFTER = 1.0

TARGET = 0.005
"""Seconds of queueing tolerated as normal: a queue whose shortest wait stays above it (and above half
the mean use time) is standing."""
INTERVAL = 0.1
"""Seconds a queue must stand before it counts as overload (longer than a burst's first wave)."""
OVERLOAD_WAIT = 2 * TARGET
"""The wait budget of a newcomer under sustained overload (folly's Codel: its "slough timeout"). With
the head's wait predicted from when the longest-held connection is due back, a newcomer waits only
for a slot about to free up, so few waiters time out; measured with ``benchmarks.overload``, 10 ms
kept more of the pool busy than 5 ms (97 against 94 % of capacity at 3x on Flask, 88 against 85 %
at 1.5x) with 503 tails within a few ms of what the server answers a DB-free route in.)"""


class _Waiter:
    __slots__ = ("budget", "future", "granted", "lock", "loop", "since")

    def __init__(self, loop: asyncio.AbstractEventLoop | None, since: float, budget: float) -> None:
        self.granted = False
        self.since = since
        self.budget = budget
        """How long it may wait: the caller's budget, or less under overload."""
        self.loop = loop
        self.lock: threading.Lock | None = None
        self.future: asyncio.Future[None] | None = None
        if loop is None:
            self.lock = threading.Lock()
            self.lock.acquire()
        else:
            self.future = loop.create_future()

    def wake(self) -> None:
        if self.lock is not None:
            self.lock.release()
        elif self.loop is not None and self.future is not None:
            self.loop.call_soon_threadsafe(_resolve, self.future)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class Admission:
    """Connection slots for one pool.

    ``capacity`` None means the pool has no bound (NullPool, unbounded overflow): everything is
    admitted and only counted. ``mean_use`` returns the live mean seconds a connection is held;
    it drives the predicted wait, with ``next_release`` (given that mean: seconds until the
    longest-held connection is expected back, None when unknown) for the head of the queue.
    """

    _lock: threading.Lock
    _waiters: deque[_Waiter]
    in_use: int
    overloaded: bool
    """Whether the queue is standing: newcomers get :data:`OVERLOAD_WAIT` at most."""
    _interval_end: float
    _shortest_wait: float
    """The shortest wait of a slot handed to a waiter in this interval."""
    _free: int
    """Slots taken at once (no wait) in this interval."""
    _queued: int
    """Requests that joined the queue in this interval."""
    _refused: int
    """Requests refused in this interval."""

    def __init__(
        self,
        capacity: int | None,
        *,
        pool_name: str,
        mean_use: Callable[[], float],
        clock: Clock,
        next_release: Callable[[float], float | None] | None = None,
    ) -> None:
        self.capacity = capacity
        self._pool_name = pool_name
        self._mean_use = mean_use
        self._next_release = next_release
        self._clock = clock
        self.reset()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def predicted_wait(self, queue_position: int) -> float:
        """Seconds until the slot for the ``queue_position``-th waiter (0 = head) frees up.

        Slots free up a mean use time apart, spread over the capacity; the first one when the
        longest-held connection is due back, when that is known. (Spread evenly, the head would be
        told it waits mean use / capacity even when a connection is about to come back, and under
        overload, where it may wait only :data:`OVERLOAD_WAIT`, be refused a slot it would get.)
        """
        mean_use = self._mean_use()
        spacing = mean_use / (self.capacity or 1)
        first = self._next_release(mean_use) if self._next_release is not None else None
        return (queue_position + 1) * spacing if first is None else first + queue_position * spacing

    def _try_enter(self, budget: float, loop: asyncio.AbstractEventLoop | None, sheds: bool) -> _Waiter | None:
        """Takes a free slot (None) or queues a waiter; raises PoolSaturated when waiting is futile."""
        with self._lock:
            if self.capacity is None or (self.in_use < self.capacity and not self._waiters):
                self.in_use += 1
                self._free += 1
                return None
            now = self._clock()
            if now >= self._interval_end:
                self._next_interval(now)
            if self.overloaded and sheds:
                budget = min(budget, OVERLOAD_WAIT)
            predicted = self.predicted_wait(len(self._waiters))
            if budget <= 0 or predicted > budget:
                self._refused += 1
                raise self._saturated(budget, predicted)
            waiter = _Waiter(loop, now, budget)
            self._waiters.append(waiter)
            self._queued += 1
            return waiter

    def _next_interval(self, now: float) -> None:
        """Decides, once per interval, whether the queue stands (under the lock)."""
        if self.overloaded:
            # Demand back below what the pool serves: newcomers may wait their whole budget again.
            elapsed = now - self._interval_end + INTERVAL
            servable = (self.capacity or 1) * elapsed / max(self._mean_use(), 1e-6)
            self.overloaded = self._free + self._queued + self._refused >= servable
        else:
            # Longer than half a connection's use, too: a batch a little over the pool's size waits a
            # fraction of one use and is a busy pool, not a standing queue. Not a whole use: with the
            # server's threads twice the pool (as docs/adopting.md says) the queue in the app holds at
            # most the pool's size, each waiting about one use, while the rest queue unseen in the
            # server; that must count, or such a server never sheds (0 % goodput at 1.5x, measured).
            self.overloaded = self._free == 0 and self._shortest_wait > max(TARGET, self._mean_use() / 2)
        self._interval_end = now + INTERVAL
        self._shortest_wait = math.inf
        self._free = 0
        self._queued = 0
        self._refused = 0

    def _give_up(self, waiter: _Waiter) -> bool:
        """After a timed-out wait: True if the slot was granted meanwhile (then it is ours)."""
        with self._lock:
            if waiter.granted:
                return True
            self._waiters.remove(waiter)
            self._refused += 1
        raise self._saturated(waiter.budget, self.predicted_wait(len(self._waiters)))

    def acquire(
        self, budget: float, await_in_greenlet: Callable[[Awaitable[None]], object] | None = None, sheds: bool = True
    ) -> None:
        """Takes a slot within ``budget`` seconds or raises PoolSaturated.

        Blocking for threads; with ``await_in_greenlet`` (SQLAlchemy's ``await_only``, inside its
        asyncio greenlet) the wait is :meth:`acquire_async` on the running loop. A free slot is
        taken at once without either: the common case costs one lock.
        """
        with self._lock:
            if self.capacity is None or (self.in_use < self.capacity and not self._waiters):
                self.in_use += 1
                self._free += 1
                return
        if await_in_greenlet is not None:
            await_in_greenlet(self.acquire_async(budget, sheds))
            return
        waiter = self._try_enter(budget, None, sheds)
        if waiter is None:
            return
        assert waiter.lock is not None
        if not waiter.lock.acquire(timeout=waiter.budget):
            self._give_up(waiter)

    def try_acquire(self) -> bool:
        """Takes a free slot if one is free now with nobody waiting ahead; never waits (one lock)."""
        with self._lock:
            if self.capacity is None or (self.in_use < self.capacity and not self._waiters):
                self.in_use += 1
                self._free += 1
                return True
        return False

    async def acquire_async(self, budget: float, sheds: bool = True) -> None:
        """Takes a slot within ``budget`` seconds or raises PoolSaturated (for asyncio tasks)."""
        waiter = self._try_enter(budget, asyncio.get_running_loop(), sheds)
        if waiter is None:
            return
        assert waiter.future is not None
        try:
            await asyncio.wait_for(asyncio.shield(waiter.future), waiter.budget)
        except TimeoutError:
            self._give_up(waiter)
        except BaseException:
            if self._give_up_quietly(waiter):
                self.release()
            raise

    def _give_up_quietly(self, waiter: _Waiter) -> bool:
        """On cancellation: leaves the queue; True if a slot had already been granted (to hand back)."""
        with self._lock:
            if waiter.granted:
                return True
            self._waiters.remove(waiter)
            return False

    def release(self) -> None:
        """Returns a slot: hands it straight to the longest waiter, if any."""
        with self._lock:
            if self._waiters:
                waiter = self._waiters.popleft()
                waiter.granted = True
                waited = self._clock() - waiter.since
                self._shortest_wait = min(self._shortest_wait, waited)
            else:
                self.in_use -= 1
                return
        waiter.wake()

    def _saturated(self, budget: float, predicted: float) -> PoolSaturated:
        return PoolSaturated(
            f"pool {self._pool_name!r} is saturated: {self.in_use} of {self.capacity} connections in use, "
            f"{len(self._waiters)} waiting, predicted wait {predicted:.3f}s exceeds the wait budget {budget:.3f}s",
            retry_after=max(_MIN_RETRY_AFTER, predicted),
            pool=self._pool_name,
        )

    def reset(self) -> None:
        """No slot taken, no waiter: the start, and a forked child's (the threads that held them do not exist there)."""
        self._lock = threading.Lock()
        self._waiters = deque()
        self.in_use = 0
        self.overloaded = False
        self._interval_end = 0.0
        self._shortest_wait = math.inf
        self._free = 0
        self._queued = 0
        self._refused = 0
