"""The connection budget: what a fleet may open on one database server, against what the server allows.

One arithmetic, used by ``poolguard budget`` and by Django's check ``poolguard.W002``::

    per process   = pool_size + max_overflow + other        (other: a second pool, a listener, ...)
    per service   = replicas x processes x per process       (processes: per pod, gunicorn's --workers)
    demand        = the sum over the services
    rollout peak  = demand + the largest one service's surge  (ceil(max_surge x replicas) extra pods)
    usable        = max_connections - reserved               (superuser_reserved_connections, and
                                                              reserved_connections on PostgreSQL 16+)
    headroom      = usable - peak
    verdict       = over   when headroom < 0: at full load (or during a rollout) a connect is refused
                    tight  when headroom < margin: it fits, but eats what admin sessions, migrations,
                           cron jobs and ``poolguard doctor`` need
                    fits   otherwise

A rolling deploy (Kubernetes' default ``maxSurge`` 25 %, rounded up) starts the new pods before it
stops the old ones, so for a while the service runs more pods than its replicas; services are
assumed to roll one at a time, so the peak adds the largest single surge. ``max_surge`` 0 turns it off.

With PgBouncer in front the server sees PgBouncer's server connections (its instances times the
cap of each: ``max_db_connections``, else ``default_pool_size + reserve_pool_size`` per pool) and
the fleet's pools are PgBouncer's clients, checked against ``max_client_conn`` of all instances.

When the fleet does not fit, two ways out are computed: pool sizes that fit (the room left after the
margin shared in proportion to each service's current demand, every process keeping at least one
connection) and PgBouncer settings that fit. Both are checked by running this same arithmetic again.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from poolguard._validate import non_negative_int, positive_int
from poolguard.engine import DEFAULT_WORKERS, PGBOUNCER_POOL_SIZE
from poolguard.errors import ConfigError

__all__ = [
    "Budget",
    "Fleet",
    "PgBouncerSettings",
    "Quantity",
    "ServerLimits",
    "Service",
    "assess",
    "engine_pool",
]

Verdict = Literal["fits", "tight", "over"]

EXIT_CODES: dict[Verdict, int] = {"fits": 0, "tight": 0, "over": 1}


@dataclass(frozen=True, slots=True)
class Quantity:
    """A count, or a percentage of some base (``10%`` of the usable connections, ``25%`` of the replicas)."""

    value: float
    percent: bool = False

    def of(self, base: int) -> int:
        """Whole connections or pods, rounded up (as Kubernetes rounds ``maxSurge``)."""
        return math.ceil(base * self.value / 100 - 1e-9) if self.percent else int(self.value)

    def __str__(self) -> str:
        return f"{self.value:g}%" if self.percent else str(int(self.value))


DEFAULT_MARGIN = Quantity(10, percent=True)
"""Left free for admin sessions, migrations, cron jobs and the doctor: 10 % of the usable connections."""
DEFAULT_MAX_SURGE = Quantity(25, percent=True)
"""Kubernetes' default ``maxSurge`` for a RollingUpdate."""


