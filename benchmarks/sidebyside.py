"""Requests per second of two servers side by side, bare and guarded, wrk alternating between them.

    python -m benchmarks.sidebyside --app fsa|select1 [--connections 8,16] [--rounds 4] [--duration 10]
        [--threads 8] [--together]

(from the repository root; needs ``wrk`` on PATH and PostgreSQL on 127.0.0.1:5432, user root,
database test). Two gunicorn servers (gthread, 1 worker x ``--threads``) run the same app, one
without poolguard and one with it as its users adopt it (``benchmarks/apps/sidebyside.py``). For
each number of connections, every round runs wrk for ``--duration`` s on one server, then on the
other (which goes first alternates by round), after a warm-up of both. A round's ratio is guarded
over bare requests per second; the figure is the median ratio over rounds, with the range. This is
what a user sees in throughput (everything that grows with concurrency included: lock contention,
GIL hand-offs, collection). Beside it, each server's CPU per request over the same rounds (its
process group's, from /proc): bare over guarded, the throughput ratio a CPU-bound server would show
if nothing but CPU per request differed, so the two figures tell the CPU cost from the rest.
``--together`` loads both servers at once instead, each with its own wrk: on a shared machine the
same noise then hits both, and the ratio measures what a request costs each server when both
compete for the same cores (a paired measurement; absolute rates are about half).
Any answer other than 2xx fails the run.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
import urllib.request

from benchmarks.server import HOST, ROOT, free_port, group_cpu_seconds, versions, wrk_output

PATHS = {"fsa": "/authors/1", "select1": "/select1"}
VARIANTS = ("bare", "guarded")
WARMUP = 3


class Server:
    """One gunicorn process serving one variant."""

    def __init__(self, app: str, variant: str, threads: int) -> None:
        self.variant = variant
        self.port = free_port()
        self.base = f"http://{HOST}:{self.port}"
        env = {key: value for key, value in os.environ.items() if not key.startswith("POOLGUARD_")}
        env.update(
            PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
            BENCH_APP=app,
            BENCH_VARIANT=variant,
        )
        command = [sys.executable, "-m", "gunicorn", "--worker-class", "gthread", "--workers", "1",
                   "--threads", str(threads), "--bind", f"{HOST}:{self.port}", "--log-level", "warning",
                   "benchmarks.apps.sidebyside:wsgi"]  # fmt: skip
        self.process = subprocess.Popen(command, cwd=ROOT, env=env, start_new_session=True)

    def wait_until_up(self, path: str) -> None:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(self.base + path, timeout=5) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise RuntimeError(f"the {self.variant} server did not answer {path}")
            time.sleep(0.2)

    def stop(self) -> None:
        os.killpg(self.process.pid, signal.SIGTERM)
        self.process.wait(timeout=30)


def wrk(url: str, seconds: int, connections: int) -> tuple[float, int]:
    """Requests per second and requests made; an error or an answer other than 2xx fails the run."""
    output = wrk_output(url, seconds, connections, [], {})
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1))  # type: ignore[union-attr]  # checked
    return rate, int(re.search(r"(\d+) requests in", output).group(1))  # type: ignore[union-attr]


def seed(app: str) -> None:
    """The fsa app's table and the author its route reads."""
    if app != "fsa":
        return
    import sqlalchemy as sa  # noqa: PLC0415

    from tests.apps.flask_sqlalchemy_app import models  # noqa: PLC0415

    engine = sa.create_engine("postgresql+psycopg://root@127.0.0.1:5432/test")
    models.Author.metadata.create_all(engine)
    with engine.begin() as connection:
        connection.execute(sa.delete(models.Author.__table__))
        connection.execute(sa.insert(models.Author.__table__).values(id=1, name="Ursula"))
    engine.dispose()


