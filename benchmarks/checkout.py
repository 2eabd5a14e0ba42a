"""Per checkout, in process: a Guard's checkout against the bare engine's, measured in the same run.

    python -m benchmarks.checkout [--rounds 15] [--ops 2000] [--pg-url URL | --no-postgres]

Two engines with identical settings per backend (SQLite in a temporary file, and PostgreSQL at
``--pg-url``; pool 8 + 0): one bare, one watched by ``poolguard.Guard(engine, name="bench")`` with
poolguard's defaults (a Guard instruments every checkout of its engine, so the bare side needs its
own engine). Operations:

- ``query``: ``with engine.connect() as c: c.exec_driver_sql("SELECT 1")`` against
  ``with guard.connection() as c: ...``;
- ``checkout only``: ``engine.pool.connect().close()``, bare against inside ``guard.request_scope()``;

each on one thread and on 8 threads at once (time per operation = wall time / operations). Rounds
alternate bare and guarded after a warm-up, so drift hits both alike; each side's figure is the
median of its rounds. No OpenTelemetry SDK is installed: poolguard makes no telemetry call.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import sqlalchemy as sa

import poolguard

PG_URL = "postgresql+psycopg://root@127.0.0.1:5432/test"
THREADS = 8


def time_round(op: Callable[[], None], ops: int, threads: int) -> float:
    """Seconds per operation: ``ops`` operations split over ``threads`` threads."""
    per_thread = ops // threads
    barrier = threading.Barrier(threads + 1)

    def worker() -> None:
        barrier.wait()
        for _ in range(per_thread):
            op()

    workers = [threading.Thread(target=worker) for _ in range(threads)]
    for thread in workers:
        thread.start()
    barrier.wait()
    started = time.perf_counter()
    for thread in workers:
        thread.join()
    return (time.perf_counter() - started) / (per_thread * threads)


def compare(bare: Callable[[], None], guarded: Callable[[], None], rounds: int, ops: int, threads: int) -> list[float]:
    """Median µs per operation of each side, over alternating rounds after a warm-up."""
    times: list[list[float]] = [[], []]
    for op in (bare, guarded):
        time_round(op, max(ops // 10, threads), threads)
    for _ in range(rounds):
        for side, op in enumerate((bare, guarded)):
            times[side].append(time_round(op, ops, threads))
    return [statistics.median(side) * 1e6 for side in times]


def bench(label: str, url: str, rounds: int, ops: int) -> None:
    with ExitStack() as stack:
        bare_engine, guarded_engine = (sa.create_engine(url, pool_size=THREADS, max_overflow=0) for _ in range(2))
        stack.callback(bare_engine.dispose)
        stack.callback(guarded_engine.dispose)
        guard = poolguard.Guard(guarded_engine, name="bench")
        stack.callback(guard.close)

        def bare_query() -> None:
            with bare_engine.connect() as connection:
                connection.exec_driver_sql("SELECT 1")

        def guarded_query() -> None:
            with guard.connection() as connection:
                connection.exec_driver_sql("SELECT 1")

        def bare_checkout() -> None:
            bare_engine.pool.connect().close()

        def guarded_checkout() -> None:
            with guard.request_scope():
                guarded_engine.pool.connect().close()

        for name, bare, guarded in (
            ("query (SELECT 1)", bare_query, guarded_query),
            ("checkout only", bare_checkout, guarded_checkout),
        ):
            for threads in (1, THREADS):
                bare_us, guarded_us = compare(bare, guarded, rounds, ops, threads)
                extra = guarded_us - bare_us
                print(
                    f"| {label} | {name} | {threads} | {bare_us:.1f} | {guarded_us:.1f} | {extra:+.1f} "
                    f"| {extra / bare_us * 100:+.0f} % |",
                    flush=True,
                )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=15, help="alternating rounds per side")
    parser.add_argument("--ops", type=int, default=2000, help="operations per round")
    parser.add_argument("--pg-url", default=PG_URL)
    parser.add_argument("--no-postgres", action="store_true", help="SQLite only")
    args = parser.parse_args()
    print(f"poolguard {poolguard.__version__}, SQLAlchemy {sa.__version__}, {args.rounds} rounds x {args.ops} ops\n")
    print("| backend | operation | threads | bare µs/op | guarded µs/op | overhead µs | overhead |")
    print("|---|---|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory(prefix="poolguard-bench-") as workdir:
        bench("SQLite", f"sqlite:///{Path(workdir) / 'bench.db'}", args.rounds, args.ops)
    if not args.no_postgres:
        bench("PostgreSQL", args.pg_url, args.rounds, args.ops)
    return 0


if __name__ == "__main__":
    sys.exit(main())
