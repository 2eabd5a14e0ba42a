"""Poolguard's telemetry per request under gunicorn, on and off in one server process, requests alternating.

    .venv/bin/python benchmarks/telemetry_server.py [--framework flask|django] [--duration 30] [--runs 3]

Flask: the two apps of ``telemetry_requests.py`` (two engines, two guards, the OpenTelemetry SDK
installed and sampling nothing; **on** uses it, **off** is given the API's no-op providers). Django: one
project with two aliases on Django's psycopg pool (min = max = 4 each), both guarded by
``poolguard.django``, the SDK installed and sampling nothing; a Django process has one POOLGUARD, so
the **off** alias's guard has its telemetry switched off after start-up, as the no-op providers do
(its ``tracing``/``metering`` flags cleared, for good). Either way **one** gunicorn process (gthread,
1 worker x 4 threads) serves ``/on/select1`` and ``/off/select1``, each one ``SELECT 1``.
``wrk`` (1 thread, 16 connections) alternates the two paths request by request, so both sides run
interleaved under the same load, threads, GIL and CPU sharing. A small WSGI wrapper in the worker
measures each request's thread CPU time (``time.thread_time_ns``: user and system time of the thread
that served it, not time spent waiting for the GIL or the database) around the app call, the body and
``close()``; that is where all of poolguard's work happens. The whole server's CPU time per request
(from /proc, HTTP parsing and writing included) is the denominator: the overhead is the difference
of the two sides' mean app CPU per request, as a share of what a request costs the server.
"""

from __future__ import annotations

import argparse
import json
import os
import re
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

DJANGO_SETTINGS = (
    "import os\n"
    + apps_overhead.SDK_UNSAMPLED
    + f"""
SECRET_KEY = "benchmark-only"
DEBUG = False
ALLOWED_HOSTS = ["*"]
ROOT_URLCONF = "bench_telemetry_pair"
USE_TZ = True
LOGGING_CONFIG = None
_DATABASE = {{
    "ENGINE": "django.db.backends.postgresql",
    "HOST": "{apps_overhead.PG_HOST}", "PORT": "{apps_overhead.PG_PORT}", "NAME": "{apps_overhead.PG_DB}",
    "USER": "{apps_overhead.PG_USER}", "CONN_MAX_AGE": 0,
    "OPTIONS": {{"pool": {{"min_size": 4, "max_size": 4, "timeout": 10}}}},
}}
DATABASES = {{"default": dict(_DATABASE), "off": dict(_DATABASE)}}
INSTALLED_APPS = ["poolguard.django"]
MIDDLEWARE = ["poolguard.django.PoolGuardMiddleware"]
POOLGUARD = {{"DATABASES": ["default", "off"], "THREADS": 4}}
"""
)

DJANGO_APP = """
import os

os.environ["DJANGO_SETTINGS_MODULE"] = "bench_telemetry_settings"

from django.apps import apps as django_apps
from django.core.wsgi import get_wsgi_application
from django.db import connections
from django.http import JsonResponse
from django.urls import path


def select1(alias):
    def view(request):
        with connections[alias].cursor() as cursor:
            cursor.execute("SELECT 1")
            return JsonResponse({"one": cursor.fetchone()[0]})

    return view


urlpatterns = [path("on/select1", select1("default")), path("off/select1", select1("off"))]

application = get_wsgi_application()
# What the API's no-op providers do to a guard, for the one alias (POOLGUARD has one set per project).
telemetry = django_apps.get_app_config("poolguard").state.guards["off"].telemetry
telemetry._follows_global_tracing = telemetry._follows_global_metering = False
telemetry.tracing = telemetry.metering = False
apps = {"on": application, "off": application}
"""

WRAPPER = """
import atexit
import json
import os
import time

from bench_telemetry_pair import apps

_cpu = {"on": [], "off": []}
_thread_cpu = time.thread_time_ns
STRIP_SIDE = os.environ["BENCH_FRAMEWORK"] == "flask"  # Django routes both paths itself


def app(environ, start_response):
    path = environ["PATH_INFO"]
    if path == "/reset":
        _cpu["on"].clear()
        _cpu["off"].clear()
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"reset"]
    side = "on" if path.startswith("/on/") else "off"
    if STRIP_SIDE:
        environ["PATH_INFO"] = path[len(side) + 1:]
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


@atexit.register
def _dump():
    with open(os.environ["BENCH_CPU_FILE"], "w") as out:
        json.dump(_cpu, out)
"""

