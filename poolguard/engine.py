"""Engines with production defaults, built in one place.

SQLAlchemy's defaults suit a script, not a web service under load: a checkout may wait 30 s for a
connection, a dead connection is only noticed when a query fails on it, a server that never answers
hangs the connect, a runaway query holds its connection forever, and ``pg_stat_activity`` cannot
tell which service opened which connection. ``create_engine`` and ``create_async_engine`` fix all of
that with the same keyword arguments, computed by one private function (``_engine_spec``) so the
sync and async engines can never drift apart.

Driver specifics (merged *under* the user's ``connect_args`` and the URL's query string, so the
user always wins):

- psycopg / psycopg2: ``application_name``, ``options="-c statement_timeout=<ms>"`` (not behind a pooler),
  ``connect_timeout`` (whole seconds; libpq's minimum is 2), and TCP keepalives plus
  ``tcp_user_timeout`` (:data:`poolguard.pools.TCP_TIMEOUT`), so a read on a silent (black-holed) server fails
  within seconds instead of waiting on the OS's retransmissions for a quarter of an hour. Neither
  cuts a slow query: the server acknowledges while it works.
- asyncpg: ``server_settings`` ``application_name`` and ``statement_timeout`` (not behind a pooler), ``timeout``, and
  ``command_timeout`` (the statement timeout plus :data:`CLIENT_MARGIN`): asyncpg has no TCP
  timeouts, so the client bounds each query itself, a little after the server would have.
- pymysql: ``program_name`` connection attribute, ``connect_timeout``, and ``read_timeout`` /
  ``write_timeout`` (the statement timeout plus :data:`CLIENT_MARGIN`); the statement timeout is a
  ``SET SESSION`` on each new connection (``max_statement_time`` on MariaDB, ``max_execution_time``
  on MySQL), since only the server can say which one it is. With ``statement_timeout=None`` no
  client-side read bound is set either.
- SQLite: none apply (``sqlite3``'s ``timeout`` is a lock wait, not a connect timeout).
- Any other driver: the generic pool defaults only.
"""

from __future__ import annotations

import logging
import math
import uuid
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import sqlalchemy
from sqlalchemy import event, exc, pool
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext import asyncio as sa_asyncio

from poolguard import _pooler
from poolguard._validate import non_negative_int, positive_float, positive_int
from poolguard.errors import ConfigError
from poolguard.pools import LIBPQ_TCP_BOUNDS
from poolguard.pools.sqlalchemy import connect_through_pooler

if TYPE_CHECKING:
    from sqlalchemy.engine.interfaces import Dialect

__all__ = ["create_async_engine", "create_engine"]

_log = logging.getLogger(__name__)

DEFAULT_WORKERS = 5
"""Concurrency assumed when ``workers`` is not given: SQLAlchemy's own default pool size."""

PGBOUNCER_POOL_SIZE = 2
"""Connections kept open per process behind PgBouncer: enough to skip the handshake on a warm path."""

CLIENT_MARGIN = 5.0
"""Seconds a client-side read bound adds to the statement timeout, so the server's own cancel comes first."""

_LIBPQ_DRIVERS = frozenset({"psycopg", "psycopg_async", "psycopg2"})
_PSYCOPG3_DRIVERS = frozenset({"psycopg", "psycopg_async"})
_DETECTING_DRIVERS = _LIBPQ_DRIVERS | {"asyncpg"}
"""PostgreSQL drivers whose connections tell a pooler apart (their startup pid); others get no detection."""
_MAX_STATEMENT_MS = 2**31 - 1  # PostgreSQL's limit for statement_timeout
_MAX_APPLICATION_NAME = 63  # PostgreSQL's NAMEDATALEN - 1; longer names are silently truncated


@dataclass(frozen=True, slots=True)
class _EngineSpec:
    """What both constructors hand to SQLAlchemy, plus what must be installed on the engine after."""

    url: URL
    kwargs: dict[str, Any]
    mysql_statement_timeout_ms: int | None
    """Set with ``SET SESSION`` on every new pymysql connection (MariaDB and MySQL name it differently)."""
    pooler: _pooler.Pooler
    """What the engine knows of a pooler in front: told (``pgbouncer=True``/``False``) or to be detected."""
    pooled_connect_args: dict[str, Any] | None
    """The ``connect_args`` to use behind a pooler, while one is to be detected (None: no detection)."""


