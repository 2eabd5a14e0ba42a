"""System checks (``manage.py check``), tag ``poolguard``.

- ``poolguard.E001``: ``settings.POOLGUARD`` or a ``POOLGUARD_*`` environment variable is invalid
  (the message is the ConfigError's; the hint names the variable when one is at fault).
- ``poolguard.E002``: ``POOLGUARD["DATABASES"]`` names an alias that ``settings.DATABASES`` lacks.
- ``poolguard.E003``: the middleware is in ``MIDDLEWARE`` but ``"poolguard.django"`` is not in
  ``INSTALLED_APPS``: the middleware refuses to start. Django runs the checks of installed apps
  only, so this one is registered when :mod:`poolguard.django` is imported (the admin's checks
  import every middleware, the test client and the servers load them); the middleware's own
  ImproperlyConfigured carries the same id.
- ``poolguard.W001``: a guarded alias keeps persistent connections (``CONN_MAX_AGE`` > 0 or None) in a
  project served over ASGI (how that is told: :mod:`poolguard.django.serving`). Under ASGI every
  request's sync code may run in a different thread, and Django's connections are per thread, so
  persistent connections pile up instead of being reused; use ``CONN_MAX_AGE = 0`` or Django's psycopg pool.
- ``poolguard.W002``: the most connections the project may open on a guarded alias (the psycopg pool's
  ``max_size``, else the threads per process, plus the SQLAlchemy pool's size and overflow when
  ``POOLGUARD["SQLALCHEMY"]`` points at the same host, times the processes) exceeds what the server
  allows (``max_connections`` minus reserved slots). Processes and threads: ``POOLGUARD["PROCESSES"]``
  / ``["THREADS"]``, else the server's own variables. It reads the server live (``poolguard budget
  --url``'s read, within ``LIMITS_TIMEOUT``), so it runs only with ``check --database ALIAS``.
- ``poolguard.W003``: ``POOLGUARD`` is set but the middleware is not in ``MIDDLEWARE``: nothing is
  guarded and the health URL answers 404.
- ``poolguard.W004``: the middleware is not first in ``MIDDLEWARE``: what runs before it is unguarded.
- ``poolguard.W008``: the server runs no more threads per process than a guarded alias has
  connections (its psycopg pool's ``max_size``; for per-thread connections ``POOLGUARD["CAPACITY"]``,
  else one per thread), so requests beyond it queue in the server, where poolguard cannot refuse
  them. Only when the threads are known (``POOLGUARD["THREADS"]``, gunicorn's ``--threads``).
- ``--deploy`` only: ``poolguard.W005`` health detail for everyone (``HEALTH_DETAIL = "always"``),
  ``poolguard.W006`` a health token shorter than 32 characters, ``poolguard.W007`` the breaker off.
  (``"when-authorized"`` with no token at all is E001, in every environment.)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar, cast

from django.conf import settings  # type: ignore[import-untyped]
from django.core.checks import CheckMessage, Error, Tags, register  # type: ignore[import-untyped]
from django.core.checks import Warning as CheckWarning
from django.db import connections  # type: ignore[import-untyped]

from poolguard._serving import DEFAULT, queue_hidden, threads_advice
from poolguard.config import ENV_PREFIX
from poolguard.django import serving
from poolguard.django.conf import DjangoSettings, configure_settings, per_thread_capacity
from poolguard.errors import ConfigError, PoolGuardError
from poolguard.pools.django_settings import pool_settings

TAG = "poolguard"

_Check = TypeVar("_Check", bound=Callable[..., list[Any]])


def _register(*tags: str, deploy: bool = False) -> Callable[[_Check], _Check]:
    """Django's ``register``, typed (django ships no type hints)."""
    return cast(Callable[[_Check], _Check], register(*tags, deploy=deploy))


MIDDLEWARE_PATH = "poolguard.django.PoolGuardMiddleware"
APP_PATHS = ("poolguard.django", "poolguard.django.apps.PoolGuardAppConfig")
MIN_TOKEN_LENGTH = 32

E001_HINT = "Fix settings.POOLGUARD; the options are documented in docs/configuration.md."
E001_ENV_HINT = "Fix or unset the environment variable {variable}; the options are documented in docs/configuration.md."
E002_HINT = "List aliases of settings.DATABASES in POOLGUARD['DATABASES'] (default: ['default'])."
W001 = CheckWarning(
    "poolguard: persistent database connections (CONN_MAX_AGE > 0) under ASGI.",
    hint=(
        "Under ASGI Django's per-thread connections are not reused across requests and pile up. "
        "Set CONN_MAX_AGE = 0, or use Django's psycopg pool (OPTIONS = {'pool': {...}})."
    ),
    id="poolguard.W001",
)
LIMITS_TIMEOUT = 5.0
"""Seconds W002 may take to read a server's limits, connect included."""

