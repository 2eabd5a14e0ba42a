"""Requests per second of a Flask, a FastAPI and a Django app with and without poolguard, same run.

Per framework two servers run side by side on loopback against the real PostgreSQL server, each an
app generated into a temporary directory with one route, ``GET /select1``, that runs one
``SELECT 1`` and commits:

- **guarded**: poolguard wired in the way the examples do it (Flask: ``PoolGuard(app, guard)`` and
  ``db``; FastAPI: ``PoolGuardMiddleware`` and ``DbSession``; Django: ``poolguard.django`` in
  INSTALLED_APPS and ``PoolGuardMiddleware`` in MIDDLEWARE, the query through Django's cursor);
- **bare**: the same route through a plain SQLAlchemy session (Flask, FastAPI) or Django's cursor,
  no poolguard anywhere.

Both sides of a framework use the same engine or DATABASES settings (a plain
``sqlalchemy.create_engine`` / ``create_async_engine`` on both sides, so ``poolguard.create_engine``'s
production defaults such as pre-ping do not enter the comparison) and the same server command:

- Flask:   gunicorn, gthread worker, 1 worker, 4 threads, psycopg 3, QueuePool 4 + 0;
- FastAPI: uvicorn, 1 worker (asyncio loop, h11), asyncpg, AsyncEngine pool 16 + 0;
- Django:  gunicorn, gthread worker, 1 worker, 4 threads, psycopg 3 with Django's psycopg pool
  (min 4, max 4), ``CONN_MAX_AGE = 0``, no ATOMIC_REQUESTS.

Access logs are off on every server. The load comes from ``wrk`` (1 thread, fixed connections,
keep-alive) when it is on PATH, else from a Python generator (threads, one keep-alive ``httpx.Client``
each). After a warm-up per server, rounds alternate bare and guarded (the order flips each round,
so drift hits both sides alike); the figure per side is the median round. Every response must be
200: a round with errors or non-2xx answers makes the run fail rather than count.

``--setup example`` gives both Django sides what ``examples/django_project`` sets besides poolguard
(``ATOMIC_REQUESTS`` and ``CommonMiddleware``: a transaction around the view and the middleware every
Django project has); Flask and FastAPI are the same in both setups. ``--compare telemetry`` runs, instead
of bare against guarded, two guarded apps with the OpenTelemetry SDK installed and sampling nothing
(``ALWAYS_OFF``, a MeterProvider with a periodic reader): one whose guard is given no-op providers
(poolguard's telemetry off) and one that uses the SDK: issue 4's "unsampled within 2 % of none", per
request under a real server, with everything else the SDK switches on (FastAPI's own telemetry) on
both sides. ``--compare sdk`` compares the guarded app without an SDK to the same app with it.

``--profile`` measures instead, in-process and without servers, the same generated apps through each
framework's test client (Flask's test client, httpx's ASGITransport, Django's ``Client``): the time per
request bare and guarded, and a cProfile of the guarded side (functions of poolguard by cumulative
time, everything by own time).

Besides requests per second, each round reads the CPU time the server's processes used (from /proc)
and reports it per request: the figure that does not move with how the two cores happen to be shared
between the server, wrk and PostgreSQL. Each framework runs ``--pairs`` fresh server pairs, since a
process keeps a speed bias of a few per cent for its whole life (hash seed, memory layout).

Usage: .venv/bin/python benchmarks/apps_overhead.py [--pairs 3] [--rounds 4] [--duration 5] [--concurrency 16]
       [--frameworks flask,fastapi,django] [--generator auto|wrk|python] [--json PATH] [--profile]
       [--setup minimal|example] [--compare poolguard|telemetry]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

PG_HOST = "127.0.0.1"
PG_PORT = 5432
PG_DB = "test"
PG_USER = "root"
ROUTE = "/select1"
EXPECTED = {"one": 1}
FRAMEWORKS = ("flask", "fastapi", "django")
SIDE_NAMES = ("bare", "guarded", "guarded_sdk", "guarded_sdk_off")
"""bare: no poolguard; guarded: poolguard, no OpenTelemetry SDK; guarded_sdk: poolguard and the SDK, sampling
nothing; guarded_sdk_off: the same SDK, but poolguard given no-op providers (its telemetry off)."""
COMPARISONS = {
    "poolguard": ("bare", "guarded"),
    "telemetry": ("guarded_sdk_off", "guarded_sdk"),
    "sdk": ("guarded", "guarded_sdk"),
}
PROJECT_ROOT = Path(__file__).resolve().parent.parent

# -- the generated apps -------------------------------------------------------------------------------

FLASK_COMMON = f"""
import sqlalchemy as sa
from flask import Flask

