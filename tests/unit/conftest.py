"""Shared fixtures of the unit tests: a clock that only moves when a test says so."""

from __future__ import annotations

import pytest


class FakeClock:
    """A monotonic clock driven by hand: ``clock()`` reads it, ``clock.advance(s)`` moves it."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()
