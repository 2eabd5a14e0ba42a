"""``poolguard demo``: the example app under overload and under an outage, unguarded vs guarded.

Claims about load shedding and circuit breaking are cheap; this runs them. The same workload goes
twice through the same engine settings, once through a plain SQLAlchemy engine (the way most
services run) and once through :class:`poolguard.Guard`, so the only difference is the guard.

Everything is built to run with no setup (a temporary SQLite file) and quickly, so times are scaled
down: the plain engine's ``pool_timeout`` of 3 s stands for SQLAlchemy's default 30 s, and the
simulated outage's connect timeout and the breaker's open interval shrink with the phase length.

The outage is simulated identically for both sides and where a real one hits: in the engine's
``do_connect`` event, every new connection attempt hangs for the connect timeout and then fails
with the driver's own ``OperationalError``; at the outage start the pool is disposed, so no
existing connection hides the outage. The workload pieces (:class:`DemoSettings`,
:class:`ExampleApp`, :func:`run_overload`, :func:`run_outage`, :func:`run_demo`) are public so the
tests can run a shorter version of exactly what users see.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy
from sqlalchemy import event, text
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.orm import Session
from sqlalchemy.pool import Pool

from poolguard._types import Clock
from poolguard.breaker import Breaker, BreakerState
from poolguard.guard import Guard
from poolguard.stats import quantile, rounded

__all__ = [
    "DemoReport",
    "DemoSettings",
    "ExampleApp",
    "OutageResult",
    "Outcome",
    "Record",
    "Side",
    "Summary",
    "create_sqlite_schema",
    "open_side",
    "render_report",
    "run_demo",
    "run_outage",
    "run_overload",
    "summarize",
]

OK, SHED, ERROR = 200, 503, 500
SIDES = ("plain", "guarded")
Progress = Callable[[str], None]


@dataclass(frozen=True, slots=True)
class DemoSettings:
    """Every knob of the demo; the CLI sets ``clients`` and ``seconds``, tests may set any.

    Defaults are chosen so the contrast is real, not staged: 32 clients each holding a connection
    for ``hold`` seconds on a pool of 4 means a plain pool queue of about 32 x 0.2 / 4 = 1.6 s, past
    the 1 s client deadline, while the guard's wait budget (0.25 s) plus one hold stays well within it.
    """

    clients: int = 32
    seconds: float = 4.0
    """Length of each phase; the outage timeline, connect timeout and breaker interval scale with it."""
    pool_size: int = 4
    hold: float = 0.2
    """Seconds each database request holds its connection (the query plus the app's work)."""
    deadline: float = 1.0
    """A response later than this is useless to the caller (it has timed out and moved on)."""
    pool_timeout: float = 3.0
    """The plain engine's checkout timeout, standing for SQLAlchemy's default 30 s."""
    max_wait: float = 0.25
    overload_factor: float = 4.0
    """Offered load in the overload phase, in multiples of the pool's capacity."""
    outage_load: float = 1.0
    """Offered load in the outage phase, as a share of the pool's capacity: a busy but normal day."""
    consecutive_failures: int = 3

    @property
    def capacity_rps(self) -> float:
        """Requests per second the pool can serve: its connections over the hold time."""
        return self.pool_size / self.hold

    @property
    def connect_timeout(self) -> float:
        """How long a connection attempt hangs during the outage (0.5 s, standing for 5 s, at 4 s phases)."""
        return self.seconds / 8

    @property
    def open_for(self) -> float:
        """The breaker's first open interval: it opens about a connect timeout into the outage and
        then probes shortly after the outage ends.

        Much longer than the connect timeout, so the attempts that were already hanging when the
        breaker opened have all failed before it half-opens and do not count against the probes.
        """
        return self.seconds * 0.4

    @property
    def outage_window(self) -> tuple[float, float]:
        """When the database is down, in seconds from the start of the outage phase."""
        return 0.15 * self.seconds, 0.65 * self.seconds


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one request answered: an HTTP-like status and, for a 503 or 500, why."""

    status: int
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class Record:
    """One request as the client saw it; ``start`` is seconds since the phase began."""

    start: float
    latency: float
    status: int
    reason: str | None


@dataclass(frozen=True, slots=True)
class Summary:
    """The table row of one phase segment and one side. Latencies are seconds, over every answer."""

    requests: int
    completed: int
    shed: int
    errors: int
    late: int
    p50: float | None
    p99: float | None
    p50_completed: float | None
    p99_completed: float | None
    goodput: float
    """Completed within the deadline, per second of the segment: what callers could actually use."""
    shed_reasons: dict[str, int] = field(default_factory=dict)
    error_types: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "completed": self.completed,
            "shed": self.shed,
            "errors": self.errors,
            "late": self.late,
            "p50": rounded(self.p50, 5),
            "p99": rounded(self.p99, 5),
            "p50_completed": rounded(self.p50_completed, 5),
            "p99_completed": rounded(self.p99_completed, 5),
            "goodput": round(self.goodput, 2),
            "shed_reasons": dict(self.shed_reasons),
            "error_types": dict(self.error_types),
        }


def _quantile(sorted_values: list[float], q: float) -> float | None:
    return quantile(sorted_values, q) if sorted_values else None


def summarize(records: list[Record], *, deadline: float, window: float) -> Summary:
    """Counts and latency quantiles of ``records``; goodput is over ``window`` seconds."""
    latencies = sorted(r.latency for r in records)
    completed = sorted(r.latency for r in records if r.status == OK)
    shed_reasons: dict[str, int] = {}
    error_types: dict[str, int] = {}
    for record in records:
        if record.status == SHED:
            key = record.reason or "unavailable"
            shed_reasons[key] = shed_reasons.get(key, 0) + 1
        elif record.status == ERROR:
            key = record.reason or "error"
            error_types[key] = error_types.get(key, 0) + 1
    in_time = sum(1 for latency in completed if latency <= deadline)
    return Summary(
        requests=len(records),
        completed=len(completed),
        shed=sum(shed_reasons.values()),
        errors=sum(error_types.values()),
        late=len(completed) - in_time,
        p50=_quantile(latencies, 0.5),
        p99=_quantile(latencies, 0.99),
        p50_completed=_quantile(completed, 0.5),
        p99_completed=_quantile(completed, 0.99),
        goodput=in_time / window if window > 0 else 0.0,
        shed_reasons=shed_reasons,
        error_types=error_types,
    )


# -- the example app ---------------------------------------------------------------------------------


class ExampleApp:
    """The service under test: ``/orders/{id}`` needs the database, ``/status`` does not.

    With ``guard`` None it runs the way most services do (a Session per request on the bare
    engine); with a guard it runs the way the adapters do (``guard.request_scope``), and answers as
    they do: 503 for ``Unavailable`` or a connection failure the breaker counted, 500 otherwise.
    """

    def __init__(self, engine: Engine, guard: Guard | None, *, hold: float) -> None:
        self.engine = engine
        self.guard = guard
        self.hold = hold
        self._query = _hold_query(engine.dialect.name)
        self._counter = 0

    def orders(self) -> Outcome:
        """A database route: one query, the connection held for ``hold`` seconds."""
        try:
            if self.guard is None:
                with Session(self.engine) as session, session.begin():
                    self._work(session)
            else:
                with self.guard.request_scope(route="/orders/{id}") as scope:
                    self._work(scope.session)
        except Exception as exc:
            # What the adapters answer: 503 for Unavailable and for a connection failure the
            # breaker counted (guard.unavailable_for), 500 for anything else.
            unavailable = self.guard.unavailable_for(exc) if self.guard is not None else None
            if unavailable is not None:
                return Outcome(SHED, unavailable.reason)
            return Outcome(ERROR, type(exc).__name__)
        return Outcome(OK)

    def status(self) -> Outcome:
        """A route that never touches the database: it must keep answering during an outage."""
        if self.guard is None:
            return Outcome(OK)
        with self.guard.request_scope(route="/status"):
            return Outcome(OK)

    def _work(self, session: Session) -> None:
        self._counter += 1
        if self._query is None:
            # SQLite has no server-side sleep: hold the checked-out connection from Python instead.
            session.execute(text("SELECT count(*) FROM orders WHERE id = :id"), {"id": self._counter % 100})
            time.sleep(self.hold)
        else:
            session.execute(text(self._query), {"s": self.hold})


def _hold_query(backend: str) -> str | None:
    """A statement that keeps the server busy for ``:s`` seconds, or None to sleep client-side."""
    if backend == "postgresql":
        return "SELECT pg_sleep(:s)"
    if backend in ("mysql", "mariadb"):
        return "SELECT SLEEP(:s)"
    return None


# -- one side: engine, optional guard, simulated outage ------------------------------------------------


@dataclass(slots=True)
class Side:
    """One half of the comparison: its engine, its guard (None for plain) and its outage switch."""

    name: str
    engine: Engine
    guard: Guard | None
    app: ExampleApp
    outage: threading.Event
    retired_pools: list[Pool] = field(default_factory=list)

    def start_outage(self) -> None:
        """The database goes away: new connects hang then fail, and no pooled connection survives.

        Connections in use when it happens go back to the replaced pool, which is kept so the side
        can close them once the phase is over.
        """
        self.outage.set()
        self.retired_pools.append(self.engine.pool)
        self.engine.dispose()

    def end_outage(self) -> None:
        self.outage.clear()


@contextmanager
def open_side(url: URL, settings: DemoSettings, *, guarded: bool) -> Iterator[Side]:
    """A fresh engine (and guard) per phase, so no state carries over; always disposed after."""
    engine = sqlalchemy.create_engine(
        url, pool_size=settings.pool_size, max_overflow=0, pool_timeout=settings.pool_timeout
    )
    outage = threading.Event()
    connect_timeout = settings.connect_timeout

    def unreachable(dialect: Any, record: Any, cargs: Any, cparams: Any) -> None:
        if outage.is_set():
            time.sleep(connect_timeout)
            raise dialect.loaded_dbapi.OperationalError("could not connect to the database (simulated outage)")

    event.listen(engine, "do_connect", unreachable)
    guard: Guard | None = None
    side: Side | None = None
    try:
        if guarded:
            breaker = Breaker(consecutive_failures=settings.consecutive_failures, open_for=settings.open_for)
            guard = Guard(engine, name="demo", max_wait=settings.max_wait, breaker=breaker)
        _warm_up(engine, settings.pool_size)
        app = ExampleApp(engine, guard, hold=settings.hold)
        side = Side("guarded" if guarded else "plain", engine, guard, app, outage)
        yield side
    finally:
        if guard is not None:
            guard.close()
        engine.dispose()
        for retired in side.retired_pools if side is not None else ():
            retired.dispose()


def _warm_up(engine: Engine, size: int) -> None:
    """Opens the pool's connections first, so neither side pays for them inside the measurement."""
    connections = [engine.connect() for _ in range(size)]
    for connection in connections:
        connection.close()


# -- load ---------------------------------------------------------------------------------------------


def _drive(
    route: Callable[[], Outcome],
    *,
    clients: int,
    rate: float,
    duration: float,
    t0: float,
    clock: Clock,
) -> tuple[list[Record], list[threading.Thread]]:
    """Starts ``clients`` threads offering ``rate`` requests/s in total for ``duration`` seconds.

    Each client paces itself to one request per ``clients / rate`` seconds and never has more than
    one in flight, like a caller that waits for its answer; a client that falls behind goes on at
    once rather than bursting to catch up. Requests start only inside the window; those in flight
    at its end are waited for. Returns the shared record list and the threads to join.
    """
    records: list[Record] = []
    pace = clients / rate
    end = t0 + duration

    def client(index: int) -> None:
        due = t0 + index * pace / clients
        while due < end:
            delay = due - clock()
            if delay > 0:
                time.sleep(delay)
            started = clock()
            outcome = route()
            finished = clock()
            records.append(Record(started - t0, finished - started, outcome.status, outcome.reason))
            due = max(due + pace, finished)

    threads = [threading.Thread(target=client, args=(i,), name=f"demo-client-{i}", daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    return records, threads


def run_overload(side: Side, settings: DemoSettings, *, clock: Clock = time.perf_counter) -> Summary:
    """Phase a: ``overload_factor`` times the pool's capacity for ``seconds``; the whole phase is one row."""
    t0 = clock() + 0.05
    records, threads = _drive(
        side.app.orders,
        clients=settings.clients,
        rate=settings.capacity_rps * settings.overload_factor,
        duration=settings.seconds,
        t0=t0,
        clock=clock,
    )
    for thread in threads:
        thread.join()
    return summarize(records, deadline=settings.deadline, window=settings.seconds)


@dataclass(frozen=True, slots=True)
class OutageResult:
    """Phase b for one side: requests started while the database was down, after it came back,
    the DB-free route while it was down, and the breaker's transitions (seconds since phase start)."""

    outage: Summary
    recovery: Summary
    db_free: Summary
    transitions: list[tuple[float, str]]


def run_outage(side: Side, settings: DemoSettings, *, clock: Clock = time.perf_counter) -> OutageResult:
    """Phase b: a normal load; after a short healthy start the database is unreachable, then back."""
    down, up = settings.outage_window
    transitions: list[tuple[float, str]] = []
    t0 = clock() + 0.05
    remove_listener: Callable[[], None] | None = None
    if side.guard is not None and side.guard.breaker is not None:

        def on_transition(old: BreakerState, new: BreakerState) -> None:
            transitions.append((round(clock() - t0, 3), new.value))

        remove_listener = side.guard.breaker.add_listener(on_transition)
    try:
        records, threads = _drive(
            side.app.orders,
            clients=settings.clients,
            rate=settings.capacity_rps * settings.outage_load,
            duration=settings.seconds,
            t0=t0,
            clock=clock,
        )
        probe, probe_threads = _drive(
            side.app.status, clients=1, rate=50.0, duration=settings.seconds, t0=t0, clock=clock
        )
        _sleep_until(t0 + down, clock)
        # Segments use the moments the switch actually flipped: a request that started a hair before
        # still found the database up.
        down = clock() - t0
        side.start_outage()
        _sleep_until(t0 + up, clock)
        up = clock() - t0
        side.end_outage()
        for thread in (*threads, *probe_threads):
            thread.join()
    finally:
        if remove_listener is not None:
            remove_listener()
    window = up - down
    return OutageResult(
        outage=summarize([r for r in records if down <= r.start < up], deadline=settings.deadline, window=window),
        recovery=summarize(
            [r for r in records if up <= r.start], deadline=settings.deadline, window=settings.seconds - up
        ),
        db_free=summarize([r for r in probe if down <= r.start < up], deadline=settings.deadline, window=window),
        transitions=transitions,
    )


def _sleep_until(moment: float, clock: Clock) -> None:
    delay = moment - clock()
    if delay > 0:
        time.sleep(delay)


# -- the whole demo -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DemoReport:
    """Everything the demo measured, keyed by segment then side ("plain", "guarded")."""

    database: str
    """The URL with its password hidden, or a description of the temporary SQLite file."""
    backend: str
    settings: DemoSettings
    segments: dict[str, dict[str, Summary]]
    db_free: dict[str, Summary]
    transitions: list[tuple[float, str]]
    elapsed: float

    def to_dict(self) -> dict[str, Any]:
        settings = self.settings
        down, up = settings.outage_window
        return {
            "database": self.database,
            "backend": self.backend,
            "settings": {
                "clients": settings.clients,
                "seconds": settings.seconds,
                "pool_size": settings.pool_size,
                "max_overflow": 0,
                "hold": settings.hold,
                "deadline": settings.deadline,
                "pool_timeout": settings.pool_timeout,
                "max_wait": settings.max_wait,
                "connect_timeout": settings.connect_timeout,
                "breaker": {"consecutive_failures": settings.consecutive_failures, "open_for": settings.open_for},
                "overload_rps": round(settings.capacity_rps * settings.overload_factor, 2),
                "outage_rps": round(settings.capacity_rps * settings.outage_load, 2),
                "outage_window": [down, up],
            },
            "segments": {
                segment: {side: summary.to_dict() for side, summary in sides.items()}
                for segment, sides in self.segments.items()
            },
            "db_free_route": {side: summary.to_dict() for side, summary in self.db_free.items()},
            "breaker_transitions": [{"at": at, "state": state} for at, state in self.transitions],
            "elapsed": round(self.elapsed, 2),
        }


def run_demo(url: str | URL | None, settings: DemoSettings, *, progress: Progress | None = None) -> DemoReport:
    """Runs both phases on both sides; with ``url`` None, on a temporary SQLite file removed after."""
    say = progress or (lambda _message: None)
    started = time.perf_counter()
    workdir: Path | None = None
    try:
        if url is None:
            workdir = Path(tempfile.mkdtemp(prefix="poolguard-demo-"))
            target = make_url(f"sqlite:///{workdir / 'demo.db'}")
            create_sqlite_schema(target)
            database = "SQLite (a temporary file, removed afterwards)"
        else:
            target = make_url(url) if isinstance(url, str) else url
            database = target.render_as_string(hide_password=True)
        segments: dict[str, dict[str, Summary]] = {"overload": {}, "outage": {}, "recovery": {}}
        db_free: dict[str, Summary] = {}
        transitions: list[tuple[float, str]] = []
        step = 0
        for phase in ("overload", "outage"):
            for side_name in SIDES:
                step += 1
                say(f"[{step}/4] {phase}, {side_name} ...")
                phase_started = time.perf_counter()
                with open_side(target, settings, guarded=side_name == "guarded") as side:
                    if phase == "overload":
                        segments["overload"][side_name] = run_overload(side, settings)
                    else:
                        result = run_outage(side, settings)
                        segments["outage"][side_name] = result.outage
                        segments["recovery"][side_name] = result.recovery
                        db_free[side_name] = result.db_free
                        if side.guard is not None:
                            transitions = result.transitions
                say(f"      done in {time.perf_counter() - phase_started:.1f} s")
        return DemoReport(
            database=database,
            backend=target.get_backend_name(),
            settings=settings,
            segments=segments,
            db_free=db_free,
            transitions=transitions,
            elapsed=time.perf_counter() - started,
        )
    finally:
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)


def create_sqlite_schema(url: URL) -> None:
    """A small table for the example route to read, so the query is a real one."""
    engine = sqlalchemy.create_engine(url)
    try:
        with engine.begin() as connection:
            connection.exec_driver_sql("CREATE TABLE orders (id INTEGER PRIMARY KEY, total INTEGER NOT NULL)")
            connection.exec_driver_sql(
                "INSERT INTO orders (id, total) "
                "WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i < 99) SELECT i, i * 7 FROM n"
            )
    finally:
        engine.dispose()


# -- rendering --------------------------------------------------------------------------------------------


def _ms(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 0.01:
        return f"{seconds * 1000:.1f} ms"
    return f"{seconds * 1000:,.0f} ms"


def render_report(report: DemoReport) -> str:
    """The side-by-side table, with the setup above it and what to read from it below."""
    s = report.settings
    down, up = s.outage_window
    lines = [
        f"poolguard demo on {report.database}",
        "",
        f"Both sides: the same engine settings (pool_size={s.pool_size}, max_overflow=0), the same app, the same load.",
        f"  plain    sqlalchemy.create_engine(..., pool_timeout={s.pool_timeout:g})",
        f"  guarded  the same engine + poolguard.Guard(engine, max_wait={s.max_wait:g}, "
        f"breaker=Breaker(consecutive_failures={s.consecutive_failures}, open_for={s.open_for:g}))",
        f"Each database request holds its connection {s.hold * 1000:.0f} ms; a caller gives up after "
        f"{s.deadline:g} s (later answers count as late).",
        f"Times are scaled down about 10x so the demo stays short: pool_timeout={s.pool_timeout:g} s stands for "
        f"SQLAlchemy's default 30 s, the {s.connect_timeout:g} s connect timeout for {s.connect_timeout * 10:g} s.",
        "",
        f"overload  {s.clients} clients offer {s.capacity_rps * s.overload_factor:.0f} requests/s, "
        f"{s.overload_factor:g}x what the pool serves ({s.capacity_rps:.0f}/s), for {s.seconds:g} s.",
        f"outage    {s.capacity_rps * s.outage_load:.0f} requests/s; the database is unreachable from "
        f"{down:g} s to {up:g} s (each connect hangs {s.connect_timeout:g} s, then fails).",
        "recovery  the same phase, requests started after the database came back.",
        "",
    ]
    header: tuple[str, ...] = (
        "phase",
        "side",
        "completed",
        "shed (503)",
        "errors (500)",
        f"late (>{s.deadline:g}s)",
        "p50",
        "p99",
        "goodput",
    )
    rows: list[tuple[str, ...]] = [header]
    for segment, sides in report.segments.items():
        for side_name in SIDES:
            summary = sides.get(side_name)
            if summary is None:
                continue
            rows.append(
                (
                    segment,
                    side_name,
                    str(summary.completed),
                    str(summary.shed),
                    str(summary.errors),
                    str(summary.late),
                    _ms(summary.p50),
                    _ms(summary.p99),
                    f"{summary.goodput:.1f}/s",
                )
            )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for index, row in enumerate(rows):
        cells = [row[0].ljust(widths[0]), row[1].ljust(widths[1])]
        cells += [cell.rjust(widths[i + 2]) for i, cell in enumerate(row[2:])]
        lines.append("  ".join(cells).rstrip())
        if index == 0:
            lines.append("  ".join("-" * w for w in widths))
    lines += [
        "",
        "p50/p99: how long callers waited for any answer; goodput: answers in time per second, what callers could use.",
    ]
    free = report.db_free
    if free:
        parts = [
            f"{name} {summary.completed}/{summary.requests} answered, p99 {_ms(summary.p99)}"
            for name, summary in free.items()
        ]
        lines.append("DB-free route (/status) during the outage: " + "; ".join(parts) + ".")
    if report.transitions:
        steps = ", ".join(f"{state} at {at:.2f} s" for at, state in report.transitions)
        lines.append(f"Guarded breaker: {steps}.")
    else:
        lines.append("Guarded breaker: never changed state.")
    lines.append(f"({report.elapsed:.0f} s in all.)")
    return "\n".join(lines)
