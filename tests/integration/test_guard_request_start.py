"""``guard.request_scope(queued=...)`` on PostgreSQL: time queued in front of the app counts against ``max_wait``.

The guards run on the fake clock (no watchdog); the queue time is given, as an adapter gives it after
reading ``X-Request-Start``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import sqlalchemy
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

import poolguard
from poolguard import Guard, PoolSaturated
from tests.support.clock import FakeClock

pytestmark = pytest.mark.postgres

SELECT_1 = text("SELECT 1")


def guard_on(engine: sqlalchemy.Engine | AsyncEngine, clock: FakeClock, **options: object) -> Guard:
    return poolguard.Guard(engine, clock=clock, probe_interval=None, **options)


def test_a_request_that_queued_past_max_wait_never_reaches_the_pool(
    make_sync_engine: Callable[..., sqlalchemy.Engine], pg_url: str, fake_clock: FakeClock
) -> None:
    guard = guard_on(make_sync_engine(pg_url, pool_size=2, max_overflow=0), fake_clock, max_wait=0.5)
    try:
        with pytest.raises(PoolSaturated) as caught, guard.request_scope("/orders", queued=0.5) as scope:
            scope.session.execute(SELECT_1)
        assert caught.value.retry_after == 1.0
        stats = guard.stats()
        assert (stats.connections_created, stats.checkouts, stats.checked_out) == (0, 0, 0)
        assert stats.shed_by_reason == {"circuit_open": 0, "pool_saturated": 1}

        with guard.request_scope("/orders", queued=0.2) as scope:
            assert scope.waited == 0.2
            assert scope.session.execute(SELECT_1).scalar() == 1
        with guard.request_scope("/orders") as scope:  # no header: the whole budget
            assert scope.session.execute(SELECT_1).scalar() == 1
        assert guard.stats().checkouts == 2
        assert guard.stats().shed == 1
    finally:
        guard.close()


async def test_the_same_for_an_async_engine(
    make_async_engine_sa: Callable[..., AsyncEngine], pg_async_url: str, fake_clock: FakeClock
) -> None:
    guard = guard_on(make_async_engine_sa(pg_async_url, pool_size=2, max_overflow=0), fake_clock)
    try:
        with pytest.raises(PoolSaturated):
            async with guard.request_scope(queued=1.2) as scope:
                await scope.session.execute(SELECT_1)
        async with guard.request_scope(queued=0.9) as scope:
            assert (await scope.session.execute(SELECT_1)).scalar() == 1
        stats = guard.stats()
        assert (stats.connections_created, stats.checkouts, stats.shed) == (1, 1, 1)
    finally:
        guard.close()


def test_max_wait_zero_serves_free_slots_unless_the_request_queued(
    make_sync_engine: Callable[..., sqlalchemy.Engine], pg_url: str, fake_clock: FakeClock
) -> None:
    guard = guard_on(make_sync_engine(pg_url, pool_size=1, max_overflow=0), fake_clock, max_wait=0.0)
    try:
        for queued in (None, 0.0):
            with guard.request_scope(queued=queued) as scope:
                assert scope.session.execute(SELECT_1).scalar() == 1
        with pytest.raises(PoolSaturated), guard.request_scope(queued=0.001) as scope:
            scope.session.execute(SELECT_1)
        assert guard.stats().shed == 1
    finally:
        guard.close()


@pytest.mark.parametrize("queued", [-0.1, math.nan, math.inf])
def test_a_queue_time_that_is_not_seconds_is_refused(
    make_sync_engine: Callable[..., sqlalchemy.Engine], pg_url: str, fake_clock: FakeClock, queued: float
) -> None:
    guard = guard_on(make_sync_engine(pg_url), fake_clock)
    try:
        with pytest.raises(ValueError, match="queued"):
            guard.request_scope(queued=queued)
    finally:
        guard.close()
