"""The one small protocol every pool kind implements, so the core never depends on a driver.

A pool adapter reports its checkouts into a :class:`poolguard.monitor.PoolMonitor` (wait, use,
create times, failures) and answers three questions: how big it is, what is in use now, and whether
the database answers a ping. SQLAlchemy engines are in :mod:`poolguard.pools.sqlalchemy`; asyncpg
pools and Django's connections implement the same protocol.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from poolguard.monitor import PoolMonitor


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


@runtime_checkable
class PoolAdapter(Protocol):
    """What the guard needs from a pool of any kind: ``Guard(adapter)`` accepts one directly."""

    backend: str
    """The database kind, e.g. ``postgresql``, ``mysql``, ``sqlite``."""

    db_system: str
    """The OpenTelemetry ``db.system.name`` value (``mariadb`` where the server is known to be MariaDB)."""

    is_async: bool

    def attach(self, monitor: PoolMonitor) -> None:
        """Starts reporting every checkout of the pool to ``monitor``."""

    def detach(self) -> None:
        """Stops reporting and removes every hook it installed."""

    def counts(self) -> PoolCounts: ...

    def ping(self) -> None:
        """Checks out a connection and runs the cheapest round trip; raises on failure (sync pools)."""

    async def aping(self) -> None:
        """The same for asyncio pools."""