engine = sa.create_engine(
    "postgresql+psycopg://{PG_USER}@{PG_HOST}:{PG_PORT}/{PG_DB}", pool_size=4, max_overflow=0
)
SELECT_1 = sa.text("SELECT 1")
app = Flask(__name__)
"""

FLASK_BARE = (
    FLASK_COMMON
    + """
from sqlalchemy.orm import sessionmaker

Session = sessionmaker(engine, expire_on_commit=False)


@app.get("/select1")
def select1():
    with Session.begin() as session:
        return {"one": session.execute(SELECT_1).scalar_one()}
"""
)

FLASK_GUARDED = (
    FLASK_COMMON
    + """
import poolguard
from poolguard.flask import PoolGuard, db

PoolGuard(app, poolguard.Guard(engine, name="bench"))


@app.get("/select1")
def select1():
    return {"one": db.execute(SELECT_1).scalar_one()}
"""
)

FASTAPI_COMMON = f"""
import sqlalchemy as sa
from fastapi import FastAPI
from sqlalchemy.ext.asyncio import create_async_engine

engine = create_async_engine(
    "postgresql+asyncpg://{PG_USER}@{PG_HOST}:{PG_PORT}/{PG_DB}", pool_size=16, max_overflow=0
)
SELECT_1 = sa.text("SELECT 1")
app = FastAPI()
"""

FASTAPI_BARE = (
    FASTAPI_COMMON
    + """
from typing import Annotated

from fastapi import Depends
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

Session = async_sessionmaker(engine, expire_on_commit=False)


async def get_db():
    async with Session() as session:
        yield session
        await session.commit()


@app.get("/select1")
async def select1(db: Annotated[AsyncSession, Depends(get_db)]) -> dict[str, int]:
    return {"one": (await db.execute(SELECT_1)).scalar_one()}
"""
)

FASTAPI_GUARDED = (
    FASTAPI_COMMON
    + """
import poolguard
from poolguard.fastapi import DbSession, PoolGuardMiddleware

guard = poolguard.Guard(engine, name="bench")
app.add_middleware(PoolGuardMiddleware, guard=guard)


@app.get("/select1")
async def select1(db: DbSession) -> dict[str, int]:
    return {"one": (await db.execute(SELECT_1)).scalar_one()}
"""
)

DJANGO_SETTINGS = f"""
SECRET_KEY = "benchmark-only"
DEBUG = False
ALLOWED_HOSTS = ["*"]
ROOT_URLCONF = "bench_django_urls"
USE_TZ = True
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
LOGGING_CONFIG = None
DATABASES = {{
    "default": {{
        "ENGINE": "django.db.backends.postgresql",
        "HOST": "{PG_HOST}", "PORT": "{PG_PORT}", "NAME": "{PG_DB}", "USER": "{PG_USER}",
        "CONN_MAX_AGE": 0,
        "OPTIONS": {{"pool": {{"min_size": 4, "max_size": 4, "timeout": 10}}}},
    }}
}}
"""

DJANGO_BARE_SETTINGS = (
    DJANGO_SETTINGS
    + """
INSTALLED_APPS = []
MIDDLEWARE = []
"""
)

DJANGO_GUARDED_SETTINGS = (
    DJANGO_SETTINGS
    + """
