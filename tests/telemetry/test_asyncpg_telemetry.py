"""Spans and semconv metrics of a Guard over an ``asyncpg.Pool``, with the real SDK in memory: the same
names and attributes as an engine's, the wait measured by poolguard around the pool's own acquire."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
from opentelemetry.trace import SpanKind

from poolguard import Guard, PoolSaturated
from tests.support.databases import DATABASE, HOST, PG_PORT, USER
from tests.telemetry.conftest import POOL_NAME, Otel, point

pytestmark = pytest.mark.postgres


@pytest.fixture
async def pool() -> AsyncIterator[asyncpg.Pool]:
    made = await asyncpg.create_pool(f"postgresql://{USER}@{HOST}:{PG_PORT}/{DATABASE}", min_size=0, max_size=2)
    yield made
    held = made.get_size() - made.get_idle_size()
    await made.close()
    assert held == 0


@pytest.fixture
def guard(pool: asyncpg.Pool, otel: Otel) -> Any:
    made = Guard(
        pool, name="orders-db", max_wait=0.0, tracer_provider=otel.tracer_provider, meter_provider=otel.meter_provider
    )
    yield made
    made.close()


async def test_checkouts_in_a_sampled_span_get_a_checkout_span(guard: Guard, otel: Otel) -> None:
    with otel.tracer.start_as_current_span("GET /orders", kind=SpanKind.SERVER) as request:
        async with guard.connection() as conn:
            assert await conn.fetchval("SELECT 1") == 1
    span = otel.span("checkout orders-db")
    assert span.parent is not None
    assert span.parent.span_id == request.get_span_context().span_id
    assert dict(span.attributes or {}) == {
        POOL_NAME: "orders-db",
        "db.system.name": "postgresql",
        "poolguard.outcome": "acquired",
    }
    async with guard.connection() as conn:  # no parent span: none of its own
        await conn.fetchval("SELECT 1")
    assert len(otel.spans("checkout orders-db")) == 1


async def test_a_refused_checkout_span_says_why(guard: Guard, otel: Otel) -> None:
    async with guard.connection(), guard.connection():
        with otel.tracer.start_as_current_span("GET /orders"), pytest.raises(PoolSaturated):
            async with guard.connection():
                pass
    assert otel.span("checkout orders-db").attributes["poolguard.outcome"] == "pool_saturated"  # type: ignore[index]


async def test_metrics_match_a_known_run(guard: Guard, otel: Otel) -> None:
    for _ in range(3):
        async with guard.connection() as conn:
            await conn.fetchval("SELECT 1")
    async with guard.connection(), guard.connection():
        held = otel.collect()
        with pytest.raises(PoolSaturated):
            async with guard.connection():
                pass
    metrics = otel.collect()
    attributes = {POOL_NAME: "orders-db"}
    used = {**attributes, "db.client.connection.state": "used"}
    assert point(held["db.client.connection.count"], used).value == 2
    assert point(metrics["db.client.connection.count"], used).value == 0
    assert point(metrics["db.client.connection.max"], attributes).value == 2
    assert point(metrics["db.client.connection.timeouts"], attributes).value == 1
    assert point(metrics["poolguard.requests.shed"], {**attributes, "poolguard.reason": "pool_saturated"}).value == 1
    wait = point(metrics["db.client.connection.wait_time"], attributes)
    assert wait.count == guard.stats().checkouts == 5
    assert 0 < wait.sum < 1.0
    assert point(metrics["db.client.connection.use_time"], attributes).count == 5
    assert point(metrics["db.client.connection.create_time"], attributes).count == 2
