"""``create_asyncpg_pool``: an ``asyncpg.Pool`` with the production defaults of :func:`poolguard.create_engine`.

The numbers are :mod:`poolguard.engine`'s (connect timeout, statement timeout and its client-side
margin, sizes from ``workers``, PgBouncer's), so an engine and a pool made for the same service
behave alike. What asyncpg is given is computed by one function, :func:`connect_kwargs`, from a
``behind_pgbouncer`` flag; with ``pgbouncer=None`` both sets are computed and the pool's ``connect=``
hook (:class:`poolguard._pooler.AsyncpgConnect`) picks one at the first connection, as the engines do.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Mapping
from functools import partial
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

from poolguard import _pooler
from poolguard._validate import positive_float, positive_int
from poolguard.engine import (
    CLIENT_MARGIN,
    DEFAULT_WORKERS,
    _driver_connect_args,
    _flag,
    _merge,
    _service_name,
    _statement_ms,
)
from poolguard.errors import ConfigError

if TYPE_CHECKING:
    import asyncpg

__all__ = ["connect_kwargs", "create_asyncpg_pool"]

_log = logging.getLogger("poolguard")

_CALLER = "create_asyncpg_pool"
_SCHEMES = {"postgresql": "postgresql", "postgres": "postgresql", "postgresql+asyncpg": "postgresql"}


async def create_asyncpg_pool(
    url: str,
    *,
    service_name: str | None = None,
    workers: int | None = None,
    pgbouncer: bool | None = None,
    statement_timeout: float | None = 30.0,
    connect_timeout: float = 2.0,
    **pool_kwargs: Any,
) -> asyncpg.Pool:
    """An ``asyncpg.Pool`` (created and ready) with defaults that keep a web service's pool healthy.

    - ``connect_timeout=2`` s (asyncpg's ``timeout``): an unreachable or silent server fails fast,
      within the time poolguard's watchdog takes to confirm an outage.
    - ``statement_timeout=30`` s, set server-side (``server_settings``): a runaway query is cancelled
      by the server; ``command_timeout`` is that plus :data:`~poolguard.engine.CLIENT_MARGIN` (5 s),
      because asyncpg has no TCP timeouts: the client bounds each query itself, a little after the
      server would have, so a black-holed server never hangs a request. ``None`` turns both off.
    - ``application_name=service_name`` (at most 63 characters): connections are attributed to the
      service in ``pg_stat_activity``.
    - Sizes from ``workers`` (the requests the event loop serves at once, default 5): ``max_size`` is
      ``workers + workers // 2``, the same ceiling as ``create_engine``'s ``pool_size + max_overflow``,
      so the connection budget adds up the same way. ``min_size=0``: asyncpg opens ``min_size``
      connections inside ``create_pool`` and fails if it cannot, and an app must start (and answer
      503 and its DB-free routes) during a database outage, not crash-loop.
    - ``pgbouncer=True`` (transaction pooling): ``max_size = workers`` (PgBouncer queues for server
      connections), ``statement_cache_size=0`` (a statement prepared on one server connection is
      missing on the next), and no ``statement_timeout`` startup parameter (PgBouncer refuses unknown
      ones: set it on the role, ``ALTER ROLE app SET statement_timeout = '30s'``).
    - ``pgbouncer=None`` (the default): found out at the pool's first connection, as
      :func:`poolguard.create_engine` does (a refused startup parameter, or a cancel key that is not
      the server's pid); behind a pooler the connections are made as with ``True`` (the size stays).
      ``False``: nothing is checked. A ``connect=`` of yours is called by the hook that checks.

    ``url``: ``postgresql://``, ``postgres://`` or ``postgresql+asyncpg://``. Every other keyword goes to
    ``asyncpg.create_pool`` and wins over these defaults (``server_settings`` merged one level deeper);
    a setting in the URL's query string is never overridden. Raises ``ConfigError`` naming
    ``create_asyncpg_pool.<option>`` for an invalid option, before anything connects.
    """
    import asyncpg  # noqa: PLC0415 (asyncpg is the ``asyncpg`` extra)

    dsn, query = _dsn(url)
    behind_pgbouncer = False if pgbouncer is None else _flag(f"{_CALLER}.pgbouncer", pgbouncer)
    demand = DEFAULT_WORKERS if workers is None else positive_int(f"{_CALLER}.workers", workers)
    _check_names(pool_kwargs, asyncpg)
    computed = partial(
        connect_kwargs,
        service_name=_service_name(_CALLER, service_name),
        connect_timeout=positive_float(f"{_CALLER}.connect_timeout", connect_timeout),
        statement_ms=_statement_ms(_CALLER, statement_timeout),
    )
    defaults = _without(computed(behind_pgbouncer), query)
    kwargs = _merge(defaults, pool_kwargs)
    if pgbouncer is not False:
        # The hook connects with ``kwargs`` (direct) or, behind a pooler, with them shifted to ``pooled``:
        # both merged with the user's, so what the user gave wins either way.
        pooled = _merge(_without(computed(True), query), pool_kwargs)
        pooler = _pooler.Pooler(
            _target(dsn), kind=_pooler.PGBOUNCER if pgbouncer else None, decided=pgbouncer is not None
        )
        kwargs["connect"] = _pooler.AsyncpgConnect(
            pooler, pool_kwargs.get("connect") or asyncpg.connect, dict(kwargs), pooled
        )
    kwargs.setdefault("min_size", 0)
    kwargs.setdefault("max_size", demand if behind_pgbouncer else demand + demand // 2)
    if kwargs["min_size"] > kwargs["max_size"]:
        raise ConfigError(f"{_CALLER}.min_size", kwargs["min_size"], f"at most max_size ({kwargs['max_size']})")
    _log.debug(
        "%s: max_size=%s pgbouncer=%s statement_cache_size=%s",
        _CALLER,
        kwargs["max_size"],
        behind_pgbouncer,
        kwargs.get("statement_cache_size", "default"),
    )
    pool: asyncpg.Pool = await asyncpg.create_pool(dsn, **kwargs)
    return pool


def connect_kwargs(
    behind_pgbouncer: bool, *, service_name: str | None, connect_timeout: float, statement_ms: int | None
) -> dict[str, Any]:
    """asyncpg's arguments for these defaults, directly to PostgreSQL or through PgBouncer (transaction mode).

    The engines' own (:mod:`poolguard.engine`), so the two cannot drift: behind PgBouncer no
    prepared-statement cache and no ``statement_timeout`` startup parameter (the client-side
    ``command_timeout`` stays: the role's timeout is the server's).
    """
    return _driver_connect_args(
        "asyncpg",
        service_name=service_name,
        connect_seconds=connect_timeout,
        statement_ms=None if behind_pgbouncer else statement_ms,
        read_bound=None if statement_ms is None else statement_ms / 1000 + CLIENT_MARGIN,
        pgbouncer=behind_pgbouncer,
    )


def _without(kwargs: dict[str, Any], query: set[str]) -> dict[str, Any]:
    """The defaults less what the URL's query string sets (the URL's own settings are never overridden)."""
    settings = kwargs.get("server_settings", {})
    for key in query:
        kwargs.pop(key, None)
        settings.pop(key, None)
    return kwargs


def _target(dsn: str) -> str:
    """How the one log line of a detection names the database: host, port and database only."""
    parts = urlsplit(dsn)
    try:
        port = parts.port
    except ValueError:
        port = None
    return _pooler.target(parts.hostname, port, parts.path.lstrip("/") or None)


def _dsn(url: object) -> tuple[str, set[str]]:
    """The DSN asyncpg takes, and the names in its query string (never echoed with its password)."""
    accepted = "a PostgreSQL URL: postgresql://, postgres:// or postgresql+asyncpg://user@host/db"
    if not isinstance(url, str):
        raise ConfigError(f"{_CALLER}.url", f"<{type(url).__name__}>", accepted)
    try:
        parts = urlsplit(url)
    except ValueError:
        raise ConfigError(f"{_CALLER}.url", "<unparseable URL>", accepted) from None
    scheme = _SCHEMES.get(parts.scheme.lower())
    if scheme is None:
        shown = f"{parts.scheme}://..." if parts.scheme else "<not a URL>"
        raise ConfigError(f"{_CALLER}.url", shown, accepted)
    query = {item.partition("=")[0] for item in parts.query.split("&") if item}
    return urlunsplit((scheme, *parts[1:])), query


def _check_names(pool_kwargs: Mapping[str, Any], asyncpg: Any) -> None:
    """Unknown keywords fail here, naming the option, rather than as a TypeError deep in asyncpg."""
    known = set(inspect.signature(asyncpg.create_pool).parameters) | set(inspect.signature(asyncpg.connect).parameters)
    known -= {"dsn", "connect_kwargs", "loop", "args", "kwargs"}
    for name in pool_kwargs:
        if name not in known:
            raise ConfigError(
                f"{_CALLER}.{name}", "(unknown option)", "a keyword of asyncpg.create_pool or asyncpg.connect"
            )
    settings = pool_kwargs.get("server_settings")
    if settings is not None and not isinstance(settings, Mapping):
        raise ConfigError(f"{_CALLER}.server_settings", f"<{type(settings).__name__}>", "a mapping of str to str")
