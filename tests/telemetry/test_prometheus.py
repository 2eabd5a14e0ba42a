"""poolguard.prometheus: the pool metrics under Prometheus names, scraped and parsed like Prometheus would."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest
from opentelemetry import metrics, trace
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample
from sqlalchemy import exc, text

import poolguard.prometheus
from poolguard import Breaker, CircuitOpen, ConfigError, Guard, PoolSaturated
from poolguard.prometheus import PoolGuardCollector
from poolguard.telemetry import DURATION_BUCKETS
from tests.support.databases import DEAD_PORT, pg_url
from tests.telemetry.conftest import POOL_NAME, Otel, point, saturate

pytestmark = pytest.mark.postgres

GuardFactory = Callable[..., Guard]

FAMILIES = {
    "db_client_connection_count": "gauge",
    "db_client_connection_max": "gauge",
    "db_client_connection_idle_max": "gauge",
    "db_client_connection_idle_min": "gauge",
    "db_client_connection_pending_requests": "gauge",
    "db_client_connection_timeouts": "counter",
    "poolguard_breaker_state": "gauge",
    "poolguard_requests_shed": "counter",
    "poolguard_connection_leaks": "counter",
    "db_client_connection_wait_time_seconds": "histogram",
    "db_client_connection_use_time_seconds": "histogram",
    "db_client_connection_create_time_seconds": "histogram",
    "poolguard_request_queue_time_seconds": "histogram",
}


class Scrape:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.text = generate_latest(registry).decode()
        self.families = {f.name: f for f in text_string_to_metric_families(self.text)}
        self.samples: list[Sample] = [s for f in self.families.values() for s in f.samples]

    def find(self, name: str, **labels: str) -> list[Sample]:
        return [s for s in self.samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]

    def value(self, name: str, **labels: str) -> float:
        found = [s for s in self.find(name, **labels) if set(s.labels) - {"le"} == set(labels) - {"le"}]
        assert len(found) == 1, f"{name}{labels}: {found}"
        return found[0].value


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


def test_names_types_and_labels_after_a_known_run(guard_on: GuardFactory, registry: CollectorRegistry):
    guard = guard_on(engine={"pool_size": 3, "max_overflow": 2})
    poolguard.prometheus.register(guard, registry)
    for _ in range(3):
        with guard.request_scope(route="/orders/{id}") as scope:
            scope.session.execute(text("SELECT 1"))
    for _ in range(2):
        with guard.connection() as connection:
            connection.execute(text("SELECT 1"))
    with guard.connection(), guard.engine.connect():
        held = Scrape(registry)
    scrape = Scrape(registry)

    assert {name: f.type for name, f in scrape.families.items()} == FAMILIES
    pool = {"pool_name": "primary"}
    assert held.value("db_client_connection_count", state="used", **pool) == 2
    assert scrape.value("db_client_connection_count", state="used", **pool) == 0
    assert scrape.value("db_client_connection_count", state="idle", **pool) == 2
    assert scrape.value("db_client_connection_max", **pool) == 5
    assert scrape.value("db_client_connection_idle_max", **pool) == 3
    assert scrape.value("db_client_connection_idle_min", **pool) == 0
    assert scrape.value("db_client_connection_pending_requests", **pool) == 0
    assert scrape.value("db_client_connection_timeouts_total", **pool) == 0
    assert scrape.value("poolguard_breaker_state", **pool) == 0
    assert scrape.value("poolguard_connection_leaks_total", **pool) == 0
    assert scrape.value("poolguard_requests_shed_total", reason="pool_saturated", **pool) == 0
    assert scrape.value("poolguard_requests_shed_total", reason="circuit_open", **pool) == 0

    checkouts = guard.stats().checkouts
    assert checkouts == 7
    assert scrape.value("db_client_connection_wait_time_seconds_count", **pool) == checkouts
    assert 0 < scrape.value("db_client_connection_wait_time_seconds_sum", **pool) < 1
    buckets = scrape.find("db_client_connection_wait_time_seconds_bucket", **pool)
    assert [b.labels["le"] for b in buckets] == [*(str(float(b)) for b in DURATION_BUCKETS), "+Inf"]
    counts = [b.value for b in buckets]
    assert counts == sorted(counts)  # cumulative
    assert counts[-1] == checkouts
    route = {"pool_name": "primary", "route": "/orders/{id}"}
    assert scrape.value("db_client_connection_use_time_seconds_count", **route) == 3
    assert scrape.value("db_client_connection_use_time_seconds_count", pool_name="primary", route="") == 4
    assert scrape.value("db_client_connection_create_time_seconds_count", **pool) == guard.stats().connections_created
    assert "# HELP db_client_connection_wait_time_seconds " in scrape.text


def test_saturation_run_timeouts_and_sheds(guard_on: GuardFactory, registry: CollectorRegistry):
    guard = guard_on(max_wait=0.2)
    poolguard.prometheus.register(guard, registry)
    results = saturate(guard, users=10, route="/slow", hold=0.4)
    saturated = results.count("saturated")
    assert saturated >= 5
    scrape = Scrape(registry)
    assert scrape.value("db_client_connection_timeouts_total", pool_name="primary") == saturated
    assert scrape.value("poolguard_requests_shed_total", pool_name="primary", reason="pool_saturated") == saturated
    assert scrape.value("db_client_connection_wait_time_seconds_count", pool_name="primary") == results.count("ok")
    slow = {"pool_name": "primary", "route": "/slow"}
    assert scrape.value("db_client_connection_use_time_seconds_count", **slow) == results.count("ok")
    assert scrape.value("db_client_connection_use_time_seconds_bucket", le="0.25", **slow) == 0


def test_breaker_open_is_state_2_and_sheds_count_by_reason(guard_on: GuardFactory, registry: CollectorRegistry):
    guard = guard_on(pg_url(port=DEAD_PORT), breaker=Breaker(consecutive_failures=1, open_for=60))
    poolguard.prometheus.register(guard, registry)
    with pytest.raises(exc.OperationalError), guard.connection():
        pass
    for _ in range(4):
        with pytest.raises(CircuitOpen), guard.connection():
            pass
    scrape = Scrape(registry)
    assert scrape.value("poolguard_breaker_state", pool_name="primary") == 2
    assert scrape.value("poolguard_requests_shed_total", pool_name="primary", reason="circuit_open") == 4
    assert scrape.value("poolguard_requests_shed_total", pool_name="primary", reason="pool_saturated") == 0
    assert scrape.find("db_client_connection_wait_time_seconds_count") == []


def test_guard_without_breaker_has_no_breaker_series(guard_on: GuardFactory, registry: CollectorRegistry):
    guard = guard_on(breaker=False)
    poolguard.prometheus.register(guard, registry)
    assert Scrape(registry).find("poolguard_breaker_state") == []


def test_one_collector_per_registry_serves_every_guard(guard_on: GuardFactory, registry: CollectorRegistry):
    primary = guard_on(name="primary")
    replica = guard_on(name="replica", engine={"pool_size": 4})
    collector = poolguard.prometheus.register(primary, registry)
    assert poolguard.prometheus.register(replica, registry) is collector
    assert poolguard.prometheus.register(replica, registry) is collector  # idempotent
    assert collector.guards == [primary, replica]
    with replica.connection():
        pass
    scrape = Scrape(registry)
    assert scrape.value("db_client_connection_max", pool_name="primary") == 2
    assert scrape.value("db_client_connection_max", pool_name="replica") == 4
    assert scrape.value("db_client_connection_wait_time_seconds_count", pool_name="replica") == 1
    assert scrape.find("db_client_connection_wait_time_seconds_count", pool_name="primary") == []

    replica.close()
    scrape = Scrape(registry)
    assert {s.labels["pool_name"] for s in scrape.samples} == {"primary"}
    poolguard.prometheus.unregister(primary, registry)
    assert Scrape(registry).samples == []


def test_two_guards_with_one_name_are_refused(guard_on: GuardFactory, registry: CollectorRegistry):
    poolguard.prometheus.register(guard_on(name="db"), registry)
    with pytest.raises(ConfigError, match="pool_name"):
        poolguard.prometheus.register(guard_on(name="db"), registry)


def test_a_second_collector_with_the_same_names_is_refused_by_the_registry(
    guard_on: GuardFactory, registry: CollectorRegistry
):
    registry.register(PoolGuardCollector(guard_on(name="a")))
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        registry.register(PoolGuardCollector(guard_on(name="b")))


def test_opentelemetry_and_prometheus_count_the_same_events(
    otel: Otel, guard_on: GuardFactory, registry: CollectorRegistry
):
    guard = guard_on()
    poolguard.prometheus.register(guard, registry)
    other = CollectorRegistry()
    poolguard.prometheus.register(guard, other)  # a second registry shares the same histograms
    for _ in range(5):
        with guard.request_scope(route="/r") as scope:
            scope.session.execute(text("SELECT 1"))
    metrics = otel.collect()
    wait = point(metrics["db.client.connection.wait_time"], {POOL_NAME: "primary"})
    scrape = Scrape(registry)
    assert scrape.value("db_client_connection_wait_time_seconds_count", pool_name="primary") == wait.count == 5
    assert scrape.value("db_client_connection_wait_time_seconds_sum", pool_name="primary") == pytest.approx(wait.sum)
    assert Scrape(other).value("db_client_connection_wait_time_seconds_count", pool_name="primary") == 5
    use = point(metrics["db.client.connection.use_time"], {POOL_NAME: "primary", "http.route": "/r"})
    assert scrape.value("db_client_connection_use_time_seconds_count", pool_name="primary", route="/r") == use.count


async def test_async_engine(async_guard_on: GuardFactory, registry: CollectorRegistry):
    guard = async_guard_on(max_wait=0.2)
    poolguard.prometheus.register(guard, registry)

    async def request() -> str:
        try:
            async with guard.request_scope(route="/slow") as scope:
                await scope.session.execute(text("SELECT pg_sleep(0.4)"))
        except PoolSaturated:
            return "saturated"
        return "ok"

    results = await asyncio.gather(*(request() for _ in range(6)))
    scrape = Scrape(registry)
    assert scrape.value("db_client_connection_timeouts_total", pool_name="primary") == results.count("saturated") >= 3
    assert scrape.value("db_client_connection_wait_time_seconds_count", pool_name="primary") == results.count("ok")
    assert scrape.value("db_client_connection_create_time_seconds_count", pool_name="primary") >= 1


def test_opentelemetry_turned_off_leaves_prometheus_counting(
    guard_on: GuardFactory, registry: CollectorRegistry, otel: Otel
):
    """The no-op providers switch off poolguard's OpenTelemetry output only: Prometheus still sees every event."""
    guard = guard_on(tracer_provider=trace.NoOpTracerProvider(), meter_provider=metrics.NoOpMeterProvider())
    poolguard.prometheus.register(guard, registry)
    with otel.tracer.start_as_current_span("GET /orders/{id}"):  # a sampled request span: still no checkout span
        for _ in range(3):
            with guard.request_scope(route="/orders/{id}") as scope:
                scope.session.execute(text("SELECT 1"))
    scrape = Scrape(registry)
    pool = {"pool_name": "primary"}
    assert scrape.value("db_client_connection_wait_time_seconds_count", **pool) == 3
    assert scrape.value("db_client_connection_use_time_seconds_count", pool_name="primary", route="/orders/{id}") == 3
    assert scrape.value("db_client_connection_count", state="idle", **pool) == 1
    assert [s.name for s in otel.spans()] == ["GET /orders/{id}"]
    data = otel.reader.get_metrics_data()
    exported = [m.name for rm in data.resource_metrics for sm in rm.scope_metrics for m in sm.metrics] if data else []
    assert exported == []
