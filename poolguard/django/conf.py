"""Settings and per-process state of the Django integration.

``settings.POOLGUARD`` is read in one place, :func:`configure_settings`, so a test can swap it with
``override_settings`` (the app rebuilds its state on ``setting_changed``) and a bad value fails at
startup with the ConfigError message instead of on the first request. The state built from it (one
Guard per guarded alias, the optional SQLAlchemy Guard) lives on the AppConfig.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast

from django.conf import settings  # type: ignore[import-untyped]

from poolguard._validate import positive_int
from poolguard.config import PoolGuardConfig
from poolguard.errors import ConfigError, Unavailable
from poolguard.guard import HEALTH_MAX_AGE, Guard, build_guard
from poolguard.health import HealthReport
from poolguard.http import HttpResponse, detail_allowed, health_response, unavailable_response
from poolguard.pools.django import DjangoPool
from poolguard.work import RequestScope

logger = logging.getLogger("poolguard")

SOURCE = "settings.POOLGUARD"
DJANGO_ONLY_OPTIONS = ("PROCESSES", "THREADS")
"""Keys only the Django integration reads: the connection budget check (poolguard.W002) uses them."""
SQLALCHEMY_GUARD_NAME = "sqlalchemy"


@dataclass(frozen=True, slots=True)
class DjangoSettings:
    """The validated ``settings.POOLGUARD``: the shared config plus the Django-only keys."""

    config: PoolGuardConfig
    processes: int = 1
    threads: int = 1


def configure_settings(raw: Mapping[str, Any] | None = None) -> DjangoSettings:
    """Reads and validates ``settings.POOLGUARD`` (or ``raw``); raises ConfigError naming the bad key.

    ``POOLGUARD_*`` environment variables fill the options the dict leaves out, as in every adapter.
    ``PROCESSES`` and ``THREADS`` (default 1 each) describe how the project is served, for the
    connection budget check.
    """
    if raw is None:
        raw = getattr(settings, "POOLGUARD", None) or {}
    if not isinstance(raw, Mapping):
        raise ConfigError(SOURCE, type(raw).__name__, "a dict of poolguard options")
    shared = {key: value for key, value in raw.items() if str(key).upper() not in DJANGO_ONLY_OPTIONS}
    extra = {str(key).upper(): value for key, value in raw.items() if str(key).upper() in DJANGO_ONLY_OPTIONS}
    return DjangoSettings(
        config=PoolGuardConfig.load(settings=shared, source=SOURCE),
        processes=positive_int(f"{SOURCE}['PROCESSES']", extra.get("PROCESSES", 1)),
        threads=positive_int(f"{SOURCE}['THREADS']", extra.get("THREADS", 1)),
    )


def route_of(request: Any) -> str | None:
    """The URL pattern a Django request matched (``/items/<int:pk>/``), or None before resolution."""
    match = getattr(request, "resolver_match", None)
    if match is None or not match.route:
        return None
    return "/" + str(match.route).lstrip("^")


class DjangoRequestScope(RequestScope):
    """A request scope named after the URL pattern of its Django request, when something first asks.

    The middleware runs before URL resolution, and a ``process_view`` hook only to learn the route
    would cost every request, including those that never touch the database; the route is needed
    only when a use time is recorded per route or a leak is reported, so it is read then.

    Django opens one per guarded alias on every request, so the constructor sets the fields itself
    rather than through ``super().__init__`` and the route setter (``tests/profiling`` pins the calls).
    """

    __slots__ = ("_named", "per_thread", "request")

    def __init__(self, guard: Guard, request: Any, per_thread: DjangoPool | None = None) -> None:
        self.gate = guard.gate
        self.session_factory = guard.session_factory
        self.is_async = False
        self._named: str | None = None
        self.waited = 0.0
        self.held = 0
        self._session = None
        self._failure = None
        self._unit_token = self._work_token = None
        self.request = request
        self.per_thread = per_thread
        """The alias's pool when its connections are Django's per-thread ones: the connection this
        unit checked out counts as returned when the request ends (``DjangoPool.end_unit``)."""

    @property
    def route(self) -> str | None:
        if self._named is None and self.request is not None:
            self._named = route_of(self.request)
        return self._named

    @route.setter
    def route(self, value: str | None) -> None:
        self._named = value


class PoolGuardState:
    """Everything poolguard keeps per process for Django: built by the AppConfig, closed on rebuild.

    One Guard per guarded alias, over a :class:`DjangoPool` (the same core as for SQLAlchemy:
    breaker, admission, leaks, telemetry, bounded ping), plus the optional SQLAlchemy Guard.
    """

    def __init__(self, loaded: DjangoSettings, *, handler: Any = None) -> None:
        self.settings = loaded
        self.config = config = loaded.config
        self.health_path: str | None = config.http.health_path
        self.guards: dict[str, Guard] = {}
        self.guard: Guard | None = None
        try:
            for alias in config.databases:
                self.guards[alias] = build_guard(config, DjangoPool(alias, handler=handler), name=alias)
            if config.sqlalchemy is not None:
                self.guard = build_guard(config, name=SQLALCHEMY_GUARD_NAME)
        except BaseException:
            self.close()
            raise
        self._aliases = tuple((self.guards[alias], None if pool.pooled else pool) for alias, pool in self.pools.items())
        """Each guarded alias and, for per-thread connections, its pool: built once, read on every request."""

    @property
    def pools(self) -> dict[str, DjangoPool]:
        return {alias: cast(DjangoPool, guard.pool) for alias, guard in self.guards.items()}

    def close(self) -> None:
        """Removes every hook and listener, stops ping threads and disposes the SQLAlchemy engine."""
        for guard in self.guards.values():
            guard.close()
        self.guards.clear()
        self._aliases = ()
        if self.guard is not None:
            from sqlalchemy import Engine  # noqa: PLC0415 (only imported when POOLGUARD["SQLALCHEMY"] is set)

            self.guard.close()
            engine = self.guard.engine
            if isinstance(engine, Engine):
                engine.dispose()
            self.guard = None

    # -- requests ------------------------------------------------------------------------------------

    def open_request(self, request: Any) -> list[DjangoRequestScope]:
        """One request's units of work: one per guarded alias, then the SQLAlchemy one when configured.

        Opening them touches no database. The SQLAlchemy scope opens last, so it is the one ``retry``
        asks whether a transaction is open.
        """
        scopes = []
        for guard, per_thread in self._aliases:
            scopes.append(DjangoRequestScope(guard, request, per_thread).open())
        if self.guard is not None:
            scopes.append(DjangoRequestScope(self.guard, request).open())
        return scopes

    @staticmethod
    def close_request(scopes: list[DjangoRequestScope]) -> None:
        """Ends the request's units: the SQLAlchemy one closes (last commit or rollback, session closed);
        each alias's connection counts as returned, and Django closes or keeps it when it ends the request."""
        session_scope = sqlalchemy_scope(scopes)
        try:
            if session_scope is not None:
                session_scope.close()
        finally:
            for scope in reversed(scopes):
                if scope is not session_scope:
                    if scope.held and scope.per_thread is not None:
                        scope.per_thread.end_unit(scope)
                    scope.leave()

    def as_unavailable(self, exc: BaseException) -> Unavailable | None:
        """The Unavailable a view's exception stands for: itself, or a connection failure a breaker counted."""
        for guard in (*self.guards.values(), *([self.guard] if self.guard is not None else [])):
            unavailable = guard.unavailable_for(exc)
            if unavailable is not None:
                return unavailable
        return None

    def unavailable_http(self, exc: BaseException) -> HttpResponse | None:
        unavailable = self.as_unavailable(exc)
        return None if unavailable is None else unavailable_response(unavailable)

    # -- health --------------------------------------------------------------------------------------

    def health_http(self, request: Any) -> HttpResponse:
        http = self.config.http
        detail = detail_allowed(http.health_detail, http.health_token, request, request.headers.get("Authorization"))
        return health_response(self.health(), detail=detail)

    def health(self, *, ping: bool = True, max_age: float = HEALTH_MAX_AGE) -> HealthReport:
        """Every guarded alias and the SQLAlchemy pool, probed side by side, within PING_TIMEOUT."""
        guards = [*self.guards.values(), *([self.guard] if self.guard is not None else [])]
        if ping:
            for guard in guards:
                guard.prober.prepare(max_age=max_age)
        return HealthReport.of([pool for guard in guards for pool in guard.health(ping=ping, max_age=max_age).pools])


def sqlalchemy_scope(scopes: list[DjangoRequestScope]) -> DjangoRequestScope | None:
    """The request's SQLAlchemy scope (opened last), or None without ``POOLGUARD["SQLALCHEMY"]``."""
    return scopes[-1] if scopes and scopes[-1].session_factory is not None else None
