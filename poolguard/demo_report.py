"""The demo's settings, what it measures and the table it prints: the part of ``poolguard demo`` that does no I/O.

:mod:`poolguard.demo` runs the workload; this module holds the knobs (:class:`DemoSettings`), one
request's outcome, the per-segment :class:`Summary` (counts, latency quantiles, goodput), the whole
:class:`DemoReport` and :func:`render_report`, the side-by-side table.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from poolguard.stats import quantile, rounded

__all__ = ["DemoReport", "DemoSettings", "Outcome", "Record", "Summary", "render_report", "summarize"]

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