def create_engine(
    url: str | URL,
    *,
    service_name: str | None = None,
    workers: int | None = None,
    pool_size: int | None = None,
    max_overflow: int | None = None,
    pool_timeout: float = 5.0,
    pool_recycle: float = 1800.0,
    pool_pre_ping: bool = True,
    connect_timeout: float = 2.0,
    statement_timeout: float | None = 30.0,
    pgbouncer: bool | None = None,
    **engine_kwargs: Any,
) -> sqlalchemy.Engine:
    """A ``sqlalchemy.Engine`` with defaults that keep a web service's pool healthy.

    Why each default:

    - ``pool_pre_ping=True``: a connection killed by a failover, a proxy or an idle timeout is
      replaced at checkout instead of failing the request that drew it (fresh connections are not
      pinged, so the cost is one round trip per reuse).
    - ``pool_recycle=1800`` s: connections are replaced before typical server, proxy and load
      balancer idle timeouts (MySQL ``wait_timeout``, cloud NAT, PgBouncer ``server_lifetime``) cut them.
    - ``pool_timeout=5`` s: never SQLAlchemy's 30 s hang; poolguard's admission control sheds a
      request sooner (``max_wait``), this is only the backstop.
    - ``connect_timeout=2`` s: an unreachable or silent server fails fast instead of waiting on the
      OS's TCP timeout (minutes), and within the 2 s in which poolguard's watchdog confirms an
      outage (a connect already under way cannot be aborted, only bounded). A healthy server
      accepts in milliseconds; libpq enforces at least 2 s and whole seconds.
    - ``statement_timeout=30`` s, set server-side: a runaway query is cancelled by the server and gives
      its connection back, instead of holding it until the pool is exhausted. ``None`` turns it off.
    - ``hide_parameters=True``: bound parameters (user data, secrets) never appear in SQLAlchemy's
      exception messages, so they cannot leak into logs or spans through an error.
    - ``application_name=service_name``: every connection is attributed to its service in
      ``pg_stat_activity`` (and MySQL's connection attributes), which is what every DBA looks at first.

    Pool sizing: ``workers`` is how many requests this process serves at once (threads, or
    concurrent tasks), default 5. Each in-flight request holds at most one connection, so
    ``pool_size = workers`` keeps one warm connection per unit of concurrency, and
    ``max_overflow = workers // 2`` absorbs bursts (background jobs, a streamed response still
    finishing) with connections that are closed when returned. The total stays bounded so that
    replicas x processes x (pool_size + max_overflow) can be checked against ``max_connections``.
    Explicit ``pool_size`` / ``max_overflow`` always win; sizing is
    only passed to pools that take it (QueuePool, not SQLite's in-memory pools or NullPool).

    PgBouncer (transaction pooling), or another pooler in front: prepared-statement caches are
    turned off, because a statement prepared on one server connection is missing on the next
    (psycopg ``prepare_threshold=None``; asyncpg ``statement_cache_size=0``, SQLAlchemy's
    ``prepared_statement_cache_size=0`` and unique statement names). ``statement_timeout`` is *not*
    sent as a startup parameter there, because PgBouncer rejects unknown startup parameters and a
    session ``SET`` would leak to other clients: set it on the role instead
    (``ALTER ROLE app SET statement_timeout = '30s'``). ``pgbouncer`` says how it is known:

    - ``None`` (default): detected at the engine's first connection (psycopg, psycopg2, asyncpg; see
      :mod:`poolguard._pooler`): a connect refused over poolguard's own startup parameter is
      retried once without it, else ``pg_backend_pid()`` against the pid given at startup (a
      pooler's cancel key is its own; one round trip) tells, and that connection is replaced by one
      made for the pooler. One INFO line says so; health shows ``"pooler"``. Nothing connects at creation, and
      pools are sized as for a direct server (client connections to PgBouncer are cheap):
      ``pgbouncer=True`` gives the smaller pools below.
    - ``True``: nothing is probed. PgBouncer does the real pooling, so this process keeps at most
      ``PGBOUNCER_POOL_SIZE`` (2) connections open and allows overflow up to ``workers`` in total
      (PgBouncer queues for server connections).
    - ``False``: no pooler, nothing is probed; PgBouncer with its default settings then refuses
      every connect.

    ``connect_args`` the user gives win in every case (e.g. ``{"prepare_threshold": 5}`` behind a
    PgBouncer 1.21+ with ``max_prepared_statements`` on, which keeps prepared statements working).

    Every other keyword goes to ``sqlalchemy.create_engine`` unchanged; ``connect_args`` is merged
    over the defaults (asyncpg's ``server_settings`` one level deeper), and a parameter given in the
    URL's query string is never overridden. Unknown drivers get the generic defaults only.

    Raises ``ConfigError`` naming ``create_engine.<option>`` for an invalid option.
    """
    spec = _engine_spec(
        "create_engine",
        url,
        is_async=False,
        service_name=service_name,
        workers=workers,
        pool_size=pool_size,
        max_overflow=max_overflow,
        pool_timeout=pool_timeout,
        pool_recycle=pool_recycle,
        pool_pre_ping=pool_pre_ping,
        connect_timeout=connect_timeout,
        statement_timeout=statement_timeout,
        pgbouncer=pgbouncer,
        engine_kwargs=engine_kwargs,
    )
    engine = sqlalchemy.create_engine(spec.url, **spec.kwargs)
    _install_listeners(engine, spec)
    return engine


