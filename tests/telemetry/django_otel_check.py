"""Child process for test_frameworks.py: Django + DjangoInstrumentor + poolguard.django, global OTel SDK.

poolguard.django builds its Guards from settings, so they use the *global* providers, and Django's
settings are process-wide too: neither can be set inside the pytest process. Run as
``python -m tests.telemetry.django_otel_check PASSWORD PARAMETER`` from the project root; it installs
the SDK (in-memory exporter and reader) globally before ``django.setup()``, instruments Django, sends
a few requests through ``django.test.Client`` and prints one JSON document on stdout:

``{"requests": {label: {"status": int, "spans": [span, ...]}}, "metrics": {name: [point, ...]},
"exported": "<every span and metric as exported JSON>"}``
"""

from __future__ import annotations

import json
import sys
from typing import Any

from django.conf import settings
from django.db import connections
from django.http import HttpResponse, JsonResponse
from django.urls import path
from sqlalchemy import text

from poolguard.django import get_session
from tests.support.databases import DATABASE, DEAD_PORT, HOST, PG_PORT, USER, pg_url


def orders(request: Any, order_id: int) -> Any:
    """Uses the Django ORM's connection (alias ``default``) and the SQLAlchemy session, each with the secret."""
    with connections["default"].cursor() as cursor:
        cursor.execute("SELECT %s", [settings.SECRET_PARAMETER])
        (django_value,) = cursor.fetchone()
    sa_value = get_session(request).execute(text("SELECT :secret"), {"secret": settings.SECRET_PARAMETER}).scalar()
    return JsonResponse({"id": order_id, "same": django_value == sa_value == settings.SECRET_PARAMETER})


def ping(request: Any) -> Any:
    return HttpResponse("pong")


KEPT: list[Any] = []


def forgetful(request: Any, name: str) -> Any:
    """Leaves a connection of the SQLAlchemy guard open: poolguard reclaims it at the end of the request."""
    from django.apps import apps  # noqa: PLC0415

    KEPT.append(apps.get_app_config("poolguard").state.guard.engine.connect())
    return HttpResponse("ok")


def down(request: Any) -> Any:
    with connections["down"].cursor() as cursor:
        cursor.execute("SELECT 1")
    return HttpResponse("unreachable")


urlpatterns = [
    path("orders/<int:order_id>/", orders),
    path("ping/", ping),
    path("down/", down),
    path("forgetful/<str:name>/", forgetful),
]


def _span(span: Any) -> dict[str, Any]:
    parent = span.parent
    return {
        "name": span.name,
        "kind": span.kind.name,
        "scope": span.instrumentation_scope.name if span.instrumentation_scope is not None else None,
        "trace_id": format(span.context.trace_id, "032x"),
        "span_id": format(span.context.span_id, "016x"),
        "parent_id": format(parent.span_id, "016x") if parent is not None else None,
        "status": span.status.status_code.name,
        "attributes": dict(span.attributes or {}),
        "events": [{"name": event.name, "attributes": dict(event.attributes or {})} for event in span.events],
    }


def main(password: str, parameter: str) -> dict[str, Any]:
    import django  # noqa: PLC0415
    from django.apps import apps  # noqa: PLC0415
    from django.test import Client  # noqa: PLC0415
    from opentelemetry import metrics, trace  # noqa: PLC0415
    from opentelemetry.instrumentation.django import DjangoInstrumentor  # noqa: PLC0415
    from opentelemetry.sdk.metrics import MeterProvider  # noqa: PLC0415
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader  # noqa: PLC0415
    from opentelemetry.sdk.trace import TracerProvider  # noqa: PLC0415
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: PLC0415
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter  # noqa: PLC0415

    exporter = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    reader = InMemoryMetricReader()
    meter_provider = MeterProvider(metric_readers=[reader])
    trace.set_tracer_provider(tracer_provider)
    metrics.set_meter_provider(meter_provider)

    pg = {"ENGINE": "django.db.backends.postgresql", "HOST": HOST, "NAME": DATABASE, "USER": USER}
    settings.configure(
        SECRET_KEY="poolguard-tests-not-secret",
        DEBUG=False,
        ALLOWED_HOSTS=["testserver"],
        USE_TZ=True,
        ROOT_URLCONF=__name__,
        INSTALLED_APPS=["poolguard.django"],
        MIDDLEWARE=["poolguard.django.PoolGuardMiddleware"],
        DEFAULT_AUTO_FIELD="django.db.models.BigAutoField",
        LOGGING_CONFIG=None,
        # trust authentication on the test server: the password is sent and ignored, and must never be exported
        DATABASES={
            "default": {**pg, "PORT": str(PG_PORT), "PASSWORD": password},
            "down": {**pg, "PORT": str(DEAD_PORT), "PASSWORD": password, "OPTIONS": {"connect_timeout": 2}},
        },
        POOLGUARD={
            "DATABASES": ["default", "down"],
            "BREAKER": {"CONSECUTIVE_FAILURES": 1, "OPEN_FOR": 60.0},
            "SQLALCHEMY": {"URL": pg_url(password=password), "POOL_SIZE": 2},
        },
        SECRET_PARAMETER=parameter,
    )
    django.setup()
    DjangoInstrumentor().instrument(tracer_provider=tracer_provider)

    client = Client()
    requests: dict[str, dict[str, Any]] = {}
    exported: list[str] = []
    try:
        for label, url in (
            ("orders", "/orders/7/"),
            ("ping", "/ping/"),
            ("down1", "/down/"),
            ("down2", "/down/"),
            ("leak", "/forgetful/x/"),
        ):
            response = client.get(url)
            spans = exporter.get_finished_spans()
            exported.extend(span.to_json() for span in spans)
            exporter.clear()
            requests[label] = {"status": response.status_code, "spans": [_span(span) for span in spans]}
        data = reader.get_metrics_data()
        exported.append(data.to_json() if data is not None else "")
        summary: dict[str, list[dict[str, Any]]] = {}
        for resource_metrics in data.resource_metrics if data is not None else ():
            for scope_metrics in resource_metrics.scope_metrics:
                if scope_metrics.scope.name != "poolguard":
                    continue
                for metric in scope_metrics.metrics:
                    summary[metric.name] = [
                        {"attributes": dict(p.attributes), "count": getattr(p, "count", None)}
                        for p in metric.data.data_points
                    ]
    finally:
        for connection in KEPT:
            connection.close()
        DjangoInstrumentor().uninstrument()
        connections.close_all()
        state = apps.get_app_config("poolguard").state
        if state is not None:
            state.close()
        tracer_provider.shutdown()
        meter_provider.shutdown()
    return {"requests": requests, "metrics": summary, "exported": "\n".join(exported)}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], sys.argv[2])))
