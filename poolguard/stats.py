"""Cheap sliding windows over checkout wait and use times, and the public PoolStats snapshot.

Recording happens on every checkout and checkin, so it is O(1): a window is a bounded ``deque`` of
``(value, time)`` pairs, recorded with the deque's own ``append``, which runs in C and is atomic.
Quantiles are computed only when someone asks (health, stats), which is rare next to recording.
Writes take no lock; readers take a snapshot in one C call.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from itertools import islice
from typing import Any

from poolguard._validate import positive_float, positive_int


class SlidingWindow(deque[tuple[float, float]]):
    """The last ``size`` samples that are at most ``max_age`` seconds old, as ``(value, time)`` pairs.

    ``append((value, now))`` records one sample.
    """

    def __init__(self, size: int = 1024, max_age: float = 60.0) -> None:
        super().__init__(maxlen=positive_int("SlidingWindow.size", size))
        self._max_age = positive_float("SlidingWindow.max_age", max_age)

    def recent(self, now: float) -> list[float]:
        """The samples still inside the window, unsorted."""
        oldest = now - self._max_age
        # tuple(self) copies in one C call, so a concurrent append cannot break the iteration.
        return [value for value, taken in tuple(self) if taken >= oldest]

    def mean_of_last(self, count: int) -> float:
        """The mean of the newest ``count`` samples, however old (0.0 with none): a live estimate.

        Worked out when asked, from samples recorded anyway, instead of a running average kept up
        to date on every sample; its one caller (admission's predicted wait) asks only when the pool is full.
        """
        # Newest first, only ``count`` of them; list() drains the iterator in one C call, so a
        # concurrent append cannot break it (copying the whole window cost 9 us at 1024 samples).
        recent = list(islice(reversed(self), count))
        return sum(value for value, _ in recent) / len(recent) if recent else 0.0

    def quantiles(self, now: float, *fractions: float) -> tuple[float, ...] | None:
        """Nearest-rank quantiles of the recent samples, or None when there are none."""
        samples = sorted(self.recent(now))
        if not samples:
            return None
        return tuple(quantile(samples, q) for q in fractions)


def quantile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank quantile of sorted, non-empty values: an observed value, never an interpolation."""
    return sorted_values[min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))]


def rounded(seconds: float | None, digits: int) -> float | None:
    """``round`` that passes None through, for optional figures in reports."""
    return None if seconds is None else round(seconds, digits)


@dataclass(frozen=True, slots=True)
class PoolStats:
    """A snapshot of one guarded pool, as ``guard.stats()`` returns it.

    ``size``/``max_overflow`` are None for pools without a fixed bound (NullPool, asyncpg without
    max_size). Times are seconds; quantiles are None until there is a sample in the window.
    """

    name: str
    backend: str
    size: int | None
    max_overflow: int | None
    checked_out: int
    idle: int
    overflow: int
    pending: int
    utilization: float
    wait_p50: float | None
    wait_p99: float | None
    use_p50: float | None
    use_p99: float | None
    checkouts: int
    timeouts: int
    connections_created: int
    create_p50: float | None
    suspected_leaks: int
    shed: int
    breaker_state: str
    shed_by_reason: Mapping[str, int] = field(default_factory=dict)
    """Requests refused with 503, by reason (``circuit_open``, ``pool_saturated``); ``shed`` is their sum."""
    leaks_reported: int = 0
    """Connections ever reported as held past the leak threshold (``suspected_leaks`` counts those held now)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
