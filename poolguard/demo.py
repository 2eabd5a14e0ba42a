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
tests can run a shorter version of exactly what users see; what is measured and how it is shown
(no I/O) is in :mod:`poolguard.demo_report`.
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
from poolguard.demo_report import (
    ERROR,
    OK,
    SHED,
    SIDES,
    DemoReport,
    DemoSettings,
    Outcome,
    Progress,
    Record,
    Summary,
    render_report,
    summarize,
)
from poolguard.guard import Guard

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
