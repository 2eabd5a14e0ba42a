"""Instructions per request of the benchmark apps, with and without poolguard: a steadier figure than time.

    .venv/bin/python benchmarks/apps_instructions.py [--frameworks flask,fastapi,django] [--requests 300]
        [--setup minimal|example] [--telemetry none|sdk]

Requests per second on this 2-core machine swing by several per cent from run to run (the server,
the load generator and PostgreSQL share the cores, and each server process keeps a speed bias of its
own), which is as large as the overhead being measured. This benchmark counts what poolguard adds
instead: the same generated apps as ``apps_overhead.py`` (one ``GET /select1`` doing ``SELECT 1`` on
the real PostgreSQL server, both sides on the same pool settings), called in process the way a WSGI
server calls them (``app(environ, start_response)``, body iterated, ``close()``, so Django returns
its connection to the pool as under gunicorn) or, for FastAPI, an ASGI server (``await app(scope,
receive, send)``, one request after another on one event loop), run under ``valgrind --tool=callgrind``, which counts
the CPU instructions executed. Each side runs twice, with ``--requests`` more requests the second
time; the difference divided by ``--requests`` is the count per request, free of start-up and
warm-up. ``PYTHONHASHSEED=0`` fixes dict layouts. The figures still move between runs: psycopg's
wait loops run as often as the server's answers make them, psycopg_pool's background threads do
time-dependent work, and a full garbage collection falls inside the measured requests or not. On
2026-11-30 a side's count repeated to 0.5-1 % (5,000-12,000 instructions): run it two or three
times and compare sides of the same run.

Modes (``--telemetry``): ``none`` compares bare and guarded apps with no OpenTelemetry SDK (what
issue 3's overhead target is about); ``sdk`` (the default) also runs the two guarded apps of
``apps_overhead.py --compare telemetry`` with the SDK installed and sampling nothing (an unsampled
parent span around the requests, a MeterProvider whose reader never collects during the run):
``guarded_sdk_off`` gives the guard no-op providers, ``guarded_sdk`` lets it use the SDK, so their
difference is poolguard's telemetry alone, for issue 4's "unsampled within 2 % of none" target.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import apps_overhead

WORKER = "--worker"
SIDES = ("bare", "guarded", "guarded_sdk_off", "guarded_sdk")
"""As apps_overhead.SIDE_NAMES: the two ``_sdk`` sides install the SDK, sampling nothing; ``_off`` gives the guard
no-op providers, so guarded_sdk_off against guarded_sdk is exactly poolguard's telemetry."""
_COLLECTED = re.compile(r"Collected : (\d+)")


def worker(framework: str, side: str, directory: Path, requests: int) -> None:
    """Runs ``requests`` requests (plus a fixed warm-up) through the app, as a WSGI or ASGI server would.

    On the SDK sides the requests run under an unsampled parent span, as under a framework
    instrumentation, so poolguard's sampling check sees a real (non-recording) parent.
    """
    sys.path.insert(0, str(directory))
    if framework == "django":
        os.environ["DJANGO_SETTINGS_MODULE"] = f"bench_django_{side}_settings"
        app = __import__(f"bench_django_{side}").application
    else:
        app = __import__(f"bench_{framework}_{side}").app
    if side.startswith("guarded_sdk"):
        from opentelemetry import trace  # noqa: PLC0415

        trace.get_tracer("bench").start_as_current_span("GET /select1").__enter__()
    if framework == "fastapi":
        asyncio.run(_asgi_requests(app, 100 + requests, f"{framework}/{side}"))
    else:
        _wsgi_requests(app, 100 + requests, f"{framework}/{side}")


def _wsgi_requests(app: Any, count: int, label: str) -> None:
    """``count`` requests as a WSGI server makes them: the body iterated, then closed."""
    from wsgiref.util import setup_testing_defaults  # noqa: PLC0415

    def start_response(status: str, headers: object, exc_info: object = None) -> None:
        if not status.startswith("200"):
            raise RuntimeError(f"{label}: {status}")

    environ: dict[str, object] = {}
    setup_testing_defaults(environ)
    environ["PATH_INFO"] = apps_overhead.ROUTE
    for _ in range(count):
        body = app(dict(environ), start_response)
        for _ in body:
            pass
        close = getattr(body, "close", None)
        if close is not None:
            close()


