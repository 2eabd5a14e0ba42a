"""The watchdog: notices an outage no request can report, and the database's return, from a thread of its own.

A black-holed database raises nothing: connections hang on their next read, no checkout fails,
and when every worker thread is stuck behind one, no request is even left to notice. So a daemon
thread ticks every :data:`TICK` (a tenth of a second; a tick of an idle pool reads a few
attributes) and asks the gate two cheap questions:

- Closed breaker, but the pool stalled (work outstanding, nothing back for
  :meth:`~poolguard.gate.Gate.stall_threshold`)? Then a probe on a fresh connection decides: if no
  server answers it (no answer within its timeout, refused, reset), the outage is confirmed: the
  breaker trips and the connections hung on the database are aborted. If the server answers, even
  with a refusal (too many connections), the work is only slow: no action, and no new suspicion
  for :data:`QUIET_AFTER_ANSWER`.
- Breaker not closed? Then probe at most once per ``probe_interval``; the guard turns a probe that
  answers into :meth:`~poolguard.breaker.Breaker.probe_succeeded`, so traffic is served again
  within about a second of the database's return, whatever ``open_for`` says.

:meth:`Watchdog.tick` holds all the logic and reads time only through the injected clock, so tests
call it directly; the thread only calls it. The thread holds the watchdog weakly and ends when its
guard is closed or collected.
"""

from __future__ import annotations

import logging
import threading
import weakref

from poolguard._types import Clock
from poolguard.breaker import Breaker
from poolguard.gate import Gate
from poolguard.probe import Prober

__all__ = ["QUIET_AFTER_ANSWER", "Watchdog"]

_log = logging.getLogger("poolguard")

TICK = 0.1
"""Seconds between the watchdog's looks: a stall is noticed at most this late."""

QUIET_AFTER_ANSWER = 5.0
"""Seconds a stalled pool is not suspected again after a probe showed the database answers."""


class Watchdog:
    """Stall detection and active probing for one guard's pool."""

    def __init__(
        self, gate: Gate, prober: Prober, breaker: Breaker | None, *, probe_interval: float, clock: Clock
    ) -> None:
        self.gate = gate
        self.prober = prober
        self.breaker = breaker
        self.probe_interval = probe_interval
        self.clock = clock
        self.suspected_at: float | None = None
        """When the current stall suspicion began (a probe decides it), or None."""
        self.confirmed = 0
        """Outages confirmed so far (stalls the probe did not clear)."""
        self._quiet_until = 0.0
        self._next_probe = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def tick(self) -> None:
        """One look at the pool: what the thread does every :data:`TICK`."""
        now = self.clock()
        breaker = self.breaker
        if breaker is not None and not breaker.closed:
            self.suspected_at = None
            if now >= self._next_probe:
                self._next_probe = now + self.probe_interval
                self.prober.poke()
            return
        if self.suspected_at is not None:
            self._decide(now, self.suspected_at)
            return
        if now >= self._quiet_until and self.gate.stalled(now):
            self.suspected_at = now
            self.prober.poke()

    def _decide(self, now: float, since: float) -> None:
        result = self.prober.outcome_since(since)
        if result is None and now - since < self.prober.timeout:
            return  # the probe has not answered yet, and still has time
        self.suspected_at = None
        if result is not None and not result.unreachable:
            # It answered (or refused: it is up, only out of slots or logins): slow work, not a silent database.
            self._quiet_until = now + QUIET_AFTER_ANSWER
            return
        self.confirmed += 1
        if self.breaker is not None:
            self.breaker.trip()
        self.gate.abort_stuck(now)

    # -- the thread ------------------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(
            target=_run,
            args=(weakref.ref(self), self._stop, TICK),
            name=f"poolguard-watchdog-{self.gate.name}",
            daemon=True,
        )
        self._thread.start()

    @property
    def running(self) -> bool:
        """Whether the watchdog's thread runs (it does unless the guard's ``probe_interval`` is None)."""
        return self._thread is not None

    def stop(self) -> None:
        self._stop.set()
        self._thread = None

    def reset_after_fork(self, *, start: bool) -> None:
        """In a forked child: the parent's thread is gone; no suspicion carries over; a thread of its own."""
        self._stop = threading.Event()
        self._thread = None
        self.suspected_at = None
        if start:
            self.start()


def _run(ref: weakref.ref[Watchdog], stop: threading.Event, interval: float) -> None:
    while not stop.wait(interval):
        watchdog = ref()
        if watchdog is None:
            return
        try:
            watchdog.tick()
        except Exception as exc:  # a bug here must not end the watching
            _log.error("poolguard: watchdog of pool %r failed a tick: %s", watchdog.gate.name, type(exc).__name__)
            _log.debug("watchdog tick failure", exc_info=True)
        del watchdog
