"""Semantic-convention pool metrics with the real OpenTelemetry SDK (InMemoryMetricReader), on PostgreSQL.

Every instrument of API.md: its type (histogram, monotonic sum, non-monotonic sum, gauge), unit,
``db.client.connection.pool.name`` attribute, and values that match what the test did.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
from opentelemetry.sdk.metrics.export import Gauge, Histogram, Sum
from sqlalchemy import exc, text

from poolguard import Breaker, CircuitOpen, Guard, PoolSaturated
from poolguard.telemetry import DURATION_BUCKETS
from tests.support.databases import DEAD_PORT, pg_url
from tests.telemetry.conftest import POOL_NAME, FakeClock, Otel, point, saturate

pytestmark = pytest.mark.postgres

GuardFactory = Callable[..., Guard]
STATE = "db.client.connection.state"

# name -> (SDK data type, monotonic for sums, unit)
INSTRUMENTS: dict[str, tuple[type, bool | None, str]] = {
    "db.client.connection.count": (Sum, False, "{connection}"),
    "db.client.connection.max": (Sum, False, "{connection}"),
    "db.client.connection.idle.max": (Sum, False, "{connection}"),
    "db.client.connection.idle.min": (Sum, False, "{connection}"),
    "db.client.connection.pending_requests": (Sum, False, "{request}"),
    "db.client.connection.timeouts": (Sum, True, "{timeout}"),
    "db.client.connection.create_time": (Histogram, None, "s"),
    "db.client.connection.wait_time": (Histogram, None, "s"),
    "db.client.connection.use_time": (Histogram, None, "s"),
    "poolguard.breaker.state": (Gauge, None, "{state}"),
    "poolguard.requests.shed": (Sum, True, "{request}"),
    "poolguard.connection.leaks": (Sum, True, "{connection}"),
}


def value(metrics: dict[str, Any], name: str, pool: str = "primary", **extra: str) -> Any:
    return point(metrics[name], {POOL_NAME: pool, **extra}).value


def test_every_instrument_has_its_type_unit_and_pool_attribute(otel: Otel, guard_on: GuardFactory):
    guard = guard_on()
    with guard.connection() as connection:
        connection.execute(text("SELECT 1"))
    metrics = otel.collect()
    assert set(INSTRUMENTS) <= set(metrics), sorted(set(INSTRUMENTS) - set(metrics))
    for name, (data_type, monotonic, unit) in INSTRUMENTS.items():
        metric = metrics[name]
        assert isinstance(metric.data, data_type), (name, type(metric.data).__name__)
        assert metric.unit == unit, name
        assert metric.description, name
        if monotonic is not None:
            assert metric.data.is_monotonic is monotonic, name
        for data_point in metric.data.data_points:
            assert data_point.attributes[POOL_NAME] == "primary", name
    for name in ("db.client.connection.wait_time", "db.client.connection.use_time", "db.client.connection.create_time"):
        [data_point] = metrics[name].data.data_points
        assert tuple(data_point.explicit_bounds) == DURATION_BUCKETS, name


def test_values_match_a_known_run(otel: Otel, guard_on: GuardFactory):
    guard = guard_on(engine={"pool_size": 3, "max_overflow": 2})
    for _ in range(3):
        with guard.request_scope(route="/orders/{id}") as scope:
            scope.session.execute(text("SELECT 1"))
    for _ in range(2):
        with guard.connection() as connection:
            connection.execute(text("SELECT 1"))
    with guard.connection(), guard.engine.connect():  # two held at once: 2 used while collecting
        held = otel.collect()
    metrics = otel.collect()
    stats = guard.stats()

    assert value(held, "db.client.connection.count", **{STATE: "used"}) == 2
    assert value(metrics, "db.client.connection.count", **{STATE: "used"}) == 0
    assert value(metrics, "db.client.connection.count", **{STATE: "idle"}) == stats.idle == 2
    assert value(metrics, "db.client.connection.max") == 5
    assert value(metrics, "db.client.connection.idle.max") == 3
    assert value(metrics, "db.client.connection.idle.min") == 0
    assert value(metrics, "db.client.connection.pending_requests") == 0
    assert value(metrics, "db.client.connection.timeouts") == 0
    assert value(metrics, "poolguard.breaker.state") == 0
    assert value(metrics, "poolguard.connection.leaks") == 0
    assert value(metrics, "poolguard.requests.shed", **{"poolguard.reason": "circuit_open"}) == 0
    assert value(metrics, "poolguard.requests.shed", **{"poolguard.reason": "pool_saturated"}) == 0

    wait = point(metrics["db.client.connection.wait_time"], {POOL_NAME: "primary"})
    assert wait.count == stats.checkouts == 7
    assert sum(wait.bucket_counts) == wait.count
    assert 0 < wait.sum < 1.0
    with_route = point(metrics["db.client.connection.use_time"], {POOL_NAME: "primary", "http.route": "/orders/{id}"})
    without_route = point(metrics["db.client.connection.use_time"], {POOL_NAME: "primary"})
    assert with_route.count == 3
    assert without_route.count == 4
    create = point(metrics["db.client.connection.create_time"], {POOL_NAME: "primary"})
    assert create.count == stats.connections_created == 2
    assert create.min > 0


def test_saturation_run_counts_timeouts_sheds_and_waits(otel: Otel, guard_on: GuardFactory):
    guard = guard_on(max_wait=0.2)
    results = saturate(guard, users=10, route="/slow", hold=0.4)
    served, saturated = results.count("ok"), results.count("saturated")
    assert served + saturated == 10
    assert saturated >= 5
    metrics = otel.collect()
    assert value(metrics, "db.client.connection.timeouts") == saturated
    assert value(metrics, "poolguard.requests.shed", **{"poolguard.reason": "pool_saturated"}) == saturated
    assert value(metrics, "poolguard.requests.shed", **{"poolguard.reason": "circuit_open"}) == 0
    assert point(metrics["db.client.connection.wait_time"], {POOL_NAME: "primary"}).count == served
    slow = point(metrics["db.client.connection.use_time"], {POOL_NAME: "primary", "http.route": "/slow"})
    assert slow.count == served
    assert slow.min >= 0.4
    assert value(metrics, "poolguard.breaker.state") == 0


def test_breaker_state_and_circuit_open_sheds(otel: Otel, guard_on: GuardFactory, fake_clock: FakeClock):
    guard = guard_on(
        pg_url(port=DEAD_PORT),
        breaker=Breaker(consecutive_failures=2, open_for=30.0),
        clock=fake_clock,
    )
    for _ in range(2):
        with pytest.raises(exc.OperationalError), guard.connection():
            pass
    for _ in range(3):
        with pytest.raises(CircuitOpen), guard.connection():
            pass
    metrics = otel.collect()
    assert value(metrics, "poolguard.breaker.state") == 2
    assert value(metrics, "poolguard.requests.shed", **{"poolguard.reason": "circuit_open"}) == 3
    assert value(metrics, "db.client.connection.timeouts") == 0
    assert "db.client.connection.wait_time" not in metrics  # nothing was ever obtained: no point at all
    fake_clock.advance(31.0)
    assert value(otel.collect(), "poolguard.breaker.state") == 1  # half-open once open_for has elapsed


def test_leaks_are_counted(otel: Otel, guard_on: GuardFactory, fake_clock: FakeClock):
    guard = guard_on(leak_threshold=5.0, clock=fake_clock)
    with guard.request_scope(route="/reports"):
        connection = guard.engine.connect()
        try:
            fake_clock.advance(6.0)
            assert value(otel.collect(), "poolguard.connection.leaks") == 0  # the count comes from a sweep
            guard.stats()
        finally:
            connection.close()
    with guard.request_scope(route="/forgetful"):
        forgotten = guard.engine.connect()
    forgotten.close()
    assert value(otel.collect(), "poolguard.connection.leaks") == 2


def test_two_guards_on_one_meter_provider_both_report_and_a_closed_one_stops(otel: Otel, guard_on: GuardFactory):
    primary = guard_on(name="primary")
    replica = guard_on(name="replica", engine={"pool_size": 4})
    for guard in (primary, replica, replica):
        with guard.connection() as connection:
            connection.execute(text("SELECT 1"))
    metrics = otel.collect()
    assert value(metrics, "db.client.connection.max", "primary") == 2
    assert value(metrics, "db.client.connection.max", "replica") == 4
    assert point(metrics["db.client.connection.wait_time"], {POOL_NAME: "primary"}).count == 1
    assert point(metrics["db.client.connection.wait_time"], {POOL_NAME: "replica"}).count == 2

    replica.close()
    with replica.engine.connect() as connection:  # no longer watched
        connection.execute(text("SELECT 1"))
    metrics = otel.collect()
    for name in (
        "db.client.connection.count",
        "db.client.connection.max",
        "db.client.connection.timeouts",
        "poolguard.breaker.state",
        "poolguard.requests.shed",
    ):
        pools = {p.attributes[POOL_NAME] for p in metrics[name].data.data_points}
        assert pools == {"primary"}, name
    # Histograms are cumulative in the SDK: the replica's last totals stay, and do not grow.
    assert point(metrics["db.client.connection.wait_time"], {POOL_NAME: "replica"}).count == 2
    assert value(metrics, "db.client.connection.max", "primary") == 2


async def test_async_engine_metrics(otel: Otel, async_guard_on: GuardFactory):
    guard = async_guard_on(name="async-primary")
    for _ in range(3):
        async with guard.request_scope(route="/items") as scope:
            await scope.session.execute(text("SELECT 1"))
    async with guard.connection() as connection:
        await connection.execute(text("SELECT 1"))
    metrics = otel.collect()
    pool = "async-primary"
    assert point(metrics["db.client.connection.wait_time"], {POOL_NAME: pool}).count == 4
    assert point(metrics["db.client.connection.use_time"], {POOL_NAME: pool, "http.route": "/items"}).count == 3
    assert point(metrics["db.client.connection.use_time"], {POOL_NAME: pool}).count == 1
    assert point(metrics["db.client.connection.create_time"], {POOL_NAME: pool}).count == 1
    assert value(metrics, "db.client.connection.count", pool, **{STATE: "idle"}) == 1
    assert value(metrics, "db.client.connection.max", pool) == 2
    assert value(metrics, "poolguard.breaker.state", pool) == 0


async def test_async_saturation_counts_timeouts(otel: Otel, async_guard_on: GuardFactory):
    guard = async_guard_on(max_wait=0.2)

    async def request() -> str:
        try:
            async with guard.request_scope(route="/slow") as scope:
                await scope.session.execute(text("SELECT pg_sleep(0.4)"))
        except PoolSaturated:
            return "saturated"
        return "ok"

    results = await asyncio.gather(*(request() for _ in range(8)))
    metrics = otel.collect()
    assert results.count("saturated") >= 4
    assert value(metrics, "db.client.connection.timeouts") == results.count("saturated")
    assert point(metrics["db.client.connection.wait_time"], {POOL_NAME: "primary"}).count == results.count("ok")
