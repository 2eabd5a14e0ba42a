"""The gate with a plain callable as the pool's own checkout: gating, accounting, no database."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import psycopg.errors
import pytest
import sqlalchemy.exc
from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider

from poolguard.breaker import Breaker, BreakerState
from poolguard.errors import CircuitOpen, PoolSaturated
from poolguard.gate import Gate
from poolguard.pools import PoolCounts
from poolguard.telemetry import PoolTelemetry
from tests.support.clock import wait_until
from tests.support.pools import FixedPool, pool_stats
from tests.unit.conftest import FakeClock

ROUTE = "/orders/{id}"


def make(clock: FakeClock, *, capacity: int | None = 2, breaker: Breaker | None = None, **telemetry: object) -> Gate:
    counts = PoolCounts(size=capacity, max_overflow=0 if capacity else None, checked_out=1, idle=1, overflow=0)
    return Gate(
        FixedPool(counts),
        name="primary",
        breaker=breaker if breaker is not None else Breaker(consecutive_failures=3, clock=clock),
        max_wait=1.0,
        leak_threshold=30.0,
        capture_stacks=False,
        clock=clock,
        **telemetry,
    )


class Scope:
    """A unit of work as the gate sees one (what :class:`poolguard.pools.Unit` describes)."""

    def __init__(self, route: str | None, waited: float = 0.0, queued: float = 0.0) -> None:
        self.route = route
        self.queued = queued
        self.waited = waited + queued
        self.reserved: float | None = None
        self.held = 0
        self.sheds = True


@contextmanager
def scope_of(gate: Gate, route: str | None = ROUTE, waited: float = 0.0, queued: float = 0.0) -> Iterator[Scope]:
    scope = Scope(route, waited, queued)
    token = gate.unit_var.set(scope)
    try:
        yield scope
    finally:
        gate.unit_var.reset(token)


def keyed(key: str) -> Callable[[object], str]:
    """A ``key_of`` for :meth:`Gate.checkout`: every connection it sees is held under ``key``."""
    return lambda _connection: key


def trip(breaker: Breaker) -> None:
    for _ in range(100):
        if breaker.state is BreakerState.OPEN:
            return
        breaker.acquire()
        breaker.record_failure(0.0)
    assert breaker.state is BreakerState.OPEN


class RealCheckout:
    """Stands in for the pool's own checkout: counts calls, may advance the clock or raise."""

    def __init__(self, clock: FakeClock, *, takes: float = 0.0, error: BaseException | None = None) -> None:
        self.calls = 0
        self._clock = clock
        self._takes = takes
        self._error = error

    def __call__(self) -> str:
        self.calls += 1
        self._clock.advance(self._takes)
        if self._error is not None:
            raise self._error
        return f"connection-{self.calls}"


def refused() -> sqlalchemy.exc.OperationalError:
    return sqlalchemy.exc.OperationalError("connect", None, ConnectionRefusedError(111, "Connection refused"))


def duplicate_key() -> sqlalchemy.exc.IntegrityError:
    return sqlalchemy.exc.IntegrityError("INSERT", None, psycopg.errors.UniqueViolation("duplicate key"))


# -- gating ------------------------------------------------------------------------------------------------


def test_checkout_outside_any_scope_is_not_gated_even_with_the_breaker_open(clock: FakeClock) -> None:
    gate = make(clock, capacity=1)
    assert gate.breaker is not None
    trip(gate.breaker)
    real = RealCheckout(clock)

    assert gate.checkout(real) == "connection-1"
    assert gate.checkout(real) == "connection-2"  # over capacity too: not through the guard

    assert real.calls == 2
    assert gate.admission.in_use == 0
    assert gate.shed == {"circuit_open": 0, "pool_saturated": 0}
    assert gate.checkouts == 2


def test_open_breaker_inside_a_scope_raises_circuit_open_and_counts_it(clock: FakeClock) -> None:
    gate = make(clock)
    assert gate.breaker is not None
    trip(gate.breaker)
    real = RealCheckout(clock)

    with scope_of(gate), pytest.raises(CircuitOpen) as caught:
        gate.checkout(real)

    assert caught.value.reason == "circuit_open"
    assert caught.value.pool == "primary"
    assert caught.value.retry_after > 0
    assert real.calls == 0
    assert gate.shed["circuit_open"] == 1
    assert gate.shed["pool_saturated"] == 0
    assert gate.admission.in_use == 0
    assert gate.pending == 0


