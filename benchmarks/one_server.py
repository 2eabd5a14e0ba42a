"""Two variants of one app in one server process, requests alternating: what poolguard or its telemetry costs.

    .venv/bin/python benchmarks/one_server.py --compare poolguard --framework flask|fastapi|django
        [--setup minimal|example] [--duration 20] [--runs 3]
    .venv/bin/python benchmarks/one_server.py --compare telemetry --framework flask|fastapi|django

``--compare poolguard`` (issue 3): the **bare** and **guarded** apps of ``apps_overhead.py`` (one
route, ``GET /select1``: one ``SELECT 1``, committed), each with its own engine or Django alias on the
same pool settings. Django: one project with two aliases on Django's psycopg pool (min = max = 4
each); ``poolguard.django`` guards ``default`` only, and the bare side is a second ``WSGIHandler``
built with poolguard's middleware left out of ``MIDDLEWARE`` and querying the unguarded alias.
``--setup example`` gives both Django sides ``ATOMIC_REQUESTS`` and ``CommonMiddleware``, as
``examples/django_project`` has them.

``--compare telemetry`` (issue 4): two guarded apps with the OpenTelemetry SDK installed and sampling
nothing; **on** uses it, **off** is given the API's no-op providers (poolguard makes no telemetry
call). Django has one POOLGUARD per process, so its **off** alias's guard has its telemetry switched
off after start-up, as the no-op providers do (its ``tracing``/``metering`` flags cleared, for good).

Either way **one** server process serves ``/<side>/select1`` for both sides: gunicorn (gthread, 1
worker x 4 threads) for Flask and Django, with ``wrk`` on 16 connections; uvicorn (one asyncio loop)
for FastAPI, with ``wrk`` on one connection, so that one request's await points never let another
request's work into its measurement (the wrapper holds each response back until the app has
returned, so an app's work after sending it does not overlap the next request either). wrk
alternates the two paths request by request, so both sides run interleaved under the same load,
threads, GIL and CPU sharing. A small WSGI (or ASGI) wrapper in the server measures each request's
thread CPU time (``time.thread_time_ns``: user and system time of the thread that served it, not
time spent waiting for the GIL or the database) around the app call, the body and ``close()``; that
is where all of poolguard's work happens. The whole server's CPU time per request (from /proc, HTTP
parsing and writing included) is the denominator: the overhead is the difference of the two sides'
mean app CPU per request, as a share of what a request costs the server, which is the share of
requests per second the service loses when CPU-bound.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import apps_overhead
import telemetry_requests

COMPARISONS = {"poolguard": ("bare", "guarded"), "telemetry": ("off", "on")}

DJANGO_DATABASE = f"""
_DATABASE = {{
    "ENGINE": "django.db.backends.postgresql",
    "HOST": "{apps_overhead.PG_HOST}", "PORT": "{apps_overhead.PG_PORT}", "NAME": "{apps_overhead.PG_DB}",
    "USER": "{apps_overhead.PG_USER}", "CONN_MAX_AGE": 0,
    "OPTIONS": {{"pool": {{"min_size": 4, "max_size": 4, "timeout": 10}}}},
}}
"""

DJANGO_SETTINGS = (
    DJANGO_DATABASE
    + """
SECRET_KEY = "benchmark-only"
DEBUG = False
ALLOWED_HOSTS = ["*"]
ROOT_URLCONF = "bench_pair"
USE_TZ = True
LOGGING_CONFIG = None
INSTALLED_APPS = ["poolguard.django"]
MIDDLEWARE = ["poolguard.django.PoolGuardMiddleware"]
"""
)

DJANGO_POOLGUARD_SETTINGS = (
    DJANGO_SETTINGS
    + """
DATABASES = {"default": dict(_DATABASE), "bare": dict(_DATABASE)}
POOLGUARD = {"DATABASES": ["default"], "THREADS": 4}
"""
)

DJANGO_TELEMETRY_SETTINGS = (
    "import os\n"
    + apps_overhead.SDK_UNSAMPLED
    + DJANGO_SETTINGS
    + """
DATABASES = {"default": dict(_DATABASE), "off": dict(_DATABASE)}
POOLGUARD = {"DATABASES": ["default", "off"], "THREADS": 4}
"""
)

DJANGO_EXAMPLE_SETUP = """
# --setup example: what examples/django_project sets besides poolguard itself, on both aliases.
for _alias in DATABASES.values():
    _alias["ATOMIC_REQUESTS"] = True
