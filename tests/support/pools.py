"""Stand-ins for the parts a unit test of the core does not exercise: a pool with fixed counts.

The gate's logic is tested with a plain callable as the pool's own checkout (tests/unit/test_gate.py);
what it asks of the pool besides (how big it is, close a forgotten connection) is answered here.
Everything that depends on a real pool runs against real PostgreSQL and MariaDB elsewhere.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from poolguard.pools import PoolCounts, PoolEvents
from poolguard.stats import PoolStats

COUNTS = PoolCounts(size=2, max_overflow=0, checked_out=1, idle=1, overflow=0)


class FixedPool:
    """A :class:`~poolguard.pools.PoolAdapter` whose counts are whatever the test sets."""

    backend = "postgresql"
    db_system = "postgresql"
    is_async = False

    def __init__(self, counts: PoolCounts = COUNTS) -> None:
        self.fixed_counts = counts
        self.events: PoolEvents | None = None
        self.reclaimed: list[Any] = []
        self.aborted: list[Any] = []
        self.discards = 0
        self.probe_error: BaseException | None = None

    def attach(self, events: PoolEvents) -> None:
        self.events = events

    def detach(self) -> None:
        self.events = None

    def counts(self) -> PoolCounts:
        return self.fixed_counts

    def probe(self, timeout: float) -> None:
        """Answers at once, or fails as the test says: the stand-in has no database."""
        if self.probe_error is not None:
            raise self.probe_error

    def abort(self, handle: Any) -> bool:
        self.aborted.append(handle)
        return True

    def abort_connecting(self) -> int:
        return 0

    def discard_stale(self) -> None:
        self.discards += 1

    def reclaim(self, handle: Any) -> None:
        self.reclaimed.append(handle)


def pool_stats(**changes: Any) -> PoolStats:
    """A PoolStats of a healthy two-connection pool, with ``changes`` applied."""
    base = PoolStats(
        name="primary",
        backend="postgresql",
        size=2,
        max_overflow=0,
        checked_out=0,
        idle=2,
        overflow=0,
        pending=0,
        utilization=0.0,
        wait_p50=None,
        wait_p99=None,
        use_p50=None,
        use_p99=None,
        checkouts=0,
        timeouts=0,
        connections_created=0,
        create_p50=None,
        suspected_leaks=0,
        shed=0,
        breaker_state="closed",
    )
    return dataclasses.replace(base, **changes)
