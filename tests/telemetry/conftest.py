"""The real OpenTelemetry SDK, in memory, handed to each Guard (the global providers are never touched).

``otel`` gives a TracerProvider whose finished spans land in an InMemorySpanExporter, and a
MeterProvider read by an InMemoryMetricReader, plus helpers to find spans and data points by name.
``guard_on`` builds engine + Guard pairs wired to it and, after the test, checks nothing is left
checked out, then closes the guards and disposes the engines.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import sqlalchemy
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader, Metric
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Tracer
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

import poolguard
from poolguard import Guard, PoolSaturated
from tests.support.clock import FakeClock, drive_the_watchdog
from tests.support.databases import PG_ASYNC_URL, PG_URL

POOL_NAME = "db.client.connection.pool.name"


@dataclass
class Otel:
    tracer_provider: TracerProvider
    exporter: InMemorySpanExporter
    meter_provider: MeterProvider
    reader: InMemoryMetricReader
    tracer: Tracer = field(init=False)

    def __post_init__(self) -> None:
        self.tracer = self.tracer_provider.get_tracer("tests.telemetry")

    def spans(self, name: str | None = None) -> list[ReadableSpan]:
        return [s for s in self.exporter.get_finished_spans() if name is None or s.name == name]

    def span(self, name: str) -> ReadableSpan:
        found = self.spans(name)
        assert len(found) == 1, f"expected one span {name!r}, got {[s.name for s in self.spans()]}"
        return found[0]

    def collect(self) -> dict[str, Metric]:
        """Every metric of the ``poolguard`` meter, by name (one collection)."""
        data = self.reader.get_metrics_data()
        metrics: dict[str, Metric] = {}
        if data is None:
            return metrics
        for resource_metrics in data.resource_metrics:
            for scope_metrics in resource_metrics.scope_metrics:
                if scope_metrics.scope.name != "poolguard":
                    continue
                for metric in scope_metrics.metrics:
                    metrics[metric.name] = metric
        return metrics


def points(metric: Metric, **attributes: str) -> list[Any]:
    """The data points whose attributes include ``attributes`` (keys with dots spelled as given)."""
    return [p for p in metric.data.data_points if all(p.attributes.get(k) == v for k, v in attributes.items())]


def point(metric: Metric, attributes: dict[str, str]) -> Any:
    """The one data point with exactly ``attributes``."""
    found = [p for p in metric.data.data_points if dict(p.attributes) == attributes]
    assert len(found) == 1, (
        f"{metric.name}: no single point {attributes} in {[dict(p.attributes) for p in metric.data.data_points]}"
    )
    return found[0]


@pytest.fixture
def otel() -> Iterator[Otel]:
    exporter = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    reader = InMemoryMetricReader()
    meter_provider = MeterProvider(metric_readers=[reader])
    yield Otel(tracer_provider, exporter, meter_provider, reader)
    tracer_provider.shutdown()
    meter_provider.shutdown()


@pytest.fixture
def fake_clock() -> FakeClock:
    return FakeClock()


def _checked_out(engine: sqlalchemy.Engine) -> int:
    pool = engine.pool
    return pool.checkedout() if hasattr(pool, "checkedout") else 0


@pytest.fixture
def guard_on(otel: Otel) -> Iterator[Callable[..., poolguard.Guard]]:
    """``guard_on(url, name=..., engine={...}, **guard_options)``: a sync engine + a Guard wired to ``otel``."""
    made: list[tuple[poolguard.Guard, sqlalchemy.Engine]] = []

    def factory(url: str = PG_URL, *, engine: dict[str, Any] | None = None, **options: Any) -> poolguard.Guard:
        sa_engine = sqlalchemy.create_engine(url, **{"pool_size": 2, "max_overflow": 0, **(engine or {})})
        options.setdefault("tracer_provider", otel.tracer_provider)
        options.setdefault("meter_provider", otel.meter_provider)
        guard = poolguard.Guard(sa_engine, **drive_the_watchdog(options))
        made.append((guard, sa_engine))
        return guard

    yield factory
    problems = [f"{g.name}: {_checked_out(e)} checked out" for g, e in made if _checked_out(e)]
    for guard, sa_engine in made:
        guard.close()
        sa_engine.dispose()
    assert not problems, problems


@pytest.fixture
async def async_guard_on(otel: Otel) -> AsyncIterator[Callable[..., poolguard.Guard]]:
    """The asyncio form of ``guard_on`` (asyncpg by default)."""
    made: list[tuple[poolguard.Guard, AsyncEngine]] = []

    def factory(url: str = PG_ASYNC_URL, *, engine: dict[str, Any] | None = None, **options: Any) -> poolguard.Guard:
        sa_engine = create_async_engine(url, **{"pool_size": 2, "max_overflow": 0, **(engine or {})})
        options.setdefault("tracer_provider", otel.tracer_provider)
        options.setdefault("meter_provider", otel.meter_provider)
        guard = poolguard.Guard(sa_engine, **drive_the_watchdog(options))
        made.append((guard, sa_engine))
        return guard

    yield factory
    problems = [f"{g.name}: {_checked_out(e.sync_engine)} checked out" for g, e in made if _checked_out(e.sync_engine)]
    for guard, sa_engine in made:
        guard.close()
        await sa_engine.dispose()
    assert not problems, problems


def saturate(guard: Guard, *, users: int, route: str, hold: float) -> list[str]:
    """``users`` threads start a request at once, each holding a connection ``hold`` seconds on PostgreSQL.

    Returns each request's outcome: "ok" or "saturated" (PoolSaturated).
    """
    barrier = threading.Barrier(users)
    results: list[str] = []
    lock = threading.Lock()

    def request() -> None:
        barrier.wait()
        try:
            with guard.request_scope(route=route) as scope:
                scope.session.execute(text("SELECT pg_sleep(:hold)"), {"hold": hold})
            outcome = "ok"
        except PoolSaturated:
            outcome = "saturated"
        with lock:
            results.append(outcome)

    threads = [threading.Thread(target=request) for _ in range(users)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    return results