MIDDLEWARE = [*MIDDLEWARE, "django.middleware.common.CommonMiddleware"]
"""

DJANGO_VIEWS = """
import os

os.environ["DJANGO_SETTINGS_MODULE"] = "bench_pair_settings"

from django.db import connections, transaction
from django.http import JsonResponse
from django.urls import path


def select1(alias, other):
    # ATOMIC_REQUESTS wraps a view in a transaction on every alias that sets it: each side opens its own.
    @transaction.non_atomic_requests(using=other)
    def view(request):
        with connections[alias].cursor() as cursor:
            cursor.execute("SELECT 1")
            return JsonResponse({"one": cursor.fetchone()[0]})

    return view

"""

DJANGO_POOLGUARD_PAIR = (
    DJANGO_VIEWS
    + """
from django.conf import settings
from django.core.handlers.wsgi import WSGIHandler
from django.core.wsgi import get_wsgi_application
from django.test.utils import override_settings

urlpatterns = [path("guarded/select1", select1("default", "bare")), path("bare/select1", select1("bare", "default"))]

guarded = get_wsgi_application()
# The bare side: the same project without poolguard's middleware, on the alias poolguard does not guard.
with override_settings(MIDDLEWARE=[name for name in settings.MIDDLEWARE if not name.startswith("poolguard.")]):
    bare = WSGIHandler()
apps = {"bare": bare, "guarded": guarded}
"""
)

DJANGO_TELEMETRY_PAIR = (
    DJANGO_VIEWS
    + """
from django.apps import apps as django_apps
from django.core.wsgi import get_wsgi_application

urlpatterns = [path("on/select1", select1("default", "off")), path("off/select1", select1("off", "default"))]

application = get_wsgi_application()
# What the API's no-op providers do to a guard, for the one alias (POOLGUARD has one set per project).
telemetry = django_apps.get_app_config("poolguard").state.guards["off"].telemetry
telemetry._follows_global_tracing = telemetry._follows_global_metering = False
telemetry.tracing = telemetry.metering = False
apps = {"on": application, "off": application}
"""
)

FASTAPI_TELEMETRY_PAIR = (
    "import os\n"
    + apps_overhead.SDK_UNSAMPLED
    + f"""
import sqlalchemy as sa
from fastapi import FastAPI
from sqlalchemy.ext.asyncio import create_async_engine

import poolguard
from poolguard.fastapi import DbSession, PoolGuardMiddleware

SELECT_1 = sa.text("SELECT 1")


def make(**options):
    engine = create_async_engine(
        "postgresql+asyncpg://{apps_overhead.PG_USER}@{apps_overhead.PG_HOST}:{apps_overhead.PG_PORT}/"
        "{apps_overhead.PG_DB}",
        pool_size=16,
        max_overflow=0,
    )
    app = FastAPI()
    app.add_middleware(PoolGuardMiddleware, guard=poolguard.Guard(engine, name="bench", **options))

    @app.get("/select1")
    async def select1(db: DbSession) -> dict[str, int]:
        return {{"one": (await db.execute(SELECT_1)).scalar_one()}}

    return app


apps = {{"on": make(), "off": make(**TELEMETRY_OFF)}}
"""
)

BARE_AND_GUARDED = """
import importlib

apps = {{side: importlib.import_module(f"bench_{framework}_{{side}}").app for side in ("bare", "guarded")}}
"""
"""Flask and FastAPI, --compare poolguard: the two apps ``apps_overhead.write_apps`` generates, in one process."""

WRAPPER_COMMON = """
import contextlib
import json
import os
import time

from bench_pair import apps

if os.environ.get("BENCH_REQUEST_SPAN"):
    from opentelemetry import trace

    _tracer = trace.get_tracer("bench")

    def request_span():  # what a framework instrumentation opens around each request
        return _tracer.start_as_current_span("GET /select1")
else:
    request_span = contextlib.nullcontext

_cpu = {side: [] for side in apps}
_thread_cpu = time.thread_time_ns
STRIP_SIDE = os.environ["BENCH_FRAMEWORK"] != "django"  # Django routes both paths itself


def control(path):  # /reset forgets the samples so far (the warm-up's), /dump writes them out
    if path == "/dump":
        with open(os.environ["BENCH_CPU_FILE"], "w") as out:
            json.dump(_cpu, out)
    else:
        for samples in _cpu.values():
            samples.clear()
