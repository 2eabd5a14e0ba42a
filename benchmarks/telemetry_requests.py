"""Poolguard's telemetry per request, on and off in one process, requests alternating: issue 4's figure.

    .venv/bin/python benchmarks/telemetry_requests.py [--requests 20000] [--runs 2]

Two Flask apps in one process, each with its own engine (``QueuePool`` 4 + 0, psycopg, the real
PostgreSQL server) and its own ``Guard``, both serving ``GET /select1`` (one ``SELECT 1``, committed)
as the guarded app of ``apps_overhead.py`` does. The OpenTelemetry SDK is installed and samples nothing
(``TracerProvider(sampler=ALWAYS_OFF)``; a ``MeterProvider`` with a periodic reader every 60 s); the
requests run under an unsampled parent span, as under a framework instrumentation. One guard uses the
SDK (**on**); the other is given the API's no-op providers (**off**: poolguard makes no telemetry call).

Requests are made the way a WSGI server makes them (``app(environ, start_response)``, body iterated,
``close()``), alternating on/off (the order flips every pair), each timed with ``perf_counter_ns``.
Alternating single requests in one process cancels what makes server benchmarks on a shared 2-core
machine swing by several per cent (drift, CPU sharing, a process's own speed bias), so differences
of about half a per cent are resolved. The mean includes the batched recording of queued samples
(every 16th request pays for 16 requests' samples); the median shows what a typical request pays.
No server: the per-request figure lacks the HTTP server's own work, so the shares here are larger
than under gunicorn.
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import apps_overhead

APP = (
    "import os\n"
    + apps_overhead.SDK_UNSAMPLED  # the SDK sampling nothing, and TELEMETRY_OFF: as the server benchmarks have it
    + f"""
import sqlalchemy as sa
from flask import Flask

import poolguard
from poolguard.flask import PoolGuard, db

SELECT_1 = sa.text("SELECT 1")


def make(name, **options):
    engine = sa.create_engine(
        "postgresql+psycopg://{apps_overhead.PG_USER}@{apps_overhead.PG_HOST}:{apps_overhead.PG_PORT}/"
        "{apps_overhead.PG_DB}",
        pool_size=4,
        max_overflow=0,
    )
    app = Flask(name)
    PoolGuard(app, poolguard.Guard(engine, name="bench", **options))

    @app.get("/select1")
    def select1():
        return {{"one": db.execute(SELECT_1).scalar_one()}}

    return app


apps = {{"on": make("on"), "off": make("off", **TELEMETRY_OFF)}}
"""
)


def mean_and_median_us(samples_ns: list[int]) -> tuple[float, float]:
    """Per-request nanosecond samples of one side, as (mean, median) in microseconds."""
    return statistics.fmean(samples_ns) / 1e3, statistics.median(samples_ns) / 1e3


def run(apps: dict[str, Any], requests: int) -> dict[str, list[int]]:
    from wsgiref.util import setup_testing_defaults  # noqa: PLC0415

    def start_response(status: str, headers: object, exc_info: object = None) -> None:
        if not status.startswith("200"):
            raise RuntimeError(status)

    environ: dict[str, object] = {}
    setup_testing_defaults(environ)
    environ["PATH_INFO"] = apps_overhead.ROUTE

    def call(app: Any) -> None:
        body = app(dict(environ), start_response)
        for _ in body:
            pass
        body.close()

    for _ in range(300):
        call(apps["on"])
        call(apps["off"])
    times: dict[str, list[int]] = {"on": [], "off": []}
    clock = time.perf_counter_ns
    for i in range(requests):
        for side in ("on", "off") if i % 2 else ("off", "on"):
            app = apps[side]
            start = clock()
            call(app)
            times[side].append(clock() - start)
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=20_000, help="requests per side and run")
    parser.add_argument("--runs", type=int, default=2)
    args = parser.parse_args()
    from opentelemetry import trace  # noqa: PLC0415

    with tempfile.TemporaryDirectory(prefix="poolguard-telemetry-") as tmp:
        (Path(tmp) / "bench_telemetry_pair.py").write_text(textwrap.dedent(APP).lstrip())
        sys.path.insert(0, tmp)
        apps = importlib.import_module("bench_telemetry_pair").apps
        print("| run | off median µs | on median µs | median overhead | off mean µs | on mean µs | mean overhead |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        with trace.get_tracer("bench").start_as_current_span("GET /select1"):
            for number in range(1, args.runs + 1):
                times = run(apps, args.requests)
                off_mean, off_median = mean_and_median_us(times["off"])
                on_mean, on_median = mean_and_median_us(times["on"])
                print(
                    f"| {number} | {off_median:.1f} | {on_median:.1f} | {(on_median / off_median - 1) * 100:+.2f} % "
                    f"| {off_mean:.1f} | {on_mean:.1f} | {(on_mean / off_mean - 1) * 100:+.2f} % |",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
