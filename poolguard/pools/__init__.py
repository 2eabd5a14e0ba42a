"""The two small protocols between the core and a pool of any kind, so neither depends on the other.

A pool module (:mod:`poolguard.pools.sqlalchemy`, :mod:`poolguard.pools.django`) knows its driver and
this module only. Through :class:`PoolAdapter` it answers what the core asks of a pool: how big it
is, what is in use, whether the database answers a probe on a fresh connection, and how to close a
connection a unit of work forgot or one hung through an outage. Through :class:`PoolEvents` (which
the core's gate implements) it tells the core what happens: a checkout (which the core gates), a
checkin, a connection made, a connection lost.
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
from collections.abc import Awaitable, Callable, Hashable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Protocol, TypeVar, runtime_checkable

from poolguard._types import Clock

T = TypeVar("T")

AwaitInGreenlet = Callable[[Awaitable[Any]], Any]
"""Runs a coroutine to completion from synchronous code inside SQLAlchemy's asyncio greenlet."""


TCP_TIMEOUT = 10.0
"""Seconds a libpq connection waits on unacknowledged data (``tcp_user_timeout``), and idles before keepalives."""


LIBPQ_TCP_BOUNDS: Mapping[str, int] = MappingProxyType(
    {
        "keepalives": 1,
        "keepalives_idle": math.ceil(TCP_TIMEOUT),
        "keepalives_interval": max(1, math.ceil(TCP_TIMEOUT / 5)),
        "keepalives_count": 3,
        "tcp_user_timeout": round(TCP_TIMEOUT * 1000),
    }
)
"""libpq's TCP keepalives and ``tcp_user_timeout``: a read on a silent server fails within seconds.
Neither cuts a slow query short: a server at work acknowledges what it is sent."""


_LIBPQ_MIN_CONNECT_TIMEOUT = 2  # libpq treats anything lower as 2 s

CONNECT_TIMEOUT = 2
"""Seconds poolguard gives a connect whose parameters set no timeout of its own (libpq then waits for
ever on a server that accepts and says nothing, asyncpg 60 s): a connect under way cannot be aborted,
only bounded. A timeout the app sets, 0 (none) included, is kept."""

_CONNECT_TIMEOUT_KEYS = {"libpq": "connect_timeout", "asyncpg": "timeout", "mysql": "connect_timeout"}


def bound_connect(family: str, params: dict[str, Any]) -> bool:
    """Adds :data:`CONNECT_TIMEOUT` to a connect's parameters, in place, where they set no timeout of their
    own (``family`` as for :func:`bound_probe_params`); True when it did."""
    key = _CONNECT_TIMEOUT_KEYS.get(family)
    if key is None or key in params:
        return False
    params[key] = CONNECT_TIMEOUT
    return True


def bound_probe_params(family: str, params: dict[str, Any], timeout: float) -> None:
    """Bounds a probe's own connection, in place, in its driver's terms: connect, and reads where it can.

    ``family``: ``libpq`` (psycopg, psycopg2), ``asyncpg`` or ``mysql`` (pymysql, mysqlclient);
    others are left alone. A probe that could hang would defeat its purpose, and a user's engine or
    Django project often sets no timeout; a shorter one the user set is kept.
    """
    if family == "libpq":
        seconds = max(_LIBPQ_MIN_CONNECT_TIMEOUT, math.ceil(timeout))
        params["connect_timeout"] = min(int(params.get("connect_timeout") or seconds), seconds)
        params["tcp_user_timeout"] = max(1, round(timeout * 1000))
    elif family == "asyncpg":
        params["timeout"] = min(float(params.get("timeout") or timeout), timeout)
        params["command_timeout"] = timeout
    elif family == "mysql":
        for key in ("connect_timeout", "read_timeout", "write_timeout"):
            params[key] = max(1, math.ceil(timeout))


