"""Wait and use samples of unsampled requests are queued and recorded in batches; none is lost.

The real SDK (MeterProvider + InMemoryMetricReader, TracerProvider) throughout; the guard tests run
against the real PostgreSQL server.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

import pytest
from opentelemetry.sdk.metrics import AlwaysOnExemplarFilter, MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF
from sqlalchemy import text

from poolguard import Guard
from poolguard.telemetry import FLUSH_AT, PoolTelemetry
from tests.support.pools import pool_stats
from tests.telemetry.conftest import POOL_NAME, Otel, point

GuardFactory = Callable[..., Guard]

STATS = pool_stats()
WAIT = "db.client.connection.wait_time"
USE = "db.client.connection.use_time"


@pytest.fixture
def sdk() -> Iterator[tuple[PoolTelemetry, InMemoryMetricReader]]:
    reader = InMemoryMetricReader()
    meter_provider = MeterProvider(metric_readers=[reader])
    telemetry = PoolTelemetry(
        pool_name="primary",
        db_system="postgresql",
        snapshot=lambda: STATS,
        tracer_provider=TracerProvider(sampler=ALWAYS_OFF),
        meter_provider=meter_provider,
    )
    yield telemetry, reader
    telemetry.close()
    meter_provider.shutdown()


def histograms(reader: InMemoryMetricReader) -> dict[str, list[object]]:
    data = reader.get_metrics_data()
    assert data is not None
    return {
        metric.name: list(metric.data.data_points)
        for resource_metrics in data.resource_metrics
        for scope_metrics in resource_metrics.scope_metrics
        for metric in scope_metrics.metrics
        if metric.name in (WAIT, USE)
    }


@pytest.mark.parametrize("samples", [1, FLUSH_AT - 1, FLUSH_AT, 3 * FLUSH_AT + 5])
def test_every_queued_sample_is_in_the_next_collection(
    sdk: tuple[PoolTelemetry, InMemoryMetricReader], samples: int
) -> None:
    telemetry, reader = sdk
    for i in range(samples):
        telemetry.record_wait(0.001 * (i + 1), False)
        telemetry.record_use(0.002, "/orders/{id}" if i % 2 else None, False)
        assert len(telemetry._queued) < FLUSH_AT  # never more than one batch waits

    found = histograms(reader)

    [wait] = found[WAIT]
    assert wait.count == samples
    assert wait.sum == pytest.approx(0.001 * samples * (samples + 1) / 2)
    uses = {tuple(sorted(p.attributes.items())): p for p in found[USE]}
    with_route = uses.get(((POOL_NAME, "primary"), ("http.route", "/orders/{id}")))
    without_route = uses[((POOL_NAME, "primary"),)]
    assert without_route.count == (samples + 1) // 2
    assert (with_route.count if with_route else 0) == samples // 2
    assert not telemetry._queued


def test_threads_recording_while_collections_run_lose_no_sample(
    sdk: tuple[PoolTelemetry, InMemoryMetricReader],
) -> None:
    telemetry, reader = sdk
    threads, per_thread = 8, 500
    start = threading.Barrier(threads + 1)
    collected = 0

    def record() -> None:
        start.wait()
        for _ in range(per_thread):
            telemetry.record_wait(0.001, False)
            telemetry.record_use(0.001, None, False)

    workers = [threading.Thread(target=record) for _ in range(threads)]
    for worker in workers:
        worker.start()
    start.wait()
    while any(worker.is_alive() for worker in workers):
        reader.get_metrics_data()  # collections (and the flushes they make) race the records
        collected += 1
    for worker in workers:
        worker.join()

    found = histograms(reader)
    assert found[WAIT][0].count == threads * per_thread
    assert found[USE][0].count == threads * per_thread
    assert collected > 0


def test_a_closed_guard_records_what_it_had_queued(otel: Otel, guard_on: GuardFactory) -> None:
    guard = guard_on()
    with guard.request_scope(route="/one") as scope:
        scope.session.execute(text("SELECT 1"))
    guard.close()  # no longer reported by the observable callbacks: its queue must be flushed now

    metrics = otel.collect()
    assert point(metrics[WAIT], {POOL_NAME: "primary"}).count == 1
    assert point(metrics[USE], {POOL_NAME: "primary", "http.route": "/one"}).count == 1


def test_a_sampled_request_records_at_once_with_its_trace_as_exemplar(otel: Otel, guard_on: GuardFactory) -> None:
    guard = guard_on()
    with otel.tracer.start_as_current_span("GET /orders/{id}") as request_span:
        with guard.request_scope(route="/orders/{id}") as scope:
            scope.session.execute(text("SELECT 1"))
        trace_id = request_span.get_span_context().trace_id
    assert not guard.gate.telemetry._queued

    metrics = otel.collect()
    wait = point(metrics[WAIT], {POOL_NAME: "primary"})
    use = point(metrics[USE], {POOL_NAME: "primary", "http.route": "/orders/{id}"})
    assert wait.count == use.count == 1
    assert [exemplar.trace_id for exemplar in wait.exemplars] == [trace_id]
    assert [exemplar.trace_id for exemplar in use.exemplars] == [trace_id]


def test_an_unsampled_request_is_queued_and_counted(guard_on: GuardFactory, otel: Otel) -> None:
    guard = guard_on()
    for _ in range(3):
        with guard.request_scope(route="/orders/{id}") as scope:
            scope.session.execute(text("SELECT 1"))
    assert len(guard.gate.telemetry._queued) == 6

    metrics = otel.collect()
    assert point(metrics[WAIT], {POOL_NAME: "primary"}).count == 3
    assert point(metrics[USE], {POOL_NAME: "primary", "http.route": "/orders/{id}"}).count == 3
    assert not point(metrics[WAIT], {POOL_NAME: "primary"}).exemplars


def test_queued_samples_take_no_exemplar_from_the_request_that_flushes_them() -> None:
    """Even with exemplars for every measurement, a queued sample is not tied to a trace it was not in."""
    reader = InMemoryMetricReader()
    meter_provider = MeterProvider(metric_readers=[reader], exemplar_filter=AlwaysOnExemplarFilter())
    tracer_provider = TracerProvider()
    telemetry = PoolTelemetry(
        pool_name="primary",
        db_system="postgresql",
        snapshot=lambda: STATS,
        tracer_provider=tracer_provider,
        meter_provider=meter_provider,
    )
    try:
        for _ in range(FLUSH_AT - 1):
            telemetry.record_wait(0.001, False)
        with tracer_provider.get_tracer("test").start_as_current_span("a sampled request"):
            telemetry.record_wait(0.001, False)  # the 32nd sample: this request flushes the batch
        assert not telemetry._queued

        [wait] = histograms(reader)[WAIT]
        assert wait.count == FLUSH_AT
        assert wait.exemplars  # the filter let them through: the point is what they point at
        assert all(exemplar.trace_id is None and exemplar.span_id is None for exemplar in wait.exemplars)
    finally:
        telemetry.close()
        meter_provider.shutdown()
        tracer_provider.shutdown()
