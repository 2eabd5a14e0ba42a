"""System checks (``manage.py check``), tag ``poolguard``.

- ``poolguard.E001``: ``settings.POOLGUARD`` is invalid (the message is the ConfigError's).
- ``poolguard.E002``: ``POOLGUARD["DATABASES"]`` names an alias that ``settings.DATABASES`` lacks.
- ``poolguard.W001``: a guarded alias keeps persistent connections (``CONN_MAX_AGE`` > 0 or None) in a
  project served over ASGI. The rule: the project declares ASGI by setting ``ASGI_APPLICATION``
  (Django cannot tell at check time which server will run it). Under ASGI every request's sync code
  may run in a different thread, and Django's connections are per thread, so persistent connections
  pile up instead of being reused; use ``CONN_MAX_AGE = 0`` or Django's psycopg pool.
- ``poolguard.W002``: the most connections the project may open on a guarded alias (the psycopg pool's
  ``max_size``, else ``POOLGUARD["THREADS"]``, plus the SQLAlchemy pool's size and overflow when
  ``POOLGUARD["SQLALCHEMY"]`` points at the same host, times ``POOLGUARD["PROCESSES"]``) exceeds
  what the server allows (``max_connections`` minus reserved slots). It reads the server live, so it runs only with
  ``check --database ALIAS``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar, cast

from django.conf import settings  # type: ignore[import-untyped]
from django.core.checks import CheckMessage, Error, Tags, register  # type: ignore[import-untyped]
from django.core.checks import Warning as CheckWarning
from django.db import connections  # type: ignore[import-untyped]

from poolguard.django.conf import DjangoSettings, configure_settings
from poolguard.errors import ConfigError
from poolguard.pools.django import _pool_settings

TAG = "poolguard"

_Check = TypeVar("_Check", bound=Callable[..., list[Any]])


def _register(*tags: str) -> Callable[[_Check], _Check]:
    """Django's ``register``, typed (django ships no type hints)."""
    return cast(Callable[[_Check], _Check], register(*tags))


E001_HINT = "Fix settings.POOLGUARD; the options are documented in docs/configuration.md."
E002_HINT = "List aliases of settings.DATABASES in POOLGUARD['DATABASES'] (default: ['default'])."
W001 = CheckWarning(
    "poolguard: persistent database connections (CONN_MAX_AGE > 0) under ASGI.",
    hint=(
        "Under ASGI Django's per-thread connections are not reused across requests and pile up. "
        "Set CONN_MAX_AGE = 0, or use Django's psycopg pool (OPTIONS = {'pool': {...}})."
    ),
    id="poolguard.W001",
)
W002_HINT = "Lower the pool's max_size, THREADS or PROCESSES, raise max_connections, or put PgBouncer in front."


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
        return [Error(f"poolguard: {exc}", hint=E001_HINT, id="poolguard.E001")]
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
    if loaded is None or not getattr(settings, "ASGI_APPLICATION", None):
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
            messages.append(
                CheckWarning(
                    f"poolguard: database {alias!r} may get {wanted} connections from this project "
                    f"but the server allows {allowed} (max_connections minus reserved slots).",
                    hint=W002_HINT,
                    id="poolguard.W002",
                )
            )
    return messages


def connection_budget(loaded: DjangoSettings, alias: str) -> int:
    """The most connections the project opens on ``alias`` across every process."""
    pool = _pool_settings(connections.settings[alias])
    per_process = pool[0] if pool is not None else loaded.threads
    sqlalchemy = loaded.config.sqlalchemy
    if sqlalchemy is not None and _same_server(str(sqlalchemy["url"]), connections.settings[alias]):
        per_process += int(sqlalchemy.get("pool_size") or 5) + int(sqlalchemy.get("max_overflow") or 10)
    return per_process * loaded.processes


def _same_server(url: str, database: dict[str, Any]) -> bool:
    """Whether the SQLAlchemy URL points at the alias's server (host and port; SQLAlchemy's defaults if unset)."""
    from sqlalchemy.engine import make_url  # noqa: PLC0415 (only with POOLGUARD["SQLALCHEMY"] set)

    parsed = make_url(url)
    host = database.get("HOST") or "localhost"
    port = str(database.get("PORT") or "")
    same_port = not parsed.port or not port or str(parsed.port) == port
    return (parsed.host or "localhost") == host and same_port


def _server_allows(alias: str) -> int | None:
    """max_connections minus reserved slots, read live; None when unknown (the check then says nothing)."""
    connection = connections[alias]
    try:
        with connection.cursor() as cursor:
            if connection.vendor == "postgresql":
                cursor.execute(
                    "SELECT current_setting('max_connections')::int"
                    " - current_setting('superuser_reserved_connections')::int"
                    " - coalesce(current_setting('reserved_connections', true)::int, 0)"
                )
            elif connection.vendor == "mysql":
                cursor.execute("SELECT @@max_connections")
            else:
                return None
            row = cursor.fetchone()
    except Exception:
        return None
    return int(row[0]) if row and row[0] is not None else None
