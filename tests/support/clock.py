"""A clock for timing logic under test: it moves only when a test says so, so no test sleeps."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any


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


def drive_the_watchdog(options: dict[str, Any]) -> dict[str, Any]:
    """Guard options for a test: with an injected ``clock``, no watchdog thread (``probe_interval=None``).

    A test that moves a fake clock decides when time passes; a real thread probing behind it would
    change the breaker's state at moments the test does not choose. Such a test calls
    ``guard.watchdog.tick()`` itself when it wants the watchdog.
    """
    if "clock" in options:
        options.setdefault("probe_interval", None)
    return options


def arrived(seconds_ago: float) -> str:
    """An ``X-Request-Start`` value (``t=`` and microseconds, on the wall clock) of a request that entered
    the platform ``seconds_ago``: what the proxy in front of the app would have set."""
    return f"t={int((time.time() - seconds_ago) * 1_000_000)}"
