"""The bulkhead: at most ``capacity`` connections in use through the guard, with bounded waiting.

Without it, overload turns into a queue inside the pool: every request waits up to ``pool_timeout``
(30 s by default) and then fails, so the service answers nothing in time. Admission keeps the queue
short instead. A request gets a slot at once if one is free; otherwise it may wait in FIFO order, but
only as long as its remaining wait budget, and not at all when the predicted wait (queue length times
the live mean use time, spread over the capacity) already exceeds that budget. Shedding early is
what lets the pool keep serving its capacity at full speed while the excess gets a fast 503.

Waiters of both kinds share one queue: threads park on a lock of their own, asyncio tasks on a
future of their loop. The bookkeeping lock is held for a few operations, never while waiting.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import Awaitable, Callable

from poolguard._types import Clock
from poolguard.errors import PoolSaturated

_MIN_RETRY_AFTER = 1.0


class _Waiter:
    __slots__ = ("future", "granted", "lock", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop | None) -> None:
        self.granted = False
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
    it drives the predicted wait.
    """

    def __init__(
        self,
        capacity: int | None,
        *,
        pool_name: str,
        mean_use: Callable[[], float],
        clock: Clock,
    ) -> None:
        self.capacity = capacity
        self._pool_name = pool_name
        self._mean_use = mean_use
        self._clock = clock
        self._lock = threading.Lock()
        self._waiters: deque[_Waiter] = deque()
        self.in_use = 0

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def predicted_wait(self, queue_position: int) -> float:
        """Seconds until the slot for the ``queue_position``-th waiter (0 = head) frees up."""
        capacity = self.capacity or 1
        return (queue_position + 1) * self._mean_use() / capacity

    def _try_enter(self, budget: float, loop: asyncio.AbstractEventLoop | None) -> _Waiter | None:
        """Takes a free slot (None) or queues a waiter; raises PoolSaturated when waiting is futile."""
        with self._lock:
            if self.capacity is None or (self.in_use < self.capacity and not self._waiters):
                self.in_use += 1
                return None
            predicted = self.predicted_wait(len(self._waiters))
            if budget <= 0 or predicted > budget:
                raise self._saturated(budget, predicted)
            waiter = _Waiter(loop)
            self._waiters.append(waiter)
            return waiter

    def _give_up(self, waiter: _Waiter, budget: float) -> bool:
        """After a timed-out wait: True if the slot was granted meanwhile (then it is ours)."""
        with self._lock:
            if waiter.granted:
                return True
            self._waiters.remove(waiter)
        raise self._saturated(budget, self.predicted_wait(len(self._waiters)))

    def acquire(self, budget: float, await_in_greenlet: Callable[[Awaitable[None]], object] | None = None) -> None:
        """Takes a slot within ``budget`` seconds or raises PoolSaturated.

        Blocking for threads; with ``await_in_greenlet`` (SQLAlchemy's ``await_only``, inside its
        asyncio greenlet) the wait is :meth:`acquire_async` on the running loop. A free slot is
        taken at once without either: the common case costs one lock.
        """
        with self._lock:
            if self.capacity is None or (self.in_use < self.capacity and not self._waiters):
                self.in_use += 1
                return
        if await_in_greenlet is not None:
            await_in_greenlet(self.acquire_async(budget))
            return
        waiter = self._try_enter(budget, None)
        if waiter is None:
            return
        assert waiter.lock is not None
        if not waiter.lock.acquire(timeout=budget):
            self._give_up(waiter, budget)

    async def acquire_async(self, budget: float) -> None:
        """Takes a slot within ``budget`` seconds or raises PoolSaturated (for asyncio tasks)."""
        waiter = self._try_enter(budget, asyncio.get_running_loop())
        if waiter is None:
            return
        assert waiter.future is not None
        try:
            await asyncio.wait_for(asyncio.shield(waiter.future), budget)
        except TimeoutError:
            self._give_up(waiter, budget)
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
        """Forgets every slot and waiter: for a forked child, where the threads that held them do not exist."""
        self._lock = threading.Lock()
        self._waiters = deque()
        self.in_use = 0
