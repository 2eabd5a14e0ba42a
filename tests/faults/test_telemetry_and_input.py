"""An unreachable OTLP collector never slows requests; bad input fails at startup, never later.

The collector is a black hole (a TcpProxy that accepts and never answers) behind the real OTLP/HTTP
exporters, batched as the OpenTelemetry SDK recommends; a second span processor whose export always
fails runs beside it. The spans poolguard makes are counted in memory, so the test knows they exist.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator, Sequence

import flask
import pytest
from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from starlette.applications import Starlette

import poolguard
from poolguard import Breaker, ConfigError
from poolguard.flask import PoolGuard
from poolguard.starlette import PoolGuardMiddleware
from tests.faults.apps import serve
from tests.faults.helpers import SECRET, Fleet, assert_clean
from tests.support.asgi import start
from tests.support.pgcluster import PgCluster, free_port
from tests.support.tcpproxy import TcpProxy

pytestmark = pytest.mark.postgres


class FailingExporter(SpanExporter):
    """Every export fails (a collector that answers 500s)."""

    def __init__(self) -> None:
        self.calls = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.calls += 1
        return SpanExportResult.FAILURE

    def shutdown(self) -> None:
        """Nothing held."""


@pytest.fixture
def collector() -> Iterator[str]:
    """An OTLP/HTTP endpoint that accepts connections and never answers."""
    with TcpProxy(("127.0.0.1", free_port())) as hole:
        hole.blackhole()
        yield f"http://127.0.0.1:{hole.port}"


async def test_unreachable_collector_never_slows_requests(cluster: PgCluster, fleet: Fleet, collector: str) -> None:
    memory = InMemorySpanExporter()
    failing = FailingExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(
        BatchSpanProcessor(OTLPSpanExporter(endpoint=f"{collector}/v1/traces", timeout=1), schedule_delay_millis=50)
    )
    tracer_provider.add_span_processor(BatchSpanProcessor(failing, schedule_delay_millis=50))
    tracer_provider.add_span_processor(SimpleSpanProcessor(memory))
    reader = PeriodicExportingMetricReader(
        OTLPMetricExporter(endpoint=f"{collector}/v1/metrics", timeout=1), export_interval_millis=100
    )
    meter_provider = MeterProvider(metric_readers=[reader])
    engine = fleet.engine(cluster.url(password=SECRET), pool_size=2, max_overflow=0)
    guard = fleet.guard(engine, tracer_provider=tracer_provider, meter_provider=meter_provider)
    tracer = tracer_provider.get_tracer("test")
    seconds: list[float] = []
    try:
        async with serve("flask", guard, "unused") as call:
            for _ in range(60):
                with tracer.start_as_current_span("GET /one"):  # a sampled parent: poolguard makes its spans
                    reply = await call("GET", "/one")
                assert reply.status == 200
                seconds.append(reply.seconds)
                await asyncio.sleep(0.005)  # lets the exporters' threads try (and hang) meanwhile
    finally:
        started = time.monotonic()
        tracer_provider.shutdown()
        meter_provider.shutdown(timeout_millis=3000)
        shutdown = time.monotonic() - started
    seconds.sort()
    assert seconds[-3] < 0.25, f"p95 {seconds[-3]:.3f}s with a hung collector"
    assert sum(seconds) / len(seconds) < 0.1
    assert any(span.name.startswith("checkout ") for span in memory.get_finished_spans())
    assert failing.calls > 0
    assert shutdown < 10.0
    assert_clean(cluster, engine)


# --- bad input -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [
        {"pool_size": -1},
        {"workers": 0},
        {"connect_timeout": 0},
        {"statement_timeout": -5},
        {"pool_timeout": "soon"},
        {"service_name": 42},
    ],
)
@pytest.mark.parametrize("maker", ["create_engine", "create_async_engine"])
def test_bad_engine_options_are_config_errors(cluster: PgCluster, maker: str, options: dict[str, object]) -> None:
    driver = "asyncpg" if maker == "create_async_engine" else "psycopg"
    with pytest.raises(ConfigError) as raised:
        getattr(poolguard, maker)(cluster.url(driver, password=SECRET), **options)
    message = str(raised.value)
    assert next(iter(options)) in message
    assert SECRET not in message


@pytest.mark.parametrize(
    "options",
    [{"max_wait": -1}, {"leak_threshold": 0}, {"name": ""}, {"breaker": "yes"}, {"ping_timeout": 0}],
)
def test_bad_guard_options_are_config_errors(cluster: PgCluster, fleet: Fleet, options: dict[str, object]) -> None:
    engine = fleet.engine(cluster.url(password=SECRET))
    with pytest.raises(ConfigError) as raised:
        fleet.guard(engine, **options)
    assert SECRET not in str(raised.value)


@pytest.mark.parametrize(
    "options", [{"failure_rate": 2.0}, {"open_for": -1.0}, {"window_size": 0}, {"half_open_calls": "3"}]
)
def test_bad_breaker_options_are_config_errors(options: dict[str, object]) -> None:
    with pytest.raises(ConfigError, match=next(iter(options))):
        Breaker(**options)  # type: ignore[arg-type]


def test_bad_adapter_options_fail_at_startup(cluster: PgCluster, fleet: Fleet) -> None:
    guard = fleet.guard(fleet.engine(cluster.url(password=SECRET)))
    app = flask.Flask(__name__)
    app.config["POOLGUARD_HEALTH_DETAIL"] = "sometimes"
    with pytest.raises(ConfigError, match=r"(?i)health_detail"):
        PoolGuard(app, guard)
    with pytest.raises(ConfigError, match="health_pth"):
        start(PoolGuardMiddleware(Starlette(), guard=guard, health_pth="/x"))  # type: ignore[call-arg]
    with pytest.raises(ConfigError) as raised:
        start(PoolGuardMiddleware(Starlette(), guard=guard, health_token=SECRET, health_detail="bogus"))
    assert SECRET not in str(raised.value)
    with pytest.raises(ConfigError):
        poolguard.retry(attempts=0)


def test_malformed_url_does_not_echo_the_password() -> None:
    with pytest.raises(Exception) as raised:  # noqa: PT011 - SQLAlchemy's own error for a bad URL
        poolguard.create_engine(f"postgresql+psycopg://app:{SECRET}@127.0.0.1:notaport/faults")
    assert SECRET not in str(raised.value)