ALTERNATE = """
local n = 0
request = function()
  n = n + 1
  if n % 2 == 0 then
    return wrk.format("GET", "/on/select1")
  end
  return wrk.format("GET", "/off/select1")
end
"""


def server_cpu_seconds(pid: int) -> float:
    """User + system CPU of the gunicorn arbiter and its worker(s)."""
    children = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True, check=False).stdout.split()
    total = 0
    for process in [pid, *map(int, children)]:
        fields = Path(f"/proc/{process}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def wrk(url: str, script: Path, seconds: int) -> int:
    output = subprocess.run(
        ["wrk", "-t1", "-c16", f"-d{seconds}s", "-s", str(script), url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    if "Non-2xx" in output or "Socket errors" in output:
        raise RuntimeError(f"wrk saw errors:\n{output}")
    found = re.search(r"(\d+) requests in", output)
    if found is None:
        raise RuntimeError(f"no request count in wrk's output:\n{output}")
    return int(found.group(1))


def one_run(directory: Path, duration: int, framework: str) -> dict[str, float]:
    port = apps_overhead.free_port()
    cpu_file = directory / "cpu.json"
    env = {**apps_overhead.server_env(), "BENCH_CPU_FILE": str(cpu_file), "BENCH_FRAMEWORK": framework}
    command = [
        sys.executable, "-m", "gunicorn", "--worker-class", "gthread", "--workers", "1", "--threads", "4",
        "--bind", f"{apps_overhead.PG_HOST}:{port}", "--chdir", str(directory), "--log-level", "warning",
        "bench_telemetry_server:app",
    ]  # fmt: skip
    server = subprocess.Popen(command, env=env, start_new_session=True)
    base = f"http://{apps_overhead.PG_HOST}:{port}"
    script = directory / "alternate.lua"
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
        wrk(base + "/", script, 3)  # warm-up
        urllib.request.urlopen(f"{base}/reset", timeout=5).read()
        cpu_before = server_cpu_seconds(server.pid)
        requests = wrk(base + "/", script, duration)
        cpu_after = server_cpu_seconds(server.pid)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
    samples: dict[str, list[int]] = json.loads(cpu_file.read_text())
    off_mean, off_median = telemetry_requests.mean_and_median_us(samples["off"])
    on_mean, on_median = telemetry_requests.mean_and_median_us(samples["on"])
    return {
        "requests": requests,
        "server_cpu_us": (cpu_after - cpu_before) / requests * 1e6,
        "off_mean_us": off_mean,
        "on_mean_us": on_mean,
        "off_median_us": off_median,
        "on_median_us": on_median,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=int, default=30, help="seconds of measured load per run")
    parser.add_argument("--runs", type=int, default=3, help="runs, each with a fresh server")
    parser.add_argument("--framework", choices=("flask", "django"), default="flask")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        parser.error("wrk is not on PATH (Debian package 'wrk'): it alternates the two paths per request")
    print(
        "| run | requests | server CPU µs/req | app CPU µs/req off (mean / median) | on (mean / median) "
        "| on - off µs | share of the server's CPU per request |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory(prefix="poolguard-telemetry-server-") as tmp:
        directory = Path(tmp)
        pair = telemetry_requests.APP if args.framework == "flask" else DJANGO_APP
        (directory / "bench_telemetry_pair.py").write_text(textwrap.dedent(pair).lstrip())
        (directory / "bench_telemetry_settings.py").write_text(textwrap.dedent(DJANGO_SETTINGS).lstrip())
        (directory / "bench_telemetry_server.py").write_text(textwrap.dedent(WRAPPER).lstrip())
        (directory / "alternate.lua").write_text(textwrap.dedent(ALTERNATE).lstrip())
        for number in range(1, args.runs + 1):
            run = one_run(directory, args.duration, args.framework)
            extra = run["on_mean_us"] - run["off_mean_us"]
            print(
                f"| {number} | {run['requests']:,} | {run['server_cpu_us']:.0f} "
                f"| {run['off_mean_us']:.1f} / {run['off_median_us']:.1f} "
                f"| {run['on_mean_us']:.1f} / {run['on_median_us']:.1f} | {extra:+.1f} "
                f"| {extra / run['server_cpu_us'] * 100:+.2f} % |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