def create_async_engine(
    url: str | URL,
    *,
    service_name: str | None = None,
    workers: int | None = None,
    pool_size: int | None = None,
    max_overflow: int | None = None,
    pool_timeout: float = 5.0,
    pool_recycle: float = 1800.0,
    pool_pre_ping: bool = True,
    connect_timeout: float = 2.0,
    statement_timeout: float | None = 30.0,
    pgbouncer: bool | None = None,
    **engine_kwargs: Any,
) -> sa_asyncio.AsyncEngine:
    """An ``AsyncEngine`` with the same defaults as ``create_engine`` (see there for why).

    ``workers`` here is the number of requests the event loop serves concurrently (tasks holding
    a connection at once), not the number of processes. The URL must name an asyncio driver
    (``postgresql+asyncpg``, ``postgresql+psycopg``, ``sqlite+aiosqlite``, ...).

    Raises ``ConfigError`` naming ``create_async_engine.<option>`` for an invalid option.
    """
    spec = _engine_spec(
        "create_async_engine",
        url,
        is_async=True,
        service_name=service_name,
        workers=workers,
        pool_size=pool_size,
        max_overflow=max_overflow,
        pool_timeout=pool_timeout,
        pool_recycle=pool_recycle,
        pool_pre_ping=pool_pre_ping,
        connect_timeout=connect_timeout,
        statement_timeout=statement_timeout,
        pgbouncer=pgbouncer,
        engine_kwargs=engine_kwargs,
    )
    engine = sa_asyncio.create_async_engine(spec.url, **spec.kwargs)
    _install_listeners(engine.sync_engine, spec)
    return engine