INSTALLED_APPS = ["poolguard.django"]
MIDDLEWARE = ["poolguard.django.PoolGuardMiddleware"]
POOLGUARD = {"DATABASES": ["default"], "THREADS": 4}
"""
)

DJANGO_EXAMPLE_SETUP = """
# --setup example: what examples/django_project sets besides poolguard itself.
DATABASES["default"]["ATOMIC_REQUESTS"] = True
MIDDLEWARE = [*MIDDLEWARE, "django.middleware.common.CommonMiddleware"]
"""

SDK_UNSAMPLED = """
# The OpenTelemetry SDK installed and sampling nothing: a TracerProvider with the ALWAYS_OFF sampler and a
# MeterProvider whose reader collects every 60 s, as a service exporting over OTLP would have them.
from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import ConsoleMetricExporter, PeriodicExportingMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF

trace.set_tracer_provider(TracerProvider(sampler=ALWAYS_OFF))
# guarded_sdk_off hands these to poolguard: its own spans and records off, everything else as in guarded_sdk.
TELEMETRY_OFF = {"tracer_provider": trace.NoOpTracerProvider(), "meter_provider": metrics.NoOpMeterProvider()}
metrics.set_meter_provider(
    MeterProvider(
        metric_readers=[
            PeriodicExportingMetricReader(
                ConsoleMetricExporter(out=open(os.devnull, "w")),
                export_interval_millis=float(os.environ.get("BENCH_EXPORT_INTERVAL_MS", "60000")),
            )
        ]
    )
)
"""

DJANGO_URLS = """
from django.db import connection
from django.http import JsonResponse
from django.urls import path


def select1(request):
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
        (one,) = cursor.fetchone()
    return JsonResponse({"one": one})


urlpatterns = [path("select1", select1)]
"""

DJANGO_WSGI = """
import os

os.environ["DJANGO_SETTINGS_MODULE"] = "{settings}"

from django.core.wsgi import get_wsgi_application

application = get_wsgi_application()
"""


@dataclass
class ServerSpec:
    framework: str
    side: str
    module: str
    command: list[str] = field(default_factory=list)


def write_apps(directory: Path, setup: str = "minimal") -> None:
    """Writes every side's app: ``bench_<framework>_<side>.py`` (Django: also ``..._settings.py``)."""
    django_setup = DJANGO_EXAMPLE_SETUP if setup == "example" else ""
    sdk = "import os\n" + SDK_UNSAMPLED
    guard_call = 'poolguard.Guard(engine, name="bench")'
    off_call = 'poolguard.Guard(engine, name="bench", **TELEMETRY_OFF)'
    django_off = 'POOLGUARD["TRACER_PROVIDER"] = TELEMETRY_OFF["tracer_provider"]\n'
    django_off += 'POOLGUARD["METER_PROVIDER"] = TELEMETRY_OFF["meter_provider"]\n'
    files = {
        "bench_flask_bare.py": FLASK_BARE,
        "bench_flask_guarded.py": FLASK_GUARDED,
        "bench_flask_guarded_sdk.py": sdk + FLASK_GUARDED,
        "bench_flask_guarded_sdk_off.py": sdk + FLASK_GUARDED.replace(guard_call, off_call),
        "bench_fastapi_bare.py": FASTAPI_BARE,
        "bench_fastapi_guarded.py": FASTAPI_GUARDED,
        "bench_fastapi_guarded_sdk.py": sdk + FASTAPI_GUARDED,
        "bench_fastapi_guarded_sdk_off.py": sdk + FASTAPI_GUARDED.replace(guard_call, off_call),
        "bench_django_bare_settings.py": DJANGO_BARE_SETTINGS + django_setup,
        "bench_django_guarded_settings.py": DJANGO_GUARDED_SETTINGS + django_setup,
        "bench_django_guarded_sdk_settings.py": sdk + DJANGO_GUARDED_SETTINGS + django_setup,
        "bench_django_guarded_sdk_off_settings.py": sdk + DJANGO_GUARDED_SETTINGS + django_setup + django_off,
        "bench_django_urls.py": DJANGO_URLS,
    }
    if guard_call not in FLASK_GUARDED or guard_call not in FASTAPI_GUARDED:
        raise RuntimeError("the guarded apps no longer build their Guard as the telemetry-off variant expects")
    for side in SIDE_NAMES:
        files[f"bench_django_{side}.py"] = DJANGO_WSGI.format(settings=f"bench_django_{side}_settings")
    for name, source in files.items():
        (directory / name).write_text(textwrap.dedent(source).lstrip())