def shutdown_socket(fileno: int | None) -> bool:
    """Shuts down (both ways) the socket behind ``fileno``; the descriptor stays its owner's to close.

    A thread blocked reading that socket wakes with end-of-file, which every driver reports as a
    lost connection; nothing is closed under the driver, so no descriptor can be reused behind it.
    """
    if fileno is None or fileno < 0:
        return False
    try:
        duplicate = socket.socket(fileno=os.dup(fileno))
    except OSError:
        return False
    with duplicate, contextlib.suppress(OSError):
        duplicate.shutdown(socket.SHUT_RDWR)
    return True


def driver_fileno(connection: Any) -> int | None:
    """The socket descriptor of a DB-API (or asyncpg) connection, where the driver exposes one."""
    fileno = getattr(connection, "fileno", None)
    if callable(fileno):
        with contextlib.suppress(Exception):
            value = fileno()
            return value if isinstance(value, int) else None
    sock = getattr(connection, "_sock", None)  # pymysql
    if sock is None:
        transport = getattr(connection, "_transport", None)  # asyncpg
        sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is not None:
        with contextlib.suppress(Exception):
            value = sock.fileno()
            return value if isinstance(value, int) else None
    return None


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
    """Seconds it has waited for connections so far, ``queued`` included; its wait budget is the gate's ``max_wait``."""

    queued: float
    """Seconds its request queued in front of the app before it began (``X-Request-Start``), 0 when unknown:
    a request that queued past its budget is refused before it touches the pool."""

    sheds: bool
    """Whether it is a request, whose wait under sustained overload is cut short (a ``guard.session()``
    block of its own, a job's, waits its whole budget)."""

    reserved: float | None
    """A slot admission gave it ahead of its first checkout (seconds waited for it), None without one:
    a sync endpoint's wait happens on the event loop, not in a worker thread."""

    held: int
    """Connections it holds now."""


class PoolEvents(Protocol):
    """What a pool tells the core. Every method is cheap and safe from any thread."""

    name: str
    """The pool's name, for log lines."""
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

    def connecting(self) -> None:
        """The pool is about to open a new connection: raises ``Unavailable`` for a guarded unit of
        work while the breaker is open (a reconnect after a failed pre-ping must not hang on a dead server)."""

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

    # Optional, read with getattr (so adapters without it stay PoolAdapters): ``pooler: str | None``,
    # the connection pooler found in front of the database (see poolguard._pooler), shown in health.

    def attach(self, events: PoolEvents) -> None:
        """Starts reporting every checkout of the pool to ``events``."""

    def detach(self) -> None:
        """Stops reporting and removes every hook it installed."""

    def counts(self) -> PoolCounts: ...

    def probe(self, timeout: float) -> None:
        """Opens a connection of its own (never a pool slot), runs the cheapest round trip, closes it.

        Raises on failure. Called from a probe thread of the core (async pools run their own event
        loop there), with the connect bounded by ``timeout`` wherever the driver takes a timeout.
        """

    def abort(self, handle: Any) -> bool:
        """Shuts down the socket under a checked-out connection, so a read hung on it fails at once.

        For connections held through an outage the core has confirmed; returns False when the
        driver exposes no socket.
        """

    def abort_connecting(self) -> int:
        """Shuts the sockets of connections being checked out right now (a pre-ping hung on a silent
        server); returns how many."""

    def discard_stale(self) -> None:
        """Connections made before now are replaced at their next checkout (after an outage)."""

    def reclaim(self, handle: Any) -> None:
        """Closes a connection a unit of work still held at its end (the handle its checkout returned)."""


@runtime_checkable
class AcquiringPool(PoolAdapter, Protocol):
    """A pool with no hook before its acquire waits (asyncpg): the core acquires and releases through it.

    A guarded unit of work calls :meth:`acquire` itself, between the gate's breaker and admission and
    its accounting, and :meth:`release` when the unit is done with the connection.
    """

    def acquire(self, budget: float) -> Awaitable[Any]:
        """The pool's own acquire, waiting at most ``budget`` seconds for a connection (then ``PoolSaturated``);
        the wait for it is what the core measures."""

    release: Callable[[Any], Awaitable[None]]
    """The pool's own release, cancellation-safe."""

    def broken(self, connection: Any, exc: BaseException) -> bool:
        """Whether ``exc``, raised while ``connection`` was in use, says the connection failed."""