def _engine_spec(
    caller: str,
    url: object,
    *,
    is_async: bool,
    service_name: object,
    workers: object,
    pool_size: object,
    max_overflow: object,
    pool_timeout: object,
    pool_recycle: object,
    pool_pre_ping: object,
    connect_timeout: object,
    statement_timeout: object,
    pgbouncer: object,
    engine_kwargs: dict[str, Any],
) -> _EngineSpec:
    """Validate every option and compute the keyword arguments for SQLAlchemy.

    Pure apart from importing the dialect module (never the driver), so a bad option fails before
    anything connects.
    """
    parsed = _parse_url(caller, url)
    dialect_cls = _dialect_class(caller, parsed, is_async=is_async)
    backend, driver = dialect_cls.name, dialect_cls.driver

    name = _service_name(caller, service_name)
    demand = DEFAULT_WORKERS if workers is None else positive_int(f"{caller}.workers", workers)
    size = None if pool_size is None else positive_int(f"{caller}.pool_size", pool_size)
    overflow = None if max_overflow is None else non_negative_int(f"{caller}.max_overflow", max_overflow)
    checkout_timeout = positive_float(f"{caller}.pool_timeout", pool_timeout)
    recycle = positive_float(f"{caller}.pool_recycle", pool_recycle)
    pre_ping = _flag(f"{caller}.pool_pre_ping", pool_pre_ping)
    connect_seconds = positive_float(f"{caller}.connect_timeout", connect_timeout)
    statement_ms = _statement_ms(caller, statement_timeout)
    if pgbouncer is not None:
        _flag(f"{caller}.pgbouncer", pgbouncer, "None (detect), True or False")
    behind_pgbouncer = pgbouncer is True
    if behind_pgbouncer and backend != "postgresql":
        raise ConfigError(f"{caller}.pgbouncer", pgbouncer, "None or False unless the URL is a PostgreSQL one")

    kwargs = dict(engine_kwargs)
    # SQLAlchemy puts bound parameters into exception messages, which reach logs and tracing
    # backends (an instrumentation records the exception on the request span): keep them out.
    kwargs.setdefault("hide_parameters", True)
    user_connect_args = kwargs.pop("connect_args", {})
    if not isinstance(user_connect_args, Mapping):
        raise ConfigError(
            f"{caller}.connect_args", f"<{type(user_connect_args).__name__}>", "a mapping of driver arguments"
        )

    if size is None:
        size = min(demand, PGBOUNCER_POOL_SIZE) if behind_pgbouncer else demand
    if overflow is None:
        overflow = max(demand - size, 0) if behind_pgbouncer else demand // 2

    if "pool" not in kwargs:
        kwargs["pool_pre_ping"] = pre_ping
        kwargs["pool_recycle"] = recycle
        poolclass = kwargs.get("poolclass") or _default_pool_class(dialect_cls, parsed)
        if isinstance(poolclass, type) and issubclass(poolclass, pool.QueuePool):
            kwargs["pool_size"] = size
            kwargs["max_overflow"] = overflow
            kwargs["pool_timeout"] = checkout_timeout

    def connect_args_for(pooled: bool) -> dict[str, Any]:
        defaults = _driver_connect_args(
            driver,
            service_name=name,
            connect_seconds=connect_seconds,
            statement_ms=None if pooled else statement_ms,
            read_bound=None if statement_ms is None else statement_ms / 1000 + CLIENT_MARGIN,
            pgbouncer=pooled,
        )
        if pooled and driver == "asyncpg":  # SQLAlchemy's asyncpg dialect: its own statement cache and names
            defaults.update(prepared_statement_cache_size=0, prepared_statement_name_func=_unique_statement_name)
        for key in parsed.query:
            defaults.pop(key, None)
        return _merge(defaults, user_connect_args)

    connect_args = connect_args_for(behind_pgbouncer)
    if connect_args:
        kwargs["connect_args"] = connect_args
    # A creator or a ready pool bypasses the dialect's connect, where detection happens: report only.
    bypassed = {"creator", "async_creator", "pool"} & kwargs.keys()
    detects = pgbouncer is None and driver in _DETECTING_DRIVERS and not bypassed
    pooler = _pooler.Pooler(
        _pooler.target(parsed.host, parsed.port, parsed.database),
        kind=_pooler.PGBOUNCER if behind_pgbouncer else None,
        decided=pgbouncer is not None or driver not in _DETECTING_DRIVERS,
        adapts=detects,
    )

    mysql_timeout = statement_ms if driver == "pymysql" else None
    _log.debug(
        "%s(%s): pool_size=%s max_overflow=%s pgbouncer=%s driver=%s",
        caller,
        parsed.render_as_string(hide_password=True),
        kwargs.get("pool_size"),
        kwargs.get("max_overflow"),
        behind_pgbouncer,
        driver,
    )
    return _EngineSpec(
        url=parsed,
        kwargs=kwargs,
        mysql_statement_timeout_ms=mysql_timeout,
        pooler=pooler,
        pooled_connect_args=connect_args_for(True) if detects else None,
    )


def _parse_url(caller: str, url: object) -> URL:
    accepted = "a SQLAlchemy URL (str or sqlalchemy.URL) such as 'postgresql+psycopg://user@host/db'"
    if isinstance(url, URL):
        return url
    if not isinstance(url, str):
        raise ConfigError(f"{caller}.url", f"<{type(url).__name__}>", accepted)
    try:
        return make_url(url)
    except (exc.ArgumentError, ValueError):
        # The string may hold a password and could not be parsed to hide it: never echo it.
        raise ConfigError(f"{caller}.url", "<unparseable URL>", accepted) from None


def _dialect_class(caller: str, url: URL, *, is_async: bool) -> type[Dialect]:
    shown = url.render_as_string(hide_password=True)
    try:
        dialect_cls = url.get_dialect(_is_async=is_async)
    except exc.NoSuchModuleError:
        raise ConfigError(f"{caller}.url", shown, "a URL whose SQLAlchemy dialect is installed") from None
    if is_async and not dialect_cls.is_async:
        raise ConfigError(
            f"{caller}.url",
            shown,
            "a URL with an asyncio driver (postgresql+asyncpg, postgresql+psycopg, sqlite+aiosqlite, ...)",
        )
    if not is_async and dialect_cls.is_async:
        raise ConfigError(
            f"{caller}.url", shown, "a URL with a synchronous driver; use create_async_engine for this one"
        )
    return dialect_cls


def _default_pool_class(dialect_cls: type[Dialect], url: URL) -> type[pool.Pool]:
    """The pool class SQLAlchemy will pick, so sizing is only passed to pools that accept it."""
    get_pool_class = getattr(dialect_cls, "get_pool_class", None)
    if get_pool_class is None:
        return pool.AsyncAdaptedQueuePool if dialect_cls.is_async else pool.QueuePool
    with warnings.catch_warnings():
        # SQLAlchemy warns about some SQLite URLs here; it warns again in create_engine, once is enough.
        warnings.simplefilter("ignore")
        chosen: type[pool.Pool] = get_pool_class(url)
    return chosen


