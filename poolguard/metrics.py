"""The pool's metrics, defined once: OpenTelemetry (:mod:`poolguard.telemetry`) and Prometheus
(:mod:`poolguard.prometheus`) both export exactly these, under the same descriptions.

Names and units follow OpenTelemetry's database-client semantic conventions; poolguard's own
metrics are under ``poolguard.``. The Prometheus name is derived the way the OpenTelemetry
Collector's Prometheus exporter derives it (dots become underscores, the unit ``s`` becomes the
suffix ``_seconds``), so the alert rules and dashboard in ``integrations/`` work with either source.

Counts are read at collection time from one :class:`~poolguard.stats.PoolStats` snapshot
(:func:`observations`); only the durations are recorded per event.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

from poolguard.breaker import BreakerState
from poolguard.stats import PoolStats

POOL_NAME = "db.client.connection.pool.name"
CONNECTION_STATE = "db.client.connection.state"
DB_SYSTEM = "db.system.name"
HTTP_ROUTE = "http.route"
OUTCOME = "poolguard.outcome"
REASON = "poolguard.reason"

Kind = Literal["updown", "counter", "gauge", "histogram"]

DURATION_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)
"""Seconds: from a warm checkout (~100 µs) to SQLAlchemy's default 30 s pool timeout."""


@dataclass(frozen=True, slots=True)
class Metric:
    """One metric: its OpenTelemetry name, instrument kind, unit, description and attribute keys."""

    name: str
    kind: Kind
    unit: str
    description: str
    attributes: tuple[str, ...] = (POOL_NAME,)

    @property
    def prometheus_name(self) -> str:
        return self.name.replace(".", "_") + ("_seconds" if self.unit == "s" else "")


METRICS = (
    Metric(
        "db.client.connection.count",
        "updown",
        "{connection}",
        "The number of connections in the state given by the state attribute (idle or used).",
        (POOL_NAME, CONNECTION_STATE),
    ),
    Metric(
        "db.client.connection.max",
        "updown",
        "{connection}",
        "The maximum number of open connections allowed.",
    ),
    Metric(
        "db.client.connection.idle.max",
        "updown",
        "{connection}",
        "The maximum number of idle open connections allowed.",
    ),
    Metric(
        "db.client.connection.idle.min",
        "updown",
        "{connection}",
        "The minimum number of idle open connections allowed.",
    ),
    Metric(
        "db.client.connection.pending_requests",
        "updown",
        "{request}",
        "Pending requests for an open connection.",
    ),
    Metric(
        "db.client.connection.timeouts", "counter", "{timeout}", "Timeouts trying to obtain a connection from the pool."
    ),
    Metric(
        "poolguard.requests.shed",
        "counter",
        "{request}",
        "Requests refused with 503 instead of waiting or failing, by reason.",
        (POOL_NAME, REASON),
    ),
    Metric(
        "poolguard.connection.leaks",
        "counter",
        "{connection}",
        "Connections held past the leak threshold.",
    ),
    Metric(
        "poolguard.breaker.state",
        "gauge",
        "{state}",
        "Circuit breaker state: 0 closed, 1 half-open, 2 open.",
    ),
    Metric(
        "db.client.connection.wait_time",
        "histogram",
        "s",
        "The time it took to obtain an open connection from the pool.",
    ),
    Metric(
        "db.client.connection.use_time",
        "histogram",
        "s",
        "The time between borrowing a connection and returning it to the pool.",
        (POOL_NAME, HTTP_ROUTE),
    ),
    Metric(
        "db.client.connection.create_time",
        "histogram",
        "s",
        "The time it took to create a new connection.",
    ),
    Metric(
        "poolguard.request.queue_time",
        "histogram",
        "s",
        "The time a request queued in front of the app before it reached it (from a trusted X-Request-Start).",
    ),
)
"""Every metric poolguard exports, observable ones first."""

BY_NAME = {metric.name: metric for metric in METRICS}
WAIT_TIME, USE_TIME, CREATE_TIME = (
    BY_NAME[f"db.client.connection.{name}"] for name in ("wait_time", "use_time", "create_time")
)
QUEUE_TIME = BY_NAME["poolguard.request.queue_time"]


def observations(stats: PoolStats) -> Iterator[tuple[str, float, dict[str, str]]]:
    """(metric name, value, attributes) of every observable metric, read from one snapshot."""
    pool = {POOL_NAME: stats.name}
    yield "db.client.connection.count", stats.idle, {**pool, CONNECTION_STATE: "idle"}
    yield "db.client.connection.count", stats.checked_out, {**pool, CONNECTION_STATE: "used"}
    if stats.size is not None and stats.max_overflow is not None:
        yield "db.client.connection.max", stats.size + stats.max_overflow, pool
    if stats.size is not None:
        yield "db.client.connection.idle.max", stats.size, pool
        yield "db.client.connection.idle.min", 0, pool
    yield "db.client.connection.pending_requests", stats.pending, pool
    yield "db.client.connection.timeouts", stats.timeouts, pool
    for reason, count in stats.shed_by_reason.items():
        yield "poolguard.requests.shed", count, {**pool, REASON: reason}
    yield "poolguard.connection.leaks", stats.leaks_reported, pool
    if stats.breaker_state != "disabled":
        yield "poolguard.breaker.state", BreakerState(stats.breaker_state).metric_value, pool
