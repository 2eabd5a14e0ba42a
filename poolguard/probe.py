"""Asking the database directly: one probe on a fresh connection, shared, cached briefly, never hanging.

A ping through the pool tells nothing when the pool is full (it would queue behind the requests)
and hangs with them when the database is black-holed. So every probe opens a connection of its
own (:meth:`~poolguard.pools.PoolAdapter.probe`) in a thread of its own, and the caller waits for
its answer only until its deadline. Concurrent callers share the probe in flight and a result
younger than their ``max_age`` is reused, so a burst of health checks costs one connection. A
probe still running past its deadline is left to finish on its own (its connect is bounded by the
driver's timeout) while a new one may start beside it, up to :data:`MAX_IN_FLIGHT`: a probe stuck
on a dead server never delays noticing that the server is back.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

from poolguard._classify import server_refusal
from poolguard._types import Clock
from poolguard.health import PingResult
from poolguard.pools import PoolAdapter

__all__ = ["MAX_IN_FLIGHT", "Prober"]

MAX_IN_FLIGHT = 6
"""Probes running at once at most; beyond that, callers wait for one of them (or their deadline)."""

TIMED_OUT = "PingTimeout"

_log = logging.getLogger("poolguard")


@dataclass(frozen=True, slots=True)
class _Outcome:
    started: float
    result: PingResult


class Prober:
    """Probes one pool's database on fresh connections; thread-safe, usable from asyncio too."""

    def __init__(
        self,
        pool: PoolAdapter,
        *,
        name: str,
        timeout: float,
        clock: Clock,
        on_result: Callable[[PingResult], None] | None = None,
    ) -> None:
        self._pool = pool
        self._name = name
        self.timeout = timeout
        self._clock = clock
        self._on_result = on_result
        self._changed = threading.Condition()
        self._latest: _Outcome | None = None
        self._starts: list[float] = []  # start times of the probes in flight

    @property
    def latest(self) -> PingResult | None:
        """The newest probe's result (by start time), or None before the first one ends."""
        outcome = self._latest
        return outcome.result if outcome is not None else None

    def result(self, *, max_age: float = 0.0) -> PingResult:
        """A result no older than ``max_age`` seconds (by its start), probing if needed; waits at most ``timeout``."""
        now = self._clock()
        oldest = now - max_age
        with self._changed:
            outcome = self._latest
            if outcome is not None and outcome.started >= oldest:
                return outcome.result
            self._start_unless_fresh(now, oldest)
            fresh = self._changed.wait_for(
                lambda: self._latest is not None and self._latest.started >= oldest, self.timeout
            )
            if fresh:
                assert self._latest is not None
                return self._latest.result
        return PingResult(None, TIMED_OUT)

    def prepare(self, *, max_age: float = 0.0) -> None:
        """Starts the probe a :meth:`result` with this ``max_age`` would need, without waiting for it.

        Several pools asked at once (a Django project's aliases) then probe side by side.
        """
        now = self._clock()
        with self._changed:
            outcome = self._latest
            if outcome is None or outcome.started < now - max_age:
                self._start_unless_fresh(now, now - max_age)

    def _start_unless_fresh(self, now: float, oldest: float) -> None:
        """Called with the condition held."""
        if not any(start >= oldest for start in self._starts) and len(self._starts) < MAX_IN_FLIGHT:
            self._start(now)

    def poke(self) -> None:
        """Starts a probe now unless :data:`MAX_IN_FLIGHT` are running; does not wait for it."""
        with self._changed:
            if len(self._starts) < MAX_IN_FLIGHT:
                self._start(self._clock())

    def outcome_since(self, since: float) -> PingResult | None:
        """The result of the newest probe if it started at or after ``since``; None if none has ended yet."""
        outcome = self._latest
        return outcome.result if outcome is not None and outcome.started >= since else None

    async def aresult(self, *, max_age: float = 0.0) -> PingResult:
        """:meth:`result` without blocking the event loop (the wait runs in the loop's executor)."""
        return await asyncio.get_running_loop().run_in_executor(None, lambda: self.result(max_age=max_age))

    def reset_after_fork(self) -> None:
        """In a forked child: the probe threads in flight are gone (their lock may be held by one)."""
        self._changed = threading.Condition()
        self._starts = []

    def _start(self, now: float) -> None:
        """Called with the condition held."""
        self._starts.append(now)
        thread = threading.Thread(target=self._run, args=(now,), name=f"poolguard-probe-{self._name}", daemon=True)
        thread.start()

    def _run(self, started: float) -> None:
        try:
            self._pool.probe(self.timeout)
        except Exception as exc:
            result = PingResult(None, type(exc).__name__, server_refusal(exc))
        else:
            result = PingResult(self._clock() - started)
        with self._changed:
            self._starts.remove(started)
            if self._latest is None or started >= self._latest.started:
                self._latest = _Outcome(started, result)
            self._changed.notify_all()
        if self._on_result is not None:
            try:
                self._on_result(result)
            except Exception as exc:  # the breaker's listeners are guarded already; this is belt and braces
                _log.error("poolguard: handling a probe result of pool %r failed: %s", self._name, type(exc).__name__)
