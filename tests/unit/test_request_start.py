"""``X-Request-Start``: the parser, and the time a request queued in front of the app spent of its wait budget.

The parser is pure (the wall clock is an argument); the gate runs with a plain callable as the pool's
checkout and the fake clock, so nothing here waits.
"""

from __future__ import annotations

import pytest

from poolguard.errors import PoolSaturated
from poolguard.http import MAX_CLOCK_SKEW, MAX_QUEUE_TIME, queue_time
from tests.unit.conftest import FakeClock
from tests.unit.test_gate import RealCheckout, keyed, make, scope_of

NOW = 1_700_000_000.5
"""The wall clock of the parser tests: 2023-11-14, in epoch seconds."""


# -- the parser ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "queued"),
    [
        ("t=1700000000.123", 0.377),  # nginx: proxy_set_header X-Request-Start "t=${msec}"
        ("1700000000.123", 0.377),
        ("t=1700000000", 0.5),
        ("1700000000123", 0.377),  # Heroku: milliseconds, 13 digits
        ("t=1700000000123", 0.377),
        ("t=1700000000123456", 0.376544),  # microseconds, 16 digits (Apache's %t)
        ("1700000000123456", 0.376544),
        ("  t=1700000000123  ", 0.377),
        ("t=1699999990000000", 10.5),
    ],
)
def test_seconds_milliseconds_and_microseconds_are_told_apart_by_magnitude(header: str, queued: float) -> None:
    assert queue_time(header, NOW) == pytest.approx(queued, abs=1e-6)


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        "   ",
        "t=",
        "t",
        "garbage",
        "t=abc",
        "t=1700000000.1.2",
        "t=-1700000000",
        "+1700000000",
        "t=1.7e9",
        "nan",
        "inf",
        "t=0x65536f80",
        "t=1_700_000_000",
        "T=1700000000",
        "t= 1700000000",
        "t=1700000000 D=1234",
        "\uff11\uff17\uff10\uff10\uff10\uff10\uff10\uff10\uff10\uff10",  # full-width digits
        "9" * 400,
        "t=" + "1" * 30,
        "0",
        "12345",  # before 2000 in every unit
    ],
)
def test_absent_or_malformed_is_none_and_never_raises(header: str | None) -> None:
    assert queue_time(header, NOW) is None


def test_a_start_a_little_in_the_future_is_clock_skew_and_counts_as_no_queueing() -> None:
    assert queue_time(f"t={NOW + 1.0:.3f}", NOW) == 0.0
    assert queue_time(f"t={int((NOW + MAX_CLOCK_SKEW - 0.5) * 1e6)}", NOW) == 0.0
    assert queue_time(f"t={NOW:.3f}", NOW) == 0.0


@pytest.mark.parametrize(
    "start",
    [
        NOW + MAX_CLOCK_SKEW + 1,  # far in the future: the proxy's clock is wrong
        NOW - MAX_QUEUE_TIME - 1,  # more than an hour ago
        NOW - 86_400 * 365,
    ],
)
def test_implausible_starts_are_not_believed(start: float) -> None:
    for header in (f"t={start:.3f}", str(int(start * 1e3)), f"t={int(start * 1e6)}"):
        assert queue_time(header, NOW) is None, header


def test_the_last_of_several_values_counts_the_one_the_nearest_proxy_set() -> None:
    assert queue_time("t=1700000000000000, t=1700000000400000", NOW) == pytest.approx(0.1)
    assert queue_time("t=1600000000000000,1700000000400", NOW) == pytest.approx(0.1)
    assert queue_time("t=1700000000400000, garbage", NOW) is None


