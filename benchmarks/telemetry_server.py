"""Poolguard's telemetry per request under gunicorn, on and off in one server process, requests alternating.

    .venv/bin/python benchmarks/telemetry_server.py [--duration 30] [--runs 3]

The two Flask apps of ``telemetry_requests.py`` (two engines, two guards, the OpenTelemetry SDK
installed and sampling nothing; **on** uses it, **off** is given the API's no-op providers) are served
by **one** gunicorn process (gthread, 1 worker x 4 threads), ``/on/select1`` and ``/off/select1``.
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
import statistics
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

WRAPPER = """
import atexit
import json
import os
import time

from bench_telemetry_pair import apps

_cpu = {"on": [], "off": []}
_thread_cpu = time.thread_time_ns


def app(environ, start_response):
    path = environ["PATH_INFO"]
    if path == "/reset":
        _cpu["on"].clear()
        _cpu["off"].clear()
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"reset"]
    side = "on" if path.startswith("/on/") else "off"
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


def one_run(directory: Path, duration: int) -> dict[str, float]:
    port = apps_overhead.free_port()
    cpu_file = directory / "cpu.json"
    env = {**apps_overhead.server_env(), "BENCH_CPU_FILE": str(cpu_file)}
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
    on, off = samples["on"], samples["off"]
    return {
        "requests": requests,
        "server_cpu_us": (cpu_after - cpu_before) / requests * 1e6,
        "off_mean_us": statistics.fmean(off) / 1e3,
        "on_mean_us": statistics.fmean(on) / 1e3,
        "off_median_us": statistics.median(off) / 1e3,
        "on_median_us": statistics.median(on) / 1e3,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=int, default=30, help="seconds of measured load per run")
    parser.add_argument("--runs", type=int, default=3, help="runs, each with a fresh server")
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
        (directory / "bench_telemetry_pair.py").write_text(textwrap.dedent(telemetry_requests.APP).lstrip())
        (directory / "bench_telemetry_server.py").write_text(textwrap.dedent(WRAPPER).lstrip())
        (directory / "alternate.lua").write_text(textwrap.dedent(ALTERNATE).lstrip())
        for number in range(1, args.runs + 1):
            run = one_run(directory, args.duration)
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