def engine_pool(
    workers: int | None = None,
    *,
    pgbouncer: bool = False,
    pool_size: int | None = None,
    max_overflow: int | None = None,
) -> tuple[int, int]:
    """``(pool_size, max_overflow)`` as :func:`poolguard.create_engine` sizes them, so a fleet can be
    described by ``workers`` alone: ``workers`` and ``workers // 2``, or behind PgBouncer at most
    ``PGBOUNCER_POOL_SIZE`` kept open and the rest as overflow. Explicit sizes win, as there."""
    demand = DEFAULT_WORKERS if workers is None else workers
    size = pool_size if pool_size is not None else (min(demand, PGBOUNCER_POOL_SIZE) if pgbouncer else demand)
    if max_overflow is not None:
        return size, max_overflow
    return size, (max(demand - size, 0) if pgbouncer else demand // 2)


@dataclass(frozen=True, slots=True, kw_only=True)
class Service:
    """One service of the fleet: its pods, its processes per pod and the connections each process may open."""

    name: str
    replicas: int
    pool_size: int
    processes: int = 1
    max_overflow: int = 0
    other: int = 0
    max_surge: Quantity | None = None
    """None: the fleet's."""

    def __post_init__(self) -> None:
        where = f"service {self.name!r}"
        non_negative_int(f"{where}: replicas", self.replicas)
        positive_int(f"{where}: processes", self.processes)
        non_negative_int(f"{where}: pool_size", self.pool_size)
        non_negative_int(f"{where}: max_overflow", self.max_overflow)
        non_negative_int(f"{where}: other", self.other)
        if self.pool_size + self.other < 1:
            raise ConfigError(f"{where}: pool_size", self.pool_size, "a whole number of at least 1")

    @property
    def per_process(self) -> int:
        return self.pool_size + self.max_overflow + self.other

    @property
    def connections(self) -> int:
        return self.replicas * self.processes * self.per_process

    def surge_pods(self, default: Quantity) -> int:
        return (self.max_surge or default).of(self.replicas)

    def surge(self, default: Quantity) -> int:
        """Extra connections while this service rolls out."""
        return self.surge_pods(default) * self.processes * self.per_process


@dataclass(frozen=True, slots=True, kw_only=True)
class PgBouncerSettings:
    """The PgBouncer settings that decide what the server sees; defaults are PgBouncer's own.

    ``instances``: PgBouncer processes (pods) in front of the server, each with these settings.
    ``pools``: the (database, user) pairs they serve on this server (one per application role).
    """

    instances: int = 1
    default_pool_size: int = 20
    reserve_pool_size: int = 0
    max_db_connections: int = 0
    """0: no cap (PgBouncer's default)."""
    max_client_conn: int = 100
    pools: int = 1

    def __post_init__(self) -> None:
        for name in ("instances", "default_pool_size", "max_client_conn", "pools"):
            positive_int(f"pgbouncer: {name}", getattr(self, name))
        for name in ("reserve_pool_size", "max_db_connections"):
            non_negative_int(f"pgbouncer: {name}", getattr(self, name))

    @property
    def server_connections_per_instance(self) -> int:
        wanted = (self.default_pool_size + self.reserve_pool_size) * self.pools
        return min(wanted, self.max_db_connections) if self.max_db_connections else wanted

    @property
    def server_connections(self) -> int:
        return self.instances * self.server_connections_per_instance

    def to_dict(self) -> dict[str, int]:
        return {
            "instances": self.instances,
            "default_pool_size": self.default_pool_size,
            "reserve_pool_size": self.reserve_pool_size,
            "max_db_connections": self.max_db_connections,
            "max_client_conn": self.max_client_conn,
            "pools": self.pools,
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class Fleet:
    """Every service on one database server, and how much of it to keep free."""

    services: tuple[Service, ...]
    margin: Quantity = DEFAULT_MARGIN
    max_surge: Quantity = DEFAULT_MAX_SURGE
    pgbouncer: PgBouncerSettings | None = None

    def __post_init__(self) -> None:
        if not self.services:
            raise ConfigError("services", "(none)", "at least one service")
        names = [service.name for service in self.services]
        duplicate = next((name for name in names if names.count(name) > 1), None)
        if duplicate is not None:
            raise ConfigError("services", duplicate, "each service named once")

    @property
    def demand(self) -> int:
        return sum(service.connections for service in self.services)

    def largest_surge(self) -> tuple[int, Service | None]:
        surges = [(service.surge(self.max_surge), service) for service in self.services]
        surge, service = max(surges, key=lambda item: item[0])
        return (surge, service) if surge else (0, None)

    @property
    def peak(self) -> int:
        return self.demand + self.largest_surge()[0]


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerLimits:
    """What the server allows: ``max_connections`` minus the slots only superusers (or, on PostgreSQL
    16+, roles with ``pg_use_reserved_connections``) may take."""

    max_connections: int
    reserved: int = 0
    source: str = "given"
    """Where the numbers come from: ``given``, or the server (``postgresql at host:port``)."""
    settings: dict[str, int] = field(default_factory=dict)
    """The server's own settings as read (``superuser_reserved_connections``, ...), for the report."""

    def __post_init__(self) -> None:
        positive_int("max_connections", self.max_connections)
        non_negative_int("reserved", self.reserved)
        if self.reserved >= self.max_connections:
            raise ConfigError("reserved", self.reserved, f"fewer than max_connections ({self.max_connections})")

    @property
    def usable(self) -> int:
        return self.max_connections - self.reserved


@dataclass(frozen=True, slots=True, kw_only=True)
class PoolSuggestion:
    name: str
    pool_size: int
    max_overflow: int

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "pool_size": self.pool_size, "max_overflow": self.max_overflow}


@dataclass(frozen=True, slots=True, kw_only=True)
class Budget:
    """The verdict and the numbers behind it."""

    fleet: Fleet
    limits: ServerLimits
    verdict: Verdict
    margin: int
    demand: int
    """Connections the fleet's pools may open at full load (clients of PgBouncer when it is in front)."""
    peak: int
    """``demand`` plus the largest one service's rollout surge."""
    surging: str | None
    """The service whose rollout makes the peak."""
    server_peak: int
    """What the server may see at the peak: ``peak``, or PgBouncer's server connections."""
    headroom: int
    """``usable - server_peak``: connections left for everyone else at the peak."""
    reasons: tuple[str, ...]
    pool_suggestion: tuple[PoolSuggestion, ...] | None = None
    pgbouncer_suggestion: PgBouncerSettings | None = None
    no_pool_fit: bool = False
    """The pools cannot be shrunk enough: one connection per process is already over."""

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.verdict]

    def to_dict(self) -> dict[str, Any]:
        fleet, limits = self.fleet, self.limits
        surge_default = fleet.max_surge
        return {
            "verdict": self.verdict,
            "reasons": list(self.reasons),
            "server": {
                "source": limits.source,
                "max_connections": limits.max_connections,
                "reserved": limits.reserved,
                **limits.settings,
                "usable": limits.usable,
                "margin": self.margin,
            },
            "services": [
                {
                    "name": service.name,
                    "replicas": service.replicas,
                    "processes": service.processes,
                    "pool_size": service.pool_size,
                    "max_overflow": service.max_overflow,
                    "other": service.other,
                    "per_process": service.per_process,
                    "connections": service.connections,
                    "surge_pods": service.surge_pods(surge_default),
                    "surge_connections": service.surge(surge_default),
                }
                for service in fleet.services
            ],
            "demand": self.demand,
            "peak": self.peak,
            "surging": self.surging,
            "max_surge": str(surge_default),
            "pgbouncer": None if fleet.pgbouncer is None else fleet.pgbouncer.to_dict(),
            "server_peak": self.server_peak,
            "headroom": self.headroom,
            "suggestions": {
                "pool_sizes": None
                if self.pool_suggestion is None
                else [suggestion.to_dict() for suggestion in self.pool_suggestion],
                "pgbouncer": None if self.pgbouncer_suggestion is None else self.pgbouncer_suggestion.to_dict(),
            },
        }


