"""What ``benchmarks.outage`` and ``benchmarks.overload`` serve: one variant of one row's app, ``app``.

(WSGI or ASGI by row.) Environment: ``BENCH_ROW`` (``flask``, ``fastapi-async``, ``fastapi-sync``,
``django-pool``, ``django-persistent``), ``BENCH_VARIANT`` (``bare``, ``guarded``, ``own-engine``),
``BENCH_DB_PORT`` (the outage benchmark's TCP proxy in front of PostgreSQL, or PostgreSQL itself),
``BENCH_THREADS`` (the server's threads); the overload benchmark's ``BENCH_POOL`` (the pool's size,
the same for every variant, no overflow; unset: each variant's own default) and
``BENCH_HOLD_SECONDS`` (``GET /work``'s query, ``common.HOLD_SECONDS``).
Every app answers ``GET /db`` (a 10 ms query), ``GET /work`` (``SELECT pg_sleep(0.05)``),
``GET /nodb`` (no database) and ``GET /health/db``.
"""

from __future__ import annotations

import os
from typing import Any

ROW = os.environ["BENCH_ROW"]
VARIANT = os.environ["BENCH_VARIANT"]
PORT = int(os.environ["BENCH_DB_PORT"])
POOL = int(os.environ["BENCH_POOL"]) if os.environ.get("BENCH_POOL") else None


def _load() -> Any:
    if ROW == "flask":
        from benchmarks.apps import flask_app  # noqa: PLC0415

        return flask_app.outage(VARIANT, PORT, threads=int(os.environ["BENCH_THREADS"]), pool=POOL)
    if ROW.startswith("fastapi"):
        from benchmarks.apps import fastapi_app  # noqa: PLC0415

        return fastapi_app.outage(VARIANT, PORT, sync=ROW == "fastapi-sync", pool=POOL)
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "benchmarks.apps.django_project.outage_settings")
    from django.core.wsgi import get_wsgi_application  # type: ignore[import-untyped]  # noqa: PLC0415

    return get_wsgi_application()


app = _load()