# -- the gate -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("queued", [1.0, 1.5, 30.0])
def test_a_request_that_queued_past_its_budget_is_refused_before_the_pool_even_with_free_slots(
    clock: FakeClock, queued: float
) -> None:
    gate = make(clock, capacity=2)  # max_wait 1.0
    real = RealCheckout(clock)

    with scope_of(gate, queued=queued) as scope, pytest.raises(PoolSaturated) as caught:
        gate.checkout(real, key_of=keyed("c"))

    assert real.calls == 0  # the pool was never asked
    assert gate.admission.in_use == 0
    assert scope.held == 0
    assert gate.pending == 0
    assert gate.checkouts == 0
    assert gate.shed == {"circuit_open": 0, "pool_saturated": 1}
    assert gate.timeouts == 1
    assert gate.snapshot().shed == 1
    assert caught.value.reason == "pool_saturated"
    assert caught.value.retry_after == 1.0
    assert caught.value.pool == "primary"
    assert f"queued {queued:.3f}s" in str(caught.value)
    assert gate.breaker is not None
    assert gate.breaker.failure_rate == 0.0  # shedding is not a database failure


def test_a_late_request_refused_in_half_open_gives_its_trial_call_back(clock: FakeClock) -> None:
    gate = make(clock, capacity=2)
    breaker = gate.breaker
    assert breaker is not None
    breaker.trip()
    clock.advance(breaker.retry_after or 0.0)
    assert breaker.state.value == "half_open"
    real = RealCheckout(clock)

    for _ in range(breaker.options.half_open_calls + 1):
        with scope_of(gate, queued=2.0), pytest.raises(PoolSaturated):
            gate.checkout(real)

    with scope_of(gate):
        assert gate.checkout(real) == "connection-1"  # the trial calls were not used up by the refusals
    assert breaker.state.value == "half_open"


def test_a_request_that_queued_less_than_its_budget_gets_what_is_left(
    clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate = make(clock, capacity=2)
    budgets: list[float] = []
    acquire = gate.admission.acquire

    def recording(budget: float, await_in_greenlet: object = None, sheds: bool = True) -> None:
        budgets.append(budget)
        acquire(budget)

    monkeypatch.setattr(gate.admission, "acquire", recording)
    real = RealCheckout(clock, takes=0.1)

    with scope_of(gate, queued=0.3) as scope:
        assert gate.checkout(real, key_of=keyed("a")) == "connection-1"
        assert scope.waited == pytest.approx(0.4)  # queued, then the checkout's own wait
        assert gate.checkout(real, key_of=keyed("b")) == "connection-2"
        gate.checkin("a")
        gate.checkin("b")

    assert budgets == [pytest.approx(0.7), pytest.approx(0.6)]
    assert gate.shed["pool_saturated"] == 0


def test_the_remaining_budget_decides_whether_waiting_is_worth_it(clock: FakeClock) -> None:
    """A full pool whose predicted wait (0.5 s) fits a fresh budget but not what a late request has left."""
    gate = make(clock, capacity=1)
    for _ in range(8):
        gate.use_times.append((0.5, clock()))
    real = RealCheckout(clock)
    with scope_of(gate, route="/holder"):
        gate.checkout(real, key_of=keyed("held"))
    assert gate.admission.predicted_wait(0) == pytest.approx(0.5)

    with scope_of(gate, queued=0.6), pytest.raises(PoolSaturated) as caught:
        gate.checkout(real)

    assert "wait budget 0.400s" in str(caught.value)
    assert gate.admission.waiting == 0
    assert real.calls == 1
    gate.checkin("held")


def test_without_a_queue_time_a_spent_budget_still_takes_a_free_slot(clock: FakeClock) -> None:
    """``max_wait=0`` (or a budget spent on earlier checkouts) never waits, but a free slot is still taken."""
    gate = make(clock, capacity=2)
    real = RealCheckout(clock)
    with scope_of(gate, waited=1.0) as scope:
        assert gate.checkout(real, key_of=keyed("a")) == "connection-1"
        assert scope.held == 1
        gate.checkin("a")
    assert gate.shed["pool_saturated"] == 0


def test_a_queue_time_of_zero_never_refuses_even_with_the_budget_spent(clock: FakeClock) -> None:
    gate = make(clock, capacity=2)
    real = RealCheckout(clock)
    with scope_of(gate, waited=1.0, queued=0.0):
        assert gate.checkout(real) == "connection-1"
    assert gate.shed["pool_saturated"] == 0