def unseed(app: str) -> None:
    if app != "fsa":
        return
    import sqlalchemy as sa  # noqa: PLC0415

    from tests.apps.flask_sqlalchemy_app import models  # noqa: PLC0415

    engine = sa.create_engine("postgresql+psycopg://root@127.0.0.1:5432/test")
    models.Author.metadata.drop_all(engine)
    engine.dispose()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--app", choices=tuple(PATHS), default="fsa")
    parser.add_argument("--connections", default="8,16", help="comma-separated wrk connection counts")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--duration", type=int, default=10, help="seconds of load per server per round")
    parser.add_argument("--threads", type=int, default=8, help="gunicorn gthread threads per server")
    parser.add_argument("--together", action="store_true", help="load both servers at once (paired rounds)")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        parser.error("wrk is not on PATH (Debian package 'wrk')")
    counts = [int(count) for count in args.connections.split(",")]
    path = PATHS[args.app]
    together = ", both servers loaded at once" if args.together else ""
    print(f"--app {args.app}, --threads {args.threads}, {args.duration} s per server per round{together}: {versions()}")
    seed(args.app)
    servers = {variant: Server(args.app, variant, args.threads) for variant in VARIANTS}
    try:
        for server in servers.values():
            server.wait_until_up(path)
        print(
            "\n| connections | round | bare req/s | guarded req/s | guarded / bare | server CPU µs/req: bare | "
            "guarded | bare / guarded |\n|---:|---:|---:|---:|---:|---:|---:|---:|"
        )
        summary = []
        for connections in counts:
            for server in servers.values():
                wrk(server.base + path, WARMUP, connections)  # warm-up, not counted
            ratios, cpu_ratios = [], []
            rates: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
            cpu: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
            for number in range(1, args.rounds + 1):
                order = VARIANTS if number % 2 else VARIANTS[::-1]
                if args.together:
                    with concurrent.futures.ThreadPoolExecutor(len(VARIANTS)) as pool:
                        befores = {v: group_cpu_seconds(servers[v].process.pid) for v in VARIANTS}
                        runs = {v: pool.submit(wrk, servers[v].base + path, args.duration, connections) for v in order}
                        for variant in VARIANTS:
                            rate, requests = runs[variant].result()
                            spent = group_cpu_seconds(servers[variant].process.pid) - befores[variant]
                            rates[variant].append(rate)
                            cpu[variant].append(spent / requests * 1e6)
                for variant in order if not args.together else ():
                    pid = servers[variant].process.pid  # its own session: the group's id is its pid
                    before = group_cpu_seconds(pid)
                    rate, requests = wrk(servers[variant].base + path, args.duration, connections)
                    rates[variant].append(rate)
                    cpu[variant].append((group_cpu_seconds(pid) - before) / requests * 1e6)
                ratios.append(rates["guarded"][-1] / rates["bare"][-1])
                cpu_ratios.append(cpu["bare"][-1] / cpu["guarded"][-1])
                print(f"| {connections} | {number} | {rates['bare'][-1]:,.0f} | {rates['guarded'][-1]:,.0f} | "
                      f"{ratios[-1]:.3f} | {cpu['bare'][-1]:,.0f} | {cpu['guarded'][-1]:,.0f} | "
                      f"{cpu_ratios[-1]:.3f} |", flush=True)  # fmt: skip
            summary.append(
                f"- {connections} connections: guarded / bare {statistics.median(ratios):.3f} "
                f"({min(ratios):.3f} to {max(ratios):.3f}); bare {statistics.median(rates['bare']):,.0f} req/s, "
                f"guarded {statistics.median(rates['guarded']):,.0f} req/s (medians); server CPU per request, "
                f"bare / guarded {statistics.median(cpu_ratios):.3f} ({min(cpu_ratios):.3f} to "
                f"{max(cpu_ratios):.3f}): {statistics.median(cpu['bare']):,.0f} against "
                f"{statistics.median(cpu['guarded']):,.0f} µs"
            )
        print("\nMedian over rounds (range):\n" + "\n".join(summary))
    finally:
        for server in servers.values():
            server.stop()
        unseed(args.app)
    return 0


if __name__ == "__main__":
    sys.exit(main())
