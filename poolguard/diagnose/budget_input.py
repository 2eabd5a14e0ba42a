"""Where ``poolguard budget`` gets its fleet and limits: the command line, a TOML file, or the server.

One set of keys for both forms, so they cannot disagree. A service on the command line::

    orders:replicas=10,processes=2,workers=8
    billing:replicas=5,pool_size=20,max_overflow=0

and in a file (``--file fleet.toml``)::

    max_connections = 200        # or --max-connections / --url
    reserved = 3                 # superuser_reserved_connections (+ reserved_connections)
    margin = "10%"               # or a count of connections
    max_surge = "25%"            # or a count of pods; 0: no rollout surge

    [services.orders]
    replicas = 10
    processes = 2                # per pod (gunicorn --workers)
    workers = 8                  # create_engine(workers=8): pool_size 8, max_overflow 4

    [pgbouncer]                  # optional: PgBouncer in front (the same keys as --pgbouncer)
    instances = 2
    max_db_connections = 40

Service keys: ``replicas`` (required), ``processes`` (1), ``workers`` (poolguard.create_engine's:
sizes the pool when ``pool_size`` is not given), ``pool_size``, ``max_overflow`` (default: 0 with a
``pool_size`` alone, else create_engine's ``workers // 2``), ``pgbouncer``
(true: sized as ``create_engine(pgbouncer=True)``), ``other`` (more connections per process: a second
pool, a listener; 0), ``max_surge``.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any

from poolguard.diagnose.budget import (
    LIMITS_SQL,
    Fleet,
    PgBouncerSettings,
    Quantity,
    ServerLimits,
    Service,
    engine_pool,
    limits_from_row,
)
from poolguard.diagnose.target import NoAnswer, Session, Target, within
from poolguard.errors import ConfigError, PoolGuardError

SERVICE_KEYS = ("replicas", "processes", "workers", "pool_size", "max_overflow", "pgbouncer", "other", "max_surge")
PGBOUNCER_KEYS = tuple(f.name for f in fields(PgBouncerSettings))
FILE_KEYS = ("max_connections", "reserved", "margin", "max_surge", "services", "pgbouncer")
_INTEGER_KEYS = frozenset({"replicas", "processes", "workers", "pool_size", "max_overflow", "other"})
_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,63}")
_QUANTITY = re.compile(r"(\d+(?:\.\d+)?)(%?)")
APPLICATION_NAME = "poolguard budget"


class LimitsUnavailable(PoolGuardError):
    """The server's limits could not be read; the message never holds the password."""


def quantity(setting: str, value: object) -> Quantity:
    """``10``, ``"10"`` or ``"10%"``."""
    accepted = "a whole number, or a percentage such as '10%'"
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return Quantity(value)
    match = _QUANTITY.fullmatch(value.strip()) if isinstance(value, str) else None
    if match is None or (not match.group(2) and "." in match.group(1)):
        raise ConfigError(setting, value, accepted)
    return Quantity(float(match.group(1)), percent=bool(match.group(2)))


def _integer(setting: str, value: object) -> int:
    if isinstance(value, str) and re.fullmatch(r"-?\d+", value.strip()):
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(setting, value, "a whole number")
    return value


def _flag(setting: str, value: object) -> bool:
    if isinstance(value, bool):
        return value
    lowered = value.strip().lower() if isinstance(value, str) else None
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ConfigError(setting, value, "true or false")


def service(name: str, options: Mapping[str, object]) -> Service:
    """A service from its keys (strings from the command line or TOML values); ConfigError names the key."""
    where = f"service {name!r}"
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ConfigError("service name", name, "1 to 63 letters, digits, '_', '.' or '-'")
    unknown = sorted(set(options) - set(SERVICE_KEYS))
    if unknown:
        raise ConfigError(f"{where}: {unknown[0]}", "(unknown key)", "one of " + ", ".join(SERVICE_KEYS))
    if "replicas" not in options:
        raise ConfigError(f"{where}: replicas", "(missing)", "a whole number of pods, required")
    values: dict[str, Any] = {}
    for key, raw in options.items():
        if key in _INTEGER_KEYS:
            values[key] = _integer(f"{where}: {key}", raw)
        elif key == "pgbouncer":
            values[key] = _flag(f"{where}: {key}", raw)
        else:
            values[key] = quantity(f"{where}: {key}", raw)
    workers = values.pop("workers", None)
    if workers is not None and workers < 1:
        raise ConfigError(f"{where}: workers", workers, "a whole number of at least 1")
    if workers is None and "pool_size" in values:
        values.setdefault("max_overflow", 0)  # a pool size alone is the whole pool
    for key in ("pool_size", "max_overflow"):
        if values.get(key) is not None and values[key] < 0:
            raise ConfigError(f"{where}: {key}", values[key], "a whole number of at least 0")
    size, overflow = engine_pool(
        workers,
        pgbouncer=values.pop("pgbouncer", False),
        pool_size=values.pop("pool_size", None),
        max_overflow=values.pop("max_overflow", None),
    )
    return Service(name=name, pool_size=size, max_overflow=overflow, **values)


