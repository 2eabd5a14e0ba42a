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

import importlib.util
import logging
import os
import threading
import traceback
from collections.abc import Callable, Hashable
from typing import Any

from poolguard._types import Clock

logger = logging.getLogger("poolguard.leaks")

_STACK_LIMIT = 30
_SQLALCHEMY_SPEC = importlib.util.find_spec("sqlalchemy")  # found, not imported: Django alone never loads it
_LIBRARY_DIRS = tuple(
    os.path.dirname(module_file) + os.sep
    for module_file in (__file__, _SQLALCHEMY_SPEC.origin if _SQLALCHEMY_SPEC else None)
    if module_file
)


class Holder:
    """One checked-out connection: who took it and when.

    Built on every checkout, so it stores only what is at hand for free (the thread's ident, the
    current span object); the thread's name and the trace id are worked out when a report needs them.
    """

    __slots__ = ("_route", "handle", "reported", "sampled", "since", "span", "stack", "thread_id", "unit")

    def __init__(
        self,
        since: float,
        unit: Any = None,
        handle: Any = None,
        span: Any = None,
        thread_id: int | None = None,
        *,
        route: str | None = None,
        stack: traceback.StackSummary | None = None,
    ) -> None:
        self.since = since
        self._route = route
        self.unit = unit
        """The unit of work that checked the connection out (None outside one)."""
        self.handle = handle
        self.span = span
        self.thread_id = thread_id
        self.sampled = False
        """Whether the checkout made a span (its request is sampled): the use time then gets an exemplar."""
        self.stack = stack
        self.reported = False

    @property
    def route(self) -> str | None:
        """The route given outright, else its unit's, which may be learned after the checkout (Django's is)."""
        return self._route or getattr(self.unit, "route", None)

    @property
    def thread(self) -> str:
        """The name of the thread that checked the connection out (its ident once it has ended)."""
        if self.thread_id is None:
            return "unknown"
        for thread in threading.enumerate():
            if thread.ident == self.thread_id:
                return thread.name
        return f"thread {self.thread_id}"

    @property
    def trace_id(self) -> str | None:
        """The trace the connection was checked out in, as 32 hex digits, or None outside a trace."""
        if self.span is None:
            return None
        context = self.span.get_span_context()
        return format(context.trace_id, "032x") if context.is_valid else None

    def __repr__(self) -> str:
        return f"<Holder route={self.route!r} since={self.since:.3f} reported={self.reported}>"


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
    """Holders by connection key, oldest first, with threshold reports.

    ``by_key`` is the one dict of holders. Checkout and checkin write it without a lock (a single
    dict store or pop is atomic), since they run on every checkout; only sweeps, which move holders
    to "reported" and must not report one twice, take the lock. Holders stay in checkout order (a
    dict keeps insertion order), so a sweep walks from the oldest and stops at the first young one.
    """

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
        self.by_key: dict[Hashable, Holder] = {}
        self._sweep_lock = threading.Lock()
        self.reported_total = 0

    def held_by(self, unit: object) -> list[tuple[Hashable, Holder]]:
        """The connections a unit of work still holds (called only when it still holds some)."""
        return [(key, holder) for key, holder in list(self.by_key.items()) if holder.unit is unit]

    @property
    def suspected(self) -> int:
        """How many connections are currently held longer than the threshold.

        A read with no side effect (reading stats or collecting metrics reports nothing): the
        reports come from :meth:`sweep`, which checkouts run at most once per sweep interval.
        """
        deadline = self._clock() - self._threshold
        return sum(1 for holder in list(self.by_key.values()) if holder.since <= deadline)

    def oldest(self) -> float | None:
        """When the longest-held connection was taken (None: none is held).

        Holders are registered as they are taken, so the first in ``by_key`` is the longest held:
        one lookup, not a pass over every holder, on every queued checkout.
        """
        try:
            for holder in self.by_key.values():
                return holder.since
        except RuntimeError:  # by_key changed size under us: no estimate this time
            pass
        return None

    def holders(self) -> list[Holder]:
        """A copy of every current holder, oldest first."""
        return list(self.by_key.values())

    def sweep(self, now: float | None = None) -> None:
        """Reports every holder that has crossed the threshold since the last sweep."""
        deadline = (self._clock() if now is None else now) - self._threshold
        newly: list[Holder] = []
        with self._sweep_lock:
            for holder in list(self.by_key.values()):
                if holder.since > deadline:
                    break
                if not holder.reported:
                    holder.reported = True
                    newly.append(holder)
        for holder in newly:
            self._report(holder)

    def _report(self, holder: Holder) -> None:
        self.reported_total += 1
        held_for = self._clock() - holder.since
        trace_id = holder.trace_id
        logger.warning(
            "poolguard: connection from pool %r held for %.1fs (leak_threshold %.1fs) by route %s in thread %s%s%s",
            self._pool_name,
            held_for,
            self._threshold,
            holder.route or "(no request)",
            holder.thread,
            f", trace {trace_id}" if trace_id is not None else "",
            f", checked out at {checkout_site(holder.stack)}" if holder.stack is not None else "",
        )
        if holder.stack is not None and logger.isEnabledFor(logging.DEBUG):
            logger.debug("poolguard: checkout stack of the connection above:\n%s", "".join(holder.stack.format()))
        if self._on_leak is not None:
            self._on_leak(holder)

    def reset(self) -> None:
        """Forgets every holder: for a forked child, where the parent's checkouts are not its own."""
        self.by_key = {}
        self._sweep_lock = threading.Lock()
