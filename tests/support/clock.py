"""A clock for timing logic under test: it moves only when a test says so, so no test sleeps."""

from __future__ import annotations


class FakeClock:
    """A monotonic clock driven by hand: ``clock()`` reads it, ``clock.advance(s)`` moves it."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds
