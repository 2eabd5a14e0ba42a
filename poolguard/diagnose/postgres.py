"""The doctor's PostgreSQL examination: ``pg_stat_activity``, connection limits, role limits.

One connection (autocommit, ``application_name`` ``poolguard doctor``), one short read-only
transaction with a ``statement_timeout``, a handful of catalog queries. Query text is never read:
a statement can hold its parameters, so sessions are named by pid, role, application and state.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import psycopg

from poolguard.diagnose.findings import Report, Severity, Thresholds, headroom
from poolguard.diagnose.target import Session, Target
from poolguard.pools import bound_probe_params, driver_fileno

APPLICATION_NAME = "poolguard doctor"

_SETTINGS = (
    "max_connections",
    "superuser_reserved_connections",
    "reserved_connections",
    "idle_in_transaction_session_timeout",
    "statement_timeout",
)

_ACTIVITY = """
SELECT pid, coalesce(usename, ''), coalesce(application_name, ''), coalesce(state, ''), backend_type,
       extract(epoch FROM clock_timestamp() - xact_start)::float8,
       extract(epoch FROM clock_timestamp() - query_start)::float8,
       extract(epoch FROM clock_timestamp() - state_change)::float8,
       coalesce(wait_event_type, ''),
       CASE WHEN wait_event_type = 'Lock' THEN pg_blocking_pids(pid) END
