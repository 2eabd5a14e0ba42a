"""``poolguard doctor``: examine one server within a deadline, whatever state it is in.

The examination runs in a worker thread (:func:`~poolguard.diagnose.target.within`); the caller
waits at most ``timeout`` seconds. The drivers'
own bounds (connect timeout, ``tcp_user_timeout``, read timeouts, ``statement_timeout``) end the
common cases; the deadline covers the rest (a server that accepts connections and never answers,
libpq's two-second floor on its connect timeout) by shutting the connection's socket down, so the
worker ends too. A server that cannot be reached, or does not answer in time, is itself a critical
finding, named by the error's class and the redacted target, never the password.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from poolguard.diagnose.findings import Report, Thresholds
from poolguard.diagnose.target import Kind, NoAnswer, Session, Target, within

__all__ = ["DEFAULT_TIMEOUT", "command_age", "diagnose"]

DEFAULT_TIMEOUT = 5.0
"""Seconds the whole diagnosis may take, connect included."""

EXIT_ALLOWANCE = 0.2
"""Seconds kept for the interpreter to exit after the report is printed, and for clock resolution
(0.05-0.1 s measured on a loaded 2-core machine)."""

Examine = Callable[[Target, float, Thresholds, Session, Report], None]

_DRIVERS: dict[Kind, str] = {"postgresql": "'psycopg[binary]'", "pgbouncer": "'psycopg[binary]'", "mysql": "pymysql"}


def _examiner(kind: Kind) -> Examine:
    """The examiner for ``kind``, imported on use: only its driver needs to be installed."""
    if kind == "postgresql":
        from poolguard.diagnose import postgres  # noqa: PLC0415 (its driver, on use)

        return postgres.examine
    if kind == "pgbouncer":
        from poolguard.diagnose import pgbouncer  # noqa: PLC0415 (its driver, on use)

        return pgbouncer.examine
    from poolguard.diagnose import mysql  # noqa: PLC0415 (its driver, on use)

    return mysql.examine


def diagnose(
    target: Target,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    thresholds: Thresholds | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> Report:
    """Examines ``target`` and returns the report; never raises for a server's trouble, never waits past ``timeout``."""
    limits = thresholds or Thresholds()
    session = Session()
    work = Report(target=target.shown(), kind=target.kind)
    started = clock()
    try:
        examine = _examiner(target.kind)  # imported here: a missing driver is a finding, not a timeout
    except ImportError as error:
        work.add(
            "critical",
            "driver_missing",
            f"cannot examine a {target.kind} server: {type(error).__name__}: {error}",
            f"install its driver in this environment: pip install {_DRIVERS[target.kind]}",
        )
        work.seconds = clock() - started
        return work

    try:
        within(
            timeout - (clock() - started),  # the driver's import counted
            session,
            lambda: examine(target, timeout, limits, session, work),
            name="poolguard-doctor",
        )
    except NoAnswer:
        report = Report(target=target.shown(), kind=target.kind, server=work.server)
        stage = "a query" if session.connected else "the connection"
        report.add(
            "critical",
            "unreachable" if not session.connected else "no_answer",
            f"{stage} got no answer within {timeout:.3g} s",
            _no_answer_action(target),
        )
    except Exception as error:  # reported as a finding, redacted
        report = Report(target=target.shown(), kind=target.kind, server=work.server, facts=work.facts)
        report.add("critical", *_describe_failure(target, error, connected=session.connected))
    else:
        report = work
    report.seconds = clock() - started
    return report


def command_age() -> float:
    """Seconds this process has used and will use besides the diagnosis, when it is the ``poolguard``
    command (Linux): its age, plus ``EXIT_ALLOWANCE`` for the interpreter's exit; else 0.0.

    ``poolguard doctor --timeout 5`` is what a script or a probe waits for the whole process: the
    interpreter's start, the imports and the exit count, so the diagnosis gets what is left. Called from
    another program (``poolguard.cli.main([...])`` in-process), the process's age means nothing.
    """
    script = Path(sys.argv[0] if sys.argv else "")
    if not (script.name == "poolguard" or (script.name == "__main__.py" and script.parent.name == "poolguard")):
        return 0.0
    try:
        with open("/proc/self/stat") as stat, open("/proc/uptime") as uptime:
            fields = stat.read().rpartition(")")[2].split()
            since_boot = float(uptime.read().split()[0])
        return max(0.0, since_boot - int(fields[19]) / os.sysconf("SC_CLK_TCK")) + EXIT_ALLOWANCE
    except (OSError, ValueError, IndexError):
        return 0.0


def _no_answer_action(target: Target) -> str:
    return (
        f"check that {target.shown()} is the right address and that the server is up and not overloaded "
        "(a firewall that drops packets, a stopped process or a full accept queue look like this)"
    )


def _describe_failure(target: Target, error: BaseException, *, connected: bool) -> tuple[str, str, str]:
    """(code, message, action) for an error, in the driver's words, with the password scrubbed."""
    message = target.describe(error)
    if not connected:
        return (
            "unreachable",
            f"cannot connect: {message}",
            f"check the address, port, user and password for {target.shown()}, that the server is up, "
            "and that it accepts connections from here (pg_hba.conf, max_connections, firewall)",
        )
    return (
        "query_failed",
        f"connected, but a diagnostic query failed: {message}",
        "the doctor's role may lack privileges (PostgreSQL: pg_read_all_stats or pg_monitor; MySQL: PROCESS); "
        "or the server is failing",
    )