"""

WSGI_WRAPPER = (
    WRAPPER_COMMON
    + """

def app(environ, start_response):
    path = environ["PATH_INFO"]
    side = path.split("/", 2)[1]
    if side not in apps:
        control(path)
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"done"]
    if STRIP_SIDE:
        environ["PATH_INFO"] = path[len(side) + 1:]
    with request_span():
        start = _thread_cpu()
        result = apps[side](environ, start_response)
        try:
            body = b"".join(result)
        finally:
            close = getattr(result, "close", None)
            if close is not None:
                close()
        _cpu[side].append(_thread_cpu() - start)
    return [body]
"""
)

ASGI_WRAPPER = (
    WRAPPER_COMMON
    + """

async def app(scope, receive, send):
    path = scope["path"]
    side = path.split("/", 2)[1]
    if side not in apps:
        control(path)
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"done"})
        return
    inner_path = path[len(side) + 1:]
    scope = {**scope, "path": inner_path, "raw_path": inner_path.encode()}
    # The response is held back until the app has returned: work an app does after sending it (a
    # dependency's exit) would otherwise overlap the next request and land in that one's time.
    messages = []

    async def hold(message):
        messages.append(message)

    with request_span():
        start = _thread_cpu()
        await apps[side](scope, receive, hold)
        _cpu[side].append(_thread_cpu() - start)
    for message in messages:
        await send(message)
"""
)

ALTERNATE = """
local n = 0
request = function()
  n = n + 1
  if n % 2 == 0 then
    return wrk.format("GET", "/{second}/select1")
  end
  return wrk.format("GET", "/{first}/select1")
end
"""


UNSAMPLED_TRACING = "trace.set_tracer_provider(TracerProvider(sampler=ALWAYS_OFF))"
SAMPLED_TRACING = """
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult


class _DropSpans(SpanExporter):
    def export(self, spans):
        return SpanExportResult.SUCCESS