W002_HINT = (
    "Lower the pool's max_size or the server's processes or threads, raise max_connections, or put PgBouncer "
    "in front. PROCESSES and THREADS in POOLGUARD override what poolguard reads from the server's variables. "
    "For every replica and service on this server: `poolguard budget` (docs/fleet.md)."
)
E003 = Error(
    "poolguard: poolguard.django.PoolGuardMiddleware is in MIDDLEWARE but 'poolguard.django' is not in "
    "INSTALLED_APPS: the middleware refuses to start (ImproperlyConfigured).",
    hint="Add 'poolguard.django' to INSTALLED_APPS.",
    id="poolguard.E003",
)
W003 = CheckWarning(
    "poolguard: settings.POOLGUARD is set but poolguard.django.PoolGuardMiddleware is not in MIDDLEWARE: "
    "no request is guarded and the health URL answers 404.",
    hint="Put 'poolguard.django.PoolGuardMiddleware' first in MIDDLEWARE.",
    id="poolguard.W003",
)
W004_HINT = (
    "Put 'poolguard.django.PoolGuardMiddleware' first in MIDDLEWARE: a middleware before it that queries the "
    "database (sessions, authentication, your own) is not guarded, and its outage errors are 500s, not 503s."
)
W005 = CheckWarning(
    "poolguard: POOLGUARD['HEALTH_DETAIL'] is 'always': anyone may read the pools' detail on the health URL.",
    hint="Use 'when-authorized' with a HEALTH_TOKEN (or a callable), or 'never'.",
    id="poolguard.W005",
)
W006 = CheckWarning(
    f"poolguard: POOLGUARD['HEALTH_TOKEN'] is shorter than {MIN_TOKEN_LENGTH} characters.",
    hint="Use a long random token, e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))'.",
    id="poolguard.W006",
)
W007 = CheckWarning(
    "poolguard: the breaker is off (POOLGUARD['BREAKER'] = False): while the database is down every request "
    "waits for its own connection to fail instead of getting a 503 at once.",
    hint="Remove BREAKER = False, or tune it: BREAKER = {'FAILURE_RATE': 0.5, 'OPEN_FOR': 30.0}.",
    id="poolguard.W007",
)


def _loaded() -> DjangoSettings | None:
    try:
        return configure_settings()
    except ConfigError:
        return None