FROM pg_stat_activity
WHERE pid <> pg_backend_pid()
"""

_ROLE_LIMITS = """
SELECT r.rolname, r.rolconnlimit, count(a.pid)::int
FROM pg_roles r LEFT JOIN pg_stat_activity a ON a.usesysid = r.oid AND a.backend_type = 'client backend'
WHERE r.rolconnlimit >= 0 AND r.rolcanlogin
GROUP BY r.rolname, r.rolconnlimit
"""

_DATABASE_LIMITS = """
SELECT d.datname, d.datconnlimit, count(a.pid)::int
FROM pg_database d LEFT JOIN pg_stat_activity a ON a.datid = d.oid AND a.backend_type = 'client backend'
WHERE d.datconnlimit >= 0
GROUP BY d.datname, d.datconnlimit
"""

_CAN_SEE_ALL = (
    "SELECT rolsuper OR pg_has_role(current_user, 'pg_read_all_stats', 'USAGE') FROM pg_roles"
    " WHERE rolname = current_user"
)

_TIMEOUT_ACTION = (
    "set idle_in_transaction_session_timeout (e.g. ALTER ROLE app SET idle_in_transaction_session_timeout = '30s') "
    "and find the code path that opens a transaction and then waits (an HTTP call, a slow loop) inside it"
)


@dataclass(frozen=True, slots=True)
class Backend:
    """One row of ``pg_stat_activity`` (never the query text)."""

    pid: int
    user: str
    application: str
    state: str
    backend_type: str
    in_transaction: float | None
    in_query: float | None
    in_state: float | None
    waiting_on: str
    blocked_by: tuple[int, ...]

    @property
    def client(self) -> bool:
        return self.backend_type == "client backend"

    def named(self) -> str:
        application = f"'{self.application}'" if self.application else "no application_name"
        return f"pid {self.pid} ({self.user or '?'}, {application})"


def _backend(row: tuple[Any, ...]) -> Backend:
    pid, user, application, state, backend_type, in_transaction, in_query, in_state, waiting_on, blocked_by = row
    return Backend(
        pid=int(pid),
        user=str(user),
        application=str(application),
        state=str(state),
        backend_type=str(backend_type or ""),
        in_transaction=in_transaction,
        in_query=in_query,
        in_state=in_state,
        waiting_on=str(waiting_on),
        blocked_by=tuple(int(blocker) for blocker in blocked_by or ()),
    )


def connect(
    target: Target, timeout: float, session: Session, *, application_name: str = APPLICATION_NAME
) -> psycopg.Connection[Any]:
    """A bounded autocommit connection to ``target`` (libpq's connect and TCP timeouts)."""
    params: dict[str, Any] = {"application_name": application_name, **target.options}
    params.update(host=target.host or None, port=target.port, user=target.user, password=target.password)
    params["dbname"] = target.database
    bound_probe_params("libpq", params, timeout)
    connection = psycopg.connect(autocommit=True, **{key: value for key, value in params.items() if value is not None})
    try:
        session.attach(driver_fileno(connection))
    except BaseException:
        connection.close()
        raise
    return connection


def examine(target: Target, timeout: float, thresholds: Thresholds, session: Session, report: Report) -> None:
    with connect(target, timeout, session) as connection:
        connection.read_only = True
        with connection.transaction():
            connection.execute(f"SET LOCAL statement_timeout = {max(1, round(timeout * 1000))}")
            report.server = str(connection.execute("SHOW server_version").fetchone()[0])  # type: ignore[index]
            settings = dict(
                connection.execute(
                    "SELECT name, setting FROM pg_settings WHERE name = ANY(%s)", [list(_SETTINGS)]
                ).fetchall()
            )
            row = connection.execute(_CAN_SEE_ALL).fetchone()
            sees_all = bool(row and row[0])
            backends = [_backend(row) for row in connection.execute(_ACTIVITY).fetchall()]
            role_limits = connection.execute(_ROLE_LIMITS).fetchall()
            database_limits = connection.execute(_DATABASE_LIMITS).fetchall()
    _judge(
        report,
        thresholds=thresholds,
        settings=settings,
        backends=backends,
        role_limits=role_limits,
        database_limits=database_limits,
        sees_all=sees_all,
    )


def _judge(
    report: Report,
    *,
    thresholds: Thresholds,
    settings: dict[str, str],
    backends: list[Backend],
    role_limits: list[tuple[str, int, int]],
    database_limits: list[tuple[str, int, int]],
    sees_all: bool,
) -> None:
    clients = [backend for backend in backends if backend.client]
    _connections(report, thresholds, settings, clients)
    _by_application(report, clients)
    by_pid = {backend.pid: backend for backend in backends}
    _idle_in_transaction(report, thresholds, settings, clients)
    _long_queries(report, thresholds, settings, clients)
    _lock_waits(report, thresholds, clients, by_pid)
    _limits(report, "role", role_limits)
    _limits(report, "database", database_limits)
    if not sees_all:
        report.add(
            "info",
            "pg.limited_view",
            "the doctor's role sees the state of its own sessions only",
            "run it as a role granted pg_read_all_stats (or pg_monitor) to see every session",
        )


def _connections(report: Report, thresholds: Thresholds, settings: dict[str, str], clients: list[Backend]) -> None:
    max_connections = int(settings.get("max_connections", "100"))
    reserved = int(settings.get("superuser_reserved_connections", "0")) + int(settings.get("reserved_connections", "0"))
    report.facts["max_connections"] = max_connections
    report.facts["reserved_connections"] = reserved
    used = len(clients) + 1  # the doctor's own session counts too
    headroom(
        report,
        used=used,
        usable=max_connections - reserved,
        thresholds=thresholds,
        code="pg.connections",
        what=f"max_connections {max_connections}, {reserved} reserved for superusers",
        action="the next pods or workers will be refused (FATAL: too many clients); shrink the pools "
        "(poolguard budget shows the arithmetic), put PgBouncer in front, or raise max_connections",
    )


def _by_application(report: Report, clients: list[Backend]) -> None:
    counts = Counter((backend.application or "(none)", backend.state or "(hidden)") for backend in clients)
    table: dict[str, dict[str, int]] = {}
    for (application, state), count in sorted(counts.items()):
        table.setdefault(application, {})[state] = count
    report.facts["connections_by_application"] = table
    if table:
        parts = [
            f"{application}: " + ", ".join(f"{count} {state}" for state, count in states.items())
            for application, states in sorted(table.items(), key=lambda item: -sum(item[1].values()))[:10]
        ]
        report.add("info", "pg.applications", "connections by application and state: " + "; ".join(parts))


def _idle_in_transaction(
    report: Report, thresholds: Thresholds, settings: dict[str, str], clients: list[Backend]
) -> None:
    idle = sorted(
        (
            backend
            for backend in clients
            if backend.state.startswith("idle in transaction")
            and (backend.in_state or 0.0) >= thresholds.idle_in_transaction
        ),
        key=lambda backend: -(backend.in_state or 0.0),
    )
    report.facts["idle_in_transaction"] = [
        {"pid": b.pid, "user": b.user, "application": b.application, "seconds": round(b.in_state or 0.0, 1)}
        for b in idle
    ]
    if not idle:
        return
    longest = idle[0].in_state or 0.0
    critical = longest >= thresholds.idle_in_transaction_critical or len(idle) >= thresholds.many
    server_timeout = settings.get("idle_in_transaction_session_timeout", "0")
    note = "" if server_timeout in ("0", "") else f" (the server ends them after {server_timeout} ms)"
    report.add(
        "critical" if critical else "warning",
        "pg.idle_in_transaction",
        f"{len(idle)} session(s) idle in transaction for over {thresholds.idle_in_transaction:g} s, "
        f"longest {longest:.1f} s: " + ", ".join(b.named() for b in idle[:5]) + note,
        _TIMEOUT_ACTION,
    )


def _long_queries(report: Report, thresholds: Thresholds, settings: dict[str, str], clients: list[Backend]) -> None:
    slow = sorted(
        (
            backend
            for backend in clients
            if backend.state == "active" and (backend.in_query or 0.0) >= thresholds.long_query
        ),
        key=lambda backend: -(backend.in_query or 0.0),
    )
    report.facts["long_queries"] = [
        {"pid": b.pid, "user": b.user, "application": b.application, "seconds": round(b.in_query or 0.0, 1)}
        for b in slow
    ]
    if not slow:
        return
    longest = slow[0].in_query or 0.0
    critical = longest >= thresholds.long_query_critical or len(slow) >= thresholds.many
    report.add(
        "critical" if critical else "warning",
        "pg.long_queries",
        f"{len(slow)} statement(s) running for over {thresholds.long_query:g} s, longest {longest:.1f} s: "
        + ", ".join(b.named() for b in slow[:5]),
        "set statement_timeout for the application's role (server default is "
        f"{settings.get('statement_timeout', '0')} ms), look at the plan of the slow statement "
        "(pg_stat_statements), and cancel a runaway one with pg_cancel_backend(pid)",
    )


def _lock_waits(report: Report, thresholds: Thresholds, clients: list[Backend], by_pid: dict[int, Backend]) -> None:
    waiting = [backend for backend in clients if backend.waiting_on == "Lock"]
    report.facts["lock_waits"] = [
        {
            "pid": b.pid,
            "application": b.application,
            "seconds": round(b.in_query or 0.0, 1),
            "blocked_by": list(b.blocked_by),
        }
        for b in waiting
    ]
    if not waiting:
        return
    longest = max(backend.in_query or 0.0 for backend in waiting)
    blockers = sorted({pid for backend in waiting for pid in backend.blocked_by})
    described = []
    for pid in blockers[:5]:
        blocker = by_pid.get(pid)
        described.append(f"{blocker.named()}, {blocker.state or 'state hidden'}" if blocker else f"pid {pid}")
    critical = longest >= thresholds.lock_wait_critical or len(waiting) >= thresholds.many
    report.add(
        "critical" if critical else "warning",
        "pg.lock_waits",
        f"{len(waiting)} session(s) waiting on a lock, longest {longest:.1f} s: "
        + ", ".join(b.named() for b in waiting[:5])
        + (f"; blocked by {'; '.join(described)}" if described else ""),
        "find why the blocker holds its lock (a long or idle transaction); set lock_timeout so waiters give up, "
        "and end a stuck blocker with pg_terminate_backend(pid)",
    )


def _limits(report: Report, what: str, limits: list[tuple[str, int, int]]) -> None:
    report.facts[f"{what}_limits"] = {name: {"limit": limit, "connections": count} for name, limit, count in limits}
    for name, limit, count in sorted(limits):
        free = limit - count
        severity: Severity
        if free <= 0:
            severity = "critical"
        elif free <= 1 or count >= 0.8 * limit:
            severity = "warning"
        else:
            continue
        report.add(
            severity,
            f"pg.{what}_connection_limit",
            f"{what} {name!r} has {count} of its {limit} connections (CONNECTION LIMIT), {max(free, 0)} free",
            f"new connections as {name!r} will be refused: raise it (ALTER {what.upper()} {name} CONNECTION LIMIT n) "
            "or shrink the pools that log in with it",
        )
