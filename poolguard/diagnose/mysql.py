"""The doctor's MySQL/MariaDB examination: the processlist, connection limits and status counters.

One pymysql connection with connect, read and write timeouts; the processlist is read without its
``INFO`` column (the statement text, which can hold parameters). Counters such as
``Aborted_connects`` run since the server started, so they are judged against ``Connections``.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pymysql  # type: ignore[import-untyped]

from poolguard.diagnose.findings import Report, Thresholds, headroom
from poolguard.diagnose.target import Session, Target
from poolguard.pools import driver_fileno

_VARIABLES = ("max_connections", "max_user_connections", "wait_timeout", "max_execution_time", "max_statement_time")

_PROCESSLIST = (
    "SELECT ID, USER, HOST, DB, COMMAND, TIME, STATE FROM information_schema.PROCESSLIST WHERE ID <> CONNECTION_ID()"
)

_OPEN_TRANSACTIONS = (
    "SELECT trx_mysql_thread_id, TIMESTAMPDIFF(SECOND, trx_started, NOW()) FROM information_schema.INNODB_TRX"
)

_QUIET = frozenset({"Daemon", "Binlog Dump", "Binlog Dump GTID", "Slave_IO", "Slave_SQL", "Slave_worker"})
"""Processlist commands of the server's own threads, not clients."""

_SLEEP_INFO = 300.0
"""Seconds asleep after which idle connections are worth a line (pools keeping idle connections)."""


def connect(target: Target, timeout: float, session: Session, *, program_name: str = "poolguard doctor") -> Any:
    """A bounded pymysql connection (connect, read and write timeouts of ``timeout``)."""
    seconds = max(0.1, timeout)
    connection = pymysql.connect(
        host=target.host,
        port=target.port,
        user=target.user or "",
        password=target.password or "",
        database=target.database,
        connect_timeout=seconds,
        read_timeout=seconds,
        write_timeout=seconds,
        autocommit=True,
        program_name=program_name,
        **target.options,
    )
    try:
        session.attach(driver_fileno(connection))
    except BaseException:
        connection.close()
        raise
    return connection


def examine(target: Target, timeout: float, thresholds: Thresholds, session: Session, report: Report) -> None:
    connection = connect(target, timeout, session)
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT VERSION()")
            report.server = str(cursor.fetchone()[0])
            cursor.execute("SHOW GLOBAL VARIABLES")
            variables = {str(name): str(value) for name, value in cursor.fetchall() if name in _VARIABLES}
            cursor.execute("SHOW GLOBAL STATUS")
            status = {str(name): str(value) for name, value in cursor.fetchall()}
            cursor.execute(_PROCESSLIST)
            processes = list(cursor.fetchall())
            transactions: dict[int, float] = {}
            try:
                cursor.execute(_OPEN_TRANSACTIONS)
                transactions = {int(thread): float(seconds or 0) for thread, seconds in cursor.fetchall()}
            except pymysql.err.MySQLError:
                report.add("info", "mysql.no_innodb_trx", "cannot read information_schema.INNODB_TRX", "grant PROCESS")
    finally:
        connection.close()
    _judge(
        report,
        thresholds=thresholds,
        variables=variables,
        status=status,
        processes=processes,
        transactions=transactions,
    )


def _judge(
    report: Report,
    *,
    thresholds: Thresholds,
    variables: dict[str, str],
    status: dict[str, str],
    processes: list[tuple[Any, ...]],
    transactions: dict[int, float],
) -> None:
    clients = [row for row in processes if row[4] not in _QUIET and row[1] not in ("system user", "event_scheduler")]
    max_connections = int(variables.get("max_connections", "151"))
    report.facts["max_connections"] = max_connections
    report.facts["threads_connected"] = int(status.get("Threads_connected", "0"))
    headroom(
        report,
        used=int(status.get("Threads_connected", str(len(clients) + 1))),
        usable=max_connections,
        thresholds=thresholds,
        code="mysql.connections",
        what=f"Threads_connected against max_connections {max_connections}; one more is kept for SUPER",
        action="the next pods or workers will be refused (Too many connections); shrink the pools "
        "(poolguard budget), lower wait_timeout so abandoned connections go, or raise max_connections",
    )
    _by_user(report, clients)
    _long_queries(report, thresholds, clients)
    _open_transactions(report, thresholds, clients, transactions)
    _counters(report, status)