def test_a_scope_of_another_gate_does_not_gate_this_one(clock: FakeClock) -> None:
    gate = make(clock)
    other = make(clock)
    assert gate.breaker is not None
    trip(gate.breaker)
    with scope_of(other):
        assert gate.checkout(RealCheckout(clock)) == "connection-1"
    assert gate.admission.in_use == 0


def test_a_guarded_checkout_takes_an_admission_slot(clock: FakeClock) -> None:
    gate = make(clock, capacity=2)
    with scope_of(gate):
        gate.checkout(RealCheckout(clock))
    assert gate.admission.in_use == 1


def test_full_admission_inside_a_scope_sheds_with_pool_saturated(clock: FakeClock) -> None:
    gate = make(clock, capacity=1)
    real = RealCheckout(clock)
    with scope_of(gate, waited=1.0):  # the whole wait budget is spent
        gate.checkout(real)
        with pytest.raises(PoolSaturated) as caught:
            gate.checkout(real)
    assert caught.value.pool == "primary"
    assert real.calls == 1
    assert gate.shed["pool_saturated"] == 1
    assert gate.timeouts == 1
    assert gate.admission.in_use == 1


def test_every_shed_request_is_counted(clock: FakeClock) -> None:
    gate = make(clock, capacity=1)
    real = RealCheckout(clock)
    with scope_of(gate):
        gate.checkout(real)
    for expected in range(1, 6):
        with scope_of(gate, waited=1.0), pytest.raises(PoolSaturated):
            gate.checkout(real)
        assert gate.shed["pool_saturated"] == expected
    assert gate.snapshot().shed_by_reason == {"circuit_open": 0, "pool_saturated": 5}
    assert gate.snapshot().shed == 5


# -- failures ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("error", [refused(), ConnectionRefusedError(111, "refused"), sqlalchemy.exc.TimeoutError()])
def test_a_connection_failure_is_recorded_on_the_breaker_and_frees_the_slot(
    clock: FakeClock, error: BaseException
) -> None:
    breaker = Breaker(consecutive_failures=3, clock=clock)
    gate = make(clock, capacity=1, breaker=breaker)
    real = RealCheckout(clock, takes=0.2, error=error)

    for _ in range(3):
        with scope_of(gate) as scope, pytest.raises(type(error)):
            gate.checkout(real)
        assert gate.admission.in_use == 0
        assert scope.waited == pytest.approx(0.2)

    assert breaker.failure_rate == 1.0
    assert breaker.state is BreakerState.OPEN
    assert gate.pending == 0
    assert gate.checkouts == 0


def test_a_checkout_timeout_is_counted(clock: FakeClock) -> None:
    gate = make(clock)
    with scope_of(gate), pytest.raises(sqlalchemy.exc.TimeoutError):
        gate.checkout(RealCheckout(clock, error=sqlalchemy.exc.TimeoutError()))
    assert gate.timeouts == 1


def test_an_application_error_records_nothing_on_the_breaker(clock: FakeClock) -> None:
    breaker = Breaker(consecutive_failures=1, minimum_calls=1, window_size=5, clock=clock)
    gate = make(clock, capacity=1, breaker=breaker)
    real = RealCheckout(clock, error=duplicate_key())

    for _ in range(20):
        with scope_of(gate), pytest.raises(sqlalchemy.exc.IntegrityError):
            gate.checkout(real)
        assert gate.admission.in_use == 0

    assert real.calls == 20
    assert breaker.state is BreakerState.CLOSED
    assert breaker.failure_rate == 0.0
    assert gate.pending == 0


def test_a_failure_outside_a_scope_is_not_recorded_on_the_breaker(clock: FakeClock) -> None:
    breaker = Breaker(consecutive_failures=1, clock=clock)
    gate = make(clock, breaker=breaker)
    with pytest.raises(sqlalchemy.exc.OperationalError):
        gate.checkout(RealCheckout(clock, error=refused()))
    assert breaker.state is BreakerState.CLOSED
    assert gate.admission.in_use == 0
    assert gate.pending == 0


# -- accounting ----------------------------------------------------------------------------------------------


def test_wait_time_is_recorded(clock: FakeClock) -> None:
    gate = make(clock, capacity=2)
    with scope_of(gate) as scope:
        gate.checkout(RealCheckout(clock, takes=0.3))
        gate.checkout(RealCheckout(clock, takes=0.1))
    assert scope.waited == pytest.approx(0.4)
    snapshot = gate.snapshot()
    assert snapshot.wait_p50 == pytest.approx(0.1)
    assert snapshot.wait_p99 == pytest.approx(0.3)
    assert snapshot.checkouts == 2
    assert snapshot.pending == 0