async def _asgi_requests(app: Any, count: int, label: str) -> None:
    """``count`` requests as an ASGI server makes them, one after another on one event loop."""
    path = apps_overhead.ROUTE
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET",
        "scheme": "http", "path": path, "raw_path": path.encode(), "root_path": "", "query_string": b"",
        "headers": [(b"host", b"bench")], "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 80),
    }  # fmt: skip
    for _ in range(count):
        statuses = await _asgi_request(app, dict(scope))
        if statuses != [200]:
            raise RuntimeError(f"{label}: {statuses}")


async def _asgi_request(app: Any, scope: dict[str, Any]) -> list[int]:
    """One request: an empty body, then a disconnect if asked again; the response statuses sent."""
    requested = False
    statuses: list[int] = []

    async def receive() -> dict[str, Any]:
        nonlocal requested
        if requested:
            return {"type": "http.disconnect"}
        requested = True
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    await app(scope, receive, send)
    return statuses


def instructions(framework: str, side: str, directory: Path, requests: int) -> int:
    command = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable, __file__]
    output = subprocess.run(
        [*command, WORKER, framework, side, str(directory), str(requests)],
        capture_output=True,
        text=True,
        env={**apps_overhead.server_env(), "PYTHONHASHSEED": "0", "BENCH_EXPORT_INTERVAL_MS": "1e9"},
        check=True,
        timeout=1800,
    ).stderr
    found = _COLLECTED.search(output)
    if found is None:
        raise RuntimeError(f"no instruction count in valgrind's output:\n{output[-2000:]}")
    return int(found.group(1))


def per_request(framework: str, side: str, directory: Path, requests: int) -> float:
    base = instructions(framework, side, directory, 50)
    more = instructions(framework, side, directory, 50 + requests)
    return (more - base) / requests


def main() -> int:
    if len(sys.argv) == 6 and sys.argv[1] == WORKER:
        worker(sys.argv[2], sys.argv[3], Path(sys.argv[4]), int(sys.argv[5]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frameworks", default=",".join(apps_overhead.FRAMEWORKS))
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--telemetry", choices=("none", "sdk"), default="sdk")
    parser.add_argument("--setup", choices=("minimal", "example"), default="minimal", help="as apps_overhead.py")
    args = parser.parse_args()
    if shutil.which("valgrind") is None:
        parser.error("valgrind is not on PATH (Debian package 'valgrind')")
    frameworks = [name.strip() for name in args.frameworks.split(",") if name.strip()]
    if unknown := sorted(set(frameworks) - set(apps_overhead.FRAMEWORKS)):
        parser.error(f"unknown framework(s) {unknown}; choose from {apps_overhead.FRAMEWORKS}")
    print("| app | side | instructions per request | over bare |")
    print("|---|---|---:|---:|")
    with tempfile.TemporaryDirectory(prefix="poolguard-instructions-") as tmp:
        directory = Path(tmp)
        apps_overhead.write_apps(directory, args.setup)
        for framework in frameworks:
            sides = SIDES if args.telemetry == "sdk" else SIDES[:2]
            counts = {side: per_request(framework, side, directory, args.requests) for side in sides}
            for side, count in counts.items():
                extra = count - counts["bare"]
                print(
                    f"| {framework} | {side} | {count:,.0f} | {extra:+,.0f} ({extra / counts['bare'] * 100:+.1f} %) |",
                    flush=True,
                )
            if "guarded_sdk" in counts:
                own = counts["guarded_sdk"] - counts["guarded_sdk_off"]
                print(f"| {framework} | poolguard's telemetry on over off (SDK unsampled on both) | | {own:+,.0f} "
                      f"({own / counts['guarded_sdk_off'] * 100:+.1f} %) |", flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
