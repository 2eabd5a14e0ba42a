"""Cheap sliding windows over checkout wait and use times, and the public PoolStats snapshot.

Recording happens on every checkout and checkin, so it is O(1) and allocation-free: a preallocated
ring of samples and their timestamps. Quantiles are computed only when someone asks (health, stats),
which is rare next to recording. Writes take no lock: a sample lost to a race between two threads
costs nothing that matters for a p99, while a lock on every checkout would.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from poolguard._validate import positive_float, positive_int


class SlidingWindow:
    """The last ``size`` samples that are at most ``max_age`` seconds old."""

    __slots__ = ("_max_age", "_next", "_size", "_times", "_values")

    def __init__(self, size: int = 1024, max_age: float = 60.0) -> None:
        self._size = positive_int("SlidingWindow.size", size)
        self._max_age = positive_float("SlidingWindow.max_age", max_age)
        self._values = [0.0] * self._size
        self._times = [-math.inf] * self._size
        self._next = 0

    def add(self, value: float, now: float) -> None:
        """Records one sample taken at ``now`` (the caller already read the clock)."""
        index = self._next
        self._values[index] = value
        self._times[index] = now
        self._next = (index + 1) % self._size

    def recent(self, now: float) -> list[float]:
        """The samples still inside the window, unsorted."""
        oldest = now - self._max_age
        return [v for v, t in zip(self._values, self._times, strict=True) if t >= oldest]

    def quantiles(self, now: float, *fractions: float) -> tuple[float, ...] | None:
        """Nearest-rank quantiles of the recent samples, or None when there are none."""
        samples = sorted(self.recent(now))
        if not samples:
            return None
        last = len(samples) - 1
        return tuple(samples[min(last, max(0, math.ceil(q * len(samples)) - 1))] for q in fractions)


class Ewma:
    """An exponentially weighted moving average: a cheap live estimate for admission decisions."""

    __slots__ = ("_alpha", "_seeded", "value")

    def __init__(self, alpha: float = 0.2) -> None:
        self._alpha = alpha
        self._seeded = False
        self.value = 0.0

    def add(self, sample: float) -> None:
        if self._seeded:
            self.value += self._alpha * (sample - self.value)
        else:
            self.value = sample
            self._seeded = True


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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
