"""Per request under a real server: every variant of one app served by one server process, requests alternating.

    python -m benchmarks.server --compare poolguard --framework flask|fastapi|django [--setup example]
    python -m benchmarks.server --compare telemetry --framework flask|fastapi|django [--sampled]
        [--duration 20] [--runs 3]

(from the repository root; needs ``wrk`` on PATH and PostgreSQL on 127.0.0.1:5432, user root,
database test). The variants are those of ``benchmarks/apps/common.py``:

- ``--compare poolguard``: bare and guarded, no OpenTelemetry SDK;
- ``--compare telemetry``: the guarded app with poolguard's telemetry off, with it on but the SDK's
  records dropped, and on the SDK; beside them (Flask, FastAPI) the bare app without and with
  ``opentelemetry-instrumentation-sqlalchemy``. Each request runs under a span of its own, as
  under a framework instrumentation; the SDK samples nothing, or (``--sampled``) every trace.

One server process serves them all: gunicorn (gthread, 1 worker x 4 threads, wrk on 16
connections) for Flask and Django, uvicorn (one asyncio loop, wrk on one connection, so no
request's await lets another's work into its time) for FastAPI. wrk takes the variants' paths in
turn, in a fresh random order every cycle (``benchmarks/alternate.lua``), so they share the load,
the threads, the GIL and the two cores' drift alike. In the server, ``benchmarks.apps.measure``
takes each request's thread CPU time around the app. A difference of two variants' mean app CPU
per request is what the one adds over the other; it is quoted as a share of what the baseline
variant's whole request costs the server (its CPU from /proc, HTTP parsing and writing
included: the run's mean server CPU per request, moved by the baseline's app CPU against the
run's mean), which is the share of requests per second lost when the server is CPU-bound.
Each run has a fresh server, 3 s of warm-up and ``--duration`` s of measured load. Any answer
but a 200 fails the run.
"""

from __future__ import annotations

import argparse
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
import time
import urllib.request
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

from benchmarks.apps import common

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
WARMUP = 3

DIFFERENCES = {
    "poolguard": (("poolguard", "guarded", "bare"),),
    "telemetry": (
        ("poolguard's own telemetry work", "own", "off"),
        ("the SDK's records", "sdk", "own"),
        ("poolguard's telemetry in all", "sdk", "off"),
        ("poolguard with telemetry, over bare", "sdk", "bare"),
        ("otel-instrumentation-sqlalchemy, over bare", "otel", "bare"),
    ),
}
"""(what, variant, baseline): each figure is the variant's mean app CPU per request minus the baseline's."""


@dataclass
class Run:
    requests: int
    server_cpu_us: float
    """The run's mean server CPU per request, every variant together."""
    app_cpu_us: dict[str, float]
    """Each variant's mean app CPU per request."""
    overall_app_cpu_us: float

    def server_cpu_of(self, variant: str) -> float:
        """A request of ``variant``: what the server spends outside the apps is the same for every variant."""
        return self.server_cpu_us + self.app_cpu_us[variant] - self.overall_app_cpu_us

    def difference(self, variant: str, baseline: str) -> tuple[float, float]:
        """(µs, % of the baseline request's server CPU)."""
        extra = self.app_cpu_us[variant] - self.app_cpu_us[baseline]
        return extra, extra / self.server_cpu_of(baseline) * 100


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def group_cpu_seconds(group: int) -> float:
    """User + system CPU seconds of every process in a process group (a server and its workers)."""
    ticks = 0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == group:
                ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def wrk(base: str, paths: list[str], seconds: int, connections: int) -> int:
    """Requests made in ``seconds``, the paths in turn (``alternate.lua``)."""
    script = ["-s", str(ROOT / "benchmarks" / "alternate.lua")]
    output = wrk_output(base + "/", seconds, connections, script, {"BENCH_PATHS": ",".join(paths)})
    return int(re.search(r"(\d+) requests in", output).group(1))  # type: ignore[union-attr]  # checked


def wrk_output(url: str, seconds: int, connections: int, extra: list[str], env: dict[str, str]) -> str:
    """wrk's report; an error or an answer other than 2xx fails the run."""
    output = subprocess.run(
        ["wrk", "-t", "1", "-c", str(connections), "-d", f"{seconds}s", "--timeout", "5s", *extra, url],
        env={**os.environ, **env}, capture_output=True, text=True, check=True, timeout=seconds + 30,
    ).stdout  # fmt: skip
    counted = re.search(r"(\d+) requests in", output) and re.search(r"Requests/sec:\s+[\d.]+", output)
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", output) or re.search(r"Socket errors: (.*)", output)
    if not counted or errors is not None:
        raise RuntimeError(f"wrk saw errors or answers other than 2xx:\n{output}")
    return output


def get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=5) as response:
        if response.status != 200:
            raise RuntimeError(f"{url} answered {response.status}")
        body: bytes = response.read()
        return body


def server_command(framework: str, port: int) -> list[str]:
    if framework == "fastapi":
        return [sys.executable, "-m", "uvicorn", "benchmarks.apps.measure:asgi", "--host", HOST, "--port", str(port),
                "--lifespan", "off", "--no-access-log", "--log-level", "warning"]  # fmt: skip
    return [sys.executable, "-m", "gunicorn", "--worker-class", "gthread", "--workers", "1", "--threads", "4",
            "--bind", f"{HOST}:{port}", "--log-level", "warning", "benchmarks.apps.measure:wsgi"]  # fmt: skip


