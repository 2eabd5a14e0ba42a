"""Guards made before the application installs the OpenTelemetry SDK still report every pool.

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
    from opentelemetry import metrics
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from poolguard import Guard

    engines = [sqlalchemy.create_engine("sqlite://", poolclass=sqlalchemy.pool.QueuePool) for _ in range(2)]
    guards = [Guard(engine, name=name) for engine, name in zip(engines, ("a", "b"))]
    reader = InMemoryMetricReader()
    metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))
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
    print(json.dumps(pools))
    """
)


def test_guards_made_before_the_sdk_is_installed_all_report():
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60, check=True)
    pools = json.loads(result.stdout)
    for name in ("db.client.connection.count", "db.client.connection.max", "db.client.connection.wait_time"):
        assert pools.get(name) == ["a", "b"], (name, pools.get(name))