def parse_service(spec: str) -> Service:
    """``NAME:key=value,key=value`` (the ``--service`` form)."""
    name, colon, rest = spec.partition(":")
    if not colon or not rest.strip():
        raise ConfigError(
            "--service", spec, "NAME:replicas=N[,processes=N][,workers=N|pool_size=N,max_overflow=N][,...]"
        )
    return service(name.strip(), _pairs(f"--service {name.strip()}", rest))


def parse_pgbouncer(spec: str) -> PgBouncerSettings:
    """``key=value,...`` (the ``--pgbouncer`` form)."""
    return pgbouncer(_pairs("--pgbouncer", spec))


def _pairs(setting: str, text: str) -> dict[str, str]:
    pairs: dict[str, str] = {}
    for item in text.split(","):
        key, equals, value = item.partition("=")
        if not equals or not key.strip():
            raise ConfigError(setting, item, "key=value pairs separated by commas")
        pairs[key.strip()] = value.strip()
    return pairs


def pgbouncer(options: Mapping[str, object]) -> PgBouncerSettings:
    unknown = sorted(set(options) - set(PGBOUNCER_KEYS))
    if unknown:
        raise ConfigError(f"pgbouncer: {unknown[0]}", "(unknown key)", "one of " + ", ".join(PGBOUNCER_KEYS))
    return PgBouncerSettings(**{key: _integer(f"pgbouncer: {key}", value) for key, value in options.items()})


def load_file(path: Path) -> dict[str, Any]:
    """The fleet file, checked: ``services`` (a tuple of Service), ``pgbouncer``, and the file's
    ``max_connections``, ``reserved``, ``margin`` and ``max_surge`` when it sets them."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise ConfigError("--file", str(path), f"a readable TOML file ({type(error).__name__})") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError("--file", str(path), f"valid TOML ({error})") from None
    unknown = sorted(set(data) - set(FILE_KEYS))
    if unknown:
        raise ConfigError(f"{path.name}: {unknown[0]}", "(unknown key)", "one of " + ", ".join(FILE_KEYS))
    services = data.get("services", {})
    if not isinstance(services, dict) or not all(isinstance(table, dict) for table in services.values()):
        raise ConfigError(f"{path.name}: services", "(not tables)", "[services.NAME] tables of service keys")
    loaded: dict[str, Any] = {"services": tuple(service(name, table) for name, table in services.items())}
    if "pgbouncer" in data:
        if not isinstance(data["pgbouncer"], dict):
            raise ConfigError(f"{path.name}: pgbouncer", data["pgbouncer"], "a [pgbouncer] table")
        loaded["pgbouncer"] = pgbouncer(data["pgbouncer"])
    for key in ("max_connections", "reserved"):
        if key in data:
            loaded[key] = _integer(f"{path.name}: {key}", data[key])
    for key in ("margin", "max_surge"):
        if key in data:
            loaded[key] = quantity(f"{path.name}: {key}", data[key])
    return loaded


def fleet(
    services: tuple[Service, ...],
    *,
    margin: Quantity | None,
    max_surge: Quantity | None,
    pgbouncer: PgBouncerSettings | None,
) -> Fleet:
    extra: dict[str, Any] = {}
    if margin is not None:
        extra["margin"] = margin
    if max_surge is not None:
        extra["max_surge"] = max_surge
    return Fleet(services=services, pgbouncer=pgbouncer, **extra)


def read_limits(target: Target, *, timeout: float) -> ServerLimits:
    """``max_connections`` and the reserved slots, read live with the doctor's bounded connection; the
    whole call ends within ``timeout`` seconds (a server that accepts and never answers is given up on)."""
    shown = f"{target.kind} at {target.host or 'localhost'}:{target.port}"
    if target.kind not in LIMITS_SQL:
        raise ConfigError(
            "--url",
            target.shown(),
            "the URL of the PostgreSQL or MySQL/MariaDB server (PgBouncer's admin console has no max_connections)",
        )
    session = Session()

    def read() -> ServerLimits:
        return limits_from_row(target.kind, _limits_row(target, timeout, session), shown)

    try:
        return within(timeout, session, read, name="poolguard-budget-limits")
    except NoAnswer:
        raise LimitsUnavailable(f"{shown} did not answer within {timeout:g}s") from None
    except Exception as error:  # the driver's (or its import's), or settings the arithmetic refuses
        raise LimitsUnavailable(f"cannot read the limits of {shown}: {target.describe(error)}") from None


def _limits_row(target: Target, timeout: float, session: Session) -> Any:
    """The row of :data:`LIMITS_SQL`'s query, on a connection of the doctor's (its driver imported on use)."""
    if target.kind == "postgresql":
        from poolguard.diagnose import postgres  # noqa: PLC0415 (its driver, on use)

        with postgres.connect(target, timeout, session, application_name=APPLICATION_NAME) as connection:
            return connection.execute(LIMITS_SQL["postgresql"]).fetchone()
    from poolguard.diagnose import mysql  # noqa: PLC0415 (its driver, on use)

    connection = mysql.connect(target, timeout, session, program_name=APPLICATION_NAME)
    try:
        with connection.cursor() as cursor:
            cursor.execute(LIMITS_SQL["mysql"])
            return cursor.fetchone()
    finally:
        connection.close()
