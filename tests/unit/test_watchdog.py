"""Stall detection, probes and recovery, driven by a fake clock and a stand-in pool: no database, no sleeps.

The watchdog's thread is off (``probe_interval=None``); each test calls ``tick()`` itself. Probes
run in real threads against the stand-in pool, which answers (or fails, or hangs) at once as the
test says, so the only waits are bounded joins of those threads.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from poolguard import Breaker, BreakerState, Guard
from poolguard.gate import STALL_FACTOR, STALL_FLOOR
from poolguard.health import PingResult
from poolguard.probe import MAX_IN_FLIGHT, TIMED_OUT, Prober
from poolguard.watchdog import QUIET_AFTER_ANSWER
from tests.support.clock import FakeClock, wait_until
from tests.support.pools import FixedPool


class HangingPool(FixedPool):
    """A stand-in whose probes block until the test releases them (a black-holed database)."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()
        self.started = 0

    def probe(self, timeout: float) -> None:
        self.started += 1
        assert self.release.wait(10), "a probe was never released"
        super().probe(timeout)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def guards() -> Iterator[list[Guard]]:
    made: list[Guard] = []
    yield made
    for guard in made:
        if isinstance(guard.pool, HangingPool):
            guard.pool.release.set()
        guard.close()


@pytest.fixture
def make_guard(clock: FakeClock, guards: list[Guard]) -> Any:
    def make(pool: FixedPool | None = None, **options: Any) -> Guard:
        options.setdefault("breaker", Breaker(clock=clock, open_for=30.0, half_open_calls=2))
        guard = Guard(pool or FixedPool(), clock=clock, probe_interval=None, ping_timeout=1.0, **options)
        guards.append(guard)
        return guard

    return make


@contextmanager
def holding(guard: Guard, handle: object = "connection") -> Iterator[None]:
    """A checkout registered as held (as a pool reports one), returned at the end of the block."""
    guard.gate.checkout(lambda: handle, None, id)
    try:
        yield
    finally:
        guard.gate.checkin(id(handle))


def settle(guard: Guard) -> None:
    """Waits (bounded) until no probe of the guard is still running."""
    wait_until(lambda: not guard.prober._starts)


# -- the gate's stall verdict ------------------------------------------------------------------------------


def test_an_idle_pool_never_stalls(make_guard: Any, clock: FakeClock) -> None:
    guard = make_guard()
    clock.advance(3600)
    assert not guard.gate.stalled(clock())


def test_held_connections_with_nothing_back_for_the_floor_stall(make_guard: Any, clock: FakeClock) -> None:
    guard = make_guard()
    with holding(guard):
        clock.advance(STALL_FLOOR * 0.9)
        assert not guard.gate.stalled(clock())
        clock.advance(STALL_FLOOR * 0.2)
        assert guard.gate.stalled(clock())


def test_overload_is_not_a_stall(make_guard: Any, clock: FakeClock) -> None:
    """Connections coming back at the usual rate, however many wait: progress, not a stall."""
    guard = make_guard()
    with holding(guard, "a"):
        for index in range(50):
            with holding(guard, f"b{index}"):
                clock.advance(0.05)
            assert not guard.gate.stalled(clock())


def test_slow_work_raises_the_stall_threshold(make_guard: Any, clock: FakeClock) -> None:
    guard = make_guard()
    for index in range(20):  # a service of 2-second reports
        with holding(guard, f"report{index}"):
            clock.advance(2.0)
    assert guard.gate.stall_threshold(clock()) == pytest.approx(STALL_FACTOR * 2.0)
    with holding(guard):
        clock.advance(5.0)
        assert not guard.gate.stalled(clock())
        clock.advance(4.0)
        assert guard.gate.stalled(clock())


# -- the watchdog: suspect, confirm with a probe, act ---------------------------------------------------------


def test_a_stall_the_probe_cannot_clear_trips_the_breaker_and_aborts_the_hung(
    make_guard: Any, clock: FakeClock
) -> None:
    pool = FixedPool()
    pool.probe_error = ConnectionRefusedError()
    guard = make_guard(pool)
    with holding(guard, "hung"):
        clock.advance(STALL_FLOOR)
        guard.watchdog.tick()  # suspected: a probe starts
        assert guard.watchdog.suspected_at == clock()
        settle(guard)
        guard.watchdog.tick()  # the probe failed: confirmed
        assert guard.breaker is not None
        assert guard.breaker.state is BreakerState.OPEN
        assert pool.aborted == ["hung"]
        assert guard.watchdog.confirmed == 1


def test_a_probe_that_does_not_answer_in_time_confirms_the_outage(make_guard: Any, clock: FakeClock) -> None:
    pool = HangingPool()
    guard = make_guard(pool)
    with holding(guard, "hung"):
        clock.advance(STALL_FLOOR)
        guard.watchdog.tick()
        wait_until(lambda: pool.started == 1)
        clock.advance(0.9)
        guard.watchdog.tick()  # still within the probe's timeout: no verdict yet
        assert guard.breaker is not None
        assert guard.breaker.state is BreakerState.CLOSED
        clock.advance(0.1)
        guard.watchdog.tick()
        assert guard.breaker.state is BreakerState.OPEN
        assert pool.aborted == ["hung"]