def _driver_connect_args(
    driver: str,
    *,
    service_name: str | None,
    connect_seconds: float,
    statement_ms: int | None,
    read_bound: float | None,
    pgbouncer: bool,
) -> dict[str, Any]:
    """The driver's own spelling of the connection defaults (asyncpg's: create_asyncpg_pool's too); else empty.

    ``read_bound`` is the client-side limit on one query for drivers without TCP timeouts (the
    statement timeout plus a margin; kept behind PgBouncer, where the server-side one is the role's).
    """
    args: dict[str, Any] = {}
    if driver in _LIBPQ_DRIVERS:
        args["connect_timeout"] = max(1, math.ceil(connect_seconds))
        args.update(LIBPQ_TCP_BOUNDS)
        if service_name is not None:
            args["application_name"] = service_name
        if statement_ms is not None:
            args["options"] = f"-c statement_timeout={statement_ms}"
        if pgbouncer and driver in _PSYCOPG3_DRIVERS:
            args["prepare_threshold"] = None
    elif driver == "asyncpg":
        args["timeout"] = connect_seconds
        if read_bound is not None:
            args["command_timeout"] = read_bound
        server_settings: dict[str, str] = {}
        if service_name is not None:
            server_settings["application_name"] = service_name
        if statement_ms is not None:
            server_settings["statement_timeout"] = str(statement_ms)
        if server_settings:
            args["server_settings"] = server_settings
        if pgbouncer:
            args["statement_cache_size"] = 0
    elif driver == "pymysql":
        args["connect_timeout"] = connect_seconds
        if read_bound is not None:
            args["read_timeout"] = args["write_timeout"] = read_bound
        if service_name is not None:
            args["program_name"] = service_name
    return args


def _unique_statement_name() -> str:
    """asyncpg numbers its statements per connection; behind PgBouncer those names collide."""
    return f"__poolguard_{uuid.uuid4().hex}__"


def _merge(defaults: dict[str, Any], user: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(defaults)
    for key, value in user.items():
        base = merged.get(key)
        if isinstance(base, dict) and isinstance(value, Mapping):
            merged[key] = {**base, **value}
        else:
            merged[key] = value
    return merged


def _install_listeners(engine: sqlalchemy.Engine, spec: _EngineSpec) -> None:
    """Listeners go on the Engine, so they survive ``dispose()``."""
    setattr(engine.dialect, _pooler.POOLER_ATTRIBUTE, spec.pooler)
    if spec.pooled_connect_args is not None:
        connect_through_pooler(
            engine.dialect, spec.pooler, spec.kwargs.get("connect_args", {}), spec.pooled_connect_args
        )
    timeout_ms = spec.mysql_statement_timeout_ms
    if timeout_ms is None:
        return

    def set_statement_timeout(dbapi_connection: Any, _record: Any) -> None:
        # Only known once connected: the same URL may point at MariaDB or MySQL, and a wrong
        # variable name would fail every connect.
        if "mariadb" in str(dbapi_connection.get_server_info()).lower():
            statement = f"SET SESSION max_statement_time = {timeout_ms / 1000:.3f}"
        else:
            # MySQL's counterpart; it applies to read-only SELECTs only.
            statement = f"SET SESSION max_execution_time = {timeout_ms}"
        with dbapi_connection.cursor() as cursor:
            cursor.execute(statement)

    event.listen(engine, "connect", set_statement_timeout)


def _service_name(caller: str, value: object) -> str | None:
    if value is None:
        return None
    accepted = f"None or 1 to {_MAX_APPLICATION_NAME} printable ASCII characters"
    if (
        not isinstance(value, str)
        or not 0 < len(value) <= _MAX_APPLICATION_NAME
        or not all(" " <= ch <= "~" for ch in value)
    ):
        raise ConfigError(f"{caller}.service_name", value, accepted)
    return value


def _statement_ms(caller: str, value: object) -> int | None:
    """Milliseconds, the unit every server takes; at least 1, since 0 would mean "no timeout"."""
    if value is None:
        return None
    setting = f"{caller}.statement_timeout"
    ms = max(1, round(positive_float(setting, value) * 1000))
    if ms > _MAX_STATEMENT_MS:
        raise ConfigError(setting, value, f"None or a number of seconds up to {_MAX_STATEMENT_MS // 1000}")
    return ms


def _flag(setting: str, value: object, accepted: str = "True or False") -> bool:
    if not isinstance(value, bool):
        raise ConfigError(setting, value, accepted)
    return value