def test_unguarded_wait_time_is_recorded_too(clock: FakeClock) -> None:
    gate = make(clock)
    gate.checkout(RealCheckout(clock, takes=0.25))
    assert gate.snapshot().wait_p99 == pytest.approx(0.25)


def test_pending_counts_checkouts_in_progress(clock: FakeClock) -> None:
    gate = make(clock)
    seen: list[int] = []

    def real() -> str:
        seen.append(gate.pending)
        return "connection"

    gate.checkout(real)
    assert seen == [1]
    assert gate.pending == 0


def test_checkout_checkin_pair_records_use_time_and_releases_the_slot(clock: FakeClock) -> None:
    gate = make(clock, capacity=1)
    with scope_of(gate) as scope:
        gate.checkout(RealCheckout(clock), None, keyed("key-1"))
        assert scope.held == 1
        assert gate.admission.in_use == 1
        clock.advance(0.25)
        gate.checkin("key-1")

    assert scope.held == 0
    assert gate.admission.in_use == 0
    assert gate._mean_use() == pytest.approx(0.25)
    snapshot = gate.snapshot()
    assert snapshot.use_p50 == pytest.approx(0.25)
    assert snapshot.use_p99 == pytest.approx(0.25)


def test_holder_records_route_and_thread(clock: FakeClock) -> None:
    gate = make(clock)
    with scope_of(gate, route="/reports"):
        gate.checkout(lambda: "handle", None, keyed("key-1"))
    (holder,) = gate.leaks.holders()
    assert holder.route == "/reports"
    assert holder.thread == threading.current_thread().name
    assert holder.handle == "handle"
    assert holder.stack is None  # capture_stacks is off


def test_checkin_of_an_unguarded_connection_does_not_free_a_guarded_slot(clock: FakeClock) -> None:
    gate = make(clock, capacity=1)
    with scope_of(gate):
        gate.checkout(RealCheckout(clock), None, keyed("guarded"))
    gate.checkout(RealCheckout(clock), None, keyed("unguarded"))
    clock.advance(0.1)
    gate.checkin("unguarded")
    gate.checkin("unknown")
    assert gate.admission.in_use == 1
    gate.checkin("guarded")
    assert gate.admission.in_use == 0


def test_suspected_leaks_show_in_the_snapshot(clock: FakeClock) -> None:
    gate = make(clock)
    with scope_of(gate):
        gate.checkout(RealCheckout(clock), None, keyed("key-1"))
    clock.advance(31)
    assert gate.snapshot().suspected_leaks == 1
    gate.checkin("key-1")
    assert gate.snapshot().suspected_leaks == 0


# -- the wait budget -------------------------------------------------------------------------------------------


def run_in_scope(gate: Gate, action: Callable[[], object], results: list[object]) -> threading.Thread:
    """Runs ``action`` in a thread inside a fresh scope of ``gate`` (threads do not inherit contextvars)."""

    def target() -> None:
        with scope_of(gate):
            try:
                results.append(action())
            except BaseException as exc:
                results.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread


def test_the_budget_shrinks_with_what_the_scope_already_waited(clock: FakeClock) -> None:
    gate = make(clock, capacity=1)
    gate.use_times.append((0.5, clock()))  # a slot frees in ~0.5 s
    with scope_of(gate):
        gate.checkout(RealCheckout(clock), None, keyed("first"))
    real = RealCheckout(clock)

    # 0.8 s of the 1.0 s budget already spent: 0.2 s left, under the 0.5 s predicted wait. Shed at once
    # (called from the main thread, which would block if it queued).
    with scope_of(gate, waited=0.8), pytest.raises(PoolSaturated):
        gate.checkout(real)
    assert real.calls == 0
    assert gate.shed["pool_saturated"] == 1
    assert gate.admission.waiting == 0

    # A fresh scope has the whole 1.0 s budget: it queues for the slot and gets it on checkin.
    results: list[object] = []
    thread = run_in_scope(gate, lambda: gate.checkout(real), results)
    wait_until(lambda: gate.admission.waiting == 1)
    gate.checkin("first")
    thread.join(timeout=10)
    assert not thread.is_alive()
    assert results == ["connection-1"]
    assert gate.admission.in_use == 1
    assert gate.shed["pool_saturated"] == 1


# -- telemetry without an SDK ---------------------------------------------------------------------------------


