"""Without an OpenTelemetry SDK (the API's default global providers) a Guard works and makes no spans."""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy
from opentelemetry import metrics, trace
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags
from sqlalchemy import text

from poolguard import Guard


@pytest.fixture
def global_providers_are_defaults() -> None:
    # No test in this suite sets the global providers in-process (those that must run in a child
    # process); if one ever does, this test must say so rather than pass without checking anything.
    assert isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider), "a test set a global TracerProvider"
    assert type(metrics.get_meter_provider()).__name__ == "_ProxyMeterProvider", "a test set a global MeterProvider"


@pytest.mark.usefixtures("global_providers_are_defaults")
def test_guard_works_and_makes_no_span_without_an_sdk(tmp_path: Path):
    engine = sqlalchemy.create_engine(f"sqlite:///{tmp_path / 'nosdk.db'}", pool_size=2, max_overflow=0)
    guard = Guard(engine)
    try:
        sampled_remote = SpanContext(
            trace_id=0x4BF92F3577B34DA6A3CE929D0E0E4736,
            span_id=0x00F067AA0BA902B7,
            is_remote=True,
            trace_flags=TraceFlags(TraceFlags.SAMPLED),
        )
        for parent in (trace.INVALID_SPAN, NonRecordingSpan(sampled_remote)):
            with trace.use_span(parent):
                with guard.request_scope(route="/x") as scope:
                    assert scope.session.execute(text("SELECT 1")).scalar() == 1
                assert not guard.gate.telemetry.start_checkout().is_recording()
        assert guard.stats().checkouts == 2
    finally:
        guard.close()
        engine.dispose()
