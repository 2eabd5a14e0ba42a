"""The ``poolguard`` console script (also ``python -m poolguard``).

Subcommands are added as they exist; each parses and validates its own options, so a bad value
fails before anything connects, with exit code 2 and a message naming the option. ``main`` returns
the exit code instead of exiting, so tests and other programs can call it in-process.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import URL, make_url

from poolguard._validate import positive_int
from poolguard._version import __version__
from poolguard.demo import run_demo
from poolguard.demo_report import DemoSettings, render_report
from poolguard.diagnose import budget_input
from poolguard.diagnose.budget import ServerLimits, assess
from poolguard.diagnose.budget_report import render as render_budget
from poolguard.diagnose.doctor import DEFAULT_TIMEOUT, command_age, diagnose
from poolguard.diagnose.findings import Thresholds, render_text
from poolguard.diagnose.target import Target, TargetError, parse_url
from poolguard.errors import ConfigError, PoolGuardError

__all__ = ["main"]

_MIN_SECONDS, _MAX_SECONDS = 0.5, 60.0
_MAX_CLIENTS = 256
_MIN_DOCTOR_SECONDS = 0.25  # what a healthy server needs, at the least, after a slow start

_DEMO_DESCRIPTION = """\
Run the example app twice with the same load, once on a plain SQLAlchemy engine and once through
poolguard.Guard, and print the results side by side:

  overload   several times more requests than the pool can serve: the plain pool queues them past
             the callers' deadline; the guard sheds the excess at once (503) and serves the rest in time.
  outage     the database becomes unreachable for a while: every plain request hangs for the connect
             timeout and fails (500); the guard's circuit breaker opens after a few failures and
             refuses at once (503 + Retry-After), then probes and closes when the database is back.

