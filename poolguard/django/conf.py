"""Settings and per-process state of the Django integration.

``settings.POOLGUARD`` is read in one place, :func:`configure_settings`, so a test can swap it with
``override_settings`` (the app rebuilds its state on ``setting_changed``) and a bad value fails at
startup with the ConfigError message instead of on the first request. The state built from it (one
Guard per guarded alias, the optional SQLAlchemy Guard) lives on the AppConfig.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, cast

from django.conf import settings  # type: ignore[import-untyped]

from poolguard._serving import DEFAULT, hidden_queue_warning, threads
from poolguard._validate import positive_int
from poolguard.config import (
    ENV_PREFIX,
    PoolGuardConfig,
    environment_options,
    parse_bool,
    parse_number,
    settings_options,
)
from poolguard.errors import ConfigError, Unavailable
from poolguard.guard import HEALTH_MAX_AGE, Guard, build_guard
from poolguard.health import HealthReport
from poolguard.http import HttpResponse, detail_allowed, health_response, queue_time, unavailable_response
from poolguard.pools.django import DjangoPool
from poolguard.work import RequestScope

logger = logging.getLogger("poolguard")

SOURCE = "settings.POOLGUARD"
DJANGO_ONLY_OPTIONS = ("PROCESSES", "THREADS", "ASGI", "CAPACITY")
"""Keys only the Django integration reads. Three describe how the project is served, for the system
checks: ``PROCESSES`` and ``THREADS`` for the connection budget (poolguard.W002) and the visible
queue (poolguard.W008), ``ASGI`` for the persistent-connections warning (poolguard.W001).
``CAPACITY``: how many of a process's threads may use an alias without Django's psycopg pool at
once (per-thread connections); default the server's threads when known. Also ``POOLGUARD_<KEY>``
environment variables."""
SQLALCHEMY_GUARD_NAME = "sqlalchemy"


@dataclass(frozen=True, slots=True)
class DjangoSettings:
    """The validated ``settings.POOLGUARD``: the shared config plus the Django-only keys (None: not set,
    the checks then read the server's own variables; see :mod:`poolguard.django.serving`)."""

    config: PoolGuardConfig
    processes: int | None = None
    threads: int | None = None
    asgi: bool | None = None
    capacity: int | None = None


def configure_settings(
    raw: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None
) -> DjangoSettings:
    """Reads and validates ``settings.POOLGUARD`` (or ``raw``); raises ConfigError naming the bad key.

    ``POOLGUARD_*`` environment variables fill the options the dict leaves out, as in every adapter;
    a variable that the dict also sets, to another value, is a ConfigError naming both (it would
    otherwise be ignored without a word). ``UNAVAILABLE_BODY`` may be a dotted path, as Django's
    settings usually name callables.
    """
    if raw is None:
        raw = getattr(settings, "POOLGUARD", None) or {}
    if not isinstance(raw, Mapping):
        raise ConfigError(SOURCE, type(raw).__name__, "a dict of poolguard options")
    environ = os.environ if environ is None else environ
    shared = {key: value for key, value in raw.items() if str(key).upper() not in DJANGO_ONLY_OPTIONS}
    extra = {str(key).upper(): value for key, value in raw.items() if str(key).upper() in DJANGO_ONLY_OPTIONS}
    shared = _with_environment(shared, environ)
    if isinstance(shared.get("UNAVAILABLE_BODY"), str):
        shared["UNAVAILABLE_BODY"] = _import_callable(f"{SOURCE}['UNAVAILABLE_BODY']", shared["UNAVAILABLE_BODY"])
    django_only = _django_only(extra, environ)
    return DjangoSettings(config=PoolGuardConfig.load(settings=shared, environ=environ, source=SOURCE), **django_only)


def _with_environment(shared: dict[Any, Any], environ: Mapping[str, str]) -> dict[Any, Any]:
    """``shared`` with the environment's breaker options it leaves out; ConfigError for a variable the
    dict overrides with another value."""
    from_env = environment_options(environ)
    ours = settings_options(shared, SOURCE)
    for name in sorted(from_env.keys() & ours.keys()):
        if name != "breaker":
            theirs, mine = from_env[name], ours[name]
            if isinstance(mine, list):
                mine = tuple(mine)
            if theirs != mine:
                _conflict(ENV_PREFIX + name.upper(), environ, name.upper(), mine)
    if "breaker" not in from_env:
        return shared
    theirs, mine = from_env["breaker"], ours.get("breaker", True)
    if not (mine is None or isinstance(mine, bool | Mapping)):
        return shared  # invalid: the loader names it
    if (theirs is False) != (mine is False or mine is None):
        _conflict(ENV_PREFIX + "BREAKER", environ, "BREAKER", mine)
    if theirs is False or mine is False or mine is None:
        return shared
    env_options = {str(key).lower(): value for key, value in (theirs if isinstance(theirs, Mapping) else {}).items()}
    own_options = {str(key).lower(): value for key, value in (mine if isinstance(mine, Mapping) else {}).items()}
    for option in sorted(env_options.keys() & own_options.keys()):
        if env_options[option] != own_options[option]:
            _conflict(
                f"{ENV_PREFIX}BREAKER_{option.upper()}", environ, f"BREAKER']['{option.upper()}", own_options[option]
            )
    if not env_options.keys() - own_options.keys():
        return shared
    merged = {key: value for key, value in shared.items() if not str(key).upper().startswith("BREAKER")}
    merged["BREAKER"] = {**env_options, **own_options}
    return merged


def _conflict(variable: str, environ: Mapping[str, str], key: str, value: object) -> None:
    shown = "<hidden>" if "TOKEN" in variable else environ.get(variable)
    shown_setting = "<hidden>" if "TOKEN" in variable else repr(value)
    raise ConfigError(
        variable,
        shown,
        f"unset, or the value {SOURCE}['{key}'] has ({shown_setting}): the option is set in both places, "
        "and the environment variable would be ignored; set it in one place",
    )


def _django_only(extra: Mapping[str, Any], environ: Mapping[str, str]) -> dict[str, Any]:
    """PROCESSES, THREADS and ASGI from the dict, else from ``POOLGUARD_<KEY>``; both set and different: ConfigError."""
    values: dict[str, Any] = {}
    for key in DJANGO_ONLY_OPTIONS:
        variable = ENV_PREFIX + key
        validate: Callable[[str, object], int] = _flag if key == "ASGI" else positive_int
        from_env: int | None = None
        if variable in environ:
            raw = environ[variable]
            parsed = parse_bool(variable, raw) if key == "ASGI" else parse_number(variable, raw, integer=True)
            from_env = validate(variable, parsed)
        if key in extra:
            mine = validate(f"{SOURCE}['{key}']", extra[key])
            if from_env is not None and from_env != mine:
                _conflict(variable, environ, key, mine)
            values[key.lower()] = mine
        elif from_env is not None:
            values[key.lower()] = from_env
    return values


def _flag(setting: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(setting, value, "True or False")
    return value


def _import_callable(setting: str, path: str) -> Any:
    from django.utils.module_loading import import_string  # type: ignore[import-untyped]  # noqa: PLC0415

    try:
        return import_string(path)
    except ImportError:
        raise ConfigError(
            setting, path, "a callable, or the dotted path of one (myproject.errors.unavailable_body)"
        ) from None


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

    def __init__(self, guard: Guard, request: Any, per_thread: DjangoPool | None = None, queued: float = 0.0) -> None:
        self.gate = guard.gate
        self.session_factory = guard.session_factory
        self.is_async = False
        self._named: str | None = None
        self.queued = queued
        self.waited = queued
        self.held = 0
        self.reserved = None
        self.sheds = True
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


def per_thread_capacity(loaded: DjangoSettings) -> int | None:
    """Connections a process may use at once on an alias with per-thread connections: ``CAPACITY``, else
    the server's threads when they are known (each thread holds one), else None (unbounded)."""
    if loaded.capacity is not None:
        return loaded.capacity
    count, source = threads(loaded.threads)
    return None if source == DEFAULT else count


class PoolGuardState:
    """Everything poolguard keeps per process for Django: built by the AppConfig, closed on rebuild.

    One Guard per guarded alias, over a :class:`DjangoPool` (the same core as for SQLAlchemy:
    breaker, admission, leaks, telemetry, bounded ping), plus the optional SQLAlchemy Guard.
    """

    def __init__(self, loaded: DjangoSettings, *, handler: Any = None) -> None:
        self.settings = loaded
        self.config = config = loaded.config
        self.health_path: str | None = config.http.health_path
        self.trust_request_start = config.http.trust_request_start
        self.guards: dict[str, Guard] = {}
        self.guard: Guard | None = None
        try:
            capacity = per_thread_capacity(loaded)
            for alias in config.databases:
                pool = DjangoPool(alias, handler=handler, capacity=capacity)
                self.guards[alias] = build_guard(config, pool, name=alias)
                hidden = hidden_queue_warning(pool.capacity, loaded.threads)
                if hidden is not None:
                    logger.warning("poolguard: database %r: %s (poolguard.W008)", alias, hidden)
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
        asks whether a transaction is open. With ``TRUST_REQUEST_START`` every scope starts with the
        time the request queued before it got here (``X-Request-Start``) spent of its wait budget.
        """
        queued = self._queued(request) if self.trust_request_start else 0.0
        scopes = []
        for guard, per_thread in self._aliases:
            scopes.append(DjangoRequestScope(guard, request, per_thread, queued).open())
        if self.guard is not None:
            scopes.append(DjangoRequestScope(self.guard, request, None, queued).open())
        return scopes

    def _queued(self, request: Any) -> float:
        """The request's queue time from ``X-Request-Start`` (0 when unknown), recorded once per request:
        on the first guarded alias's pool, not once per alias."""
        queued = queue_time(request.META.get("HTTP_X_REQUEST_START"), time.time())
        if queued is None:
            return 0.0
        first = self._aliases[0][0] if self._aliases else self.guard
        if first is not None:
            first.gate.request_queued(queued)
        return queued

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
        return None if unavailable is None else unavailable_response(unavailable, self.config.http.unavailable_body)

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