def server_command(framework: str, module: str, port: int, directory: Path) -> list[str]:
    python = sys.executable
    bind = f"{PG_HOST}:{port}"
    if framework == "fastapi":
        return [
            python, "-m", "uvicorn", f"{module}:app", "--app-dir", str(directory), "--host", PG_HOST,
            "--port", str(port), "--workers", "1", "--no-access-log", "--log-level", "warning",
        ]  # fmt: skip
    target = f"{module}:application" if framework == "django" else f"{module}:app"
    return [
        python, "-m", "gunicorn", "--worker-class", "gthread", "--workers", "1", "--threads", "4",
        "--bind", bind, "--chdir", str(directory), "--log-level", "warning", target,
    ]  # fmt: skip


# -- servers --------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((PG_HOST, 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Server:
    framework: str
    side: str
    port: int
    process: subprocess.Popen[bytes]
    log: Path

    @property
    def url(self) -> str:
        return f"http://{PG_HOST}:{self.port}{ROUTE}"


def server_env() -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("POOLGUARD_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), env.get("PYTHONPATH", "")]))
    env.pop("DJANGO_SETTINGS_MODULE", None)
    return env


@contextlib.contextmanager
def running(framework: str, directory: Path, sides: tuple[str, str]) -> Iterator[dict[str, Server]]:
    """Both servers of a framework; each is stopped (its whole process group) however the block ends."""
    servers: dict[str, Server] = {}
    try:
        for side in sides:
            port = free_port()
            log = directory / f"{framework}_{side}.log"
            command = server_command(framework, f"bench_{framework}_{side}", port, directory)
            with log.open("wb") as out:
                process = subprocess.Popen(
                    command,
                    cwd=directory,
                    env=server_env(),
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            servers[side] = Server(framework, side, port, process, log)
        for server in servers.values():
            wait_ready(server)
        yield servers
    finally:
        for server in servers.values():
            stop(server)


def wait_ready(server: Server, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            break
        try:
            response = httpx.get(server.url, timeout=2.0)
            if response.status_code == 200 and response.json() == EXPECTED:
                return
            last = (response.status_code, response.content[:200])
        except httpx.HTTPError as exc:
            last = exc
        time.sleep(0.2)
    raise RuntimeError(
        f"{server.framework}/{server.side} did not answer {ROUTE} with 200 {EXPECTED} (last: {last!r}); "
        f"log:\n{server.log.read_text(errors='replace')[-3000:]}"
    )


def stop(server: Server) -> None:
    process = server.process
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=5)


# -- load ----------------------------------------------------------------------------------------------


@dataclass
class Round:
    requests: int
    seconds: float
    errors: int
    server_cpu: float = 0.0
    """CPU seconds the server's processes used during the round (user + system, from /proc)."""

    @property
    def cpu_per_request(self) -> float:
        """Server CPU microseconds per request: what the server spends, whoever else shares the cores."""
        return self.server_cpu / self.requests * 1e6 if self.requests else 0.0

    @property
    def rps(self) -> float:
        return self.requests / self.seconds


_WRK_RPS = re.compile(r"Requests/sec:\s+([\d.]+)")
_WRK_TOTAL = re.compile(r"(\d+) requests in ([\d.]+)(us|ms|s|m)")
_WRK_NON2XX = re.compile(r"Non-2xx or 3xx responses:\s+(\d+)")
_WRK_SOCKET = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")
_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}


def group_cpu_seconds(group: int) -> float:
    """User + system CPU seconds of every live process in a process group (a server and its workers)."""
    ticks = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[2]) == group:
            ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def load_wrk(url: str, concurrency: int, duration: float, script: Path | None = None) -> Round:
    """One wrk run; ``script``: a Lua script that picks each request (``one_server.py`` alternates paths)."""
    options = ["-s", str(script)] if script is not None else []
    output = subprocess.run(
        ["wrk", "-t", "1", "-c", str(concurrency), "-d", f"{duration:g}s", "--timeout", "5s", *options, url],
        capture_output=True,
        text=True,
        timeout=duration + 30,
        check=True,
    ).stdout
    total = _WRK_TOTAL.search(output)
    if total is None or _WRK_RPS.search(output) is None:
        raise RuntimeError(f"unexpected wrk output:\n{output}")
    errors = 0
    if (non2xx := _WRK_NON2XX.search(output)) is not None:
        errors += int(non2xx.group(1))
    if (socket_errors := _WRK_SOCKET.search(output)) is not None:
        errors += sum(int(group) for group in socket_errors.groups())
    return Round(int(total.group(1)), float(total.group(2)) * _UNITS[total.group(3)], errors)


