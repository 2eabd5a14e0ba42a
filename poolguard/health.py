"""Health reports: per-pool stats, breaker state and a live ping, with one set of status rules.

A load balancer or orchestrator acts on ``status``: ``ok`` and ``degraded`` keep the instance in
rotation (200), ``unavailable`` takes it out (503). ``degraded`` is the early warning: the pool is
nearly full, waits are long, or the breaker is probing a recovering database. Nothing in a report
carries a password, a DSN, SQL or a stack: failures are named by exception class only, and every
free text passes :func:`redact` on its way out.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

from poolguard._classify import TOO_MANY_CONNECTIONS
from poolguard.stats import PoolStats, rounded

Status = Literal["ok", "degraded", "unavailable"]

DEGRADED_UTILIZATION = 0.9
"""Utilisation at or above which a pool is degraded: one more burst and requests start to wait."""

_SEVERITY: dict[Status, int] = {"ok": 0, "degraded": 1, "unavailable": 2}
# The password ends at the first "@", as SQLAlchemy reads it (it may contain "/").
_URL_CREDENTIALS = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<user>[^:/@\s]*):[^@\s]*@")
_KEY_VALUE_PASSWORD = re.compile(r"(?i)(password|passwd|pwd)\s*=\s*('[^']*'|\"[^\"]*\"|\S+)")


def redact(text: str) -> str:
    """Hides passwords in URLs (``scheme://user:***@host``) and in ``password=...`` DSN fragments."""
    text = _URL_CREDENTIALS.sub(r"\g<scheme>\g<user>:***@", text)
    return _KEY_VALUE_PASSWORD.sub(r"\1=***", text)


@dataclass(frozen=True, slots=True)
class PingResult:
    """The outcome of one live round trip: its time, or the class name of what went wrong.

    ``refused_with`` is the server's own code when the server answered with a refusal (it is up:
    a refused login, too many connections, starting up); None when it answered or never did.
    """

    seconds: float | None
    error: str | None = None
    refused_with: str | None = None

    @property
    def unreachable(self) -> bool:
        """The probe failed and no server answered: refused, reset, timed out, or a silent network."""
        return self.error is not None and self.refused_with is None


@dataclass(frozen=True, slots=True)
class PoolHealth:
    """One pool's part of a HealthReport.

    ``pooler``: the connection pooler found in front of the database (``pgbouncer``, or
    ``unidentified`` when only its cancel key gave it away), None when there is none or it is not
    known yet (it is found at the pool's first connection).
    """

    name: str
    status: Status
    stats: PoolStats
    ping: PingResult | None
    breaker_failure_rate: float | None
    breaker_retry_after: float | None
    issues: tuple[str, ...]
    pooler: str | None = None

    def to_dict(self) -> dict[str, Any]:
        stats = self.stats
        return {
            "name": self.name,
            "status": self.status,
            "backend": stats.backend,
            "size": stats.size,
            "max_overflow": stats.max_overflow,
            "checked_out": stats.checked_out,
            "idle": stats.idle,
            "overflow": stats.overflow,
            "pending": stats.pending,
            "utilization": round(stats.utilization, 2),
            "wait_seconds": {"p50": rounded(stats.wait_p50, 6), "p99": rounded(stats.wait_p99, 6)},
            "timeouts": stats.timeouts,
            "suspected_leaks": stats.suspected_leaks,
            "ping_seconds": rounded(self.ping.seconds, 6) if self.ping is not None else None,
            "breaker": {
                "state": stats.breaker_state,
                "failure_rate": self.breaker_failure_rate,
                "retry_after": self.breaker_retry_after,
            },
            "pooler": self.pooler,
        }


@dataclass(frozen=True, slots=True)
class HealthReport:
    """The health of every guarded pool; the worst pool decides the overall status."""

    status: Status
    pools: tuple[PoolHealth, ...]
    issues: tuple[str, ...]

    @classmethod
    def of(cls, pools: list[PoolHealth] | tuple[PoolHealth, ...]) -> HealthReport:
        status: Status = "ok"
        for pool in pools:
            if _SEVERITY[pool.status] > _SEVERITY[status]:
                status = pool.status
        return cls(status=status, pools=tuple(pools), issues=tuple(i for p in pools for i in p.issues))

    @property
    def http_status(self) -> int:
        return 503 if self.status == "unavailable" else 200

    def to_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "pools": [pool.to_dict() for pool in self.pools],
            "issues": [redact(issue) for issue in self.issues],
        }


def assess(
    stats: PoolStats,
    *,
    ping: PingResult | None,
    max_wait: float,
    breaker_failure_rate: float | None,
    breaker_retry_after: float | None,
    pooler: str | None = None,
) -> PoolHealth:
    """Applies the status rules to one pool's numbers."""
    issues: list[str] = []
    status: Status = "ok"
    name = stats.name
    if stats.breaker_state == "open":
        status = "unavailable"
        issues.append(f"{name}: circuit breaker open")
    if ping is not None and ping.error is not None:
        if ping.refused_with in TOO_MANY_CONNECTIONS:
            # The probe's own connection found no slot; the pool's connections serve on.
            status = "degraded" if status == "ok" else status
            issues.append(f"{name}: the server refused a probe connection: too many connections ({ping.refused_with})")
        else:
            status = "unavailable"
            issues.append(f"{name}: ping failed ({ping.error})")
    if status != "unavailable":
        if stats.breaker_state == "half_open":
            status = "degraded"
            issues.append(f"{name}: circuit breaker half-open, probing the database")
        if stats.utilization >= DEGRADED_UTILIZATION:
            status = "degraded"
            issues.append(f"{name}: pool utilization {stats.utilization:.0%}")
        if stats.wait_p99 is not None and stats.wait_p99 >= max_wait / 2:
            status = "degraded"
            issues.append(f"{name}: checkout wait p99 {stats.wait_p99:.3f}s, wait budget {max_wait:.3f}s")
    if stats.suspected_leaks:
        issues.append(f"{name}: {stats.suspected_leaks} connection(s) held past the leak threshold")
    return PoolHealth(
        name=name,
        status=status,
        stats=stats,
        ping=ping,
        breaker_failure_rate=breaker_failure_rate,
        breaker_retry_after=breaker_retry_after,
        issues=tuple(issues),
        pooler=pooler,
    )