_tracer_provider = TracerProvider()  # the default sampler: every request sampled
_tracer_provider.add_span_processor(BatchSpanProcessor(_DropSpans()))
trace.set_tracer_provider(_tracer_provider)
"""
"""--sampled: every request traced, spans batched to an exporter that drops them (off the requests' threads)."""


def sampled(source: str) -> str:
    if UNSAMPLED_TRACING not in source:
        raise RuntimeError("the SDK set-up no longer installs its tracer provider as --sampled expects")
    return source.replace(UNSAMPLED_TRACING, textwrap.dedent(SAMPLED_TRACING))


def write_pair(directory: Path, compare: str, framework: str, setup: str, *, traced: bool = False) -> None:
    """Writes ``bench_pair.py`` (its ``apps``: side -> WSGI/ASGI app), its settings, the wrapper and the wrk script.

    ``traced``: every request sampled (telemetry only; else the SDK samples nothing).
    """
    apps_overhead.write_apps(directory, setup)
    django_setup = DJANGO_EXAMPLE_SETUP if setup == "example" else ""
    if framework == "django":
        pair = DJANGO_POOLGUARD_PAIR if compare == "poolguard" else DJANGO_TELEMETRY_PAIR
        settings = DJANGO_POOLGUARD_SETTINGS if compare == "poolguard" else DJANGO_TELEMETRY_SETTINGS
        settings = sampled(settings) if traced else settings
        (directory / "bench_pair_settings.py").write_text(textwrap.dedent(settings + django_setup).lstrip())
    elif compare == "poolguard":
        pair = BARE_AND_GUARDED.format(framework=framework)
    else:
        pair = telemetry_requests.APP if framework == "flask" else FASTAPI_TELEMETRY_PAIR
        pair = sampled(pair) if traced else pair
    wrapper = ASGI_WRAPPER if framework == "fastapi" else WSGI_WRAPPER
    first, second = COMPARISONS[compare]
    (directory / "bench_pair.py").write_text(textwrap.dedent(pair).lstrip())
    (directory / "bench_one_server.py").write_text(textwrap.dedent(wrapper).lstrip())
    (directory / "alternate.lua").write_text(textwrap.dedent(ALTERNATE.format(first=first, second=second)).lstrip())


def wrk(url: str, script: Path, seconds: int, connections: int) -> int:
    """Requests wrk made in ``seconds``; any error or non-2xx answer fails the run rather than count."""
    result = apps_overhead.load_wrk(url, connections, seconds, script)
    if result.errors:
        raise RuntimeError(f"wrk saw {result.errors} errors or non-2xx answers")
    return result.requests


def server_command(framework: str, directory: Path, port: int) -> list[str]:
    if framework == "fastapi":
        return [
            sys.executable, "-m", "uvicorn", "bench_one_server:app", "--app-dir", str(directory),
            "--host", apps_overhead.PG_HOST, "--port", str(port), "--lifespan", "off",
            "--no-access-log", "--log-level", "warning",
        ]  # fmt: skip
    return [
        sys.executable, "-m", "gunicorn", "--worker-class", "gthread", "--workers", "1", "--threads", "4",
        "--bind", f"{apps_overhead.PG_HOST}:{port}", "--chdir", str(directory), "--log-level", "warning",
        "bench_one_server:app",
    ]  # fmt: skip


def one_run(directory: Path, duration: int, framework: str, compare: str) -> dict[str, float]:
    port = apps_overhead.free_port()
    cpu_file = directory / "cpu.json"
    env = {**apps_overhead.server_env(), "BENCH_CPU_FILE": str(cpu_file), "BENCH_FRAMEWORK": framework}
    if compare == "telemetry":
        env["BENCH_REQUEST_SPAN"] = "1"
    server = subprocess.Popen(server_command(framework, directory, port), env=env, start_new_session=True)
    base = f"http://{apps_overhead.PG_HOST}:{port}"
    script = directory / "alternate.lua"
    connections = 1 if framework == "fastapi" else 16
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{base}/reset", timeout=5).read()
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError("the server did not start") from None
                time.sleep(0.2)
        wrk(base + "/", script, 3, connections)  # warm-up
        urllib.request.urlopen(f"{base}/reset", timeout=5).read()
        cpu_before = apps_overhead.group_cpu_seconds(server.pid)  # its own session: group = pid
        requests = wrk(base + "/", script, duration, connections)
        cpu_after = apps_overhead.group_cpu_seconds(server.pid)
        urllib.request.urlopen(f"{base}/dump", timeout=5).read()
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
    samples: dict[str, list[int]] = json.loads(cpu_file.read_text())
    baseline, measured = COMPARISONS[compare]
    base_mean, base_median = telemetry_requests.mean_and_median_us(samples[baseline])
    mean, median = telemetry_requests.mean_and_median_us(samples[measured])
    return {
        "requests": requests,
        "server_cpu_us": (cpu_after - cpu_before) / requests * 1e6,
        "base_mean_us": base_mean,
        "mean_us": mean,
        "base_median_us": base_median,
        "median_us": median,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--compare", choices=tuple(COMPARISONS), default="poolguard")
    parser.add_argument("--framework", choices=apps_overhead.FRAMEWORKS, default="flask")
    parser.add_argument("--setup", choices=("minimal", "example"), default="minimal", help="Django's (see above)")
    parser.add_argument("--duration", type=int, default=20, help="seconds of measured load per run")
    parser.add_argument("--runs", type=int, default=3, help="runs, each with a fresh server")
    parser.add_argument("--sampled", action="store_true", help="--compare telemetry: every request sampled")
    args = parser.parse_args()
    if args.sampled and args.compare != "telemetry":
        parser.error("--sampled goes with --compare telemetry (the bare and guarded apps install no SDK)")
    if shutil.which("wrk") is None:
        parser.error("wrk is not on PATH (Debian package 'wrk'): it alternates the two paths per request")
    baseline, measured = COMPARISONS[args.compare]
    print(
        f"| run | requests | server CPU µs/req | app CPU µs/req {baseline} (mean / median) "
        f"| {measured} (mean / median) | {measured} - {baseline} µs | share of the server's CPU per request |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory(prefix="poolguard-one-server-") as tmp:
        directory = Path(tmp)
        write_pair(directory, args.compare, args.framework, args.setup, traced=args.sampled)
        for number in range(1, args.runs + 1):
            run = one_run(directory, args.duration, args.framework, args.compare)
            extra = run["mean_us"] - run["base_mean_us"]
            print(
                f"| {number} | {run['requests']:,} | {run['server_cpu_us']:.0f} "
                f"| {run['base_mean_us']:.1f} / {run['base_median_us']:.1f} "
                f"| {run['mean_us']:.1f} / {run['median_us']:.1f} | {extra:+.1f} "
                f"| {extra / run['server_cpu_us'] * 100:+.2f} % |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
