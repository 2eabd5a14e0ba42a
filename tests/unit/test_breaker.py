"""The breaker state machine, driven by a fake clock: no test sleeps."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import pytest

from poolguard.breaker import Breaker, BreakerState
from poolguard.errors import CircuitOpen, ConfigError, Unavailable
from tests.support.clock import FakeClock


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def make(clock: FakeClock, **options: Any) -> Breaker:
    settings: dict[str, Any] = {
        "consecutive_failures": 0,
        "window_size": 10,
        "minimum_calls": 4,
        "open_for": 10.0,
        "max_open_for": 60.0,
        "half_open_calls": 2,
    }
    settings.update(options)
    return Breaker(clock=clock, **settings)


def trip(breaker: Breaker) -> None:
    """Fail until the breaker opens; fails the test if it never does."""
    for _ in range(100):
        if breaker.state is BreakerState.OPEN:
            return
        breaker.acquire()
        breaker.record_failure(0.01)
    assert breaker.state is BreakerState.OPEN


def to_half_open(breaker: Breaker, clock: FakeClock) -> None:
    retry_after = breaker.retry_after
    assert retry_after is not None
    clock.advance(retry_after)
    assert breaker.state is BreakerState.HALF_OPEN


# -- configuration -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("failure_rate", 0),
        ("failure_rate", 1.5),
        ("failure_rate", "half"),
        ("consecutive_failures", -1),
        ("consecutive_failures", 2.5),
        ("slow_call_rate", 0.0),
        ("slow_call_duration", 0),
        ("slow_call_duration", float("inf")),
        ("window_size", 0),
        ("window_size", True),
        ("minimum_calls", 0),
        ("open_for", -1.0),
        ("max_open_for", 0),
        ("open_for_multiplier", 0.5),
        ("open_for_multiplier", float("nan")),
        ("half_open_calls", 0),
        ("clock", 42),
    ],
)
def test_invalid_option_is_named(option: str, value: object) -> None:
    with pytest.raises(ConfigError) as info:
        Breaker(**{option: value})
    assert info.value.setting == f"Breaker.{option}"
    assert isinstance(info.value, ValueError)


def test_multiplier_below_one_says_what_is_accepted() -> None:
    with pytest.raises(ConfigError, match="at least 1") as info:
        Breaker(open_for_multiplier=0.9)
    assert info.value.setting == "Breaker.open_for_multiplier"


def test_max_open_for_below_open_for_is_refused() -> None:
    with pytest.raises(ConfigError) as info:
        Breaker(open_for=30.0, max_open_for=10.0)
    assert info.value.setting == "Breaker.max_open_for"


def test_minimum_calls_above_window_size_is_refused() -> None:
    with pytest.raises(ConfigError) as info:
        Breaker(window_size=5, minimum_calls=6)
    assert info.value.setting == "Breaker.minimum_calls"


def test_zero_consecutive_failures_and_multiplier_one_are_accepted() -> None:
    breaker = Breaker(consecutive_failures=0, open_for_multiplier=1, minimum_calls=20, window_size=20)
    assert breaker.state is BreakerState.CLOSED


def test_defaults_use_the_monotonic_clock_and_start_closed() -> None:
    breaker = Breaker()
    assert breaker.clock is time.monotonic
    assert breaker.state is BreakerState.CLOSED
    assert breaker.failure_rate == 0.0
    assert breaker.retry_after is None
    assert breaker.opened_count == 0


def test_metric_values() -> None:
    assert BreakerState.CLOSED.metric_value == 0
    assert BreakerState.HALF_OPEN.metric_value == 1
    assert BreakerState.OPEN.metric_value == 2
    assert [s.value for s in BreakerState] == ["closed", "open", "half_open"]


# -- tripping ------------------------------------------------------------------------------------------


def test_failure_rate_trips_only_after_minimum_calls(clock: FakeClock) -> None:
    breaker = make(clock, failure_rate=0.5, minimum_calls=4)
    for _ in range(3):
        breaker.acquire()
        breaker.record_failure(0.01)
    assert breaker.failure_rate == 1.0
    assert breaker.state is BreakerState.CLOSED
    breaker.acquire()
    breaker.record_failure(0.01)
    assert breaker.state is BreakerState.OPEN
    assert breaker.opened_count == 1


def test_failure_rate_below_threshold_stays_closed(clock: FakeClock) -> None:
    breaker = make(clock, failure_rate=0.5, window_size=10, minimum_calls=10)
    for outcome in [False, True] * 4 + [False, False]:
        breaker.acquire()
        if outcome:
            breaker.record_failure(0.01)
        else:
            breaker.record_success(0.01)
    assert breaker.failure_rate == pytest.approx(0.4)
    assert breaker.state is BreakerState.CLOSED
    breaker.acquire()
    breaker.record_failure(0.01)  # the oldest success slides out: 5 failures of 10
    assert breaker.failure_rate == pytest.approx(0.5)
    assert breaker.state is BreakerState.OPEN


def test_rate_threshold_is_not_defeated_by_float_rounding(clock: FakeClock) -> None:
    breaker = make(clock, failure_rate=0.28, window_size=25, minimum_calls=25)
    for index in range(25):  # 0.28 * 25 is 7.000000000000001 in floating point; 7 / 25 is 0.28
        breaker.acquire()
        if index < 7:
            breaker.record_failure(0.01)
        else:
            breaker.record_success(0.01)
    assert breaker.state is BreakerState.OPEN


def test_consecutive_failures_trip_before_minimum_calls(clock: FakeClock) -> None:
    breaker = make(clock, consecutive_failures=3, window_size=20, minimum_calls=20)
    breaker.record_failure(0.01)
    breaker.record_failure(0.01)
    breaker.record_success(0.01)  # breaks the run
    breaker.record_failure(0.01)
    breaker.record_failure(0.01)
    assert breaker.state is BreakerState.CLOSED
    breaker.record_failure(0.01)
    assert breaker.state is BreakerState.OPEN


def test_consecutive_failures_zero_means_off(clock: FakeClock) -> None:
    breaker = make(clock, consecutive_failures=0, window_size=20, minimum_calls=20)
    for _ in range(19):
        breaker.record_failure(0.01)
    assert breaker.state is BreakerState.CLOSED


def test_slow_calls_trip(clock: FakeClock) -> None:
    breaker = make(clock, slow_call_rate=0.5, slow_call_duration=2.0, minimum_calls=4)
    breaker.record_success(2.0)  # exactly the threshold counts as slow
    breaker.record_success(0.1)
    breaker.record_success(5.0)
    assert breaker.state is BreakerState.CLOSED
    assert breaker.failure_rate == 0.0
    breaker.record_success(0.1)  # 2 slow of 4
    assert breaker.state is BreakerState.OPEN


def test_fast_successes_never_trip_on_slowness(clock: FakeClock) -> None:
    breaker = make(clock, slow_call_rate=0.5, slow_call_duration=2.0, minimum_calls=4)
    for _ in range(20):
        breaker.record_success(1.99)
    assert breaker.state is BreakerState.CLOSED


def test_window_slides_old_failures_out(clock: FakeClock) -> None:
    breaker = make(clock, failure_rate=0.5, window_size=4, minimum_calls=4)
    breaker.record_failure(0.01)
    for _ in range(3):
        breaker.record_success(0.01)
    assert breaker.failure_rate == pytest.approx(0.25)
    breaker.record_success(0.01)  # the failure falls out
    assert breaker.failure_rate == 0.0
    breaker.record_failure(0.01)
    assert breaker.failure_rate == pytest.approx(0.25)
    assert breaker.state is BreakerState.CLOSED


def test_window_wraps_many_times_with_consistent_counts(clock: FakeClock) -> None:
    breaker = make(clock, failure_rate=1.0, window_size=5, minimum_calls=5)
    for index in range(53):
        if index % 5 == 0:
            breaker.record_failure(0.01)
        else:
            breaker.record_success(0.01)
    assert breaker.failure_rate == pytest.approx(0.2)


def test_successes_into_a_full_window_of_successes_keep_the_counts_exact(clock: FakeClock) -> None:
    # Such a success changes nothing and is not even pushed (the per-checkout fast path); the window
    # must still slide failures in and out exactly as before.
    breaker = make(clock, failure_rate=0.5, window_size=4, minimum_calls=4)
    for _ in range(10):
        breaker.record_success(0.01)
    assert breaker.failure_rate == 0.0
    breaker.record_failure(0.01)
    assert breaker.failure_rate == pytest.approx(0.25)
    for expected in (0.25, 0.25, 0.25, 0.0, 0.0):
        breaker.record_success(0.01)
        assert breaker.failure_rate == pytest.approx(expected)
    breaker.record_success(10.0)  # a slow success is pushed: the slow-call rate counts it
    breaker.record_failure(0.01)
    breaker.record_failure(0.01)
    assert breaker.failure_rate == pytest.approx(0.5)
    assert breaker.state is BreakerState.OPEN
    assert not breaker.closed


def test_closed_attribute_follows_the_state(clock: FakeClock) -> None:
    breaker = make(clock, consecutive_failures=1, open_for=5.0, half_open_calls=1)
    assert breaker.closed
    breaker.record_failure(0.01)
    assert breaker.state is BreakerState.OPEN
    assert not breaker.closed
    clock.advance(5.0)
    assert breaker.state is BreakerState.HALF_OPEN
    assert not breaker.closed
    breaker.acquire()
    breaker.record_success(0.01)
    assert breaker.state is BreakerState.CLOSED
    assert breaker.closed


# -- open ----------------------------------------------------------------------------------------------


def test_open_refuses_with_retry_after_that_counts_down(clock: FakeClock) -> None:
    breaker = make(clock, open_for=10.0)
    trip(breaker)
    assert breaker.retry_after == pytest.approx(10.0)
    clock.advance(4.0)
    assert breaker.retry_after == pytest.approx(6.0)
    with pytest.raises(CircuitOpen) as info:
        breaker.acquire()
    assert isinstance(info.value, Unavailable)
    assert info.value.retry_after == pytest.approx(6.0)
    assert info.value.reason == "circuit_open"
    message = str(info.value)
    assert "open" in message
    assert "6.0 s" in message
    assert "://" not in message


def test_open_message_never_says_zero_seconds(clock: FakeClock) -> None:
    breaker = make(clock, open_for=10.0)
    trip(breaker)
    clock.advance(9.99)
    with pytest.raises(CircuitOpen, match=r"0\.1 s") as info:
        breaker.acquire()
    assert info.value.retry_after > 0


def test_open_to_half_open_is_lazy_on_state(clock: FakeClock) -> None:
    breaker = make(clock, open_for=10.0)
    seen: list[tuple[BreakerState, BreakerState]] = []
    trip(breaker)
    breaker.add_listener(lambda old, new: seen.append((old, new)))
    clock.advance(9.999)
    assert breaker.state is BreakerState.OPEN
    assert seen == []
    clock.advance(0.001)
    assert breaker.state is BreakerState.HALF_OPEN
    assert breaker.retry_after is None
    assert seen == [(BreakerState.OPEN, BreakerState.HALF_OPEN)]


def test_open_to_half_open_is_lazy_on_acquire(clock: FakeClock) -> None:
    breaker = make(clock, open_for=10.0)
    trip(breaker)
    clock.advance(10.0)
    breaker.acquire()  # admitted as a probe, no state read in between
    assert breaker.state is BreakerState.HALF_OPEN


def test_records_while_open_are_ignored(clock: FakeClock) -> None:
    breaker = make(clock, open_for=10.0)
    trip(breaker)
    breaker.record_failure(0.01)
    breaker.record_success(0.01)
    breaker.record_ignored()
    assert breaker.opened_count == 1
    assert breaker.retry_after == pytest.approx(10.0)


# -- half-open -----------------------------------------------------------------------------------------


def test_half_open_limits_concurrent_probes(clock: FakeClock) -> None:
    breaker = make(clock, open_for=10.0, half_open_calls=2)
    trip(breaker)
    to_half_open(breaker, clock)
    breaker.acquire()
    breaker.acquire()
    with pytest.raises(CircuitOpen, match="half-open") as info:
        breaker.acquire()
    assert info.value.retry_after == pytest.approx(1.0)
    assert breaker.state is BreakerState.HALF_OPEN


def test_half_open_retry_after_is_capped_by_open_for(clock: FakeClock) -> None:
    breaker = make(clock, open_for=0.25, max_open_for=1.0, half_open_calls=1)
    trip(breaker)
    to_half_open(breaker, clock)
    breaker.acquire()
    with pytest.raises(CircuitOpen) as info:
        breaker.acquire()
    assert info.value.retry_after == pytest.approx(0.25)


def test_successful_probes_close_and_clear_the_window(clock: FakeClock) -> None:
    breaker = make(clock, half_open_calls=2)
    trip(breaker)
    to_half_open(breaker, clock)
    breaker.acquire()
    breaker.record_success(0.01)
    assert breaker.state is BreakerState.HALF_OPEN
    breaker.acquire()
    breaker.record_success(0.01)
    assert breaker.state is BreakerState.CLOSED
    assert breaker.failure_rate == 0.0
    assert breaker.retry_after is None
    breaker.acquire()  # admitted


def test_success_without_a_permit_is_not_a_probe(clock: FakeClock) -> None:
    breaker = make(clock, half_open_calls=1)
    trip(breaker)
    to_half_open(breaker, clock)
    breaker.record_success(0.01)  # a straggler from before the trip
    assert breaker.state is BreakerState.HALF_OPEN


def test_failed_probe_reopens_with_growing_interval_capped_and_reset_on_close(clock: FakeClock) -> None:
    breaker = make(clock, open_for=10.0, open_for_multiplier=2.0, max_open_for=35.0, half_open_calls=1)
    trip(breaker)
    intervals = []
    for _ in range(4):
        intervals.append(breaker.retry_after)
        to_half_open(breaker, clock)
        breaker.acquire()
        breaker.record_failure(0.01)
        assert breaker.state is BreakerState.OPEN
    intervals.append(breaker.retry_after)
    assert intervals == [10.0, 20.0, 35.0, 35.0, 35.0]
    assert breaker.opened_count == 5

    to_half_open(breaker, clock)
    breaker.acquire()
    breaker.record_success(0.01)
    assert breaker.state is BreakerState.CLOSED
    trip(breaker)
    assert breaker.retry_after == 10.0


def test_dead_connection_in_half_open_reopens(clock: FakeClock) -> None:
    breaker = make(clock, half_open_calls=2)
    trip(breaker)
    to_half_open(breaker, clock)
    breaker.record_failure(0.01)  # no acquire(): a connection found dead in use
    assert breaker.state is BreakerState.OPEN
    assert breaker.retry_after == pytest.approx(20.0)


def test_record_ignored_frees_a_permit_without_counting(clock: FakeClock) -> None:
    breaker = make(clock, half_open_calls=1)
    trip(breaker)
    to_half_open(breaker, clock)
    breaker.acquire()
    with pytest.raises(CircuitOpen):
        breaker.acquire()
    breaker.record_ignored()
    assert breaker.state is BreakerState.HALF_OPEN  # not counted as a success
    breaker.acquire()  # the permit is free again
    breaker.record_success(0.01)
    assert breaker.state is BreakerState.CLOSED


def test_record_ignored_does_not_count_in_closed(clock: FakeClock) -> None:
    breaker = make(clock)
    breaker.record_failure(0.01)
    breaker.record_ignored()
    breaker.record_ignored()
    assert breaker.failure_rate == 1.0


def test_reset_closes_and_clears(clock: FakeClock) -> None:
    breaker = make(clock, open_for=10.0, half_open_calls=1)
    trip(breaker)
    to_half_open(breaker, clock)
    breaker.acquire()
    breaker.record_failure(0.01)
    assert breaker.retry_after == pytest.approx(20.0)
    breaker.reset()
    assert breaker.state is BreakerState.CLOSED
    assert breaker.failure_rate == 0.0
    breaker.acquire()
    trip(breaker)
    assert breaker.retry_after == pytest.approx(10.0)  # growth was reset too


# -- listeners -----------------------------------------------------------------------------------------


def test_listeners_see_every_transition_and_can_be_removed(clock: FakeClock) -> None:
    breaker = make(clock, half_open_calls=1)
    seen: list[tuple[BreakerState, BreakerState]] = []
    remove = breaker.add_listener(lambda old, new: seen.append((old, new)))
    trip(breaker)
    to_half_open(breaker, clock)
    breaker.acquire()
    breaker.record_success(0.01)
    assert seen == [
        (BreakerState.CLOSED, BreakerState.OPEN),
        (BreakerState.OPEN, BreakerState.HALF_OPEN),
        (BreakerState.HALF_OPEN, BreakerState.CLOSED),
    ]
    remove()
    remove()  # idempotent
    trip(breaker)
    assert len(seen) == 3


def test_removing_one_listener_keeps_the_others(clock: FakeClock) -> None:
    breaker = make(clock)
    first: list[BreakerState] = []
    second: list[BreakerState] = []
    remove_first = breaker.add_listener(lambda old, new: first.append(new))
    breaker.add_listener(lambda old, new: second.append(new))
    remove_first()
    trip(breaker)
    assert first == []
    assert second == [BreakerState.OPEN]


def test_reset_from_closed_notifies_nobody(clock: FakeClock) -> None:
    breaker = make(clock)
    seen: list[BreakerState] = []
    breaker.add_listener(lambda old, new: seen.append(new))
    breaker.reset()
    assert seen == []


def test_both_transitions_reported_when_an_expired_open_is_reopened(clock: FakeClock) -> None:
    breaker = make(clock, open_for=10.0)
    trip(breaker)
    seen: list[tuple[BreakerState, BreakerState]] = []
    breaker.add_listener(lambda old, new: seen.append((old, new)))
    clock.advance(10.0)
    breaker.record_failure(0.01)  # no state read: expiry and re-open happen in one call
    assert seen == [
        (BreakerState.OPEN, BreakerState.HALF_OPEN),
        (BreakerState.HALF_OPEN, BreakerState.OPEN),
    ]


def test_exploding_listener_is_logged_and_harmless(clock: FakeClock, caplog: pytest.LogCaptureFixture) -> None:
    breaker = make(clock)
    seen: list[BreakerState] = []

    def explode(old: BreakerState, new: BreakerState) -> None:
        raise RuntimeError("boom")

    breaker.add_listener(explode)
    breaker.add_listener(lambda old, new: seen.append(new))
    with caplog.at_level(logging.ERROR, logger="poolguard.breaker"):
        trip(breaker)
    assert seen == [BreakerState.OPEN]
    assert breaker.state is BreakerState.OPEN
    assert [r.name for r in caplog.records] == ["poolguard.breaker"]
    # Named by class at ERROR; the traceback only at DEBUG (no stack traces at INFO or above).
    assert "RuntimeError" in caplog.records[0].getMessage()
    assert caplog.records[0].exc_info is None


def test_listener_runs_outside_the_lock(clock: FakeClock) -> None:
    breaker = make(clock)
    observed: list[BreakerState] = []
    # Reading the breaker from a listener would deadlock if the lock were held around callbacks.
    breaker.add_listener(lambda old, new: observed.append(breaker.state))
    trip(breaker)
    assert observed == [BreakerState.OPEN]


# -- clock, repr ---------------------------------------------------------------------------------------


def test_use_clock_replaces_the_clock_and_keeps_remaining_open_time(clock: FakeClock) -> None:
    breaker = make(clock, open_for=10.0)
    trip(breaker)
    clock.advance(3.0)
    other = FakeClock(now=5.0)
    breaker.use_clock(other)
    assert breaker.clock is other
    assert breaker.retry_after == pytest.approx(7.0)
    clock.advance(100.0)  # the old clock no longer matters
    assert breaker.state is BreakerState.OPEN
    other.advance(7.0)
    assert breaker.state is BreakerState.HALF_OPEN


def test_use_clock_refuses_a_non_callable(clock: FakeClock) -> None:
    breaker = make(clock)
    with pytest.raises(ConfigError) as info:
        breaker.use_clock(3.0)  # type: ignore[arg-type]
    assert info.value.setting == "Breaker.clock"
    assert breaker.clock is clock


def test_repr_shows_state_and_failure_rate(clock: FakeClock) -> None:
    breaker = make(clock, minimum_calls=4)
    breaker.record_failure(0.01)
    breaker.record_success(0.01)
    assert repr(breaker) == "<Breaker state=closed failure_rate=0.50>"
    trip(breaker)
    assert "state=open" in repr(breaker)


# -- concurrency ---------------------------------------------------------------------------------------


def test_concurrent_recording_keeps_counts_consistent(clock: FakeClock) -> None:
    threads, rounds = 8, 500
    size = threads * rounds * 2
    breaker = make(clock, failure_rate=1.0, window_size=size, minimum_calls=size)
    barrier = threading.Barrier(threads)

    def work() -> None:
        barrier.wait()
        for _ in range(rounds):
            breaker.acquire()
            breaker.record_failure(0.01)
            breaker.acquire()
            breaker.record_success(0.01)

    workers = [threading.Thread(target=work) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert breaker.state is BreakerState.CLOSED
    assert breaker.failure_rate == 0.5  # exactly half of a full window: no lost updates
    breaker.record_failure(0.01)  # window full: the oldest entry slides out, still consistent
    assert 0.4999 < breaker.failure_rate < 0.5002


def test_concurrent_half_open_acquires_hand_out_exactly_the_permits(clock: FakeClock) -> None:
    breaker = make(clock, half_open_calls=3)
    trip(breaker)
    to_half_open(breaker, clock)
    threads = 16
    barrier = threading.Barrier(threads)
    admitted: list[int] = []
    refused: list[int] = []
    guard = threading.Lock()

    def work(index: int) -> None:
        barrier.wait()
        try:
            breaker.acquire()
        except CircuitOpen:
            with guard:
                refused.append(index)
        else:
            with guard:
                admitted.append(index)

    workers = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert len(admitted) == 3
    assert len(refused) == threads - 3


def test_concurrent_trips_open_once(clock: FakeClock) -> None:
    breaker = make(clock, consecutive_failures=1)
    threads = 8
    barrier = threading.Barrier(threads)
    seen: list[BreakerState] = []
    breaker.add_listener(lambda old, new: seen.append(new))

    def work() -> None:
        barrier.wait()
        for _ in range(50):
            breaker.record_failure(0.01)

    workers = [threading.Thread(target=work) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert breaker.opened_count == 1
    assert seen == [BreakerState.OPEN]


# -- verdicts from outside the window: trip() and probe_succeeded() ----------------------------------------


def test_trip_opens_a_closed_breaker_at_once(clock: FakeClock) -> None:
    breaker = make(clock)
    seen: list[tuple[BreakerState, BreakerState]] = []
    breaker.add_listener(lambda old, new: seen.append((old, new)))
    breaker.trip()
    assert breaker.state is BreakerState.OPEN
    assert breaker.retry_after == pytest.approx(10.0)
    assert seen == [(BreakerState.CLOSED, BreakerState.OPEN)]
    with pytest.raises(CircuitOpen):
        breaker.acquire()


def test_trip_while_open_keeps_the_open_interval(clock: FakeClock) -> None:
    breaker = make(clock)
    breaker.trip()
    clock.advance(4.0)
    breaker.trip()
    assert breaker.retry_after == pytest.approx(6.0)
    assert breaker.opened_count == 1


def test_trip_while_half_open_reopens_for_longer(clock: FakeClock) -> None:
    breaker = make(clock)
    breaker.trip()
    clock.advance(10.0)
    assert breaker.state is BreakerState.HALF_OPEN
    breaker.trip()
    assert breaker.state is BreakerState.OPEN
    assert breaker.retry_after == pytest.approx(20.0)


def test_probe_success_turns_open_into_half_open_before_the_interval_ends(clock: FakeClock) -> None:
    breaker = make(clock)
    breaker.trip()
    clock.advance(0.5)
    breaker.probe_succeeded()
    assert breaker.state is BreakerState.HALF_OPEN
    assert breaker.retry_after is None
    breaker.acquire()  # a trial call is let through at once
    breaker.record_success(0.01)
    breaker.acquire()
    breaker.record_success(0.01)
    assert breaker.state is BreakerState.CLOSED


def test_probe_successes_close_a_half_open_breaker_without_traffic(clock: FakeClock) -> None:
    breaker = make(clock)  # half_open_calls=2
    breaker.trip()
    breaker.probe_succeeded()
    breaker.probe_succeeded()
    assert breaker.state is BreakerState.HALF_OPEN
    breaker.probe_succeeded()
    assert breaker.state is BreakerState.CLOSED
    assert breaker.failure_rate == 0.0


def test_probe_success_while_closed_changes_nothing(clock: FakeClock) -> None:
    breaker = make(clock)
    breaker.acquire()
    breaker.record_failure(0.01)
    breaker.probe_succeeded()
    assert breaker.state is BreakerState.CLOSED
    assert breaker.failure_rate == 1.0


def test_an_actively_probed_breaker_tells_callers_to_retry_at_the_probe_cadence(clock: FakeClock) -> None:
    breaker = make(clock)
    breaker.probed_every = 0.5
    breaker.trip()
    assert breaker.retry_after == 1.0  # Retry-After is whole seconds, at least 1: not the 10 s open interval
    with pytest.raises(CircuitOpen) as raised:
        breaker.acquire()
    assert raised.value.retry_after == 1.0
    clock.advance(9.5)
    assert breaker.retry_after == pytest.approx(0.5)
