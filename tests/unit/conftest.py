"""Shared fixtures of the unit tests: a clock that only moves when a test says so."""

from __future__ import annotations

import pytest

from tests.support.clock import FakeClock

__all__ = ["FakeClock"]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()
