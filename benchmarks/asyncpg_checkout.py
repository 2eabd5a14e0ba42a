"""Per checkout, in process: a Guard over an asyncpg pool against the bare pool, measured in the same run.

    python -m benchmarks.asyncpg_checkout [--rounds 21] [--ops 4000] [--dsn DSN]

Pairs of asyncpg pools with identical settings (``min_size = max_size = 8``, warmed): one bare, one
watched by ``poolguard.Guard(pool, name="bench")`` with poolguard's defaults (watchdog thread
included; no OpenTelemetry SDK, so no telemetry call). Operations, on one task and on 8 at once:

- ``acquire + release``: ``async with pool.acquire(): pass`` against ``async with guard.connection(): pass``,
  on pools as asyncpg makes them (a release resets the connection: one round trip), and on pools
  whose ``reset`` does nothing, where the pool's own work is all there is to compare with (the
  strictest test of the guard's cost);
- ``SELECT 1``: the same with ``await conn.fetchval("SELECT 1")`` inside (default pools).

A figure is CPU time per operation (``time.process_time``: this process's threads, the watchdog's
included; time spent waiting for the server is not in it, so other work on the machine moves it far
less than wall time), then wall time. Rounds alternate bare and guarded after a warm-up, which side
goes first alternating too; a figure is the median of its rounds with the interquartile range, and
the guard's extra is the median of the paired per-round differences. Issue 15's target: the guard
adds under 25 % to acquire + release, and less than asyncpg's own acquire costs (measured apart, the
acquire alone timed on one task: ``await pool.acquire()`` against the guard's acquire, rounds
paired). The machine's load average before and after is printed: the runs share it with other work.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from collections.abc import Awaitable, Callable

import asyncpg

import poolguard

DSN = "postgresql://root@127.0.0.1:5432/test"
TASKS = 8

Op = Callable[[], Awaitable[None]]


async def time_round(op: Op, ops: int, tasks: int) -> tuple[float, float]:
    """µs of CPU and of wall time per operation: ``ops`` operations split over ``tasks`` concurrent tasks."""
    per_task = ops // tasks

    async def worker() -> None:
        for _ in range(per_task):
            await op()

    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(tasks)))
    done = per_task * tasks
    return (time.process_time() - cpu) / done * 1e6, (time.perf_counter() - wall) / done * 1e6


def quartiles(values: list[float]) -> tuple[float, float, float]:
    q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, median, q3


Rounds = tuple[list[tuple[float, float]], list[tuple[float, float]]]


async def compare(bare: Op, guarded: Op, rounds: int, ops: int, tasks: int) -> Rounds:
    """(CPU, wall) µs per operation of each side, per round, alternating (and who goes first) after a warm-up."""
    for op in (bare, guarded):
        await time_round(op, max(ops // 4, tasks), tasks)
    times: Rounds = ([], [])
    for round_number in range(rounds):
        order = ((0, bare), (1, guarded)) if round_number % 2 == 0 else ((1, guarded), (0, bare))
        for side, op in order:
            times[side].append(await time_round(op, ops, tasks))
    return times


async def acquire_alone(pool: asyncpg.Pool, guard: poolguard.Guard, rounds: int, ops: int) -> Rounds:
    """µs of wall time of the acquire alone (the release is not timed), per round: asyncpg's own
    ``await pool.acquire()`` against the guard's ``await guard.connection().__aenter__()`` on a pool of
    the same settings, rounds alternating. The guard's side is asyncpg's acquire and its own work around it."""

    async def bare() -> float:
        started = time.perf_counter()
        connection = await pool.acquire()
        spent = time.perf_counter() - started
        await pool.release(connection)
        return spent

    async def guarded() -> float:
        block = guard.connection()
        started = time.perf_counter()
        await block.__aenter__()
        spent = time.perf_counter() - started
        await block.__aexit__(None, None, None)
        return spent

    times: Rounds = ([], [])
    for round_number in range(rounds + 1):  # the first is a warm-up
        order = ((0, bare), (1, guarded)) if round_number % 2 == 0 else ((1, guarded), (0, bare))
        for side, op in order:
            spent = 0.0
            for _ in range(ops):
                spent += await op()
            if round_number:
                times[side].append((spent / ops * 1e6, spent / ops * 1e6))
    return times


def row(name: str, tasks: int, times: Rounds) -> str:
    cells = []
    for measure in (0, 1):  # CPU, wall
        bare = [r[measure] for r in times[0]]
        guarded = [r[measure] for r in times[1]]
        b1, b, b3 = quartiles(bare)
        g1, g, g3 = quartiles(guarded)
        p1, extra, p3 = quartiles([g_round - b_round for b_round, g_round in zip(bare, guarded, strict=True)])
        cells.append(
            f"{b:.1f} ({b1:.1f}-{b3:.1f}) | {g:.1f} ({g1:.1f}-{g3:.1f}) "
            f"| **{extra:+.1f}** ({p1:+.1f} to {p3:+.1f}), **{extra / b * 100:+.0f} %**"
        )
    return f"| {name} | {tasks} | " + " | ".join(cells) + " |"


async def no_reset(connection: asyncpg.Connection) -> None:
    """A release without asyncpg's reset round trip: what is left is the pool's own work."""


async def run(dsn: str, rounds: int, ops: int) -> None:
    bare_pool = await asyncpg.create_pool(dsn, min_size=TASKS, max_size=TASKS)
    guarded_pool = await asyncpg.create_pool(dsn, min_size=TASKS, max_size=TASKS)
    bare_noreset = await asyncpg.create_pool(dsn, min_size=TASKS, max_size=TASKS, reset=no_reset)
    guarded_noreset = await asyncpg.create_pool(dsn, min_size=TASKS, max_size=TASKS, reset=no_reset)
    guard = poolguard.Guard(guarded_pool, name="bench")
    guard_noreset = poolguard.Guard(guarded_noreset, name="bench-noreset")
    try:

        async def bare_acquire() -> None:
            async with bare_pool.acquire():
                pass

        async def guarded_acquire() -> None:
            async with guard.connection():
                pass

        async def bare_acquire_noreset() -> None:
            async with bare_noreset.acquire():
                pass

        async def guarded_acquire_noreset() -> None:
            async with guard_noreset.connection():
                pass

        async def bare_query() -> None:
            async with bare_pool.acquire() as connection:
                await connection.fetchval("SELECT 1")

        async def guarded_query() -> None:
            async with guard.connection() as connection:
                await connection.fetchval("SELECT 1")

        print(
            "| operation | tasks | CPU µs/op bare, median (IQR) | guarded | guard's extra (paired) "
            "| wall µs/op bare | guarded | guard's extra (paired) |"
        )
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        for name, bare, guarded, scale in (
            ("acquire + release, no reset", bare_acquire_noreset, guarded_acquire_noreset, 1),
            ("acquire + release (asyncpg's reset: a round trip)", bare_acquire, guarded_acquire, 4),
            ("SELECT 1", bare_query, guarded_query, 4),
        ):
            for tasks in (1, TASKS):
                print(row(name, tasks, await compare(bare, guarded, rounds, ops // scale, tasks)), flush=True)
        bare_alone, guarded_alone = await acquire_alone(bare_noreset, guard_noreset, rounds, ops)
        own = quartiles([wall for wall, _ in bare_alone])
        extra = quartiles([g - b for (b, _), (g, _) in zip(bare_alone, guarded_alone, strict=True)])
        print(
            f"\nThe acquire alone (wall µs, release untimed), one task: asyncpg's own `await pool.acquire()` "
            f"{own[1]:.1f} ({own[0]:.1f}-{own[2]:.1f}); the guard's extra on it, paired: "
            f"**{extra[1]:+.1f}** ({extra[0]:+.1f} to {extra[2]:+.1f})"
        )
    finally:
        guard.close()
        guard_noreset.close()
        for pool in (bare_pool, guarded_pool, bare_noreset, guarded_noreset):
            await pool.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=21, help="alternating rounds per side")
    parser.add_argument("--ops", type=int, default=4000, help="operations per round (a quarter for SELECT 1)")
    parser.add_argument("--dsn", default=DSN)
    args = parser.parse_args()
    before = os.getloadavg()
    print(
        f"poolguard {poolguard.__version__}, asyncpg {asyncpg.__version__}, Python {sys.version.split()[0]}, "
        f"{args.rounds} rounds x {args.ops} ops; load average {before[0]:.2f} {before[1]:.2f}\n"
    )
    asyncio.run(run(args.dsn, args.rounds, args.ops))
    after = os.getloadavg()
    print(f"load average after: {after[0]:.2f} {after[1]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
