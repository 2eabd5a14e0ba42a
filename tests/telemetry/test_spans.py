"""Checkout spans and request-span events with the real OpenTelemetry SDK, on real PostgreSQL.

The parent span stands in for a framework instrumentation's request span: a plain span started
with the test's TracerProvider and made current, exactly what opentelemetry-instrumentation-* does.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, StatusCode, TraceFlags
from sqlalchemy import exc, text

from poolguard import Breaker, CircuitOpen, Guard, PoolSaturated
from tests.support.databases import DEAD_PORT, pg_url
from tests.telemetry.conftest import POOL_NAME, FakeClock, Otel

pytestmark = pytest.mark.postgres

GuardFactory = Callable[..., Guard]
DEAD_URL = pg_url(port=DEAD_PORT)


def checkout_spans(otel: Otel, pool: str = "primary") -> list[Any]:
    return otel.spans(f"checkout {pool}")


def events(span: Any, name: str) -> list[Any]:
    return [e for e in span.events if e.name == name]


def test_checkout_inside_a_sampled_request_span_is_its_child(otel: Otel, guard_on: GuardFactory):
    guard = guard_on()
    with (
        otel.tracer.start_as_current_span("GET /orders/{id}", kind=SpanKind.SERVER) as request,
        guard.request_scope(route="/orders/{id}") as scope,
    ):
        assert scope.session.execute(text("SELECT 1")).scalar() == 1
    request_context = request.get_span_context()
    span = otel.span("checkout primary")
    assert span.kind is SpanKind.INTERNAL
    assert span.parent is not None
    assert span.parent.span_id == request_context.span_id
    assert span.context.trace_id == request_context.trace_id
    assert dict(span.attributes or {}) == {
        POOL_NAME: "primary",
        "db.system.name": "postgresql",
        "poolguard.outcome": "acquired",
    }
    assert span.status.status_code is StatusCode.UNSET
    assert span.instrumentation_scope is not None
    assert span.instrumentation_scope.name == "poolguard"
    # The span covers the wait for a connection, not the query: it ends before the request does.
    assert span.end_time is not None
    assert request.end_time is not None  # type: ignore[attr-defined]
    assert span.end_time <= request.end_time  # type: ignore[attr-defined]


def test_every_checkout_of_a_request_gets_its_span_and_the_pool_name_is_the_guards(otel: Otel, guard_on: GuardFactory):
    guard = guard_on(name="orders-db")
    with otel.tracer.start_as_current_span("job"):
        for _ in range(3):
            with guard.connection() as connection:
                connection.execute(text("SELECT 1"))
    spans = checkout_spans(otel, "orders-db")
    assert len(spans) == 3
    assert {s.attributes[POOL_NAME] for s in spans} == {"orders-db"}


def test_no_parent_span_means_no_checkout_span(otel: Otel, guard_on: GuardFactory):
    guard = guard_on()
    assert not trace.get_current_span().get_span_context().is_valid
    with guard.connection() as connection:
        connection.execute(text("SELECT 1"))
    assert otel.spans() == []
    assert guard.stats().checkouts == 1


def test_unsampled_parent_from_an_always_off_provider_means_no_checkout_span(otel: Otel, guard_on: GuardFactory):
    guard = guard_on()
    unsampled = TracerProvider(sampler=ALWAYS_OFF).get_tracer("app")
    with unsampled.start_as_current_span("GET /orders") as request:
        assert request.get_span_context().is_valid
        assert not request.get_span_context().trace_flags.sampled
        with guard.request_scope(route="/orders") as scope:
            scope.session.execute(text("SELECT 1"))
    assert otel.spans() == []


def test_unsampled_remote_parent_means_no_checkout_span(otel: Otel, guard_on: GuardFactory):
    guard = guard_on()
    remote = SpanContext(
        trace_id=0x4BF92F3577B34DA6A3CE929D0E0E4736,
        span_id=0x00F067AA0BA902B7,
        is_remote=True,
        trace_flags=TraceFlags(TraceFlags.DEFAULT),
    )
    with trace.use_span(NonRecordingSpan(remote)), guard.connection() as connection:
        connection.execute(text("SELECT 1"))
    assert otel.spans() == []


def test_sampled_remote_parent_gets_a_child_in_the_same_trace(otel: Otel, guard_on: GuardFactory):
    guard = guard_on()
    remote = SpanContext(
        trace_id=0x4BF92F3577B34DA6A3CE929D0E0E4736,
        span_id=0x00F067AA0BA902B7,
        is_remote=True,
        trace_flags=TraceFlags(TraceFlags.SAMPLED),
    )
    with trace.use_span(NonRecordingSpan(remote)), guard.connection() as connection:
        connection.execute(text("SELECT 1"))
    span = otel.span("checkout primary")
    assert span.context.trace_id == remote.trace_id
    assert span.parent is not None
    assert span.parent.span_id == remote.span_id


def test_circuit_open_marks_the_span_and_puts_a_shed_event_on_the_request_span(otel: Otel, guard_on: GuardFactory):
    guard = guard_on(DEAD_URL, breaker=Breaker(consecutive_failures=1, open_for=60.0))
    with otel.tracer.start_as_current_span("GET /orders", kind=SpanKind.SERVER):
        with pytest.raises(exc.OperationalError), guard.connection():
            pass
        with pytest.raises(CircuitOpen), guard.connection():
            pass
    request = otel.span("GET /orders")
    failed, shed = sorted(checkout_spans(otel), key=lambda s: s.start_time)
    assert failed.attributes["poolguard.outcome"] == "error"
    assert failed.status.status_code is StatusCode.ERROR
    assert shed.attributes["poolguard.outcome"] == "circuit_open"
    assert shed.status.status_code is StatusCode.ERROR
    assert shed.parent is not None
    assert shed.parent.span_id == request.context.span_id

    transitions = events(request, "poolguard.breaker_transition")
    assert [dict(e.attributes) for e in transitions] == [
        {POOL_NAME: "primary", "poolguard.breaker.from": "closed", "poolguard.breaker.to": "open"}
    ]
    shed_events = events(request, "poolguard.request_shed")
    assert [dict(e.attributes) for e in shed_events] == [{POOL_NAME: "primary", "poolguard.reason": "circuit_open"}]
    # The transition happened before the request was shed.
    assert transitions[0].timestamp <= shed_events[0].timestamp


def test_pool_saturated_marks_the_span_and_the_request_span(otel: Otel, guard_on: GuardFactory):
    guard = guard_on(max_wait=0.05, engine={"pool_size": 1})
    with (
        otel.tracer.start_as_current_span("GET /report"),
        guard.connection(),
        pytest.raises(PoolSaturated),
        guard.connection(),
    ):
        pass
    outcomes = sorted(s.attributes["poolguard.outcome"] for s in checkout_spans(otel))
    assert outcomes == ["acquired", "pool_saturated"]
    saturated = next(s for s in checkout_spans(otel) if s.attributes["poolguard.outcome"] == "pool_saturated")
    assert saturated.status.status_code is StatusCode.ERROR
    request = otel.span("GET /report")
    assert [e.attributes["poolguard.reason"] for e in events(request, "poolguard.request_shed")] == ["pool_saturated"]


def test_pool_timeout_outside_the_guard_is_outcome_timeout(otel: Otel, guard_on: GuardFactory):
    guard = guard_on(engine={"pool_size": 1, "pool_timeout": 0.1})
    engine = guard.engine
    holder = engine.connect()  # not through the guard: ungated, so SQLAlchemy's own timeout applies
    try:
        with otel.tracer.start_as_current_span("batch"), pytest.raises(exc.TimeoutError):
            engine.connect()
    finally:
        holder.close()
    [span] = checkout_spans(otel)
    assert span.attributes["poolguard.outcome"] == "timeout"
    assert guard.stats().timeouts == 1


def test_leak_suspected_is_an_event_on_the_request_span_that_holds_the_connection(
    otel: Otel, guard_on: GuardFactory, fake_clock: FakeClock
):
    guard = guard_on(leak_threshold=5.0, clock=fake_clock)
    with otel.tracer.start_as_current_span("GET /reports/{id}"), guard.request_scope(route="/reports/{id}"):
        connection = guard.engine.connect()
        try:
            fake_clock.advance(6.0)
            assert guard.stats().suspected_leaks == 1
        finally:
            connection.close()
    request = otel.span("GET /reports/{id}")
    [leak] = events(request, "poolguard.leak_suspected")
    assert dict(leak.attributes) == {POOL_NAME: "primary", "poolguard.held_seconds": 6.0, "http.route": "/reports/{id}"}


def test_leak_found_from_another_thread_still_lands_on_the_holders_span(
    otel: Otel, guard_on: GuardFactory, fake_clock: FakeClock
):
    guard = guard_on(leak_threshold=5.0, clock=fake_clock)
    held = threading.Event()
    release = threading.Event()

    def slow_request() -> None:
        with otel.tracer.start_as_current_span("GET /slow"), guard.request_scope(route="/slow"), guard.engine.connect():
            held.set()
            release.wait(10)

    worker = threading.Thread(target=slow_request)
    worker.start()
    try:
        assert held.wait(10)
        fake_clock.advance(31.0)
        with otel.tracer.start_as_current_span("GET /health/db"):
            assert guard.stats().suspected_leaks == 1  # the sweep runs here, in another request
    finally:
        release.set()
        worker.join(10)
    assert events(otel.span("GET /slow"), "poolguard.leak_suspected")
    assert not events(otel.span("GET /health/db"), "poolguard.leak_suspected")


def test_connection_left_at_the_end_of_a_request_is_a_leak_event(otel: Otel, guard_on: GuardFactory):
    guard = guard_on()
    with otel.tracer.start_as_current_span("GET /forgetful"):
        with guard.request_scope(route="/forgetful"):
            forgotten = guard.engine.connect()
        [leak] = events(trace.get_current_span(), "poolguard.leak_suspected")  # type: ignore[attr-defined]
        assert leak.attributes["http.route"] == "/forgetful"
    forgotten.close()


def test_saturation_run_gives_one_span_per_request_with_its_outcome(otel: Otel, guard_on: GuardFactory):
    guard = guard_on(max_wait=0.2)
    barrier = threading.Barrier(8)
    outcomes: list[str] = []
    lock = threading.Lock()

    def request(i: int) -> None:
        barrier.wait()
        with otel.tracer.start_as_current_span(f"GET /slow #{i}"):
            try:
                with guard.request_scope(route="/slow") as scope:
                    scope.session.execute(text("SELECT pg_sleep(0.4)"))
                outcome = "acquired"
            except PoolSaturated:
                outcome = "pool_saturated"
        with lock:
            outcomes.append(outcome)

    threads = [threading.Thread(target=request, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert sorted(outcomes) == sorted(s.attributes["poolguard.outcome"] for s in checkout_spans(otel))
    assert outcomes.count("pool_saturated") >= 4
    for span in checkout_spans(otel):
        assert span.parent is not None
        parent = next(p for p in otel.spans() if p.context.span_id == span.parent.span_id)
        assert parent.name.startswith("GET /slow #")


async def test_async_engine_checkout_span_is_a_child_of_the_request_span(otel: Otel, async_guard_on: GuardFactory):
    guard = async_guard_on()
    with otel.tracer.start_as_current_span("GET /async", kind=SpanKind.SERVER) as request:
        async with guard.request_scope(route="/async") as scope:
            assert (await scope.session.execute(text("SELECT 1"))).scalar() == 1
        async with guard.connection() as connection:
            await connection.execute(text("SELECT 1"))
    spans = checkout_spans(otel)
    assert len(spans) == 2
    for span in spans:
        assert span.parent is not None
        assert span.parent.span_id == request.get_span_context().span_id
        assert span.attributes["db.system.name"] == "postgresql"
        assert span.attributes["poolguard.outcome"] == "acquired"


async def test_async_engine_unsampled_parent_means_no_span(otel: Otel, async_guard_on: GuardFactory):
    guard = async_guard_on()
    with TracerProvider(sampler=ALWAYS_OFF).get_tracer("app").start_as_current_span("GET /async"):
        async with guard.connection() as connection:
            await connection.execute(text("SELECT 1"))
    assert otel.spans() == []


def test_span_measures_the_wait(otel: Otel, guard_on: GuardFactory):
    guard = guard_on(max_wait=2.0, engine={"pool_size": 1})
    holder = guard.engine.connect()
    release = threading.Timer(0.2, holder.close)
    release.start()
    with otel.tracer.start_as_current_span("GET /waits"):
        started = time.monotonic()
        with guard.connection():
            waited = time.monotonic() - started
    release.join()
    span = otel.span("checkout primary")
    assert span.attributes["poolguard.outcome"] == "acquired"
    assert span.end_time is not None
    assert span.start_time is not None
    assert 0.15 <= (span.end_time - span.start_time) / 1e9 <= waited + 0.01
