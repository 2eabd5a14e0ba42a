"""The outage benchmark (issue 12): real apps under real servers while their database hangs or refuses.

    python -m benchmarks.outage [--runs 1] [--fault blackhole|refuse] [--rows flask,django-pool,...]
        [--variants bare,guarded[,own-engine]] [--warmup 3] [--fault-seconds 8] [--after 5]

(from the repository root; needs PostgreSQL on 127.0.0.1:5432, user root, database test.) Rows:

- ``flask``: Flask under gunicorn (gthread, 1 worker x 8 threads), psycopg;
- ``fastapi-async``: FastAPI, ``async def`` routes, under uvicorn (1 worker), asyncpg;
- ``fastapi-sync``: FastAPI, ``def`` routes (the thread pool), under uvicorn, psycopg;
- ``django-pool``: Django under gunicorn (gthread 1 x 8) with its psycopg pool (``OPTIONS={"pool": True}``);
- ``django-persistent``: Django under gunicorn (gthread 1 x 8) with ``CONN_MAX_AGE=60``.

Each row is served ``bare`` (no poolguard: SQLAlchemy's or Django's defaults, a ``SELECT 1`` health
route) and ``guarded`` (poolguard adopted as the README says, its defaults, no options), one after
the other, in alternating order from run to run; ``own-engine`` (Flask and FastAPI: the bare app's
own engine under a default ``Guard``) on request. The apps are ``benchmarks/apps/*`` (``outage()``,
``django_project/outage_*``), served from ``benchmarks/apps/outage_app.py``; the client and the
server helpers are ``benchmarks/_load.py`` (shared with ``benchmarks.overload``).

Each scenario has a fresh server, whose database is PostgreSQL behind a fresh TCP proxy
(``tests/support/tcpproxy.py``), and one asyncio client sending open-loop load, a new connection per
request (``Connection: close``), each request with its own 5 s deadline: ``GET /db`` (a 10 ms
query) at 40 per second, ``GET /nodb`` (no database) at 20 per second, ``GET /health/db`` every
250 ms. After ``--warmup`` seconds the fault starts (t0): ``blackhole`` (connections are accepted,
nothing is forwarded: a hung database) or ``refuse`` (live connections reset, new ones refused: a
stopped database); ``--fault-seconds`` later the proxy heals (or listens again), and the load goes on
for ``--after`` seconds. Figures (times from t0 or from the heal):

- first fast 503: when the first 503 answered within 50 ms arrived (``never``: none did);
- DB p99 after 2 s: the p99 latency of the ``/db`` requests sent from t0 + 2 s to the heal (``>5 s``: an
  unanswered one in the top 1 %), and the share of them answered 503;
- hung: the share of ``/db`` requests sent from t0 on with no answer within 5 s;
- DB-free p99: of ``/nodb`` before the fault, and of those sent from t0 + 2 s to the heal (during the
  detection window a thread server's threads may all be held by requests hung on the database, so
  a DB-free request queues behind them until they are aborted: that window is excluded, as for
  the DB route, and all ``/nodb`` from t0 on must still be answered 200);
- health 503: the share of ``/health/db`` polls sent from t0 + 2 s to the heal answered 503;
- recovery: from the heal to the answer of the first ``/db`` request answered 200 after which every
  ``/db`` request (by the time it was sent) is answered 200 (``>N s``: none among those sent in the
  ``--after`` seconds; a figure above ``--after`` is an answer to one of them that came late).

Targets (issue 12), each row and fault: after the 2 s detection window every ``/db`` request is
answered 503 and their p99 is at most 50 ms; no request of any route goes unanswered for 5 s; health
is 503 at every poll; ``/nodb`` answers 200 with a p99 after the detection window at most 50 ms above
its p99 before the fault (the machine's noise moves a p99 by tens of ms); recovery at most 1 s. With ``--runs N``
a cell is the median over the runs, the range in brackets, and a row passes when every run does.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks import _load
from benchmarks._load import NO_ANSWER, Sample, cell, counts, p99
from benchmarks.server import versions
from tests.support.tcpproxy import TcpProxy

PG = ("127.0.0.1", 5432)
THREADS = 8
TIMEOUT = 5.0
"""The client's deadline per request: no answer by then is a hang."""
FAST = 0.050
DETECTION = 2.0
RECOVERY = 1.0
DB_RATE = 40.0
NODB_RATE = 20.0
HEALTH_EVERY = 0.25

ROWS = {
    "flask": "Flask, gunicorn",
    "fastapi-async": "FastAPI async, uvicorn",
    "fastapi-sync": "FastAPI def, uvicorn",
    "django-pool": "Django pool, gunicorn",
    "django-persistent": "Django CONN_MAX_AGE, gunicorn",
}
VARIANTS = ("bare", "guarded", "own-engine")
FAULTS = ("blackhole", "refuse")