def load_python(url: str, concurrency: int, duration: float) -> Round:
    """``concurrency`` threads, each with its own keep-alive client, for ``duration`` seconds."""
    counts = [0] * concurrency
    errors = [0] * concurrency
    start = threading.Barrier(concurrency + 1)
    stop_at = [0.0]

    def worker(index: int) -> None:
        with httpx.Client(timeout=5.0) as client:
            start.wait()
            while time.monotonic() < stop_at[0]:
                try:
                    response = client.get(url)
                    if response.status_code == 200:
                        counts[index] += 1
                    else:
                        errors[index] += 1
                except httpx.HTTPError:
                    errors[index] += 1

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(concurrency)]
    for thread in threads:
        thread.start()
    began = time.monotonic()
    stop_at[0] = began + duration
    start.wait()  # the workers read stop_at only after this
    for thread in threads:
        thread.join(timeout=duration + 10)
    return Round(sum(counts), time.monotonic() - began, sum(errors))


# -- the run ---------------------------------------------------------------------------------------------


@dataclass
class Result:
    """The rounds of one framework's two sides: ``base`` (without what is measured) and ``measured``."""

    framework: str
    base: str
    measured: str
    rounds: dict[str, list[Round]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.rounds = {self.base: [], self.measured: []}

    def median(self, side: str) -> float:
        return statistics.median(r.rps for r in self.rounds[side])

    def cpu(self, side: str) -> float:
        return statistics.median(r.cpu_per_request for r in self.rounds[side])

    @property
    def cpu_overhead(self) -> float:
        return (self.cpu(self.measured) - self.cpu(self.base)) / self.cpu(self.base) * 100.0

    @property
    def overhead(self) -> float:
        base = self.median(self.base)
        return (base - self.median(self.measured)) / base * 100.0

    @property
    def paired_overhead(self) -> float:
        """Median over rounds of each round's own overhead (its two sides' runs are adjacent)."""
        pairs = zip(self.rounds[self.base], self.rounds[self.measured], strict=True)
        return statistics.median((base.rps - measured.rps) / base.rps * 100.0 for base, measured in pairs)


def run_framework(framework: str, directory: Path, args: argparse.Namespace, generator: str) -> Result:
    load = load_wrk if generator == "wrk" else load_python
    sides = COMPARISONS[args.compare]
    result = Result(framework, *sides)
    for pair in range(args.pairs):
        # Fresh processes per pair: a process's own layout (hash seed, addresses) shifts its speed by a
        # few per cent for its whole life, which rounds within one pair cannot average out.
        with running(framework, directory, sides) as servers:
            for side in sides:  # warm-up: connections opened, code paths hot
                load(servers[side].url, args.concurrency, args.warmup)
            for index in range(args.rounds):
                order = sides if index % 2 == 0 else tuple(reversed(sides))
                for side in order:
                    group = servers[side].process.pid
                    cpu_before = group_cpu_seconds(group)
                    measured = load(servers[side].url, args.concurrency, args.duration)
                    measured.server_cpu = group_cpu_seconds(group) - cpu_before
                    if measured.errors:
                        raise RuntimeError(
                            f"{framework}/{side} round {index + 1}: {measured.errors} errors or non-200 answers"
                        )
                    result.rounds[side].append(measured)
                    print(
                        f"  {framework:8} pair {pair + 1} round {index + 1} {side:11} {measured.rps:9.1f} req/s "
                        f"{measured.cpu_per_request:7.1f} us CPU/req",
                        file=sys.stderr,
                        flush=True,
                    )
    return result


def versions() -> str:
    from importlib.metadata import version  # noqa: PLC0415

    names = ("poolguard", "flask", "fastapi", "starlette", "django", "gunicorn", "uvicorn", "sqlalchemy", "psycopg",
             "asyncpg")  # fmt: skip
    parts = []
    for name in names:
        try:
            parts.append(f"{name} {version(name)}")
        except Exception:
            parts.append(f"{name} ?")
    return ", ".join(parts) + f", Python {platform.python_version()}"


def markdown(results: list[Result], args: argparse.Namespace, generator: str) -> str:
    base, measured = COMPARISONS[args.compare]
    lines = [
        f"| app | server | {base} req/s (median) | {measured} req/s (median) | overhead (of medians) "
        f"| overhead (median of rounds) | server CPU µs/req {base} | {measured} | CPU overhead |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    servers = {
        "flask": "gunicorn gthread, 1 worker x 4 threads, psycopg",
        "fastapi": "uvicorn, 1 worker, asyncpg",
        "django": "gunicorn gthread, 1 worker x 4 threads, psycopg pool",
    }
    for result in results:
        lines.append(
            f"| {result.framework} | {servers[result.framework]} | {result.median(base):.0f} | "
            f"{result.median(measured):.0f} | {result.overhead:+.1f} % | {result.paired_overhead:+.1f} % | "
            f"{result.cpu(base):.0f} | {result.cpu(measured):.0f} | {result.cpu_overhead:+.1f} % |"
        )
    lines.append("")
    for result in results:
        for side in (base, measured):
            rounds = ", ".join(f"{r.rps:.0f}" for r in result.rounds[side])
            lines.append(f"- {result.framework} {side} rounds (req/s): {rounds}")
    lines.append("")
    lines.append(
        f"Setup: {args.setup}; compared: {args.compare} ({base} vs {measured}). "
        f"Load: {generator}, {args.concurrency} connections; {args.pairs} fresh server pairs x {args.rounds} rounds "
        f"x {args.duration:g} s per side (after {args.warmup:g} s warm-up), alternating. {versions()}. "
        f"{os.cpu_count()} CPUs."
    )
    return "\n".join(lines)


# -- in-process profile ---------------------------------------------------------------------------------

PROFILE_WORKER = "--profile-worker"


def profile_worker(framework: str, side: str, directory: Path, requests: int) -> None:
    """Runs in a process of its own (Django allows one settings module per process)."""
    import asyncio  # noqa: PLC0415
    import cProfile  # noqa: PLC0415
    import pstats  # noqa: PLC0415

    sys.path.insert(0, str(directory))
    module = f"bench_{framework}_{side}"
    if framework == "django":
        os.environ["DJANGO_SETTINGS_MODULE"] = f"bench_django_{side}_settings"
        import django  # noqa: PLC0415

        django.setup()
        from django.test import Client  # noqa: PLC0415

        client = Client()

        def one() -> None:
            assert client.get(ROUTE).status_code == 200

        def many(count: int) -> None:
            for _ in range(count):
                one()

    elif framework == "flask":
        app = __import__(module).app
        flask_client = app.test_client()

        def many(count: int) -> None:
            for _ in range(count):
                assert flask_client.get(ROUTE).status_code == 200

    else:
        app = __import__(module).app
        loop = asyncio.new_event_loop()
        transport = httpx.ASGITransport(app=app)
        asgi_client = httpx.AsyncClient(transport=transport, base_url="http://bench")

        async def run(count: int) -> None:
            for _ in range(count):
                assert (await asgi_client.get(ROUTE)).status_code == 200

        def many(count: int) -> None:
            loop.run_until_complete(run(count))

    many(max(200, requests // 10))  # warm-up
    timings = []
    for _ in range(5):
        began = time.perf_counter()
        many(requests)
        timings.append((time.perf_counter() - began) / requests * 1e6)
    print(f"{framework} {side}: {statistics.median(timings):.1f} us/request (median of 5 x {requests})", flush=True)
    if side == "bare":
        return
    profiler = cProfile.Profile()
    profiler.enable()
    many(requests)
    profiler.disable()
    stats = pstats.Stats(profiler, stream=sys.stdout)
    stats.sort_stats("cumulative").print_stats(r"poolguard", 25)
    stats.sort_stats("tottime").print_stats(20)


def run_profiles(frameworks: list[str], args: argparse.Namespace) -> None:
    requests = args.profile_requests
    with tempfile.TemporaryDirectory(prefix="poolguard-apps-profile-") as tmp:
        directory = Path(tmp)
        write_apps(directory, args.setup)
        for framework in frameworks:
            for side in COMPARISONS[args.compare]:
                subprocess.run(
                    [sys.executable, __file__, PROFILE_WORKER, framework, side, str(directory), str(requests)],
                    env=server_env(),
                    check=True,
                    timeout=600,
                )


def main() -> int:
    if len(sys.argv) == 6 and sys.argv[1] == PROFILE_WORKER:
        profile_worker(sys.argv[2], sys.argv[3], Path(sys.argv[4]), int(sys.argv[5]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=4, help="rounds per server pair")
    parser.add_argument("--pairs", type=int, default=3, help="fresh bare/guarded server pairs per framework")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per round and side")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of warm-up per server")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--frameworks", default=",".join(FRAMEWORKS))
    parser.add_argument("--generator", choices=("auto", "wrk", "python"), default="auto")
    parser.add_argument("--json", type=Path, help="also write the raw rounds here")
    parser.add_argument("--profile", action="store_true", help="profile in-process through the test clients instead")
    parser.add_argument("--profile-requests", type=int, default=2000)
    parser.add_argument(
        "--setup",
        choices=("minimal", "example"),
        default="minimal",
        help="minimal: the cheapest route each framework allows; example: Django as examples/django_project sets it",
    )
    parser.add_argument(
        "--compare",
        choices=tuple(COMPARISONS),
        default="poolguard",
        help="poolguard: bare vs guarded; telemetry: poolguard's telemetry off vs on, SDK installed and unsampled "
        "on both; sdk: guarded without vs with the SDK",
    )
    args = parser.parse_args()
    frameworks = [name.strip() for name in args.frameworks.split(",") if name.strip()]
    if unknown := sorted(set(frameworks) - set(FRAMEWORKS)):
        parser.error(f"unknown framework(s) {unknown}; choose from {FRAMEWORKS}")
    if args.profile:
        run_profiles(frameworks, args)
        return 0
    generator = args.generator
    if generator == "auto":
        generator = "wrk" if shutil.which("wrk") else "python"
    elif generator == "wrk" and not shutil.which("wrk"):
        parser.error("wrk is not on PATH; use --generator python (or auto)")

    started = datetime.datetime.now(datetime.UTC)
    print(f"load generator: {generator}", file=sys.stderr)
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="poolguard-apps-bench-") as tmp:
        directory = Path(tmp)
        write_apps(directory, args.setup)
        for framework in frameworks:
            results.append(run_framework(framework, directory, args, generator))
    print(f"Run started {started:%Y-%m-%d %H:%M} UTC.")
    print(markdown(results, args, generator))
    if args.json is not None:
        raw = {
            r.framework: {
                side: [{"requests": x.requests, "seconds": x.seconds, "server_cpu": x.server_cpu} for x in rounds]
                for side, rounds in r.rounds.items()
            }
            for r in results
        }
        args.json.write_text(
            json.dumps(
                {
                    "started": started.isoformat(),
                    "generator": generator,
                    "setup": args.setup,
                    "compare": args.compare,
                    "results": raw,
                }
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
