"""The bulkhead: immediate grants, deadline-aware shedding and FIFO handoff to threads and tasks.

Waiting threads are synchronised with bounded polls of ``admission.waiting`` (each step is a 1 ms
Event wait, a synchronisation poll, not a timing assertion); no test depends on how long anything takes.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable

import pytest

from poolguard.admission import INTERVAL, OVERLOAD_WAIT, Admission
from poolguard.errors import PoolSaturated, Unavailable
from tests.support.clock import wait_until
from tests.unit.conftest import FakeClock

GENEROUS = 30.0  # a budget no test ever waits out: waiters are always released explicitly


class MeanUse:
    """A settable stand-in for the live mean use time."""

    def __init__(self, value: float = 0.0) -> None:
        self.value = value

    def __call__(self) -> float:
        return self.value


def make(clock: FakeClock, capacity: int | None = 2, mean_use: Callable[[], float] | None = None) -> Admission:
    return Admission(capacity, pool_name="primary", mean_use=mean_use or MeanUse(), clock=clock)


async def async_wait_until(condition: Callable[[], bool], steps: int = 1000) -> None:
    for _ in range(steps):
        if condition():
            return
        await asyncio.sleep(0)  # a yield to the loop, not a sleep
    assert condition(), "condition never became true"


class ThreadWaiter:
    """Calls ``admission.acquire`` in a thread and records the outcome."""

    def __init__(self, admission: Admission, name: str, order: list[str], budget: float = GENEROUS) -> None:
        self.error: BaseException | None = None
        self.acquired = threading.Event()
        self._admission = admission
        self._order = order
        self._budget = budget
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)

    def _run(self) -> None:
        try:
            self._admission.acquire(self._budget)
        except BaseException as exc:
            self.error = exc
            return
        self._order.append(self.thread.name)
        self.acquired.set()

    def start_queued(self, expected_waiting: int) -> ThreadWaiter:
        self.thread.start()
        wait_until(lambda: self._admission.waiting == expected_waiting)
        return self

    def join(self) -> None:
        self.thread.join(timeout=10)
        assert not self.thread.is_alive(), "waiter thread never finished"


# -- immediate grants -----------------------------------------------------------------------------------


def test_grants_at_once_while_slots_are_free(clock: FakeClock) -> None:
    admission = make(clock, capacity=2)
    admission.acquire(0.0)
    admission.acquire(0.0)
    assert admission.in_use == 2
    assert admission.waiting == 0


async def test_async_grants_at_once_while_slots_are_free(clock: FakeClock) -> None:
    admission = make(clock, capacity=1)
    await admission.acquire_async(0.0)
    assert admission.in_use == 1


def test_release_frees_a_slot_for_the_next_caller(clock: FakeClock) -> None:
    admission = make(clock, capacity=1)
    admission.acquire(0.0)
    admission.release()
    assert admission.in_use == 0
    admission.acquire(0.0)
    assert admission.in_use == 1


def test_unbounded_capacity_admits_everything_and_counts(clock: FakeClock) -> None:
    admission = make(clock, capacity=None, mean_use=MeanUse(100.0))
    for _ in range(500):
        admission.acquire(0.0)
    assert admission.in_use == 500
    for _ in range(500):
        admission.release()
    assert admission.in_use == 0


# -- shedding -------------------------------------------------------------------------------------------


def test_full_pool_with_no_budget_sheds_at_once(clock: FakeClock) -> None:
    admission = make(clock, capacity=2)
    admission.acquire(0.0)
    admission.acquire(0.0)
    with pytest.raises(PoolSaturated) as caught:
        admission.acquire(0.0)
    error = caught.value
    assert isinstance(error, Unavailable)
    assert error.reason == "pool_saturated"
    assert error.retry_after >= 1.0
    assert error.pool == "primary"
    message = str(error)
    assert "primary" in message
    assert "2 of 2" in message
    assert "://" not in message
    assert "password" not in message.lower()
    assert admission.in_use == 2
    assert admission.waiting == 0


def test_negative_budget_sheds_at_once(clock: FakeClock) -> None:
    admission = make(clock, capacity=1)
    admission.acquire(0.0)
    with pytest.raises(PoolSaturated):
        admission.acquire(-0.5)


async def test_async_full_pool_with_no_budget_sheds_at_once(clock: FakeClock) -> None:
    admission = make(clock, capacity=1)
    await admission.acquire_async(0.0)
    with pytest.raises(PoolSaturated) as caught:
        await admission.acquire_async(0.0)
    assert caught.value.reason == "pool_saturated"
    assert admission.waiting == 0


def test_predicted_wait_spreads_the_queue_over_the_capacity(clock: FakeClock) -> None:
    admission = make(clock, capacity=2, mean_use=MeanUse(2.0))
    assert admission.predicted_wait(0) == pytest.approx(1.0)
    assert admission.predicted_wait(1) == pytest.approx(2.0)
    assert admission.predicted_wait(3) == pytest.approx(4.0)


def test_sheds_without_waiting_when_the_predicted_wait_exceeds_the_budget(clock: FakeClock) -> None:
    mean_use = MeanUse(0.0)
    admission = make(clock, capacity=2, mean_use=mean_use)
    admission.acquire(0.0)
    admission.acquire(0.0)
    order: list[str] = []
    ahead = ThreadWaiter(admission, "ahead", order).start_queued(expected_waiting=1)

    # Two connections held 2.0 s on average, one waiter ahead: a slot frees in ~2.0 s, over the 1.0 s budget.
    # Called from the main thread, which would block if it queued. Should it ever join the queue, the
    # watchdog hands it a slot, so the call returns instead of raising and the test fails.
    mean_use.value = 2.0
    done = threading.Event()
    queued = threading.Event()

    def watchdog() -> None:
        pause = threading.Event()
        while not done.is_set():
            if admission.waiting >= 2:
                queued.set()
                admission.release()
                admission.release()
                return
            pause.wait(0.001)

    guard = threading.Thread(target=watchdog, daemon=True)
    guard.start()
    try:
        with pytest.raises(PoolSaturated) as caught:
            admission.acquire(1.0)
    finally:
        done.set()
        guard.join(timeout=10)
    assert not queued.is_set(), "the caller queued instead of being shed"
    assert caught.value.retry_after == pytest.approx(2.0)
    assert admission.waiting == 1  # the shed caller never joined the queue

    admission.release()
    ahead.join()
    assert ahead.error is None
    assert order == ["ahead"]


def test_predicted_wait_within_the_budget_queues(clock: FakeClock) -> None:
    admission = make(clock, capacity=2, mean_use=MeanUse(2.0))
    admission.acquire(0.0)
    admission.acquire(0.0)
    order: list[str] = []
    # Head of the queue: (0 + 1) * 2.0 / 2 = 1.0 s predicted, within a 1.5 s budget, so it waits.
    waiter = ThreadWaiter(admission, "head", order, budget=1.5).start_queued(expected_waiting=1)
    admission.release()
    waiter.join()
    assert waiter.error is None


# -- handoff to threads ---------------------------------------------------------------------------------


def test_release_hands_the_slot_to_a_waiting_thread(clock: FakeClock) -> None:
    admission = make(clock, capacity=2)
    admission.acquire(0.0)
    admission.acquire(0.0)
    order: list[str] = []
    waiter = ThreadWaiter(admission, "waiter", order).start_queued(expected_waiting=1)
    assert not waiter.acquired.is_set()

    admission.release()
    waiter.join()

    assert waiter.error is None
    assert order == ["waiter"]
    assert admission.waiting == 0
    assert admission.in_use == 2  # handed over, never freed in between


def test_handoff_keeps_in_use_at_capacity_so_newcomers_cannot_jump_the_queue(clock: FakeClock) -> None:
    admission = make(clock, capacity=1)
    admission.acquire(0.0)
    order: list[str] = []
    waiter = ThreadWaiter(admission, "waiter", order).start_queued(expected_waiting=1)
    admission.release()
    waiter.join()
    with pytest.raises(PoolSaturated):
        admission.acquire(0.0)
    assert admission.in_use == 1


def test_threads_are_served_in_fifo_order(clock: FakeClock) -> None:
    admission = make(clock, capacity=1)
    admission.acquire(0.0)
    order: list[str] = []
    first = ThreadWaiter(admission, "first", order).start_queued(expected_waiting=1)
    second = ThreadWaiter(admission, "second", order).start_queued(expected_waiting=2)
    third = ThreadWaiter(admission, "third", order).start_queued(expected_waiting=3)

    admission.release()
    first.join()
    assert order == ["first"]
    assert admission.waiting == 2
    assert not second.acquired.is_set()
    assert not third.acquired.is_set()

    admission.release()
    second.join()
    assert order == ["first", "second"]

    admission.release()
    third.join()
    assert order == ["first", "second", "third"]
    assert admission.in_use == 1
    admission.release()
    assert admission.in_use == 0


# -- handoff to asyncio tasks ---------------------------------------------------------------------------


async def test_release_hands_the_slot_to_a_waiting_task(clock: FakeClock) -> None:
    admission = make(clock, capacity=1)
    await admission.acquire_async(0.0)
    task = asyncio.create_task(admission.acquire_async(GENEROUS))
    await async_wait_until(lambda: admission.waiting == 1)
    assert not task.done()

    admission.release()
    await asyncio.wait_for(task, timeout=10)

    assert task.exception() is None
    assert admission.in_use == 1
    assert admission.waiting == 0


async def test_tasks_are_served_in_fifo_order(clock: FakeClock) -> None:
    admission = make(clock, capacity=1)
    await admission.acquire_async(0.0)
    order: list[str] = []

    async def wait_for_slot(name: str) -> None:
        await admission.acquire_async(GENEROUS)
        order.append(name)

    tasks = []
    for position, name in enumerate(["a", "b", "c"], start=1):
        tasks.append(asyncio.create_task(wait_for_slot(name)))
        await async_wait_until(lambda position=position: admission.waiting == position)

    for served in range(1, 4):
        admission.release()
        await asyncio.wait_for(tasks[served - 1], timeout=10)
        assert order == ["a", "b", "c"][:served]
    assert admission.in_use == 1


async def test_a_release_from_another_thread_wakes_a_task(clock: FakeClock) -> None:
    admission = make(clock, capacity=1)
    await admission.acquire_async(0.0)
    task = asyncio.create_task(admission.acquire_async(GENEROUS))
    await async_wait_until(lambda: admission.waiting == 1)

    releaser = threading.Thread(target=admission.release)
    releaser.start()
    releaser.join(timeout=10)
    await asyncio.wait_for(task, timeout=10)

    assert task.exception() is None
    assert admission.in_use == 1


async def test_threads_and_tasks_share_one_fifo_queue(clock: FakeClock) -> None:
    admission = make(clock, capacity=1)
    await admission.acquire_async(0.0)
    order: list[str] = []

    async def task_waiter() -> None:
        await admission.acquire_async(GENEROUS)
        order.append("task")

    task = asyncio.create_task(task_waiter())
    await async_wait_until(lambda: admission.waiting == 1)
    thread = ThreadWaiter(admission, "thread", order)
    thread.thread.start()
    await async_wait_until(lambda: admission.waiting == 2, steps=100_000)

    admission.release()
    await asyncio.wait_for(task, timeout=10)
    assert order == ["task"]
    assert not thread.acquired.is_set()

    admission.release()
    await asyncio.to_thread(thread.join)
    assert order == ["task", "thread"]


async def test_a_cancelled_task_leaves_the_queue_without_leaking_a_slot(clock: FakeClock) -> None:
    admission = make(clock, capacity=1)
    await admission.acquire_async(0.0)
    task = asyncio.create_task(admission.acquire_async(GENEROUS))
    await async_wait_until(lambda: admission.waiting == 1)

    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    assert admission.waiting == 0
    assert admission.in_use == 1
    admission.release()  # nobody is waiting any more: the slot is free, not handed to the cancelled task
    assert admission.in_use == 0
    await admission.acquire_async(0.0)
    assert admission.in_use == 1


async def test_a_task_cancelled_after_its_grant_hands_the_slot_back(clock: FakeClock) -> None:
    admission = make(clock, capacity=1)
    await admission.acquire_async(0.0)
    task = asyncio.create_task(admission.acquire_async(GENEROUS))
    await async_wait_until(lambda: admission.waiting == 1)

    admission.release()  # granted, but the task has not run yet
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    assert admission.waiting == 0
    assert admission.in_use == 0


# -- a standing queue (controlled delay) ----------------------------------------------------------------


def stand_a_queue(clock: FakeClock, admission: Admission, order: list[str]) -> ThreadWaiter:
    """One slot held, a waiter served after 50 ms and another queued behind: then an interval ends."""
    admission.acquire(0.0)
    first = ThreadWaiter(admission, "first", order).start_queued(expected_waiting=1)
    clock.advance(0.05)
    admission.release()  # to "first", after a 50 ms wait: over TARGET
    first.join()
    second = ThreadWaiter(admission, "second", order).start_queued(expected_waiting=1)
    clock.advance(INTERVAL)
    return second


def test_a_queue_standing_for_an_interval_gives_newcomers_the_short_budget(clock: FakeClock) -> None:
    admission = make(clock, capacity=1, mean_use=MeanUse(0.008))
    order: list[str] = []
    second = stand_a_queue(clock, admission, order)
    assert not admission.overloaded
    # Behind "second", a newcomer would wait ~16 ms: within its own 1 s, not within OVERLOAD_WAIT.
    with pytest.raises(PoolSaturated):
        admission.acquire(1.0)
    assert admission.overloaded
    assert admission.waiting == 1
    # The waiter that queued before keeps the budget it came with: a burst is served.
    admission.release()
    second.join()
    assert second.error is None
    assert order == ["first", "second"]


def test_under_overload_a_newcomer_waits_at_most_the_short_budget(clock: FakeClock) -> None:
    mean_use = MeanUse(0.008)
    admission = make(clock, capacity=1, mean_use=mean_use)
    order: list[str] = []
    second = stand_a_queue(clock, admission, order)
    with pytest.raises(PoolSaturated):
        admission.acquire(1.0)
    admission.release()
    second.join()
    # Head of the queue: ~8 ms predicted, within OVERLOAD_WAIT, so it queues, but it gives up after it
    # (real time: a 10 ms lock timeout) although its caller allowed 30 s.
    late = ThreadWaiter(admission, "late", order).start_queued(expected_waiting=1)
    late.join()
    assert isinstance(late.error, PoolSaturated)
    assert "0.010s" in str(late.error)  # the budget it had: OVERLOAD_WAIT, not the caller's 30 s
    assert pytest.approx(0.010) == OVERLOAD_WAIT


def test_overload_holds_while_more_arrive_than_the_pool_serves(clock: FakeClock) -> None:
    """One slot held 40 ms on average serves 2.5 requests per 100 ms interval."""
    admission = make(clock, capacity=1, mean_use=MeanUse(0.04))
    second = stand_a_queue(clock, admission, [])
    with pytest.raises(PoolSaturated):
        admission.acquire(1.0)  # the interval ends here: overload
    admission.release()
    second.join()
    admission.release()
    for _ in range(2):  # found the slot free, and yet three arrivals in all: more than 2.5
        admission.acquire(1.0)
        admission.release()
    admission.acquire(0.0)
    clock.advance(INTERVAL)
    with pytest.raises(PoolSaturated):
        admission.acquire(0.0)  # the slow path, at the interval's end, decides
    assert admission.overloaded


def test_overload_ends_when_fewer_arrive_than_the_pool_serves(clock: FakeClock) -> None:
    admission = make(clock, capacity=1, mean_use=MeanUse(0.04))
    second = stand_a_queue(clock, admission, [])
    with pytest.raises(PoolSaturated):
        admission.acquire(1.0)
    assert admission.overloaded
    admission.release()
    second.join()
    admission.release()
    admission.acquire(0.0)  # one arrival in the interval, where the pool serves 2.5
    clock.advance(INTERVAL)
    with pytest.raises(PoolSaturated):
        admission.acquire(0.0)
    assert not admission.overloaded


def test_a_moment_with_a_free_slot_is_not_a_standing_queue(clock: FakeClock) -> None:
    admission = make(clock, capacity=1, mean_use=MeanUse(0.008))
    order: list[str] = []
    second = stand_a_queue(clock, admission, order)
    admission.release()
    second.join()
    admission.release()
    admission.acquire(0.0)  # the queue drained and a request found the slot free
    clock.advance(INTERVAL)
    newcomer = ThreadWaiter(admission, "newcomer", order, budget=1.0).start_queued(expected_waiting=1)
    assert not admission.overloaded
    admission.release()
    newcomer.join()
    assert newcomer.error is None


def test_the_head_waits_until_the_longest_held_connection_is_due_back(clock: FakeClock) -> None:
    due: list[float | None] = [None]
    admission = Admission(
        4, pool_name="primary", mean_use=MeanUse(0.040), clock=clock, next_release=lambda _mean: due[0]
    )
    assert admission.predicted_wait(0) == pytest.approx(0.010)  # unknown: spread evenly, 40 ms / 4
    due[0] = 0.002  # a connection is about to come back
    assert admission.predicted_wait(0) == pytest.approx(0.002)
    assert admission.predicted_wait(2) == pytest.approx(0.022)  # then one every 10 ms


def test_under_overload_a_job_waits_its_whole_budget(clock: FakeClock) -> None:
    """A ``guard.session()`` block outside any request (a batch job's) is not cut short: it wants its work done."""
    admission = make(clock, capacity=1, mean_use=MeanUse(0.008))
    order: list[str] = []
    second = stand_a_queue(clock, admission, order)
    with pytest.raises(PoolSaturated):
        admission.acquire(1.0)  # a request: refused at once
    assert admission.overloaded
    job = threading.Thread(target=lambda: admission.acquire(GENEROUS, None, False), name="job")
    job.start()
    wait_until(lambda: admission.waiting == 2)  # queued behind "second", on its own 30 s
    admission.release()
    second.join()
    admission.release()
    job.join(timeout=10)
    assert not job.is_alive()
    assert admission.in_use == 1


async def test_try_acquire_takes_a_free_slot_and_never_waits(clock: FakeClock) -> None:
    """The asyncpg checkout's fast path: a free slot with nobody ahead, else False (and nothing taken)."""
    admission = make(clock, capacity=1)
    assert admission.try_acquire()
    assert admission.in_use == 1
    assert not admission.try_acquire()
    waiter = asyncio.ensure_future(admission.acquire_async(GENEROUS))
    await async_wait_until(lambda: admission.waiting == 1)
    admission.release()  # handed straight to the waiter
    await waiter
    assert not admission.try_acquire()
    admission.release()
    assert admission.try_acquire()  # free again, nobody waiting
    admission.release()
    assert admission.in_use == 0
    assert make(clock, capacity=None).try_acquire()


def serve_a_waiter_after(clock: FakeClock, admission: Admission, seconds: float) -> None:
    """One slot held; a waiter gets it after ``seconds`` (the interval's shortest wait), then the interval ends."""
    admission.acquire(0.0)
    first = ThreadWaiter(admission, "first", []).start_queued(expected_waiting=1)
    clock.advance(seconds)
    admission.release()
    first.join()
    clock.advance(INTERVAL)


def test_waits_of_most_of_a_use_are_a_standing_queue(clock: FakeClock) -> None:
    """Threads twice the pool: at most the pool's size waits in the app, each about one use (here 30 of
    40 ms), while the rest of the overload queues unseen in the server. That is overload."""
    admission = make(clock, capacity=1, mean_use=MeanUse(0.040))
    serve_a_waiter_after(clock, admission, 0.030)
    with pytest.raises(PoolSaturated):
        admission.acquire(0.0)  # the slow path, at the interval's end, decides
    assert admission.overloaded


def test_waits_of_a_fraction_of_a_use_are_a_busy_pool(clock: FakeClock) -> None:
    """A batch a little over the pool's size: each waits a fraction of a use (15 of 40 ms), over TARGET."""
    admission = make(clock, capacity=1, mean_use=MeanUse(0.040))
    serve_a_waiter_after(clock, admission, 0.015)
    with pytest.raises(PoolSaturated):
        admission.acquire(0.0)
    assert not admission.overloaded