Needs no setup: by default it runs on a temporary SQLite file. Times are scaled down (a 3 s
pool_timeout stands for SQLAlchemy's default 30 s) so the whole run takes about 25 seconds.
"""

_DEMO_EPILOG = """\
examples:
  poolguard demo
  poolguard demo --url postgresql+psycopg://app@127.0.0.1/app --clients 48
  poolguard demo --json --seconds 2

The URL's password is never printed.
"""


_DOCTOR_DESCRIPTION = """\
Examine a database server as the fleet sees it, and say what to do about what it finds:

  PostgreSQL  pg_stat_activity: connections by application and state, sessions idle in transaction,
              long-running statements, sessions waiting on locks (and who blocks them),
              max_connections and reserved slots (headroom), roles and databases near their
              CONNECTION LIMIT
  MySQL       the processlist (by user, database and command; long-running; asleep inside a
              transaction), Threads_connected against max_connections, Aborted_* and
              Connection_errors_* counters
  PgBouncer   the admin console (a URL whose database is "pgbouncer"): SHOW POOLS (clients
              waiting, maxwait), SHOW STATS, SHOW CONFIG

The whole run, connect included, ends within --timeout: a server that does not answer is itself a
critical finding. Statement text is never shown (it can hold parameters); neither is the password.
"""

_DOCTOR_EPILOG = """\
The URL may also come from the DATABASE_URL environment variable (which keeps a password off the
command line). SQLAlchemy forms (postgresql+psycopg://, mysql+pymysql://) are accepted.

exit codes:
  0  healthy, or only warnings and information
  1  a critical finding (the server is unreachable, nearly out of connections, ...)
  2  a bad option or URL

examples:
  poolguard doctor postgresql://monitor@db.internal/app
  DATABASE_URL=mysql://app:...@127.0.0.1/app poolguard doctor --json
  poolguard doctor postgresql://admin@pgbouncer.internal:6432/pgbouncer --timeout 2
"""


def _server_url(value: str) -> Target:
    """The URL of a server to read (doctor, budget --url); the error never echoes the value (it may hold a password)."""
    try:
        return parse_url(value)
    except TargetError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _threshold(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not 0.0 < seconds <= 86400.0:
        raise argparse.ArgumentTypeError(f"expected a number of seconds above 0 and up to 86400, got {value!r}")
    return seconds


def _seconds(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not _MIN_SECONDS <= seconds <= _MAX_SECONDS:
        raise argparse.ArgumentTypeError(
            f"expected a number of seconds from {_MIN_SECONDS:g} to {_MAX_SECONDS:g}, got {value!r}"
        )
    return seconds


def _clients(value: str) -> int:
    try:
        clients = int(value)
    except ValueError:
        clients = 0
    if not 1 <= clients <= _MAX_CLIENTS:
        raise argparse.ArgumentTypeError(f"expected a whole number from 1 to {_MAX_CLIENTS}, got {value!r}")
    return clients


def _sync_url(value: str) -> URL:
    """A URL whose dialect is installed and synchronous; the value is never echoed (it may hold a password)."""
    try:
        url = make_url(value)
    except (sa_exc.ArgumentError, ValueError):
        raise argparse.ArgumentTypeError(
            "not a SQLAlchemy URL; expected e.g. postgresql+psycopg://user@host/dbname"
        ) from None
    shown = url.render_as_string(hide_password=True)
    try:
        dialect = url.get_dialect()
    except sa_exc.NoSuchModuleError:
        raise argparse.ArgumentTypeError(f"no SQLAlchemy dialect installed for {shown}") from None
    if dialect.is_async:
        raise argparse.ArgumentTypeError(
            f"{shown} names an asyncio driver; the demo needs a synchronous one (e.g. postgresql+psycopg)"
        )
    return url


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="poolguard",
        description="Keeps a web service's database connection pool healthy from inside the app.",
    )
    parser.add_argument("--version", action="version", version=f"poolguard {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    demo = commands.add_parser(
        "demo",
        help="overload and outage, unguarded vs guarded, side by side (no setup needed)",
        description=_DEMO_DESCRIPTION,
        epilog=_DEMO_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo.add_argument(
        "--url",
        type=_sync_url,
        default=None,
        help="a SQLAlchemy URL with a synchronous driver, e.g. postgresql+psycopg://user@host/db "
        "(default: a temporary SQLite file)",
    )
    demo.add_argument(
        "--clients",
        type=_clients,
        default=32,
        help=f"concurrent clients in the overload phase, 1 to {_MAX_CLIENTS} (default: 32)",
    )
    demo.add_argument(
        "--seconds",
        type=_seconds,
        default=4.0,
        help=f"length of each phase in seconds, {_MIN_SECONDS:g} to {_MAX_SECONDS:g} (default: 4); the outage's "
        "connect timeout and the breaker's open interval scale with it",
    )
    demo.add_argument("--json", action="store_true", help="print the numbers as JSON instead of the table")
    demo.set_defaults(handler=_run_demo)

    doctor = commands.add_parser(
        "doctor",
        help="what the database server sees: connections, idle transactions, long queries, locks, headroom",
        description=_DOCTOR_DESCRIPTION,
        epilog=_DOCTOR_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    doctor.add_argument(
        "url",
        metavar="URL",
        nargs="?",
        type=_server_url,
        default=os.environ.get("DATABASE_URL") or None,
        help="postgresql://, mysql:// (or mariadb://) URL, or PgBouncer's admin console "
        "postgresql://user@host:6432/pgbouncer (default: $DATABASE_URL)",
    )
    doctor.add_argument("--json", action="store_true", help="print the report as JSON")
    doctor.add_argument(
        "--timeout",
        type=_seconds,
        default=DEFAULT_TIMEOUT,
        help=f"seconds the whole command may take, start and connect included, {_MIN_SECONDS:g} to {_MAX_SECONDS:g} "
        f"(default: {DEFAULT_TIMEOUT:g})",
    )
    defaults = Thresholds()
    doctor.add_argument(
        "--long-query",
        type=_threshold,
        default=defaults.long_query,
        metavar="SECONDS",
        help=f"a statement running this long is a warning, {defaults.long_query_critical / defaults.long_query:g}x "
        f"as long critical (default: {defaults.long_query:g})",
    )
    doctor.add_argument(
        "--idle-in-transaction",
        type=_threshold,
        default=defaults.idle_in_transaction,
        metavar="SECONDS",
        help="a session idle inside a transaction this long is a warning, "
        f"{defaults.idle_in_transaction_critical / defaults.idle_in_transaction:g}x as long critical "
        f"(default: {defaults.idle_in_transaction:g})",
    )
    doctor.set_defaults(handler=_run_doctor)
    _add_budget(commands)
    return parser


def _run_demo(args: argparse.Namespace) -> int:
    url: URL | None = args.url
    settings = DemoSettings(clients=args.clients, seconds=args.seconds)
    shown = "SQLite" if url is None else url.render_as_string(hide_password=True)
    try:
        report = run_demo(url, settings, progress=_stderr)
    except (sa_exc.SQLAlchemyError, PoolGuardError, OSError, ImportError) as error:
        _stderr(f"poolguard demo: cannot run against {shown}: {_describe(error, url)}")
        return 1
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(render_report(report))
    return 0


def _run_doctor(args: argparse.Namespace) -> int:
    target: Target | None = args.url
    if target is None:
        _stderr("poolguard doctor: no URL: give one (poolguard doctor URL) or set DATABASE_URL")
        return 2
    thresholds = Thresholds().scaled(idle_in_transaction=args.idle_in_transaction, long_query=args.long_query)
    timeout = max(args.timeout - command_age(), _MIN_DOCTOR_SECONDS)  # the process's start counts too
    report = diagnose(target, timeout=timeout, thresholds=thresholds)
    print(json.dumps(report.to_dict(), indent=2) if args.json else render_text(report))
    return report.exit_code


_BUDGET_DESCRIPTION = """\
Check that a fleet's connection pools fit one database server:

  per service   replicas x processes x (pool_size + max_overflow + other)
  demand        the sum over the services; the peak adds the largest one service's rollout surge
                (Kubernetes' maxSurge, 25 % by default: new pods start before old ones stop)
  usable        max_connections - reserved (superuser_reserved_connections, + reserved_connections)
  verdict       over when the peak exceeds usable, tight when it leaves less than the margin free
                (admin sessions, migrations, cron jobs), fits otherwise

When it does not fit it says what does: pool sizes (the room shared in proportion to current
demand) or PgBouncer settings (default_pool_size, max_db_connections, max_client_conn).

A service: NAME:replicas=N[,processes=N][,workers=N][,pool_size=N][,max_overflow=N]
[,pgbouncer=true][,other=N][,max_surge=N|P%]. workers is poolguard.create_engine's (the pool is
sized as create_engine(workers=N) does when pool_size is not given); processes are per pod.
The same keys in a TOML file (--file), documented in docs/fleet.md.
"""

_BUDGET_EPILOG = """\
exit codes: 0 fits (or tight), 1 over budget, 2 bad usage or input, 3 the server could not be read

examples:
  poolguard budget --max-connections 200 --service orders:replicas=10,pool_size=20 \\
      --service billing:replicas=5,pool_size=20 --service search:replicas=8,pool_size=20
  poolguard budget --file fleet.toml --url postgresql://app@db/orders --json
  poolguard budget --file fleet.toml --max-connections 100 --pgbouncer instances=2,max_db_connections=40

The URL's password is never printed.
"""


def _add_budget(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    budget = commands.add_parser(
        "budget",
        help="do the fleet's pools fit max_connections? a verdict, and the pool or PgBouncer sizes that fit",
        description=_BUDGET_DESCRIPTION,
        epilog=_BUDGET_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    budget.add_argument(
        "--service",
        action="append",
        default=[],
        metavar="SPEC",
        help="a service, NAME:replicas=N[,KEY=VALUE,...] with the keys listed above (repeatable)",
    )
    budget.add_argument("--file", type=Path, default=None, help="a TOML fleet file ([services.NAME] tables)")
    server = budget.add_mutually_exclusive_group()
    server.add_argument("--max-connections", type=int, default=None, metavar="N", help="the server's max_connections")
    server.add_argument(
        "--url",
        type=_server_url,
        default=None,
        help="read max_connections and the reserved slots from this server: postgresql://user@host[:port]/db "
        "or mysql://... (SQLAlchemy forms accepted)",
    )
    budget.add_argument(
        "--reserved",
        type=int,
        default=None,
        metavar="N",
        help="slots reserved for superusers (default with --max-connections: 3, PostgreSQL's default)",
    )
    budget.add_argument(
        "--margin", default=None, metavar="N|P%", help="connections to keep free, N or P%% (default: 10%%)"
    )
    budget.add_argument(
        "--max-surge", default=None, metavar="N|P%", help="extra pods during a rollout, N or P%% (default: 25%%)"
    )
    budget.add_argument(
        "--pgbouncer", default=None, metavar="SPEC", help="PgBouncer in front: instances=N,max_db_connections=N,..."
    )
    budget.add_argument(
        "--timeout",
        type=_seconds,
        default=5.0,
        metavar="SECONDS",
        help=f"seconds the whole read with --url may take, connect included, {_MIN_SECONDS:g} to {_MAX_SECONDS:g} "
        "(default: 5)",
    )
    budget.add_argument("--json", action="store_true", help="print the result as JSON")
    budget.set_defaults(handler=_run_budget)


def _run_budget(args: argparse.Namespace) -> int:
    try:
        from_file = budget_input.load_file(args.file) if args.file is not None else {}
        services = (*from_file.get("services", ()), *(budget_input.parse_service(spec) for spec in args.service))
        if not services:
            raise ConfigError("--service", "(none)", "at least one --service, or a --file with [services.NAME]")
        pgbouncer = (
            budget_input.parse_pgbouncer(args.pgbouncer) if args.pgbouncer is not None else from_file.get("pgbouncer")
        )
        margin = budget_input.quantity("--margin", args.margin) if args.margin is not None else from_file.get("margin")
        max_surge = (
            budget_input.quantity("--max-surge", args.max_surge)
            if args.max_surge is not None
            else from_file.get("max_surge")
        )
        fleet = budget_input.fleet(services, margin=margin, max_surge=max_surge, pgbouncer=pgbouncer)
        limits = _budget_limits(args, from_file)
    except ConfigError as error:
        _stderr(f"poolguard budget: {error}")
        return 2
    except budget_input.LimitsUnavailable as error:
        _stderr(f"poolguard budget: {error}")
        return 3
    result = assess(fleet, limits)
    print(json.dumps(result.to_dict(), indent=2) if args.json else render_budget(result))
    return result.exit_code


def _budget_limits(args: argparse.Namespace, from_file: dict[str, Any]) -> ServerLimits:
    if args.url is not None:
        if args.reserved is not None:
            raise ConfigError("--reserved", args.reserved, "nothing with --url: the server's own settings are read")
        return budget_input.read_limits(args.url, timeout=args.timeout)
    maximum = args.max_connections if args.max_connections is not None else from_file.get("max_connections")
    if maximum is None:
        raise ConfigError("--max-connections", "(missing)", "a whole number, or --url to read it from the server")
    reserved = args.reserved if args.reserved is not None else from_file.get("reserved", 3)
    positive_int("--max-connections", maximum)
    if not isinstance(reserved, int) or not 0 <= reserved < maximum:
        raise ConfigError("--reserved", reserved, f"a whole number from 0 to max_connections - 1 ({maximum - 1})")
    return ServerLimits(max_connections=maximum, reserved=reserved)


def _describe(error: BaseException, url: URL | None) -> str:
    """The error's class and first line, with the driver's message rather than SQLAlchemy's wrapper."""
    if isinstance(error, sa_exc.DBAPIError) and error.orig is not None:
        error = error.orig
    lines = str(error).strip().splitlines()
    message = f"{type(error).__name__}: {lines[0] if lines else ''}".rstrip(": ")
    password = url.password if url is not None else None
    if password:
        message = message.replace(str(password), "***")
    return message


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``poolguard`` script; returns the exit code (2 for a bad option)."""
    parser = _build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        # argparse exits for --help (0) and for bad options (2); report the code instead.
        return exit_.code if isinstance(exit_.code, int) else 0
    handler: Callable[[argparse.Namespace], int] = args.handler
    return handler(args)
