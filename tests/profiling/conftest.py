"""Engines and guards for the call-count tests; after each test nothing is left checked out."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
import sqlalchemy
from opentelemetry import metrics, trace
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from poolguard import Guard
from tests.support.clock import FakeClock
from tests.support.databases import PG_URL


@pytest.fixture(autouse=True)
def _no_global_sdk() -> None:
    """The pins are of the no-SDK path (the OpenTelemetry API's default providers)."""
    assert isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider), trace.get_tracer_provider()
    assert type(metrics.get_meter_provider()).__name__ == "_ProxyMeterProvider", metrics.get_meter_provider()


@pytest.fixture
def engine() -> Iterator[sqlalchemy.Engine]:
    engine = sqlalchemy.create_engine(PG_URL)
    yield engine
    checked_out = engine.pool.checkedout()  # type: ignore[attr-defined]
    engine.dispose()
    assert checked_out == 0


@pytest.fixture
async def async_engine() -> AsyncIterator[AsyncEngine]:
    engine = create_async_engine(PG_URL)
    yield engine
    checked_out = engine.sync_engine.pool.checkedout()  # type: ignore[attr-defined]
    await engine.dispose()
    assert checked_out == 0


@pytest.fixture
def guard(engine: sqlalchemy.Engine) -> Iterator[Guard]:
    """A guard whose clock stands still: its once-a-second work (the leak sweep) runs on the first checkout only."""
    guard = Guard(engine, clock=FakeClock())
    yield guard
    guard.close()


@pytest.fixture
def async_guard(async_engine: AsyncEngine) -> Iterator[Guard]:
    guard = Guard(async_engine, clock=FakeClock())
    yield guard
    guard.close()
