"""POOLGUARD["TRACER_PROVIDER"] / ["METER_PROVIDER"]: a project's own OpenTelemetry providers reach its guards."""

from __future__ import annotations

import logging

import pytest
from django.conf import settings
from django.db.utils import ConnectionHandler
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from poolguard.django.conf import PoolGuardState, configure_settings
from poolguard.errors import ConfigError


def test_the_providers_in_settings_receive_the_spans_and_metrics_of_every_alias():
    exporter = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    reader = InMemoryMetricReader()
    meter_provider = MeterProvider(metric_readers=[reader])
    handler = ConnectionHandler(settings.DATABASES)  # its own connections: the app's state keeps watching its own
    loaded = configure_settings(
        {"DATABASES": ["default"], "TRACER_PROVIDER": tracer_provider, "METER_PROVIDER": meter_provider}
    )
    state = PoolGuardState(loaded, handler=handler)
    try:
        scopes = state.open_request(None)
        try:
            tracer = tracer_provider.get_tracer("test")
            with tracer.start_as_current_span("GET /items"), handler["default"].cursor() as cursor:
                cursor.execute("SELECT 1")
        finally:
            state.close_request(scopes)
        spans = {span.name for span in exporter.get_finished_spans()}
        assert "checkout default" in spans
        names = {
            metric.name
            for resource in reader.get_metrics_data().resource_metrics
            for scope in resource.scope_metrics
            for metric in scope.metrics
        }
        assert {"db.client.connection.wait_time", "db.client.connection.count"} <= names
    finally:
        state.close()
        handler.close_all()
        tracer_provider.shutdown()
        meter_provider.shutdown()


def test_a_provider_that_is_not_one_is_refused_at_startup():
    with pytest.raises(ConfigError, match="tracer_provider"):
        configure_settings({"TRACER_PROVIDER": "opentelemetry"})


def test_a_startup_warning_when_the_threads_do_not_outnumber_the_pool(caplog: pytest.LogCaptureFixture) -> None:
    handler = ConnectionHandler(settings.DATABASES)
    loaded = configure_settings({"DATABASES": ["pooled", "persistent"], "THREADS": 1, "CAPACITY": 1}, environ={})
    with caplog.at_level(logging.WARNING, logger="poolguard"):
        state = PoolGuardState(loaded, handler=handler)
    try:
        warned = sorted(r.getMessage().split("'")[1] for r in caplog.records if "poolguard.W008" in r.getMessage())
        assert warned == ["persistent", "pooled"]  # one thread against one connection each
    finally:
        state.close()
        handler.close_all()