@dataclass
class Trace:
    """One scenario's requests, and when the fault started and ended (``time.monotonic``)."""

    samples: list[Sample] = field(default_factory=list)
    fault: float = math.nan
    heal: float = math.nan
    end: float = math.nan

    def of(self, route: str, start: float = -math.inf, stop: float = math.inf) -> list[Sample]:
        return [s for s in self.samples if s.route == route and start <= s.sent < stop]


@dataclass(frozen=True)
class Figures:
    first_fast_503: float
    """Seconds from t0; ``math.inf``: never."""
    db_p99_after: float
    db_503_after: float
    """Share, 0 to 1."""
    hung: float
    """Share of /db requests sent from t0 on."""
    hung_any: int
    """Unanswered requests of any route, from t0 on."""
    nodb_p99_before: float
    nodb_p99_fault: float
    nodb_all_200: bool
    health_503: float
    recovery: float
    """Seconds from the heal; ``math.inf``: not within the run."""
    db_statuses: str
    health_statuses: str

    def misses(self) -> list[str]:
        """The targets this scenario misses."""
        missed = []
        if self.db_503_after < 1 or self.db_p99_after > FAST:
            missed.append("503<=50ms")
        if self.hung_any:
            missed.append("no hang")
        if self.health_503 < 1:
            missed.append("health 503")
        if not self.nodb_all_200 or self.nodb_p99_fault > self.nodb_p99_before + FAST:
            missed.append("DB-free")
        if self.recovery > RECOVERY:
            missed.append("recovery<=1s")
        return missed


def figures(trace: Trace) -> Figures:
    t0, heal = trace.fault, trace.heal
    db = sorted(trace.of("db"), key=lambda s: s.sent)
    fast = [s.done - t0 for s in db if s.sent >= t0 and s.status == 503 and s.latency <= FAST]
    after = trace.of("db", t0 + DETECTION, heal)
    since_fault = trace.of("db", t0)
    health = trace.of("health", t0 + DETECTION, heal)
    nodb_fault = trace.of("nodb", t0, heal)
    nodb_detected = trace.of("nodb", t0 + DETECTION, heal)
    bad = [i for i, s in enumerate(db) if s.status != 200]
    if not bad:
        recovery = 0.0
    elif bad[-1] + 1 < len(db):
        recovery = max(0.0, db[bad[-1] + 1].done - heal)
    else:
        recovery = math.inf
    return Figures(
        first_fast_503=min(fast, default=math.inf),
        db_p99_after=p99([s.latency for s in after]),
        db_503_after=sum(s.status == 503 for s in after) / max(1, len(after)),
        hung=sum(s.status == NO_ANSWER for s in since_fault) / max(1, len(since_fault)),
        hung_any=sum(s.status == NO_ANSWER for s in trace.samples if s.sent >= t0),
        nodb_p99_before=p99([s.latency for s in trace.of("nodb", stop=t0)]),
        nodb_p99_fault=p99([s.latency for s in nodb_detected]),
        nodb_all_200=all(s.status == 200 for s in nodb_fault),
        health_503=sum(s.status == 503 for s in health) / max(1, len(health)),
        recovery=recovery,
        db_statuses=counts(trace.of("db", t0, heal)),
        health_statuses=counts(trace.of("health", t0, heal)),
    )


# -- the client ----------------------------------------------------------------------------------------


async def fetch(port: int, route: str, path: str, trace: Trace) -> None:
    """One request on a connection of its own, with the ``TIMEOUT`` deadline; its sample goes to ``trace``."""
    await _load.fetch(port, route, path, trace.samples, TIMEOUT)


async def drive(port: int, proxy: TcpProxy, fault: str, timeline: tuple[float, float, float]) -> Trace:
    """Open-loop load on the three routes, the fault from t0 for its duration, then the load goes on."""
    warmup, duration, after = timeline
    trace = Trace()
    pending: set[asyncio.Task[None]] = set()
    start = time.monotonic()
    t0, heal, end = start + warmup, start + warmup + duration, start + warmup + duration + after

    async def until(moment: float) -> None:
        await asyncio.sleep(max(0.0, moment - time.monotonic()))

    async def ticker(route: str, path: str, every: float, offset: float) -> None:
        n = 0
        while (moment := start + offset + n * every) < end:
            await until(moment)
            task = asyncio.create_task(fetch(port, route, path, trace))
            pending.add(task)
            task.add_done_callback(pending.discard)
            n += 1

    async def inject() -> None:
        await until(t0)
        trace.fault = time.monotonic()
        await asyncio.to_thread(proxy.blackhole if fault == "blackhole" else proxy.stop)
        await until(heal)
        await asyncio.to_thread(proxy.heal if fault == "blackhole" else proxy.start)
        trace.heal = time.monotonic()

    await asyncio.gather(
        ticker("db", "/db", 1 / DB_RATE, 0.0),
        ticker("nodb", "/nodb", 1 / NODB_RATE, 0.011),
        ticker("health", "/health/db", HEALTH_EVERY, 0.007),
        inject(),
    )
    trace.end = time.monotonic()
    while pending:  # each bounded by TIMEOUT
        await asyncio.gather(*list(pending))
    return trace