def _by_user(report: Report, clients: list[tuple[Any, ...]]) -> None:
    counts = Counter((str(row[1]), str(row[3] or ""), str(row[4])) for row in clients)
    table = [
        {"user": user, "db": db, "command": command, "count": n} for (user, db, command), n in sorted(counts.items())
    ]
    report.facts["connections_by_user"] = table
    hosts = Counter(str(row[2] or "").rpartition(":")[0] or str(row[2] or "") for row in clients)
    report.facts["connections_by_host"] = dict(hosts.most_common(20))
    if table:
        parts = [f"{row['user']}@{row['db'] or '-'} {row['command']}: {row['count']}" for row in table[:10]]
        report.add("info", "mysql.users", "connections by user, database and command: " + "; ".join(parts))
    asleep = [row for row in clients if row[4] == "Sleep" and float(row[5] or 0) >= _SLEEP_INFO]
    if asleep:
        report.add(
            "info",
            "mysql.sleeping",
            f"{len(asleep)} connection(s) asleep for over {_SLEEP_INFO:g} s "
            f"(longest {max(float(r[5]) for r in asleep):.0f} s)",
            "idle pooled connections hold slots: cap the pools' idle size or recycle them before wait_timeout",
        )


def _named(row: tuple[Any, ...]) -> str:
    return f"id {row[0]} ({row[1]}@{row[3] or '-'}, {row[4]}, {row[6] or 'no state'}, {float(row[5] or 0):.0f} s)"


def _long_queries(report: Report, thresholds: Thresholds, clients: list[tuple[Any, ...]]) -> None:
    slow = sorted(
        (row for row in clients if row[4] in ("Query", "Execute") and float(row[5] or 0) >= thresholds.long_query),
        key=lambda row: -float(row[5] or 0),
    )
    report.facts["long_queries"] = [{"id": row[0], "user": row[1], "seconds": float(row[5] or 0)} for row in slow]
    if not slow:
        return
    longest = float(slow[0][5] or 0)
    critical = longest >= thresholds.long_query_critical or len(slow) >= thresholds.many
    report.add(
        "critical" if critical else "warning",
        "mysql.long_queries",
        f"{len(slow)} statement(s) running for over {thresholds.long_query:g} s: " + ", ".join(map(_named, slow[:5])),
        "bound statements (MySQL: max_execution_time; MariaDB: max_statement_time), look at the plan "
        "(EXPLAIN, the slow query log), and end a runaway one with KILL QUERY id",
    )


def _open_transactions(
    report: Report, thresholds: Thresholds, clients: list[tuple[Any, ...]], transactions: dict[int, float]
) -> None:
    idle = [
        (row, transactions[int(row[0])])
        for row in clients
        if row[4] == "Sleep"
        and int(row[0]) in transactions
        and transactions[int(row[0])] >= thresholds.idle_in_transaction
    ]
    report.facts["idle_in_transaction"] = [{"id": row[0], "user": row[1], "seconds": seconds} for row, seconds in idle]
    if not idle:
        return
    longest = max(seconds for _, seconds in idle)
    critical = longest >= thresholds.idle_in_transaction_critical or len(idle) >= thresholds.many
    report.add(
        "critical" if critical else "warning",
        "mysql.idle_in_transaction",
        f"{len(idle)} connection(s) asleep inside an open transaction, longest {longest:.0f} s: "
        + ", ".join(_named(row) for row, _ in idle[:5]),
        "find the code path that opens a transaction and then waits; lower wait_timeout / innodb_lock_wait_timeout",
    )


def _counters(report: Report, status: dict[str, str]) -> None:
    def number(name: str) -> int:
        try:
            return int(status.get(name, "0"))
        except ValueError:
            return 0

    connections = number("Connections")
    counters = {name: number(name) for name in status if name.startswith(("Aborted_", "Connection_errors_"))}
    report.facts["counters"] = {"Connections": connections, "Uptime": number("Uptime"), **counters}
    aborted_connects = number("Aborted_connects")
    if aborted_connects > 10 and aborted_connects > 0.01 * connections:
        report.add(
            "warning",
            "mysql.aborted_connects",
            f"{aborted_connects} of {connections} connection attempts failed since the server started "
            "(Aborted_connects)",
            "look for wrong passwords, clients that time out during the handshake (connect_timeout) and port scans",
        )
    aborted_clients = number("Aborted_clients")
    if aborted_clients:
        report.add(
            "info",
            "mysql.aborted_clients",
            f"{aborted_clients} connections were dropped without a proper close since the server started "
            "(Aborted_clients)",
            "clients that exit without closing, or connections idle past wait_timeout: close pools at shutdown "
            "and recycle idle connections before wait_timeout",
        )
    refused = number("Connection_errors_max_connections")
    if refused:
        report.add(
            "warning",
            "mysql.refused_max_connections",
            f"{refused} connections were refused because max_connections was reached (since the server started)",
            "the fleet's pools add up to more than the server allows: run poolguard budget",
        )
    others = {
        name: n
        for name, n in counters.items()
        if name.startswith("Connection_errors_") and n and name != "Connection_errors_max_connections"
    }
    if others:
        report.add(
            "info",
            "mysql.connection_errors",
            "connection errors since the server started: "
            + ", ".join(f"{name} {n}" for name, n in sorted(others.items())),
        )