def _verdict(headroom: int, margin: int) -> Verdict:
    if headroom < 0:
        return "over"
    return "tight" if headroom < margin else "fits"


def _worse(first: Verdict, second: Verdict) -> Verdict:
    order: tuple[Verdict, ...] = ("fits", "tight", "over")
    return max(first, second, key=order.index)


def assess(fleet: Fleet, limits: ServerLimits, *, suggest: bool = True) -> Budget:
    """The verdict for ``fleet`` on a server with ``limits``, and (``suggest``) what to change when it is
    not ``fits``."""
    usable = limits.usable
    margin = min(fleet.margin.of(usable), usable)
    surge, surging = fleet.largest_surge()
    demand = fleet.demand
    peak = demand + surge
    bouncer = fleet.pgbouncer
    reasons: list[str] = []
    server_peak = peak if bouncer is None else bouncer.server_connections
    headroom = usable - server_peak
    verdict = _verdict(headroom, margin)
    what = "the fleet" if bouncer is None else "PgBouncer"
    if verdict == "over":
        during = " during a rollout" if bouncer is None and demand <= usable else ""
        reasons.append(f"{what} may open {server_peak} connections{during}; the server allows {usable}")
    elif verdict == "tight":
        reasons.append(f"{what} leaves {headroom} connections free; the margin wants {margin}")
    if bouncer is not None:
        capacity = bouncer.max_client_conn * bouncer.instances
        client_verdict: Verdict = "fits"
        if peak > capacity:
            client_verdict = "over"
            reasons.append(f"the fleet may open {peak} client connections; PgBouncer accepts {capacity}")
        elif bouncer.instances > 1 and peak > bouncer.max_client_conn * (bouncer.instances - 1):
            client_verdict = "tight"
            reasons.append(
                f"with one PgBouncer instance lost the others accept "
                f"{bouncer.max_client_conn * (bouncer.instances - 1)} of the fleet's {peak} client connections"
            )
        verdict = _worse(verdict, client_verdict)
    budget = Budget(
        fleet=fleet,
        limits=limits,
        verdict=verdict,
        margin=margin,
        demand=demand,
        peak=peak,
        surging=None if surging is None else surging.name,
        server_peak=server_peak,
        headroom=headroom,
        reasons=tuple(reasons),
    )
    if not suggest or verdict == "fits":
        return budget
    pools = None if bouncer is not None else fit_pools(fleet, usable - margin)
    return replace(
        budget,
        pool_suggestion=pools,
        no_pool_fit=bouncer is None and pools is None,
        pgbouncer_suggestion=fit_pgbouncer(fleet, usable - margin),
    )


