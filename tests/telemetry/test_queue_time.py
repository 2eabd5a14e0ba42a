"""``poolguard.request.queue_time``: once per request with a trusted, readable ``X-Request-Start``.

With the real OpenTelemetry SDK (an in-memory reader) and prometheus_client's exposition, on PostgreSQL.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from flask import Flask
from opentelemetry.sdk.metrics.export import Histogram
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import text

import poolguard.prometheus
from poolguard import Guard, PoolSaturated
from poolguard.flask import PoolGuard, db
from poolguard.telemetry import DURATION_BUCKETS
from tests.support.clock import arrived
from tests.telemetry.conftest import POOL_NAME, Otel, point

pytestmark = pytest.mark.postgres

GuardFactory = Callable[..., Guard]
QUEUE_TIME = "poolguard.request.queue_time"


def test_each_request_with_a_queue_time_is_one_sample(otel: Otel, guard_on: GuardFactory) -> None:
    guard = guard_on()
    for queued in (0.25, 0.0):
        with guard.request_scope("/orders", queued=queued) as scope:
            scope.session.execute(text("SELECT 1"))
    with guard.request_scope("/orders") as scope:  # no header: no sample
        scope.session.execute(text("SELECT 1"))
    with pytest.raises(PoolSaturated), guard.request_scope("/orders", queued=1.5) as scope:
        scope.session.execute(text("SELECT 1"))

    metric = otel.collect()[QUEUE_TIME]
    assert isinstance(metric.data, Histogram)
    assert metric.unit == "s"
    assert metric.description
    data_point = point(metric, {POOL_NAME: "primary"})
    assert data_point.count == 3
    assert data_point.sum == pytest.approx(1.75)
    assert (data_point.min, data_point.max) == (0.0, 1.5)
    assert tuple(data_point.explicit_bounds) == DURATION_BUCKETS


def test_a_sampled_request_records_at_once_with_its_trace_as_exemplar(otel: Otel, guard_on: GuardFactory) -> None:
    guard = guard_on()
    with otel.tracer.start_as_current_span("GET /orders") as request_span:
        guard.request_scope("/orders", queued=0.2).open().close()
        trace_id = request_span.get_span_context().trace_id
    assert not guard.gate.telemetry._queued

    data_point = point(otel.collect()[QUEUE_TIME], {POOL_NAME: "primary"})
    assert data_point.count == 1
    assert [exemplar.trace_id for exemplar in data_point.exemplars] == [trace_id]


def test_a_flask_request_with_the_header_records_its_queue_time(otel: Otel, guard_on: GuardFactory) -> None:
    guard = guard_on()
    app = Flask(__name__)
    PoolGuard(app, guard, trust_request_start=True)

    @app.get("/db")
    def with_db() -> str:
        db.execute(text("SELECT 1"))
        return "ok"

    client = app.test_client()
    assert client.get("/db", headers={"X-Request-Start": arrived(0.3)}).status_code == 200
    assert client.get("/db", headers={"X-Request-Start": "garbage"}).status_code == 200
    assert client.get("/db").status_code == 200

    data_point = point(otel.collect()[QUEUE_TIME], {POOL_NAME: "primary"})
    assert data_point.count == 1
    assert 0.3 <= data_point.sum < 5.0


def test_prometheus_exposes_the_queue_time(guard_on: GuardFactory) -> None:
    registry = CollectorRegistry()
    guard = guard_on()
    poolguard.prometheus.register(guard, registry)
    empty = {f.name: f for f in text_string_to_metric_families(generate_latest(registry).decode())}
    assert empty["poolguard_request_queue_time_seconds"].type == "histogram"

    for queued in (0.03, 2.0):
        guard.request_scope("/orders", queued=queued).open().close()
    guard.request_scope("/orders").open().close()

    exposition = generate_latest(registry).decode()
    assert "# TYPE poolguard_request_queue_time_seconds histogram" in exposition
    samples = {
        (s.name, s.labels.get("le")): s
        for f in text_string_to_metric_families(exposition)
        if f.name == "poolguard_request_queue_time_seconds"
        for s in f.samples
    }
    assert samples["poolguard_request_queue_time_seconds_count", None].value == 2
    assert samples["poolguard_request_queue_time_seconds_count", None].labels == {"pool_name": "primary"}
    assert samples["poolguard_request_queue_time_seconds_sum", None].value == pytest.approx(2.03)
    assert samples["poolguard_request_queue_time_seconds_bucket", "0.05"].value == 1
    assert samples["poolguard_request_queue_time_seconds_bucket", "2.5"].value == 2
    assert samples["poolguard_request_queue_time_seconds_bucket", "+Inf"].value == 2
