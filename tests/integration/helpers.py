"""Assertions the guard's integration tests share across PostgreSQL, MariaDB and SQLite."""

from __future__ import annotations

from typing import Any

import sqlalchemy
from sqlalchemy.ext.asyncio import AsyncEngine

from poolguard import BreakerState, Guard, PoolSaturated

Outcome = tuple[str, float, BaseException | None]
"""A request's ``("ok" | "saturated" | "error", seconds, exception)``."""


def assert_nothing_checked_out(guard: Guard, engine: sqlalchemy.Engine | AsyncEngine) -> None:
    sync_engine = engine.sync_engine if isinstance(engine, AsyncEngine) else engine
    pool: Any = sync_engine.pool
    assert guard.stats().checked_out == 0
    assert pool.checkedout() == 0


def assert_shed_within_budget(
    results: list[Outcome], guard: Guard, engine: sqlalchemy.Engine | AsyncEngine
) -> tuple[list[float], list[tuple[float, BaseException | None]]]:
    """20 users on a pool of 2 with ``max_wait=0.5``: the excess is shed fast, never 30 s, and overload
    never trips the breaker. Returns (served seconds, shed (seconds, error)) for further checks."""
    assert [error for outcome, _, error in results if outcome == "error"] == []
    served = [seconds for outcome, seconds, _ in results if outcome == "ok"]
    shed = [(seconds, error) for outcome, seconds, error in results if outcome == "saturated"]
    assert len(served) >= 2
    assert len(shed) >= 10
    for seconds, error in shed:
        assert seconds < 1.0, f"PoolSaturated after {seconds:.2f}s; max_wait is 0.5s"
        assert isinstance(error, PoolSaturated)
        assert error.retry_after >= 1
        assert error.reason == "pool_saturated"
    assert guard.stats().timeouts == len(shed)
    assert guard.breaker is not None
    assert guard.breaker.state is BreakerState.CLOSED
    assert guard.breaker.failure_rate == 0.0
    assert_nothing_checked_out(guard, engine)
    return served, shed
