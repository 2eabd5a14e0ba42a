"""``poolguard doctor``'s wall time, as a user runs it, on healthy servers and on a silent one.

    python -m benchmarks.doctor [--runs 7] [--timeout 5]

Each case runs ``python -m poolguard doctor --json URL`` as a fresh process ``--runs`` times
(interpreter start, imports, connect, queries, output: what a user or a probe waits for) and prints
the median and the range of the wall time, with the exit code and the doctor's own ``seconds``
(connect and queries only). Cases: the shared PostgreSQL (127.0.0.1:5432) and MariaDB (3306); a
private PostgreSQL cluster behind a private PgBouncer, examined through its admin console (started
here with ``tests/support/pgcluster.py``; needs the PostgreSQL 15 binaries and pgbouncer, and root
or the postgres OS user); a silent server (a listener that never accepts) with ``--timeout``; a
refused port. Issue 15's target: under 1 s on a healthy server, under the timeout on a dead one.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path

from tests.support.pgcluster import PgBouncer, PgCluster

ROOT = Path(__file__).resolve().parent.parent


def run_once(url: str, timeout: float) -> tuple[float, int, float]:
    """(wall seconds, exit code, the report's own seconds) of one ``poolguard doctor`` process."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    started = time.perf_counter()
    completed = subprocess.run(
        [sys.executable, "-m", "poolguard", "doctor", "--json", "--timeout", str(timeout), url],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=timeout + 30,
        check=False,
    )
    wall = time.perf_counter() - started
    report = json.loads(completed.stdout)
    return wall, completed.returncode, float(report["seconds"])


def measure(name: str, url: str, runs: int, timeout: float) -> None:
    results = [run_once(url, timeout) for _ in range(runs)]
    walls = sorted(wall for wall, _, _ in results)
    own = statistics.median(seconds for _, _, seconds in results)
    codes = sorted({code for _, code, _ in results})
    print(
        f"{name:<34} wall {statistics.median(walls):6.3f} s ({walls[0]:.3f} to {walls[-1]:.3f}); "
        f"doctor's own {own:6.3f} s; exit {','.join(map(str, codes))}",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--timeout", type=float, default=5.0)
    args = parser.parse_args()
    print(f"poolguard doctor, {args.runs} runs per case, --timeout {args.timeout:g}")
    with ExitStack() as stack:
        cluster = PgCluster.create(max_connections=40)
        stack.callback(cluster.destroy)
        cluster.start()
        cluster.bootstrap()
        bouncer = PgBouncer(cluster, admin_users=["admin"])
        stack.callback(bouncer.destroy)
        bouncer.start()
        listener = stack.enter_context(socket.socket())
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        silent = listener.getsockname()[1]
        cases = [
            ("PostgreSQL 15 (shared)", "postgresql://root@127.0.0.1:5432/test"),
            ("MariaDB (shared)", "mysql://root@127.0.0.1:3306/test"),
            ("PgBouncer admin console (private)", bouncer.admin_url("admin")),
            ("silent server (never accepts)", f"postgresql://app:pw@127.0.0.1:{silent}/app"),
            ("refused port", "postgresql://app:pw@127.0.0.1:1/app"),
        ]
        for name, url in cases:
            measure(name, url, args.runs, args.timeout)


if __name__ == "__main__":
    main()
