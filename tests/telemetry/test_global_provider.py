"""Guards made before the application installs the OpenTelemetry SDK still report every pool and trace.

The global provider is process-wide and can be set once, so this runs in a child interpreter.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import json, sqlalchemy
    from opentelemetry import metrics, trace
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from poolguard import Guard

    engines = [sqlalchemy.create_engine("sqlite://", poolclass=sqlalchemy.pool.QueuePool) for _ in range(2)]
    guards = [Guard(engine, name=name) for engine, name in zip(engines, ("a", "b"))]
    reader = InMemoryMetricReader()
    metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))
    exporter = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(tracer_provider)
    with trace.get_tracer("app").start_as_current_span("GET /"):
        for guard in guards:
            with guard.connection() as connection:
                connection.exec_driver_sql("SELECT 1")
    pools = {}
    for resource in reader.get_metrics_data().resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                pools[metric.name] = sorted(
                    {p.attributes["db.client.connection.pool.name"] for p in metric.data.data_points}
                )
    for guard, engine in zip(guards, engines):
        guard.close()
        engine.dispose()
    pools["spans"] = sorted(span.name for span in exporter.get_finished_spans())
    print(json.dumps(pools))
    """
)


def test_guards_made_before_the_sdk_is_installed_all_report_and_trace():
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60, check=True)
    pools = json.loads(result.stdout)
    for name in ("db.client.connection.count", "db.client.connection.max", "db.client.connection.wait_time"):
        assert pools.get(name) == ["a", "b"], (name, pools.get(name))
    assert pools["spans"] == ["GET /", "checkout a", "checkout b"]
