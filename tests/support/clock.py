"""A clock for timing logic under test: it moves only when a test says so, so no test sleeps."""

from __future__ import annotations

import threading
from collections.abc import Callable


class FakeClock:
    """A monotonic clock driven by hand: ``clock()`` reads it, ``clock.advance(s)`` moves it."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def wait_until(condition: Callable[[], bool], steps: int = 5000) -> None:
    """Bounded synchronisation poll between threads: fails the test instead of hanging."""
    pause = threading.Event()
    for _ in range(steps):
        if condition():
            return
        pause.wait(0.001)
    assert condition(), "condition never became true"
