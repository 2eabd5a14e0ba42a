"""Django's own database connections behind the pool protocol.

Django's classic connections have no pool object to wrap: each thread owns one connection per
alias, opened on first use and closed at the end of the request (or kept for ``CONN_MAX_AGE``).
So the checkout poolguard gates there is a request's first use of the alias, which always goes
through ``ensure_connection``: every cursor, every query and ``transaction.atomic`` (thus
``ATOMIC_REQUESTS``) calls it before touching the database. Django 5.1+'s psycopg pool
(``OPTIONS["pool"]``) has real checkouts, so for it the pool's own ``getconn``/``putconn`` are
wrapped instead: an admission slot is then held exactly as long as a connection is out of the pool.

Django makes connection wrappers per thread, so the hooks go on every wrapper as it is created (an
instance attribute on the ConnectionHandler's ``create_connection``; nothing is patched on a class).
They are installed once and look the adapter of their alias up at call time, so rebuilding
poolguard's state (``override_settings`` in tests) never leaves a stale hook behind.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import threading
from collections.abc import Callable
from typing import Any

from django.db import connections as default_connections  # type: ignore[import-untyped]
from django.db.utils import DatabaseError  # type: ignore[import-untyped]

from poolguard._classify import counted_pool, is_connection_failure
from poolguard.errors import ConfigError, PoolSaturated
from poolguard.pools import (
    CONNECT_TIMEOUT,
    LIBPQ_TCP_BOUNDS,
    PoolCounts,
    PoolEvents,
    Unit,
    bound_probe_params,
    driver_fileno,
    shutdown_socket,
)
from poolguard.pools.django_settings import pool_option, pool_settings

__all__ = ["DjangoPool"]

_MIN_GETCONN_WAIT = 0.05
"""Even with the wait budget spent, the pool gets this long to hand over a connection being returned."""

_REGISTRY = "_poolguard_adapters"
_HOOKED = "_poolguard_hooked"
_CONNECTING = "_poolguard_connecting"
_GENERATION = "_poolguard_generation"


class DjangoPool:
    """Adapts one alias of ``django.db.connections`` (persistent/per-request connections or the psycopg pool)."""

    is_async = False

    def __init__(self, alias: str, *, handler: Any = None, capacity: int | None = None) -> None:
        self.handler: Any = handler if handler is not None else default_connections
        if alias not in self.handler.settings:
            raise ConfigError(
                "POOLGUARD['DATABASES']",
                alias,
                "aliases of settings.DATABASES: " + ", ".join(repr(a) for a in self.handler.settings),
            )
        self.alias = alias
        settings_dict = self.handler.settings[alias]
        wrapper = self.handler[alias]
        self.backend: str = wrapper.vendor
        self._wrapper_class: Any = type(wrapper)
        """The alias's DatabaseWrapper class: probes make their own instance (``handler[alias]`` would
        make one per thread that asks)."""
        self.db_system = self.backend
        pool = pool_settings(settings_dict)
        self.pooled = pool is not None
        self.max_size: int | None = pool[0] if pool is not None else None
        self.min_size: int | None = pool[1] if pool is not None else None
        self.conn_max_age: float | None = settings_dict.get("CONN_MAX_AGE", 0)
        self._per_thread_capacity = None if self.pooled else capacity
        """Per-thread connections: how many threads may use the alias at once (None: unbounded)."""
        self._events: PoolEvents | None = None
        self._pool: Any = None
        self._mid_checkout: dict[int, Any] = {}
        """Connections being checked out right now, by id: what :meth:`abort_connecting` reaches. Psycopg
        connections in the pool's own check (``CONN_HEALTH_CHECKS``), and per-thread wrappers in a request's
        first use (connect, ``init_connection_state``, the app's ``connection_created`` receivers)."""
        self._connect_errors = 0
        self.generation = 0
        """Bumped by :meth:`discard_stale`: a per-thread connection of an older generation is closed
        at its next request instead of being reused."""

    @property
    def capacity(self) -> int | None:
        """Connections the alias can hand out at once: the pool's max_size; for per-thread connections
        the configured or detected capacity (None when unknown: unbounded)."""
        return self.max_size if self.pooled else self._per_thread_capacity

    def describe(self) -> str:
        """What kind of connection handling the alias uses, for the doctor."""
        if self.pooled:
            return f"psycopg pool (min_size={self.min_size}, max_size={self.max_size})"
        if self.conn_max_age is None:
            return "persistent per-thread connections (CONN_MAX_AGE=None)"
        if self.conn_max_age:
            return f"persistent per-thread connections (CONN_MAX_AGE={self.conn_max_age:g})"
        return "a new connection per request (CONN_MAX_AGE=0)"

    # -- the protocol ------------------------------------------------------------------------------

    def attach(self, events: PoolEvents) -> None:
        registry: dict[str, DjangoPool] = self.handler.__dict__.setdefault(_REGISTRY, {})
        if registry.get(self.alias) is not None:
            raise ConfigError(
                "POOLGUARD['DATABASES']",
                self.alias,
                "an alias no other poolguard state watches (close the old one first)",
            )
        self._events = events
        registry[self.alias] = self
        _hook_handler(self.handler, registry)
        for connection in self.handler.all(initialized_only=True):
            _instrument(connection, registry)

    def detach(self) -> None:
        registry: dict[str, DjangoPool] = self.handler.__dict__.get(_REGISTRY, {})
        if registry.get(self.alias) is self:
            del registry[self.alias]
        self._events = None

    def counts(self) -> PoolCounts:
        if self.pooled:
            pool = self._pool
            if pool is None:
                return PoolCounts(size=self.max_size, max_overflow=0, checked_out=0, idle=0, overflow=0)
            stats = pool.get_stats()
            available = int(stats.get("pool_available", 0))
            opened = int(stats.get("pool_size", 0))
            return PoolCounts(
                size=self.max_size, max_overflow=0, checked_out=max(0, opened - available), idle=available, overflow=0
            )
        held = self._events.held if self._events is not None else 0
        capacity = self._per_thread_capacity
        return PoolCounts(
            size=capacity, max_overflow=None if capacity is None else 0, checked_out=held, idle=0, overflow=0
        )

    def probe(self, timeout: float) -> None:
        """``SELECT 1`` on a connection of its own: never the pool's, never a thread's, connect bounded."""
        settings_dict = copy.deepcopy(self.handler.settings[self.alias])
        options = dict(settings_dict.get("OPTIONS") or {})
        options.pop("pool", None)
        bound_probe_params("libpq" if self.backend == "postgresql" else self.backend, options, timeout)
        settings_dict["OPTIONS"] = options
        connection = self._wrapper_class(settings_dict, self.alias)
        try:
            with connection.cursor() as cursor:
                cursor.execute("SELECT 1")
        finally:
            connection.close()

    def abort(self, handle: Any) -> bool:
        """``handle`` is a thread's connection wrapper, or a psycopg connection of Django's pool."""
        raw = handle.connection if hasattr(handle, "settings_dict") else handle
        return raw is not None and shutdown_socket(driver_fileno(raw))

    def abort_connecting(self) -> int:
        """Connections mid-checkout: with ``CONN_HEALTH_CHECKS`` Django has the pool ping each connection
        inside ``getconn``, and a new per-thread connection makes round trips before the request has it;
        a silent database leaves either hanging."""
        return sum(self.abort(connection) for connection in list(self._mid_checkout.values()))

    def discard_stale(self) -> None:
        """Per-thread connections: closed at their next request. Django's psycopg pool: replaced.

        After an outage psycopg_pool's workers are sleeping in their reconnect backoff (seconds,
        doubling) and a drained pool would wait for them; a new pool connects at once. Django
        builds it on the next connect; the old one is closed in the background, its connections
        still in use closed as they come back.
        """
        pool = self._pool
        if pool is not None:
            pools: dict[str, Any] = getattr(self._wrapper_class, "_connection_pools", {})
            if pools.get(self.alias) is pool:
                del pools[self.alias]
            self._pool = None
            threading.Thread(target=_close_quietly, args=(pool,), name="poolguard-pool-close", daemon=True).start()
        self.generation += 1

    def reclaim(self, handle: Any) -> None:
        """Nothing to force: Django closes or returns its connections when it ends the request."""

    def end_unit(self, unit: Unit) -> None:
        """A request ended: its per-thread connection counts as returned (Django keeps or closes it itself)."""
        if self._events is not None and not self.pooled:
            self._events.checkin(id(unit))

    # -- hooks ---------------------------------------------------------------------------------------

    def _ensure(self, connection: Any, real: Callable[[], None]) -> None:
        """A request's first use of the alias is its checkout: gated, and held until the request ends."""
        events = self._events
        if events is None or self.pooled:  # pooled: the pool's getconn is gated instead
            real()
            return
        unit = events.unit_var.get()
        if unit is None:
            real()
            return
        if unit.held:
            if connection.connection is not None:
                real()
                return
            try:  # a reconnect within the request: not gated again, but its failure counts
                real()
            except DatabaseError as exc:
                if is_connection_failure(exc, during_checkout=True):
                    events.lost(exc)
                raise
            return
        state = connection.__dict__
        if state.get(_CONNECTING):  # connect() itself calls ensure_connection again
            real()
            return
        if self.generation and state.get(_GENERATION, 0) != self.generation:
            state[_GENERATION] = self.generation
            if connection.connection is not None:  # made before an outage: likely dead, never probed
                with contextlib.suppress(DatabaseError):
                    connection.close()

        def connect() -> Any:
            real()
            return connection  # the holder's handle: what a leak report or a reclaim acts on

        state[_CONNECTING] = True
        key = id(connection)
        self._mid_checkout[key] = connection
        try:
            # Keyed by the request's unit: end_unit checks it in under the same key.
            events.checkout(connect, None, lambda _connection: id(unit))
        finally:
            state[_CONNECTING] = False
            self._mid_checkout.pop(key, None)

    def _watch_pool(self, connection: Any) -> None:
        pool = connection.pool
        if pool is None or pool is self._pool:
            return
        _hook_pool(pool, self.handler.__dict__[_REGISTRY], self.alias)
        self._pool = pool

    def _pool_busy(self, pool: Any) -> bool:
        """True when every connection the pool may open is open and in use, and none failed to open since
        the last look: saturation, not a failure.

        psycopg_pool makes its connections in background workers and keeps their errors there; its
        ``connections_errors`` counter is the one trace of a database that refuses new connections.
        """
        stats = pool.get_stats()
        errors = int(stats.get("connections_errors", 0))
        failed, self._connect_errors = errors > self._connect_errors, errors
        if failed:
            return False
        return bool(int(stats.get("pool_size", 0)) >= int(pool.max_size) and int(stats.get("pool_available", 0)) == 0)

    def _on_query_error(self, exc: BaseException, connection: Any) -> None:
        """A query failed: a lost connection counts on the breaker, an application error does not."""
        events = self._events
        if events is None or counted_pool(exc) is not None:
            return
        name = type(exc).__name__
        if name not in ("OperationalError", "InterfaceError"):
            return
        if is_connection_failure(exc) or _driver_broken(connection.connection):
            events.lost(exc)

    def reset_after_fork(self) -> list[object]:
        """In a forked child: this thread's wrapper of the alias and Django's psycopg pool are dropped, unclosed.

        Django makes a fresh wrapper (and a fresh pool: the old one's worker threads did not survive
        the fork) on next use. The dropped ones are returned for the child to keep referenced:
        closing them, or letting the collector do it, would end the parent's sessions.
        """
        orphans: list[object] = []
        storage = self.handler._connections
        wrapper = getattr(storage, self.alias, None)
        if wrapper is not None:
            orphans.append(wrapper)
            delattr(storage, self.alias)
        if self.pooled:
            pools: dict[str, Any] = getattr(self._wrapper_class, "_connection_pools", {})
            pool = pools.pop(self.alias, None)
            if pool is not None:
                orphans.append(pool)
        self._pool = None
        return orphans


def _close_quietly(pool: Any) -> None:
    with contextlib.suppress(Exception):
        pool.close(timeout=5.0)


def _driver_broken(raw: Any) -> bool:
    """Whether the DB-API connection says it is dead (psycopg 3 ``broken``, psycopg2 ``closed`` = 2)."""
    if raw is None:
        return True
    broken = getattr(raw, "broken", None)
    if isinstance(broken, bool):
        return broken
    closed = getattr(raw, "closed", None)
    return bool(closed) if isinstance(closed, bool | int) else False


def _hook_handler(handler: Any, registry: dict[str, DjangoPool]) -> None:
    if handler.__dict__.get(_HOOKED):
        return
    real_create = handler.create_connection

    def create_connection(alias: str) -> Any:
        connection = real_create(alias)
        _instrument(connection, registry)
        return connection

    handler.create_connection = create_connection
    handler.__dict__[_HOOKED] = True


def _instrument(connection: Any, registry: dict[str, DjangoPool]) -> None:
    """Hooks one connection wrapper once; the hooks cost a dict lookup while its alias is unguarded.

    With Django's psycopg pool the pool's own ``getconn`` is what gets gated, so the wrapper only
    needs ``connect`` hooked (once per request, to find the pool, which Django makes lazily).
    Per-thread connections need ``ensure_connection``: a request's first use is the checkout,
    even on a persistent connection that is already open.
    """
    if connection.__dict__.get(_HOOKED):
        return
    connection.__dict__[_HOOKED] = True
    alias = connection.alias
    _bound_connects(connection)
    if pool_option(connection.settings_dict) is not None:
        real_connect = connection.connect

        pools: dict[str, Any] = getattr(type(connection), "_connection_pools", {})

        def connect() -> None:
            adapter = registry.get(alias)
            if adapter is not None and adapter.pooled:
                pool = pools.get(alias)  # Django's own pool registry: a dict lookup instead of its `pool` property
                if pool is None or pool is not adapter._pool:
                    adapter._watch_pool(connection)
            real_connect()

        connection.connect = connect
    else:
        real_ensure = connection.ensure_connection

        def ensure_connection() -> None:
            adapter = registry.get(alias)
            if adapter is None:
                real_ensure()
            else:
                adapter._ensure(connection, real_ensure)

        connection.ensure_connection = ensure_connection
    connection.execute_wrappers.append(_ExecuteHook(registry, alias))


class _ExecuteHook:
    """A Django execute wrapper: sees every query's error, so a connection lost in use reaches the breaker."""

    __slots__ = ("alias", "registry")

    def __init__(self, registry: dict[str, DjangoPool], alias: str) -> None:
        self.registry = registry
        self.alias = alias

    def __call__(self, execute: Callable[..., Any], sql: Any, params: Any, many: bool, context: Any) -> Any:
        try:
            return execute(sql, params, many, context)
        except DatabaseError as exc:
            adapter = self.registry.get(self.alias)
            if adapter is not None:
                adapter._on_query_error(exc, context["connection"])
            raise


def _bound_connects(connection: Any) -> None:
    """Connects (and, on PostgreSQL, reads on a silent server) get bounds where ``OPTIONS`` sets none.

    Django passes ``OPTIONS`` to the driver and sets no timeout itself, so a project that did not
    think of it waits on the OS's TCP timeouts (minutes) when its database goes silent: a connect
    under way cannot be aborted, only bounded. Whatever ``OPTIONS`` sets wins; the psycopg pool is
    built from these same parameters.
    """
    vendor = connection.vendor
    if vendor not in ("postgresql", "mysql"):
        return
    real_params = connection.get_connection_params
    defaults = {"connect_timeout": CONNECT_TIMEOUT, **(LIBPQ_TCP_BOUNDS if vendor == "postgresql" else {})}

    def get_connection_params() -> dict[str, Any]:
        return {**defaults, **real_params()}

    connection.get_connection_params = get_connection_params


def _hook_pool(pool: Any, registry: dict[str, DjangoPool], alias: str) -> None:
    """Gates the psycopg pool's ``getconn`` and sees its ``putconn``, for the alias's adapter of the moment.

    The budget check is written out in the hook rather than in a method of the adapter: it runs on
    every checkout (``tests/profiling`` pins the calls of Django's request path).
    """
    if pool.__dict__.get(_HOOKED):
        return
    real_getconn = pool.getconn
    real_putconn = pool.putconn

    def getconn(timeout: float | None = None) -> Any:
        adapter = registry.get(alias)
        if adapter is None or adapter._events is None:
            return real_getconn(timeout)
        events = adapter._events
        adapter._pool = pool
        unit = events.unit_var.get()
        if unit is None:
            return events.checkout(functools.partial(real_getconn, timeout), None, id)
        start = events.clock()

        def bounded() -> Any:
            # Admission gave a slot: wait for the connection itself only what is left of the budget,
            # never psycopg_pool's own 30 s timeout.
            remaining = events.max_wait - unit.waited - (events.clock() - start)
            limit = max(remaining, _MIN_GETCONN_WAIT)
            if timeout is not None:
                limit = min(limit, timeout)
            try:
                return real_getconn(limit)
            except Exception as exc:
                if type(exc).__name__ != "PoolTimeout":
                    raise
                events.connecting()  # the breaker opened while the pool checked: its 503, not a timeout
                if adapter._pool_busy(pool):
                    raise PoolSaturated(
                        f"pool {alias!r} is saturated: every psycopg pool connection is in use "
                        f"(some outside poolguard's requests); no connection within {limit:.3f}s",
                        retry_after=1.0,
                        pool=alias,
                    ) from None
                raise

        return events.checkout(bounded, None, id)

    def putconn(connection: Any) -> None:
        try:
            real_putconn(connection)
        finally:
            adapter = registry.get(alias)
            if adapter is not None and adapter._events is not None:
                adapter._events.checkin(id(connection))

    pool.getconn = getconn
    pool.putconn = putconn
    check = pool.__dict__.get("_check")
    if check is not None:
        pool._check = _tracked_check(check, registry, alias)
    pool.__dict__[_HOOKED] = True


def _tracked_check(check: Callable[[Any], None], registry: dict[str, DjangoPool], alias: str) -> Callable[[Any], None]:
    """psycopg_pool's check of a connection it hands out (``CONN_HEALTH_CHECKS``), made abortable.

    The check is a ping inside ``getconn``: on a silent database it never returns, and no bound of
    ``getconn`` reaches it. Registered while it runs, its socket can be shut down when the watchdog
    confirms the outage; while the breaker is open a guarded request's check is refused at once
    (psycopg_pool then tries another connection until its deadline, refused the same way).
    """

    def tracked(connection: Any) -> None:
        adapter = registry.get(alias)
        if adapter is None or adapter._events is None:
            check(connection)
            return
        adapter._events.connecting()
        key = id(connection)
        adapter._mid_checkout[key] = connection
        try:
            check(connection)
        finally:
            adapter._mid_checkout.pop(key, None)

    return tracked