def test_a_stall_the_probe_clears_is_slow_work_left_alone(make_guard: Any, clock: FakeClock) -> None:
    pool = FixedPool()
    guard = make_guard(pool)
    with holding(guard, "report"):
        clock.advance(STALL_FLOOR)
        guard.watchdog.tick()
        settle(guard)
        guard.watchdog.tick()
        assert guard.breaker is not None
        assert guard.breaker.state is BreakerState.CLOSED
        assert pool.aborted == []
        clock.advance(QUIET_AFTER_ANSWER - 0.1)
        guard.watchdog.tick()
        assert guard.watchdog.suspected_at is None  # not suspected again so soon
        clock.advance(0.2)
        guard.watchdog.tick()
        assert guard.watchdog.suspected_at == clock()


def test_without_a_breaker_the_hung_are_still_aborted(make_guard: Any, clock: FakeClock) -> None:
    pool = FixedPool()
    pool.probe_error = TimeoutError()
    guard = make_guard(pool, breaker=False)
    with holding(guard, "hung"):
        clock.advance(STALL_FLOOR)
        guard.watchdog.tick()
        settle(guard)
        guard.watchdog.tick()
    assert pool.aborted == ["hung"]


def test_an_open_breaker_is_probed_and_recovers_when_the_database_answers(make_guard: Any, clock: FakeClock) -> None:
    pool = FixedPool()
    pool.probe_error = ConnectionRefusedError()
    guard = make_guard(pool)
    breaker = guard.breaker
    assert breaker is not None
    breaker.trip()
    guard.watchdog.tick()
    settle(guard)
    assert breaker.state is BreakerState.OPEN  # the database still refuses
    pool.probe_error = None
    guard.watchdog.tick()  # too soon for another probe
    settle(guard)
    assert breaker.state is BreakerState.OPEN
    clock.advance(guard.watchdog.probe_interval)
    guard.watchdog.tick()
    settle(guard)
    assert breaker.state is BreakerState.HALF_OPEN  # well before open_for (30 s)
    assert pool.discards == 1  # connections from before the outage are replaced
    for _ in range(2):  # half_open_calls: probes count as trial calls when no traffic comes
        clock.advance(guard.watchdog.probe_interval)
        guard.watchdog.tick()
        settle(guard)
    assert breaker.state is BreakerState.CLOSED


def test_a_failed_health_probe_counts_on_a_closed_breaker(make_guard: Any, clock: FakeClock) -> None:
    pool = FixedPool()
    pool.probe_error = ConnectionRefusedError()
    guard = make_guard(pool, breaker=Breaker(clock=clock, consecutive_failures=2))
    assert guard.health().status == "unavailable"
    settle(guard)
    assert guard.breaker is not None
    assert guard.breaker.failure_rate == 1.0
    clock.advance(2.0)
    guard.health()
    settle(guard)
    assert guard.breaker.state is BreakerState.OPEN


# -- the prober: shared, cached, bounded ---------------------------------------------------------------------


def test_concurrent_callers_share_one_probe(clock: FakeClock) -> None:
    pool = HangingPool()
    prober = Prober(pool, name="primary", timeout=5.0, clock=clock)
    results: list[PingResult] = []
    callers = [threading.Thread(target=lambda: results.append(prober.result())) for _ in range(5)]
    for caller in callers:
        caller.start()
    wait_until(lambda: pool.started == 1)
    pool.release.set()
    for caller in callers:
        caller.join(5)
    assert pool.started == 1
    assert len(results) == 5
    assert all(result.error is None for result in results)


def test_a_recent_result_is_reused_and_an_old_one_is_not(clock: FakeClock) -> None:
    pool = FixedPool()
    calls: list[float] = []
    original = pool.probe
    pool.probe = lambda timeout: (calls.append(timeout), original(timeout))[1]  # type: ignore[method-assign]
    prober = Prober(pool, name="primary", timeout=1.0, clock=clock)
    assert prober.result(max_age=1.0).error is None
    clock.advance(0.5)
    assert prober.result(max_age=1.0).error is None
    assert len(calls) == 1
    clock.advance(0.6)
    prober.result(max_age=1.0)
    assert len(calls) == 2


def test_a_hung_probe_answers_timeout_at_the_deadline_and_does_not_block_the_next(clock: FakeClock) -> None:
    pool = HangingPool()
    prober = Prober(pool, name="primary", timeout=0.05, clock=clock)
    try:
        assert prober.result().error == TIMED_OUT
        clock.advance(1.0)
        assert prober.result().error == TIMED_OUT
        assert pool.started == 2  # the second did not wait behind the first
        for _ in range(MAX_IN_FLIGHT):
            clock.advance(1.0)
            prober.poke()
        assert pool.started == MAX_IN_FLIGHT  # never more in flight than that
    finally:
        pool.release.set()
    wait_until(lambda: not prober._starts)
    latest = prober.latest
    assert latest is not None
    assert latest.error is None  # the released probes answered, late: their result is kept


def test_a_half_open_breaker_whose_database_is_gone_again_reopens_on_the_next_probe(
    make_guard: Any, clock: FakeClock
) -> None:
    pool = FixedPool()
    guard = make_guard(pool)
    breaker = guard.breaker
    assert breaker is not None
    breaker.trip()
    guard.watchdog.tick()
    settle(guard)
    assert breaker.state is BreakerState.HALF_OPEN
    pool.probe_error = ConnectionResetError()
    clock.advance(guard.watchdog.probe_interval)
    guard.watchdog.tick()
    settle(guard)
    assert breaker.state is BreakerState.OPEN