def fit_pools(fleet: Fleet, room: int) -> tuple[PoolSuggestion, ...] | None:
    """Pool sizes whose rollout peak is at most ``room``: each service's pool connections per process
    scaled by one factor (the room shared in proportion to current demand), rounded down, the largest
    factor that fits found by bisection (the peak only grows with it), then what rounding left given
    back one connection at a time; None when one connection per process is already too many."""
    totals = {service.name: service.pool_size + service.max_overflow for service in fleet.services}

    def peak(current: dict[str, int]) -> int:
        sized = tuple(replace(service, pool_size=current[service.name], max_overflow=0) for service in fleet.services)
        return replace(fleet, services=sized).peak

    def scaled(factor: float) -> dict[str, int]:
        return {name: max(1, math.floor(total * factor)) for name, total in totals.items()}

    if peak(totals) <= room:
        return _split(fleet, totals)
    if peak(scaled(0.0)) > room:
        return None
    low, high = 0.0, 1.0
    for _ in range(60):
        middle = (low + high) / 2
        low, high = (middle, high) if peak(scaled(middle)) <= room else (low, middle)
    current = scaled(low)
    for _ in range(_GROW_STEPS):
        candidates = [name for name in current if current[name] < totals[name]]
        for name in sorted(candidates, key=lambda key: current[key] / totals[key]):
            current[name] += 1
            if peak(current) <= room:
                break
            current[name] -= 1
        else:
            break
    return _split(fleet, current)


_GROW_STEPS = 1000
"""A bound on the connections given back after rounding (a few per service in practice)."""


def _split(fleet: Fleet, totals: dict[str, int]) -> tuple[PoolSuggestion, ...]:
    """Each total split between pool_size and max_overflow in the service's current proportion."""
    suggestions = []
    for service in fleet.services:
        total = totals[service.name]
        pooled = service.pool_size + service.max_overflow
        size = total if not service.max_overflow else max(1, round(total * service.pool_size / pooled))
        suggestions.append(PoolSuggestion(name=service.name, pool_size=size, max_overflow=total - size))
    return tuple(suggestions)


def fit_pgbouncer(fleet: Fleet, room: int) -> PgBouncerSettings | None:
    """PgBouncer settings that fit: its instances' server connections within ``room`` (a cap per
    instance, ``max_db_connections``, kept when it already fits, with ``default_pool_size`` no larger),
    and ``max_client_conn`` covering the fleet's client connections at the peak on every instance (a
    lost instance's clients reconnect to the others). None when the room is smaller than one server
    connection per instance and pool."""
    current = fleet.pgbouncer or PgBouncerSettings()
    per_instance = room // current.instances
    if per_instance < current.pools:
        return None
    cap = current.max_db_connections if 0 < current.max_db_connections <= per_instance else per_instance
    pool_size = min(current.default_pool_size, max(cap // current.pools, 1))
    return replace(
        current,
        default_pool_size=pool_size,
        reserve_pool_size=0,
        max_db_connections=cap,
        max_client_conn=max(current.max_client_conn, fleet.peak),
    )


LIMITS_SQL: dict[str, str] = {
    "postgresql": (
        "SELECT current_setting('max_connections')::int,"
        " current_setting('superuser_reserved_connections')::int,"
        " current_setting('reserved_connections', true)::int"
    ),
    "mysql": "SELECT @@max_connections",
}
"""The query that reads the limits, per backend (``current_setting(..., true)`` is NULL before PostgreSQL 16)."""


def limits_from_row(backend: str, row: Any, source: str) -> ServerLimits:
    """:class:`ServerLimits` from a row of :data:`LIMITS_SQL`'s query."""
    if backend == "postgresql":
        settings = {"superuser_reserved_connections": int(row[1])}
        if row[2] is not None:
            settings["reserved_connections"] = int(row[2])
        return ServerLimits(
            max_connections=int(row[0]), reserved=sum(settings.values()), source=source, settings=settings
        )
    # MySQL and MariaDB keep one connection beyond max_connections for SUPER / CONNECTION_ADMIN: none is taken.
    return ServerLimits(max_connections=int(row[0]), source=source)