def one_run(args: argparse.Namespace, variants: tuple[str, ...], cpu_file: Path) -> Run:
    port = free_port()
    env = {key: value for key, value in os.environ.items() if not key.startswith("POOLGUARD_")}
    env.pop("DJANGO_SETTINGS_MODULE", None)
    env.update(
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
        BENCH_FRAMEWORK=args.framework,
        BENCH_COMPARE=args.compare,
        BENCH_CPU_FILE=str(cpu_file),
        BENCH_DJANGO_SETUP=args.setup,
        BENCH_SAMPLED="1" if args.sampled else "",
    )
    server = subprocess.Popen(server_command(args.framework, port), cwd=ROOT, env=env, start_new_session=True)
    base = f"http://{HOST}:{port}"
    paths = [f"/{variant}/select1" for variant in variants]
    connections = 1 if args.framework == "fastapi" else 16
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                get(f"{base}/_bench/reset")
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError("the server did not start") from None
                time.sleep(0.2)
        for path in paths:
            if json.loads(get(base + path)) != {"one": 1}:
                raise RuntimeError(f"{path} did not answer {{'one': 1}}")
        wrk(base, paths, WARMUP, connections)
        get(f"{base}/_bench/reset")
        cpu_before = group_cpu_seconds(server.pid)  # its own session: the group's id is its pid
        requests = wrk(base, paths, args.duration, connections)
        cpu_after = group_cpu_seconds(server.pid)
        get(f"{base}/_bench/dump")
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
    dump = json.loads(cpu_file.read_text())
    if any(dump["not_200"].values()):
        raise RuntimeError(f"answers other than 200: {dump['not_200']}")
    samples: dict[str, list[int]] = dump["cpu_ns"]
    every = [sample for variant in variants for sample in samples[variant]]
    return Run(
        requests=requests,
        server_cpu_us=(cpu_after - cpu_before) / requests * 1e6,
        app_cpu_us={variant: statistics.fmean(samples[variant]) / 1e3 for variant in variants},
        overall_app_cpu_us=statistics.fmean(every) / 1e3,
    )


def versions() -> str:
    names = ("sqlalchemy", "psycopg", "asyncpg", "opentelemetry-sdk", "opentelemetry-instrumentation-sqlalchemy",
             "flask", "fastapi", "django", "gunicorn", "uvicorn")  # fmt: skip
    commit = subprocess.run(
        ["git", "describe", "--always", "--dirty"], check=False, cwd=ROOT, capture_output=True, text=True
    )
    found = ", ".join(f"{name} {version(name)}" for name in names)
    return f"poolguard at {commit.stdout.strip() or '?'}; {found}; Python {platform.python_version()}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--compare", choices=tuple(DIFFERENCES), default="poolguard")
    parser.add_argument("--framework", choices=("flask", "fastapi", "django"), default="flask")
    parser.add_argument("--setup", choices=("minimal", "example"), default="minimal", help="Django's (settings.py)")
    parser.add_argument("--duration", type=int, default=20, help="seconds of measured load per run")
    parser.add_argument("--runs", type=int, default=3, help="runs, each with a fresh server")
    parser.add_argument("--sampled", action="store_true", help="--compare telemetry: every trace sampled")
    args = parser.parse_args()
    if args.sampled and args.compare != "telemetry":
        parser.error("--sampled goes with --compare telemetry (the other comparison installs no SDK)")
    if shutil.which("wrk") is None:
        parser.error("wrk is not on PATH (Debian package 'wrk')")
    variants = common.variants(args.framework, args.compare)
    differences = [d for d in DIFFERENCES[args.compare] if d[1] in variants and d[2] in variants]
    if args.sampled:  # the own variant then makes the SDK's spans: only its records are dropped
        differences = [d for d in differences if "own" not in d[1:]]
    sampled = ", --sampled" if args.sampled else ""
    print(f"{args.framework}, --compare {args.compare}{sampled}, --setup {args.setup}: {versions()}", flush=True)
    print(
        "| run | requests | server CPU µs/req (all) | "
        + " | ".join(f"{d[0]} ({d[1]} - {d[2]})" for d in differences)
        + " |"
    )
    print("|---:|---:|---:|" + "---:|" * len(differences), flush=True)
    runs: list[Run] = []
    with tempfile.TemporaryDirectory(prefix="poolguard-bench-") as tmp:
        for number in range(1, args.runs + 1):
            run = one_run(args, variants, Path(tmp) / "cpu.json")
            runs.append(run)
            cells = [run.difference(variant, baseline) for _, variant, baseline in differences]
            shown = " | ".join(f"{us:+.1f} µs, {share:+.2f} %" for us, share in cells)
            print(f"| {number} | {run.requests:,} | {run.server_cpu_us:.0f} | {shown} |", flush=True)
    print("\nMedian over runs (range), as a share of the baseline request's server CPU:")
    for what, variant, baseline in differences:
        shares = [run.difference(variant, baseline)[1] for run in runs]
        micros = [run.difference(variant, baseline)[0] for run in runs]
        server = statistics.median(run.server_cpu_of(baseline) for run in runs)
        print(
            f"- {what} ({variant} - {baseline}): {statistics.median(shares):+.2f} % "
            f"({min(shares):+.2f} to {max(shares):+.2f} %), {statistics.median(micros):+.1f} µs "
            f"({min(micros):+.1f} to {max(micros):+.1f}) of {server:.0f} µs"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