def test_without_an_sdk_checkouts_skip_spans_and_records_until_one_is_installed(
    clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate = make(clock)
    telemetry = gate.telemetry
    assert not telemetry.tracing, "the default (proxy) providers were taken for an SDK"
    assert not telemetry.metering
    try:
        gate.checkout(RealCheckout(clock))  # the first checkout looks at the providers
        installed = {"yes": True}
        # An SDK installing its global providers, as seen by the checks (a real install is process-wide
        # and for good, so tests/telemetry/test_global_provider.py does that in a child process).
        monkeypatch.setattr("poolguard.telemetry._global_tracing", lambda: installed["yes"])
        monkeypatch.setattr("poolguard.telemetry._global_metering", lambda: installed["yes"])
        gate.checkout(RealCheckout(clock))
        assert not telemetry.tracing, "looked again before the sweep interval"
        clock.advance(1.0)
        gate.checkout(RealCheckout(clock))
        assert telemetry.tracing
        assert telemetry.metering
    finally:
        telemetry.close()


def test_no_op_providers_turn_the_pools_telemetry_off_for_good(
    clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    telemetry = PoolTelemetry(
        pool_name="primary",
        db_system="postgresql",
        snapshot=pool_stats,
        tracer_provider=trace.NoOpTracerProvider(),
        meter_provider=metrics.NoOpMeterProvider(),
    )
    try:
        assert not telemetry.tracing
        assert not telemetry.metering
        # An SDK installed globally later does not override providers the application chose.
        monkeypatch.setattr("poolguard.telemetry._global_tracing", lambda: True)
        monkeypatch.setattr("poolguard.telemetry._global_metering", lambda: True)
        telemetry.notice_providers()
        assert not telemetry.tracing
        assert not telemetry.metering
    finally:
        telemetry.close()


def test_an_injected_sdk_provider_records_at_once() -> None:
    reader = InMemoryMetricReader()
    telemetry = PoolTelemetry(
        pool_name="primary",
        db_system="postgresql",
        snapshot=pool_stats,
        tracer_provider=TracerProvider(),
        meter_provider=MeterProvider(metric_readers=[reader]),
    )
    try:
        assert telemetry.tracing
        assert telemetry.metering
        telemetry.record_wait(0.002, False)
        data = reader.get_metrics_data()
        assert data is not None
        names = [m.name for rm in data.resource_metrics for sm in rm.scope_metrics for m in sm.metrics]
        assert "db.client.connection.wait_time" in names
    finally:
        telemetry.close()


# -- a slot taken ahead (FastAPI's def routes) -----------------------------------------------------------


async def test_a_slot_taken_ahead_is_the_first_checkouts(clock: FakeClock) -> None:
    gate = make(clock, capacity=1)
    real = RealCheckout(clock, takes=0.002)
    with scope_of(gate) as scope:
        await gate.areserve(scope)
        assert gate.admission.in_use == 1
        assert scope.reserved == 0.0
        connection = gate.checkout(real, key_of=keyed("a"))  # would block or shed if it asked admission again
        assert connection == "connection-1"
        assert scope.reserved is None
        assert scope.waited == pytest.approx(0.002)
        assert gate.admission.in_use == 1
        gate.checkin("a")
    assert gate.admission.in_use == 0


async def test_a_slot_taken_ahead_and_never_used_goes_back(clock: FakeClock) -> None:
    gate = make(clock, capacity=1)
    with scope_of(gate) as scope:
        await gate.areserve(scope)
        await gate.areserve(scope)  # a second call takes nothing more
        assert gate.admission.in_use == 1
        gate.unreserve(scope)
    assert scope.reserved is None
    assert gate.admission.in_use == 0


async def test_taking_a_slot_ahead_is_refused_as_a_checkout_would_be(clock: FakeClock) -> None:
    gate = make(clock, capacity=1)
    gate.admission.acquire(1.0)  # the only slot, held elsewhere
    with scope_of(gate, waited=1.0) as scope, pytest.raises(PoolSaturated):
        await gate.areserve(scope)  # no budget left
    assert scope.reserved is None
    assert gate.shed["pool_saturated"] == 1


async def test_nothing_is_taken_ahead_while_the_breaker_is_not_closed(clock: FakeClock) -> None:
    gate = make(clock, capacity=1)
    assert gate.breaker is not None
    trip(gate.breaker)
    with scope_of(gate) as scope:
        await gate.areserve(scope)  # the checkout decides, and answers circuit_open
        assert scope.reserved is None
        assert gate.admission.in_use == 0
        with pytest.raises(CircuitOpen):
            gate.checkout(RealCheckout(clock))