# -- a scenario: a fresh server (``benchmarks._load``) behind a fresh proxy ----------------------------


def scenario(row: str, variant: str, fault: str, timeline: tuple[float, float, float], tmp: Path) -> Figures:
    proxy = TcpProxy(PG, max_connections=500).start()
    try:
        log = tmp / f"{row}-{variant}-{fault}.log"
        with _load.serving(row, variant, proxy.port, log, threads=THREADS) as port:
            trace = asyncio.run(drive(port, proxy, fault, timeline))
    finally:
        proxy.stop()
    return figures(trace)


# -- the report ---------------------------------------------------------------------------------------


def seconds(value: float) -> str:
    if math.isnan(value):
        return "n/a"
    if math.isinf(value):
        return f">{TIMEOUT:g} s" if value > 0 else "-"
    return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.1f} s"


def recovery_text(recovery: float, after: float) -> str:
    return f">{after:g} s" if math.isinf(recovery) else seconds(recovery)


def share(value: float) -> str:
    return f"{value * 100:.0f} %"


def report_row(row: str, variant: str, fault: str, runs: list[Figures], after: float) -> str:
    misses = sorted({miss for run in runs for miss in run.misses()})
    verdict = "**pass**" if not misses else "fail: " + ", ".join(misses)
    nodb = f"{cell([r.nodb_p99_before for r in runs], seconds)} → {cell([r.nodb_p99_fault for r in runs], seconds)}"
    if not all(r.nodb_all_200 for r in runs):
        nodb += " (not all 200)"
    cells = [
        ROWS[row],
        variant,
        fault,
        cell([r.first_fast_503 for r in runs], seconds, cap="never"),
        cell([r.db_p99_after for r in runs], seconds),
        cell([r.db_503_after for r in runs], share),
        cell([r.hung for r in runs], share),
        nodb,
        cell([r.health_503 for r in runs], share),
        cell([r.recovery for r in runs], seconds, cap=f">{after:g} s"),
        verdict,
    ]
    return "| " + " | ".join(cells) + " |"


HEADER = (
    "| row | variant | fault | first fast 503 | DB p99 after 2 s | DB 503 after 2 s | DB hung | "
    "DB-free p99 before → after 2 s | health 503 | recovery | targets |\n"
    "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|"
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--fault", choices=(*FAULTS, "both"), default="both")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of: {', '.join(ROWS)}")
    parser.add_argument("--variants", default="bare,guarded", help=f"comma-separated, of: {', '.join(VARIANTS)}")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds of load before the fault")
    parser.add_argument("--fault-seconds", type=float, default=8.0, help="how long the fault lasts")
    parser.add_argument("--after", type=float, default=5.0, help="seconds of load after the heal")
    args = parser.parse_args()
    rows = [row for row in args.rows.split(",") if row]
    variants = [variant for variant in args.variants.split(",") if variant]
    if unknown := sorted(set(rows) - set(ROWS)) + sorted(set(variants) - set(VARIANTS)):
        parser.error(f"unknown rows or variants: {', '.join(unknown)}")
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    if args.fault_seconds <= DETECTION:
        parser.error(f"--fault-seconds must be above the {DETECTION:g} s detection window")
    faults = FAULTS if args.fault == "both" else (args.fault,)
    timeline = (args.warmup, args.fault_seconds, args.after)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))

    print(f"outage benchmark: {versions()}", flush=True)
    print(
        f"--runs {args.runs}, warm-up {args.warmup:g} s, fault {args.fault_seconds:g} s, after {args.after:g} s; "
        f"/db {DB_RATE:g}/s, /nodb {NODB_RATE:g}/s, /health/db every {HEALTH_EVERY * 1000:.0f} ms",
        flush=True,
    )
    results: dict[tuple[str, str, str], list[Figures]] = {}
    with tempfile.TemporaryDirectory(prefix="poolguard-outage-") as tmp:
        for number in range(args.runs):
            for fault in faults:
                for row in rows:
                    order = variants if number % 2 == 0 else variants[::-1]
                    for variant in order:
                        if variant == "own-engine" and row.startswith("django"):
                            continue
                        found = scenario(row, variant, fault, timeline, Path(tmp))
                        results.setdefault((row, variant, fault), []).append(found)
                        print(
                            f"run {number + 1} {row} {variant} {fault}: /db during the fault {found.db_statuses}; "
                            f"health {found.health_statuses}; recovery {recovery_text(found.recovery, args.after)}; "
                            f"misses: {', '.join(found.misses()) or 'none'}",
                            flush=True,
                        )
    print()
    print(HEADER)
    for fault in faults:
        for row in rows:
            for variant in variants:
                if (row, variant, fault) in results:
                    print(report_row(row, variant, fault, results[(row, variant, fault)], args.after))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # the servers and the proxy are stopped on the way out
        sys.exit(130)
