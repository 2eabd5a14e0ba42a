"""Who holds which connection since when, and which holders look like leaks.

A leaked connection is the slow way a pool dies: each one shrinks the pool until requests queue
for good. Every checkout registers a holder (route, thread, trace id and, only when asked for, the
checkout stack); checkin removes it. Holders are kept in checkout order, so the oldest one is found
in O(1) and a sweep on each checkout costs nothing until something is actually over the threshold.
A holder over ``leak_threshold`` is reported once: a WARNING log naming the route, the thread and,
when stack capture is on, the line that checked the connection out (the whole checkout stack goes to
a DEBUG line: stack traces never reach INFO or above), and a count in health.
"""

from __future__ import annotations

import logging
import os
import threading
import traceback
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy

from poolguard._types import Clock

logger = logging.getLogger("poolguard.leaks")

_STACK_LIMIT = 30
_LIBRARY_DIRS = tuple(
    os.path.dirname(module_file) + os.sep for module_file in (__file__, sqlalchemy.__file__) if module_file
)


@dataclass(slots=True)
class Holder:
    """One checked-out connection: who took it and when."""

    since: float
    route: str | None
    thread: str
    trace_id: str | None = None
    stack: traceback.StackSummary | None = None
    scope: object | None = None
    handle: Any = None
    span: Any = None
    reported: bool = field(default=False)


def capture_stack() -> traceback.StackSummary:
    """The caller's stack, trimmed of poolguard's and SQLAlchemy's own frames; formatted only if reported."""
    frames = [f for f in traceback.extract_stack(limit=_STACK_LIMIT + 20) if not f.filename.startswith(_LIBRARY_DIRS)]
    return traceback.StackSummary.from_list(frames[-_STACK_LIMIT:])


def checkout_site(stack: traceback.StackSummary) -> str:
    """The innermost application frame, as ``file:line in function``."""
    if not stack:
        return "unknown"
    frame = stack[-1]
    return f"{frame.filename}:{frame.lineno} in {frame.name}"


class LeakTracker:
    """Holders by connection key, oldest first, with threshold reports."""

    def __init__(
        self,
        *,
        pool_name: str,
        threshold: float,
        clock: Clock,
        on_leak: Callable[[Holder], None] | None = None,
    ) -> None:
        self._pool_name = pool_name
        self._threshold = threshold
        self._clock = clock
        self._on_leak = on_leak
        self._holders: dict[Hashable, Holder] = {}
        self._suspected: dict[Hashable, Holder] = {}
        self._lock = threading.Lock()
        self.reported_total = 0

    def checked_out(self, key: Hashable, holder: Holder) -> None:
        with self._lock:
            self._holders[key] = holder

    def checked_in(self, key: Hashable) -> Holder | None:
        """Forgets the holder and returns it (so the caller can compute the use time)."""
        with self._lock:
            holder = self._holders.pop(key, None)
            if holder is None:
                holder = self._suspected.pop(key, None)
            return holder

    def held_by(self, scope: object) -> list[tuple[Hashable, Holder]]:
        """The connections a request scope still holds (called only when it still holds some)."""
        with self._lock:
            return [
                (key, holder)
                for holders in (self._holders, self._suspected)
                for key, holder in holders.items()
                if holder.scope is scope
            ]

    @property
    def suspected(self) -> int:
        """How many connections are currently held longer than the threshold."""
        self.sweep()
        return len(self._suspected)

    @property
    def held(self) -> int:
        """How many connections are checked out now (a count, without copying the holders)."""
        return len(self._holders) + len(self._suspected)

    def holders(self) -> list[Holder]:
        """A copy of every current holder, oldest first."""
        with self._lock:
            return [*self._suspected.values(), *self._holders.values()]

    def sweep(self, now: float | None = None) -> None:
        """Reports every holder that has crossed the threshold since the last sweep."""
        deadline = (self._clock() if now is None else now) - self._threshold
        newly: list[Holder] = []
        with self._lock:
            while self._holders:
                key = next(iter(self._holders))
                holder = self._holders[key]
                if holder.since > deadline:
                    break
                del self._holders[key]
                holder.reported = True
                self._suspected[key] = holder
                newly.append(holder)
        for holder in newly:
            self._report(holder)

    def _report(self, holder: Holder) -> None:
        self.reported_total += 1
        held_for = self._clock() - holder.since
        logger.warning(
            "poolguard: connection from pool %r held for %.1fs (leak_threshold %.1fs) by route %s in thread %s%s",
            self._pool_name,
            held_for,
            self._threshold,
            holder.route or "(no request)",
            holder.thread,
            f", checked out at {checkout_site(holder.stack)}" if holder.stack is not None else "",
        )
        if holder.stack is not None and logger.isEnabledFor(logging.DEBUG):
            logger.debug("poolguard: checkout stack of the connection above:\n%s", "".join(holder.stack.format()))
        if self._on_leak is not None:
            self._on_leak(holder)
