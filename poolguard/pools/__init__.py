"""The two small protocols between the core and a pool of any kind, so neither depends on the other.

A pool module (:mod:`poolguard.pools.sqlalchemy`, :mod:`poolguard.pools.django`) knows its driver and
this module only. Through :class:`PoolAdapter` it answers what the core asks of a pool: how big it
is, what is in use, whether the database answers a ping, and how to close a connection a unit of
work forgot. Through :class:`PoolEvents` (which the core's gate implements) it tells the core what
happens: a checkout (which the core gates), a checkin, a connection made, a connection lost.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Hashable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar, runtime_checkable

from poolguard._types import Clock

T = TypeVar("T")

AwaitInGreenlet = Callable[[Awaitable[Any]], Any]
"""Runs a coroutine to completion from synchronous code inside SQLAlchemy's asyncio greenlet."""


@dataclass(frozen=True, slots=True)
class PoolCounts:
    """What the pool holds right now; ``size``/``max_overflow`` are None when unbounded.

    ``capacity`` is the most connections the pool will ever hand out at once, None when unbounded.
    """

    size: int | None
    max_overflow: int | None
    checked_out: int
    idle: int
    overflow: int

    @property
    def capacity(self) -> int | None:
        if self.size is None or self.max_overflow is None:
            return None
        return self.size + self.max_overflow


class Unit(Protocol):
    """What the core keeps of one unit of work (a request, a session block); the unit carries it."""

    route: str | None
    """The route it serves, for use times and leak reports (None outside a request, or not known yet)."""

    waited: float
    """Seconds it has waited for connections so far; its wait budget is the gate's ``max_wait``."""

    held: int
    """Connections it holds now."""


class PoolEvents(Protocol):
    """What a pool tells the core. Every method is cheap and safe from any thread."""

    clock: Clock
    max_wait: float
    unit_var: ContextVar[Unit | None]
    """The unit of work of this pool's guard in the caller's context (``unit_var.get()``), or None."""

    @property
    def held(self) -> int:
        """Connections checked out and not yet back, as the core counts them."""

    def checkout(
        self,
        real_checkout: Callable[[], T],
        await_in_greenlet: AwaitInGreenlet | None = None,
        key_of: Callable[[T], Hashable] | None = None,
    ) -> T:
        """Runs the pool's own checkout, gated inside a unit of work, and accounts for it.

        With ``key_of`` the connection is registered as held under ``key_of(connection)`` until
        :meth:`checkin` with the same key.
        """

    def checkin(self, key: Hashable) -> None:
        """A connection registered under ``key`` came back (or was detached or invalidated)."""

    def connected(self, seconds: float) -> None:
        """The pool opened a new connection, which took ``seconds``."""

    def lost(self, exc: BaseException | None = None) -> None:
        """A connection of a guarded unit of work died in use (disconnect, server shutdown)."""


@runtime_checkable
class PoolAdapter(Protocol):
    """What the core needs from a pool of any kind: ``Guard(adapter)`` accepts one directly."""

    backend: str
    """The database kind, e.g. ``postgresql``, ``mysql``, ``sqlite``."""

    db_system: str
    """The OpenTelemetry ``db.system.name`` value (``mariadb`` where the server is known to be MariaDB)."""

    is_async: bool

    def attach(self, events: PoolEvents) -> None:
        """Starts reporting every checkout of the pool to ``events``."""

    def detach(self) -> None:
        """Stops reporting and removes every hook it installed."""

    def counts(self) -> PoolCounts: ...

    def ping(self) -> None:
        """Checks out a connection and runs the cheapest round trip; raises on failure (sync pools)."""

    async def aping(self) -> None:
        """The same for asyncio pools."""

    def reclaim(self, handle: Any) -> None:
        """Closes a connection a unit of work still held at its end (the handle its checkout returned)."""
