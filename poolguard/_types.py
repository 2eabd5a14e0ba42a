"""Type aliases for the injected time sources.

Timing logic (breaker, admission, leaks, retry, stats) never reads the wall clock itself: it takes a
clock and, where it waits, a sleep, so tests drive time by hand and never sleep.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeAlias

Clock: TypeAlias = Callable[[], float]
"""Returns monotonic seconds; ``time.monotonic`` unless injected."""

Sleep: TypeAlias = Callable[[float], None]
"""Blocks for the given seconds; ``time.sleep`` unless injected."""

AsyncSleep: TypeAlias = Callable[[float], Awaitable[None]]
"""Waits for the given seconds without blocking the event loop; ``asyncio.sleep`` unless injected."""
