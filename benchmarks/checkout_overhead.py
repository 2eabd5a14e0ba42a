"""What a checkout through poolguard costs over the bare engine, measured in the same run.

Two engines with identical settings per backend: one bare, one watched by a Guard (a Guard
instruments every checkout of its engine, so the bare side needs its own engine). Each operation is
timed in rounds that alternate bare, guarded, bare, guarded ... so drift (CPU frequency, caches,
other load) hits both sides alike; the figure per side is the median of its rounds.

Operations:
  query     ``with engine.connect() as c: c.exec_driver_sql("SELECT 1")``
            vs ``with guard.connection() as c: c.exec_driver_sql("SELECT 1")``
  checkout  ``engine.pool.connect().close()`` (no query: the pool path alone)
            vs the same inside ``guard.request_scope()``

each on one thread and on 8 threads at once (per-operation time = wall time / operations).

Usage: .venv/bin/python benchmarks/checkout_overhead.py [--rounds 15] [--ops 2000] [--pg-url URL | --no-postgres]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import sqlalchemy

import poolguard

PG_URL = "postgresql+psycopg://root@127.0.0.1:5432/test"
THREADS = 8
POOL_SIZE = THREADS


def bare_query(engine: sqlalchemy.Engine) -> Callable[[], None]:
    def op() -> None:
        with engine.connect() as connection:
            connection.exec_driver_sql("SELECT 1")

    return op


def guarded_query(guard: poolguard.Guard) -> Callable[[], None]:
    def op() -> None:
        with guard.connection() as connection:
            connection.exec_driver_sql("SELECT 1")

    return op


def bare_checkout(engine: sqlalchemy.Engine) -> Callable[[], None]:
    def op() -> None:
        engine.pool.connect().close()

    return op


def guarded_checkout(guard: poolguard.Guard, engine: sqlalchemy.Engine) -> Callable[[], None]:
    def op() -> None:
        with guard.request_scope():
            engine.pool.connect().close()

    return op


def time_round(op: Callable[[], None], ops: int, threads: int) -> float:
    """Seconds per operation for one round: ``ops`` operations split over ``threads`` threads."""
    if threads == 1:
        started = time.perf_counter()
        for _ in range(ops):
            op()
        return (time.perf_counter() - started) / ops
    per_thread = ops // threads
    barrier = threading.Barrier(threads + 1)

    def worker() -> None:
        barrier.wait()
        for _ in range(per_thread):
            op()

    workers = [threading.Thread(target=worker) for _ in range(threads)]
    for worker_thread in workers:
        worker_thread.start()
    barrier.wait()
    started = time.perf_counter()
    for worker_thread in workers:
        worker_thread.join()
    return (time.perf_counter() - started) / (per_thread * threads)


def compare(
    bare: Callable[[], None], guarded: Callable[[], None], *, rounds: int, ops: int, threads: int
) -> tuple[float, float]:
    """Median microseconds per operation (bare, guarded), over alternating rounds after a warm-up."""
    time_round(bare, max(ops // 10, threads), threads)
    time_round(guarded, max(ops // 10, threads), threads)
    bare_times: list[float] = []
    guarded_times: list[float] = []
    for _ in range(rounds):
        bare_times.append(time_round(bare, ops, threads))
        guarded_times.append(time_round(guarded, ops, threads))
    return statistics.median(bare_times) * 1e6, statistics.median(guarded_times) * 1e6


def make_engine(url: str) -> sqlalchemy.Engine:
    return sqlalchemy.create_engine(url, pool_size=POOL_SIZE, max_overflow=0, pool_timeout=30)


def bench_backend(label: str, url: str, *, rounds: int, ops: int) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = []
    with ExitStack() as stack:
        bare_engine = make_engine(url)
        stack.callback(bare_engine.dispose)
        guarded_engine = make_engine(url)
        stack.callback(guarded_engine.dispose)
        # No breaker trips or shedding here: max_wait is generous, so only the bookkeeping is measured.
        guard = poolguard.Guard(guarded_engine, name="bench", max_wait=30.0)
        stack.callback(guard.close)
        cases = [
            ("query (SELECT 1)", bare_query(bare_engine), guarded_query(guard)),
            ("checkout only", bare_checkout(bare_engine), guarded_checkout(guard, guarded_engine)),
        ]
        for name, bare, guarded in cases:
            for threads in (1, THREADS):
                bare_us, guarded_us = compare(bare, guarded, rounds=rounds, ops=ops, threads=threads)
                overhead = guarded_us - bare_us
                rows.append(
                    (
                        label,
                        name,
                        str(threads),
                        f"{bare_us:.1f}",
                        f"{guarded_us:.1f}",
                        f"{overhead:+.1f}",
                        f"{overhead / bare_us * 100:+.0f} %",
                    )
                )
                print(
                    f"  {label:<10} {name:<17} threads={threads}: bare {bare_us:.1f} us, guarded {guarded_us:.1f} us",
                    file=sys.stderr,
                    flush=True,
                )
    return rows


def postgres_reachable(url: str) -> bool:
    engine = sqlalchemy.create_engine(url)
    try:
        with engine.connect() as connection:
            connection.exec_driver_sql("SELECT 1")
        return True
    except sqlalchemy.exc.SQLAlchemyError:
        return False
    finally:
        engine.dispose()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=15, help="alternating rounds per side (default: 15)")
    parser.add_argument("--ops", type=int, default=2000, help="operations per round (default: 2000)")
    parser.add_argument("--pg-url", default=PG_URL, help=f"PostgreSQL URL (default: {PG_URL})")
    parser.add_argument("--no-postgres", action="store_true", help="SQLite only")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.ops < THREADS:
        parser.error(f"--rounds must be at least 1 and --ops at least {THREADS}")

    rows: list[tuple[str, ...]] = []
    with tempfile.TemporaryDirectory(prefix="poolguard-bench-") as workdir:
        sqlite_url = f"sqlite:///{Path(workdir) / 'bench.db'}"
        rows += bench_backend("SQLite", sqlite_url, rounds=args.rounds, ops=args.ops)
    if not args.no_postgres:
        shown = sqlalchemy.make_url(args.pg_url).render_as_string(hide_password=True)
        if postgres_reachable(args.pg_url):
            rows += bench_backend("PostgreSQL", args.pg_url, rounds=args.rounds, ops=args.ops)
        else:
            print(f"PostgreSQL at {shown} is not reachable: skipped (run `make services`)", file=sys.stderr)

    header = ("backend", "operation", "threads", "bare µs/op", "guarded µs/op", "overhead µs", "overhead")
    print(
        f"\npoolguard {poolguard.__version__}, SQLAlchemy {sqlalchemy.__version__}, "
        f"Python {platform.python_version()}, "
        f"{args.rounds} alternating rounds x {args.ops} ops, median per side\n"
    )
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" if i < 2 else "---:" for i in range(len(header))) + "|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
