"""Fork safety: a forked child starts with fresh pools and fresh gate state, and never touches the parent's connections.

After ``os.fork()`` (gunicorn ``--preload``, multiprocessing's fork start) the child has copies of
the parent's pooled connections: the same sockets, the same server sessions. A child that uses one
corrupts the parent's conversation with the server; one that closes one (or lets the garbage
collector close it: psycopg2 sends a Terminate message, SQLAlchemy rolls back a checked-out
connection it finalizes) ends the parent's session. And the child inherits bookkeeping about
threads it does not have: admission slots held by the parent's request threads, their holders,
waiters, locks they held at the fork.

So, the first time a Guard is built, an ``os.register_at_fork(after_in_child=...)`` handler is
registered (once per process). In the child it resets every live guard (it holds them weakly, so it
keeps none alive): the pool drops the parent's connections unclosed (SQLAlchemy's documented
``engine.dispose(close=False)``; Django's per-thread wrapper and psycopg pool), the gate starts with
full admission, no holders and nothing pending, the probes in flight are forgotten and the watchdog
starts a thread of the child's own (threads do not survive a fork). What the pools dropped is kept
referenced here for the child's whole life, so no finalizer ever runs on a socket the parent still
uses. The breaker keeps its state: it describes
the database, which parent and child share.

This is poolguard's one piece of process-wide state: a fork happens to the process, not to an app.
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from collections.abc import Iterable
from typing import Protocol

logger = logging.getLogger("poolguard")


class ForkAware(Protocol):
    name: str

    def _reset_after_fork(self) -> Iterable[object]:
        """Resets its state for the child; returns what the child must keep referenced and never close."""


_live: weakref.WeakSet[ForkAware] = weakref.WeakSet()
_orphans: list[object] = []
"""The parent's pools and connections a child dropped: referenced until the child exits, never closed."""
_lock = threading.Lock()
_registered = False


def track(guard: ForkAware) -> None:
    """Resets ``guard`` in every child forked from now on, for as long as it is alive."""
    global _registered  # noqa: PLW0603 (one handler per process)
    with _lock:
        if not _registered:
            os.register_at_fork(after_in_child=_after_fork_in_child)
            _registered = True
        _live.add(guard)


def _after_fork_in_child() -> None:
    global _lock  # noqa: PLW0603
    _lock = threading.Lock()  # a parent thread may have held it at the fork
    for guard in list(_live):
        try:
            _orphans.extend(guard._reset_after_fork())
        except Exception as exc:
            # The class name only: stack traces never go to INFO or above.
            logger.warning(
                "poolguard: could not reset pool %r in the forked child (%s); do not use it there",
                guard.name,
                type(exc).__name__,
            )
            logger.debug("poolguard: reset after fork failed", exc_info=True)
