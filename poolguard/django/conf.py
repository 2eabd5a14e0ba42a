"""Settings and per-process state of the Django integration.

``settings.POOLGUARD`` is read in one place, :func:`configure_settings`, so a test can swap it with
``override_settings`` (the app rebuilds its state on ``setting_changed``) and a bad value fails at
startup with the ConfigError message instead of on the first request. The state built from it (one
monitor and breaker per guarded alias, the optional SQLAlchemy Guard) lives on the AppConfig.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from contextvars import Token
from dataclasses import dataclass
from typing import Any, cast

from django.conf import settings  # type: ignore[import-untyped]

from poolguard._validate import positive_int
from poolguard.config import PoolGuardConfig
from poolguard.errors import ConfigError, Unavailable
from poolguard.guard import Guard, RequestScope
from poolguard.health import HealthReport
from poolguard.http import HttpResponse, detail_allowed, health_response, unavailable_response
from poolguard.monitor import GuardedScope, PoolMonitor
from poolguard.pools.django import AliasScope, DjangoPool, route_of

logger = logging.getLogger("poolguard")

SOURCE = "settings.POOLGUARD"
DJANGO_ONLY_OPTIONS = ("PROCESSES", "THREADS")
"""Keys only the Django integration reads: the connection budget check (poolguard.W002) uses them."""
SQLALCHEMY_OPTIONS = ("URL", "POOL_SIZE", "MAX_OVERFLOW")
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
    config = PoolGuardConfig.load(settings=shared, source=SOURCE)
    if config.sqlalchemy is not None:
        _check_sqlalchemy(config.sqlalchemy)
    return DjangoSettings(
        config=config,
        processes=positive_int(f"{SOURCE}['PROCESSES']", extra.get("PROCESSES", 1)),
        threads=positive_int(f"{SOURCE}['THREADS']", extra.get("THREADS", 1)),
    )


def _check_sqlalchemy(options: Mapping[str, Any]) -> None:
    setting = f"{SOURCE}['SQLALCHEMY']"
    if not isinstance(options, Mapping):
        raise ConfigError(setting, options, "a dict with 'URL' and optionally 'POOL_SIZE', 'MAX_OVERFLOW'")
    unknown = sorted(str(key).upper() for key in options if str(key).upper() not in SQLALCHEMY_OPTIONS)
    if unknown:
        raise ConfigError(f"{setting}['{unknown[0]}']", "(unknown option)", "one of " + ", ".join(SQLALCHEMY_OPTIONS))
    url = options.get("url")
    if not isinstance(url, str) or "://" not in url:
        raise ConfigError(
            f"{setting}['URL']", "<hidden>" if url else url, "a SQLAlchemy URL such as postgresql+psycopg://..."
        )
    for key in ("pool_size", "max_overflow"):
        if options.get(key) is not None:
            positive_int(f"{setting}['{key.upper()}']", options[key])


class PoolGuardState:
    """Everything poolguard keeps per process for Django: built by the AppConfig, closed on rebuild.

    One Guard per guarded alias, over a :class:`DjangoPool` (the same core as for SQLAlchemy:
    breaker, admission, leaks, telemetry, bounded ping), plus the optional SQLAlchemy Guard.
    """

    def __init__(self, loaded: DjangoSettings, *, handler: Any = None) -> None:
        self.settings = loaded
        self.config = config = loaded.config
        self.health_path: str | None = config.health_path
        self.guards: dict[str, Guard] = {}
        self.guard: Guard | None = None
        self.alias_monitors: tuple[PoolMonitor, ...] = ()
        """The monitors each request opens a scope on, built once (the per-request path reads them)."""
        try:
            for alias in config.databases:
                self.guards[alias] = Guard(DjangoPool(alias, handler=handler), name=alias, **config.guard_options())
            self.alias_monitors = tuple(guard.monitor for guard in self.guards.values())
            if config.sqlalchemy is not None:
                self.guard = _make_guard(config)
        except BaseException:
            self.close()
            raise

    @property
    def pools(self) -> dict[str, DjangoPool]:
        return {alias: cast(DjangoPool, guard.pool) for alias, guard in self.guards.items()}

    @property
    def monitors(self) -> dict[str, PoolMonitor]:
        return {alias: guard.monitor for alias, guard in self.guards.items()}

    def close(self) -> None:
        """Removes every hook and listener, stops ping threads and disposes the SQLAlchemy engine."""
        for guard in self.guards.values():
            guard.close()
        self.guards.clear()
        self.alias_monitors = ()
        if self.guard is not None:
            from sqlalchemy import Engine  # noqa: PLC0415 (only imported when POOLGUARD["SQLALCHEMY"] is set)

            self.guard.close()
            engine = self.guard.engine
            if isinstance(engine, Engine):
                engine.dispose()
            self.guard = None

    # -- requests ------------------------------------------------------------------------------------

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
        config = self.config
        detail = detail_allowed(
            config.health_detail, config.health_token, request, request.headers.get("Authorization")
        )
        return health_response(self.health(), detail=detail)

    def health(self, *, ping: bool = True) -> HealthReport:
        """Every guarded alias and the SQLAlchemy pool, each pinged within PING_TIMEOUT."""
        guards = [*self.guards.values(), *([self.guard] if self.guard is not None else [])]
        return HealthReport.of([pool for guard in guards for pool in guard.health(ping=ping).pools])


def _make_guard(config: PoolGuardConfig) -> Guard:
    """The Guard of ``POOLGUARD["SQLALCHEMY"]``: SQLAlchemy is loaded here, only for apps that ask for it."""
    from poolguard.engine import create_engine  # noqa: PLC0415

    options = config.sqlalchemy or {}
    kwargs: dict[str, Any] = {}
    if options.get("pool_size") is not None:
        kwargs["pool_size"] = options["pool_size"]
    if options.get("max_overflow") is not None:
        kwargs["max_overflow"] = options["max_overflow"]
    engine = create_engine(options["url"], **kwargs)
    try:
        return Guard(engine, name=SQLALCHEMY_GUARD_NAME, **config.guard_options())
    except BaseException:
        engine.dispose()
        raise


class RequestWork:
    """One request's scopes: one per guarded alias, and the SQLAlchemy request scope when configured.

    Opening them touches no database. They learn the request's route (its URL pattern) from
    ``request`` when they first check a connection out, after Django has resolved the URL.
    """

    __slots__ = ("_tokens", "request", "sqlalchemy", "state")

    def __init__(self, state: PoolGuardState, request: Any) -> None:
        self.state = state
        self.request = request
        self._tokens: list[tuple[PoolMonitor, AliasScope, Token[GuardedScope | None]]] = []
        for monitor in state.alias_monitors:
            scope = AliasScope(request)
            self._tokens.append((monitor, scope, monitor.scope_var.set(scope)))
        self.sqlalchemy: RequestScope | None = state.guard.request_scope(None).open() if state.guard else None

    def session(self) -> Any:
        """The SQLAlchemy session, its scope named after the route (resolved by now: a view is asking)."""
        scope = self.sqlalchemy
        assert scope is not None
        self._name_route(scope)
        return scope.session

    def _name_route(self, scope: RequestScope) -> None:
        if scope.route is None and self.request is not None:
            scope.route = route_of(self.request)

    def fail(self, error: BaseException) -> None:
        """The view raised: the SQLAlchemy session rolls back (Django's ORM keeps its own rules)."""
        if self.sqlalchemy is not None:
            self.sqlalchemy.fail(error)

    def finish_session(self) -> None:
        """Commits the SQLAlchemy session (rollback when the view raised); blocking, so a thread under ASGI."""
        if self.sqlalchemy is not None:
            self.sqlalchemy.finish()

    def close(self) -> None:
        """Ends the request: the SQLAlchemy scope, then each alias's checkout; leaves the contexts."""
        try:
            request_scope = self.sqlalchemy
            if request_scope is not None:
                self._name_route(request_scope)  # for what close reports: use times, leftovers
                request_scope.close()
        finally:
            for monitor, scope, token in reversed(self._tokens):
                if scope.checked_out:
                    scope.checked_out = False
                    monitor.on_checkin(id(scope))
                try:
                    monitor.scope_var.reset(token)
                except ValueError:
                    monitor.scope_var.set(None)
            self._tokens.clear()
