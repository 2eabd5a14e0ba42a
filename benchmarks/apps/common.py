"""What the benchmark apps share: the database, the query, the variants and their OpenTelemetry set-ups.

(The outage and overload benchmarks, ``benchmarks.outage`` and ``benchmarks.overload``, serve other
routes of the same apps: see ``outage_app``.)

Every app has one route, ``GET /select1``: one ``SELECT 1``, committed, answered ``{"one": 1}``. It is
the cheapest route there is, so whatever poolguard adds is as large a share of it as it can be.
Each variant has its own engine (or Django alias) on the same pool settings, built with plain
``sqlalchemy.create_engine`` on every side, so ``poolguard.create_engine``'s production defaults
(pre-ping and the rest) stay out of the comparison; a guard is ``poolguard.Guard(engine, name="bench")``
with poolguard's defaults.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from opentelemetry import metrics, trace
from opentelemetry.util.types import Attributes

PG_ADDRESS = "root@127.0.0.1:5432/test"
SYNC_URL = f"postgresql+psycopg://{PG_ADDRESS}"
ASYNC_URL = f"postgresql+asyncpg://{PG_ADDRESS}"
SELECT_1 = sa.text("SELECT 1")

WORK_SQL = "SELECT pg_sleep(0.01)"
"""The outage benchmark's database route (``GET /db``): a 10 ms query, what a modest request waits on the database."""
WORK = sa.text(WORK_SQL)

HOLD_SECONDS = float(os.environ.get("BENCH_HOLD_SECONDS", "0.05"))
"""How long the overload benchmark's route (``GET /work``) holds its connection: ``BENCH_HOLD_SECONDS``, 50 ms."""
HOLD_SQL = f"SELECT pg_sleep({HOLD_SECONDS!r})"
"""``GET /work``'s query: it holds a connection for ``HOLD_SECONDS`` and costs the database no CPU, so a
pool of N connections serves at most N / ``HOLD_SECONDS`` requests per second however busy the cores are."""
HOLD = sa.text(HOLD_SQL)


def sync_url(port: int) -> str:
    """The benchmark database on ``port`` (the outage benchmark's TCP proxy), with psycopg."""
    return f"postgresql+psycopg://root@127.0.0.1:{port}/test"


def async_url(port: int) -> str:
    """The benchmark database on ``port``, with asyncpg."""
    return f"postgresql+asyncpg://root@127.0.0.1:{port}/test"


COMPARISONS = {
    "poolguard": ("bare", "guarded"),
    "telemetry": ("off", "own", "sdk", "bare", "otel"),
}
"""The variants one server serves side by side. ``otel`` comes last: building it instruments SQLAlchemy.

- bare:    no poolguard; the route through a plain session (Flask, FastAPI) or Django's cursor;
- guarded: poolguard wired in as the examples do it (``PoolGuard`` + ``db``, the middleware +
           ``DbSession``, ``poolguard.django``), no OpenTelemetry SDK in the process;
- off:     guarded, the guard given the API's no-op providers: poolguard makes no telemetry call;
- own:     guarded, the guard's meter provider hands out histograms whose ``record`` does nothing:
           poolguard does all its telemetry work (the span decision, the route, the queueing, the
           flush loop) but the SDK records nothing;
- sdk:     guarded, the guard on the SDK (sampling nothing, a metric reader), as a service has it;
- otel:    bare, with ``opentelemetry-instrumentation-sqlalchemy`` on its engine: what users would
           install instead.

The telemetry variants all run with the SDK installed and each request under a span of its own,
unsampled (or sampled, ``--sampled``), as a framework instrumentation makes one (``benchmarks.apps.measure``).
"""


def variants(framework: str, compare: str) -> tuple[str, ...]:
    """Django has no SQLAlchemy engine to instrument: its telemetry comparison is poolguard's own."""
    if framework == "django" and compare == "telemetry":
        return ("off", "own", "sdk")
    return COMPARISONS[compare]