@_register(TAG)
def check_settings(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    """poolguard.E001 / poolguard.E002."""
    try:
        loaded = configure_settings()
    except ConfigError as exc:
        variable = exc.setting if exc.setting.startswith(ENV_PREFIX) else None
        hint = E001_ENV_HINT.format(variable=variable) if variable else E001_HINT
        return [Error(f"poolguard: {exc}", hint=hint, id="poolguard.E001")]
    return [
        Error(
            f"poolguard: POOLGUARD['DATABASES'] names {alias!r}, which is not in settings.DATABASES.",
            hint=E002_HINT,
            id="poolguard.E002",
        )
        for alias in loaded.config.databases
        if alias not in settings.DATABASES
    ]


@_register(TAG)
def check_asgi_persistent_connections(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    """poolguard.W001."""
    loaded = _loaded()
    if loaded is None or serving.asgi_signal(loaded.asgi, settings) is None:
        return []
    for alias in loaded.config.databases:
        database = settings.DATABASES.get(alias)
        if database is None:
            continue
        max_age = database.get("CONN_MAX_AGE", 0)
        if max_age is None or max_age > 0:
            return [W001]
    return []


@_register(TAG, Tags.database)
def check_connection_budget(app_configs: Any = None, databases: Any = None, **kwargs: Any) -> list[CheckMessage]:
    """poolguard.W002; only with ``check --database`` since it asks the server."""
    loaded = _loaded()
    if not databases or loaded is None:
        return []
    messages: list[CheckMessage] = []
    for alias in loaded.config.databases:
        if alias not in databases or alias not in settings.DATABASES:
            continue
        wanted = connection_budget(loaded, alias)
        allowed = _server_allows(alias)
        if allowed is not None and wanted > allowed:
            count, source = serving.processes(loaded.processes)
            messages.append(
                CheckWarning(
                    f"poolguard: database {alias!r} may get {wanted} connections from this project "
                    f"({count} processes, from {source}) "
                    f"but the server allows {allowed} (max_connections minus reserved slots).",
                    hint=W002_HINT,
                    id="poolguard.W002",
                )
            )
    return messages


@_register(TAG)
def check_threads_exceed_capacity(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    """poolguard.W008: the queue must form where poolguard can shed it, so threads must outnumber connections."""
    loaded = _loaded()
    if loaded is None:
        return []
    count, source = serving.threads(loaded.threads)
    if source == DEFAULT:
        return []
    messages: list[CheckMessage] = []
    for alias in loaded.config.databases:
        if alias not in settings.DATABASES:
            continue
        pool = pool_settings(connections.settings[alias])
        capacity = pool[0] if pool is not None else per_thread_capacity(loaded)
        if capacity is None or not queue_hidden(count, capacity):
            continue
        hint = f"Run more threads (gunicorn --threads {2 * capacity}, or POOLGUARD['THREADS'] if set)" + (
            " or a smaller psycopg pool." if pool is not None else f", or set POOLGUARD['CAPACITY'] below {count}."
        )
        message = f"poolguard: database {alias!r}: {threads_advice(count, source, capacity)}."
        messages.append(CheckWarning(message, hint=hint, id="poolguard.W008"))
    return messages


def connection_budget(loaded: DjangoSettings, alias: str) -> int:
    """The most connections the project opens on ``alias`` across every process (``poolguard budget``'s
    arithmetic: one pod, its processes, each with Django's connections plus the SQLAlchemy pool's)."""
    from poolguard.diagnose.budget import Service  # noqa: PLC0415 (SQLAlchemy only when a check needs it)

    pool = pool_settings(connections.settings[alias])
    per_process = pool[0] if pool is not None else serving.threads(loaded.threads)[0]
    sqlalchemy = loaded.config.sqlalchemy
    other = 0
    if sqlalchemy is not None and _same_server(str(sqlalchemy["url"]), connections.settings[alias]):
        other = _sqlalchemy_connections(sqlalchemy)
    processes = serving.processes(loaded.processes)[0]
    return Service(name=alias, replicas=1, processes=processes, pool_size=per_process, other=other).connections


def _sqlalchemy_connections(options: Any) -> int:
    """pool_size + max_overflow as ``poolguard.create_engine`` sizes them (an explicit 0 overflow is 0)."""
    from poolguard.diagnose.budget import engine_pool  # noqa: PLC0415 (SQLAlchemy only when set)

    size, overflow = engine_pool(
        int(options["workers"]) if options.get("workers") else None,
        pgbouncer=bool(options.get("pgbouncer")),
        pool_size=None if options.get("pool_size") is None else int(options["pool_size"]),
        max_overflow=None if options.get("max_overflow") is None else int(options["max_overflow"]),
    )
    return size + overflow


def _same_server(url: str, database: dict[str, Any]) -> bool:
    """Whether the SQLAlchemy URL points at the alias's server (host and port; SQLAlchemy's defaults if unset)."""
    from sqlalchemy.engine import make_url  # noqa: PLC0415 (only with POOLGUARD["SQLALCHEMY"] set)

    parsed = make_url(url)
    host = database.get("HOST") or "localhost"
    port = str(database.get("PORT") or "")
    same_port = not parsed.port or not port or str(parsed.port) == port
    return (parsed.host or "localhost") == host and same_port


def _server_allows(alias: str) -> int | None:
    """max_connections minus reserved slots, read live on ``poolguard budget --url``'s bounded connection
    (a silent server costs ``LIMITS_TIMEOUT``, not a hang); None when unknown (the check then says nothing)."""
    from poolguard.diagnose.budget_input import read_limits  # noqa: PLC0415 (SQLAlchemy only when a check needs it)
    from poolguard.diagnose.target import target_from_django  # noqa: PLC0415

    target = target_from_django(connections[alias].settings_dict)
    if target is None:
        return None
    try:
        return read_limits(target, timeout=LIMITS_TIMEOUT).usable
    except PoolGuardError:  # unreachable, PgBouncer's admin console, or refused settings
        return None


def _middleware() -> list[str]:
    return [str(path) for path in getattr(settings, "MIDDLEWARE", None) or ()]


@_register(TAG)
def check_app_installed(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    """poolguard.E003; registered by ``poolguard.django`` itself, since Django runs installed apps' checks only."""
    from django.apps import apps  # type: ignore[import-untyped]  # noqa: PLC0415

    if MIDDLEWARE_PATH not in _middleware():
        return []
    if apps.ready and apps.is_installed("poolguard.django"):
        return []
    if any(app in APP_PATHS for app in getattr(settings, "INSTALLED_APPS", ())):
        return []
    return [E003]


@_register(TAG)
def check_middleware(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    """poolguard.W003 / poolguard.W004."""
    middleware = _middleware()
    if MIDDLEWARE_PATH not in middleware:
        return [W003] if getattr(settings, "POOLGUARD", None) is not None else []
    before = middleware[: middleware.index(MIDDLEWARE_PATH)]
    if not before:
        return []
    return [
        CheckWarning(
            f"poolguard: poolguard.django.PoolGuardMiddleware is not first in MIDDLEWARE ({', '.join(before)} "
            "run before it).",
            hint=W004_HINT,
            id="poolguard.W004",
        )
    ]


@_register(TAG, Tags.security, deploy=True)
def check_deploy(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    """poolguard.W005 / W006 / W007 (``check --deploy``)."""
    loaded = _loaded()
    if loaded is None:
        return []
    http = loaded.config.http
    messages: list[CheckMessage] = []
    if http.health_path is not None and http.health_detail == "always":
        messages.append(W005)
    token = http.health_token
    if http.health_detail == "when-authorized" and isinstance(token, str) and len(token) < MIN_TOKEN_LENGTH:
        messages.append(W006)
    if loaded.config.guard.breaker is None:
        messages.append(W007)
    return messages
