"""The doctor's PgBouncer examination, through its admin console (a URL whose database is ``pgbouncer``).

The console speaks the simple query protocol only and accepts ``SHOW`` commands, not transactions
or ``SET``: statements go through psycopg's :class:`~psycopg.ClientCursor`, and the bounds are all
client-side (libpq's connect and TCP timeouts, and the doctor's deadline). Columns are read by
name, so a PgBouncer that adds some (``sv_idle_xact`` where one reports it) is read as well.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import psycopg

from poolguard.diagnose.findings import Report, Thresholds, headroom
from poolguard.diagnose.postgres import connect
from poolguard.diagnose.target import Session, Target

_CONFIG_KEYS = (
    "pool_mode",
    "default_pool_size",
    "min_pool_size",
    "reserve_pool_size",
    "max_client_conn",
    "max_db_connections",
    "max_user_connections",
    "query_wait_timeout",
    "server_idle_timeout",
    "idle_transaction_timeout",
    "max_prepared_statements",
)

_SIZE_ACTION = (
    "the pool's server connections are all busy: raise default_pool_size (or this database's pool_size) if the "
    "server has room (poolguard budget), shorten the transactions that hold them, or add reserve_pool_size"
)


def _rows(connection: psycopg.Connection[Any], command: str) -> list[dict[str, Any]]:
    cursor = psycopg.ClientCursor(connection)
    cursor.execute(command)
    names = [column.name for column in cursor.description or ()]
    return [dict(zip(names, (_plain(value) for value in row), strict=True)) for row in cursor.fetchall()]


def _plain(value: Any) -> Any:
    return int(value) if isinstance(value, Decimal) else value


def examine(target: Target, timeout: float, thresholds: Thresholds, session: Session, report: Report) -> None:
    with connect(target, timeout, session) as connection:
        version = _rows(connection, "SHOW VERSION")
        config = {row["key"]: row["value"] for row in _rows(connection, "SHOW CONFIG") if row["key"] in _CONFIG_KEYS}
        pools = _rows(connection, "SHOW POOLS")
        stats = _rows(connection, "SHOW STATS")
        lists = {row["list"]: int(row["items"]) for row in _rows(connection, "SHOW LISTS")}
    report.server = str(version[0]["version"]) if version else ""
    report.facts["config"] = config
    report.facts["pools"] = [pool for pool in pools if pool.get("database") != "pgbouncer"]
    report.facts["stats"] = [row for row in stats if row.get("database") != "pgbouncer"]
    _judge(
        report,
        thresholds=thresholds,
        config=config,
        pools=report.facts["pools"],
        stats=report.facts["stats"],
        lists=lists,
    )


def _judge(
    report: Report,
    *,
    thresholds: Thresholds,
    config: dict[str, Any],
    pools: list[dict[str, Any]],
    stats: list[dict[str, Any]],
    lists: dict[str, int],
) -> None:
    max_client_conn = int(config.get("max_client_conn") or 0)
    if max_client_conn and "used_clients" in lists:
        headroom(
            report,
            used=lists["used_clients"],
            usable=max_client_conn,
            thresholds=thresholds,
            code="pgbouncer.clients",
            what=f"client connections against max_client_conn {max_client_conn}",
            action="new clients will be refused: raise max_client_conn (it costs a file descriptor each, "
            "not a server connection) or find who opens so many",
        )
    report.add(
        "info",
        "pgbouncer.config",
        ", ".join(
            f"{key} {config[key]}" for key in ("pool_mode", "default_pool_size", "max_client_conn") if key in config
        ),
    )
    if int(config.get("max_prepared_statements") or 0) > 0:
        report.add(
            "info",
            "pgbouncer.prepared_statements",
            f"max_prepared_statements {config['max_prepared_statements']}: prepared statements work through "
            "this PgBouncer (1.21+), in transaction mode too",
            "poolguard's engines turn the drivers' prepared statements off behind a pooler (a client cannot see "
            "this setting); to keep them, pass connect_args={'prepare_threshold': 5} (psycopg) or "
            "{'statement_cache_size': 100} (asyncpg)",
        )
    for pool in pools:
        _pool(report, thresholds, pool, config)
    for row in stats:
        wait_us = int(row.get("avg_wait_time") or 0)
        if wait_us >= 100_000:
            report.add(
                "warning",
                "pgbouncer.avg_wait",
                f"database {row.get('database')!r}: clients waited {wait_us / 1e6:.2f} s on average for a server "
                "connection lately (SHOW STATS avg_wait_time)",
                _SIZE_ACTION,
            )


def _pool(report: Report, thresholds: Thresholds, pool: dict[str, Any], config: dict[str, Any]) -> None:
    name = f"{pool.get('database')}/{pool.get('user')}"
    waiting = int(pool.get("cl_waiting") or 0)
    maxwait = int(pool.get("maxwait") or 0) + int(pool.get("maxwait_us") or 0) / 1e6
    if waiting:
        critical = maxwait >= thresholds.wait_critical
        report.add(
            "critical" if critical else "warning",
            "pgbouncer.clients_waiting",
            f"pool {name}: {waiting} client(s) waiting for a server connection, the oldest for {maxwait:.1f} s "
            f"({pool.get('sv_active', 0)} server connections active, {pool.get('sv_idle', 0)} idle, "
            f"pool size {config.get('default_pool_size', '?')})",
            _SIZE_ACTION,
        )
    idle_xact = int(pool.get("sv_idle_xact") or 0)
    if idle_xact:
        report.add(
            "warning",
            "pgbouncer.idle_in_transaction",
            f"pool {name}: {idle_xact} server connection(s) idle inside a transaction",
            "a client opened a transaction and waits: set idle_transaction_timeout, and fix the code path",
        )