class _DroppedHistogram(metrics.NoOpHistogram):
    def record(self, amount: float, attributes: Attributes = None, context: Any = None) -> None:
        """Nothing: the call is poolguard's work, what the SDK would do with it is not."""


class _RecordlessMeter(metrics.NoOpMeter):
    def create_histogram(self, name: str, unit: str = "", description: str = "", **advisory: Any) -> metrics.Histogram:
        return _DroppedHistogram(name, unit=unit, description=description)


class RecordlessMeterProvider(metrics.MeterProvider):
    """Not the API's no-op provider (poolguard would then make no call at all), but records nothing."""

    def get_meter(
        self, name: str, version: str | None = None, schema_url: str | None = None, attributes: Attributes = None
    ) -> metrics.Meter:
        return _RecordlessMeter(name, version=version, schema_url=schema_url)


def guard_options(variant: str) -> dict[str, Any]:
    """The ``Guard`` keyword arguments of a guarded variant (poolguard's defaults for the rest)."""
    if variant == "off":
        return {"tracer_provider": trace.NoOpTracerProvider(), "meter_provider": metrics.NoOpMeterProvider()}
    if variant == "own":
        return {"meter_provider": RecordlessMeterProvider()}
    return {}


def install_sdk(*, sampled: bool = False) -> None:
    """The OpenTelemetry SDK as a service exporting over OTLP has it, sampling nothing by default.

    ``TracerProvider(sampler=ALWAYS_OFF)``, and a ``MeterProvider`` whose periodic reader collects
    every 60 s (to an exporter writing to /dev/null), so records are aggregated as in production.
    ``sampled``: every trace sampled instead, its spans batched (off the requests' threads) to an
    exporter that drops them.
    """
    from opentelemetry.sdk.metrics import MeterProvider  # noqa: PLC0415
    from opentelemetry.sdk.metrics.export import ConsoleMetricExporter, PeriodicExportingMetricReader  # noqa: PLC0415
    from opentelemetry.sdk.trace import ReadableSpan, TracerProvider  # noqa: PLC0415
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult  # noqa: PLC0415
    from opentelemetry.sdk.trace.sampling import ALWAYS_OFF  # noqa: PLC0415

    class DropSpans(SpanExporter):
        def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    if sampled:
        tracer_provider = TracerProvider()
        tracer_provider.add_span_processor(BatchSpanProcessor(DropSpans()))
    else:
        tracer_provider = TracerProvider(sampler=ALWAYS_OFF)
    trace.set_tracer_provider(tracer_provider)
    exporter = ConsoleMetricExporter(out=open(os.devnull, "w"))  # noqa: SIM115 (for the process's life)
    reader = PeriodicExportingMetricReader(exporter, export_interval_millis=60_000)
    metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))


def instrument_sqlalchemy(engine: sa.Engine) -> None:
    """``opentelemetry-instrumentation-sqlalchemy`` on ``engine``, as its documentation sets it up.

    Its ``instrument()`` wraps ``Engine.connect`` for every engine in the process (a ``connect``
    span per call); that wrapper is moved onto this one engine, so the variants served beside it
    stay uninstrumented while this engine keeps all it would have.
    """
    from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor  # noqa: PLC0415
    from opentelemetry.instrumentation.utils import unwrap  # noqa: PLC0415

    # skip_dep_check: the instrumentation declares SQLAlchemy < 2.1 and otherwise does nothing on 2.1.
    SQLAlchemyInstrumentor().instrument(engine=engine, skip_dep_check=True)
    connect = vars(sa.Engine)["connect"]
    if not hasattr(connect, "__wrapped__"):
        raise RuntimeError("opentelemetry-instrumentation-sqlalchemy did not instrument the engine")
    unwrap(sa.Engine, "connect")
    engine.connect = connect.__get__(engine, sa.Engine)  # type: ignore[method-assign]
