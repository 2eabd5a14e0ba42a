"""``manage.py poolguard doctor``: what poolguard sees of this project's databases, from this process.

It reports, per guarded alias (and the SQLAlchemy pool when configured): how connections are
handled, the pool counts, the breaker state and a live ping bounded by ``PING_TIMEOUT``. A fresh
management process has served no requests, so its breaker is closed and its counts are its own.
Beside the ping, the server-side doctor (:mod:`poolguard.diagnose`, as ``poolguard doctor URL``) examines each
guarded alias's server, once per server, from the alias's HOST, PORT, NAME, USER, PASSWORD and
OPTIONS. Exits non-zero when a database does not answer or the doctor finds something critical.
"""

from __future__ import annotations

import argparse
import json
import math
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from django.apps import apps  # type: ignore[import-untyped]
from django.core.management.base import BaseCommand, CommandError, CommandParser  # type: ignore[import-untyped]
from django.db import connections  # type: ignore[import-untyped]

from poolguard.diagnose.doctor import DEFAULT_TIMEOUT, diagnose
from poolguard.diagnose.findings import render_text
from poolguard.diagnose.target import Target, target_from_django
from poolguard.health import PoolHealth


class Command(BaseCommand):  # type: ignore[misc]
    help = "poolguard for Django: 'doctor' reports the guarded databases (connection handling, counts, breaker, ping)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("action", choices=["doctor"], help="doctor: report the guarded databases")
        parser.add_argument("--json", action="store_true", help="print the health report as JSON")
        parser.add_argument(
            "--timeout",
            type=_timeout,
            default=DEFAULT_TIMEOUT,
            help=f"seconds the server-side doctor may take per server (default: {DEFAULT_TIMEOUT:g})",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        state = apps.get_app_config("poolguard").require_state()
        targets = _targets(list(state.guards))
        # The server-side doctor runs beside the ping, so a silent database costs the longer wait, not both.
        with ThreadPoolExecutor(max_workers=max(1, len(targets)), thread_name_prefix="poolguard-doctor") as workers:
            pending = [workers.submit(diagnose, target, timeout=options["timeout"]) for target in targets]
            report = state.health(max_age=0.0)  # a command-line check asks the database now
            servers = [(aliases, future.result()) for aliases, future in zip(targets.values(), pending, strict=True)]
        if options["json"]:
            data = report.to_dict()
            data["doctor"] = [{"aliases": aliases, **found.to_dict()} for aliases, found in servers]
            self.stdout.write(json.dumps(data, indent=2))
        else:
            self.stdout.write("poolguard doctor (what this process sees of the guarded databases)")
            for pool in report.pools:
                kind = state.pools[pool.name].describe() if pool.name in state.pools else "SQLAlchemy engine"
                self.stdout.write(_line(pool, kind))
            for issue in report.to_dict()["issues"]:
                self.stdout.write(f"  issue: {issue}")
            self.stdout.write(f"status: {report.status}")
            for aliases, found in servers:
                self.stdout.write("")
                self.stdout.write(f"database {', '.join(aliases)}: what the server sees")
                self.stdout.write(render_text(found))
        if report.status == "unavailable":
            raise CommandError("poolguard: a guarded database is unavailable (see above)")
        if any(found.critical for _, found in servers):
            raise CommandError("poolguard: the server-side doctor found a critical problem (see above)")


def _timeout(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not 0.0 < seconds <= 60.0:
        raise argparse.ArgumentTypeError(f"expected a number of seconds above 0 and up to 60, got {value!r}")
    return seconds


def _targets(aliases: list[str]) -> dict[Target, list[str]]:
    """Each server the aliases use, with the aliases on it: a server is examined once however many share it."""
    shared: dict[Target, list[str]] = {}
    for alias in aliases:
        target = target_from_django(connections[alias].settings_dict)
        if target is not None:
            shared.setdefault(target, []).append(alias)
    return shared


def _line(pool: PoolHealth, kind: str) -> str:
    data = pool.to_dict()
    ping = pool.ping
    if ping is None:
        ping_text = "not pinged"
    elif ping.error is not None:
        ping_text = f"ping failed ({ping.error})"
    else:
        ping_text = f"ping {1000 * (ping.seconds or 0.0):.1f} ms"
    size = "unbounded" if data["size"] is None else str(data["size"])
    return (
        f"- {pool.name} [{data['backend']}] {pool.status}: {kind}; size {size}, checked out "
        f"{data['checked_out']}, idle {data['idle']}; breaker {data['breaker']['state']}; {ping_text}"
    )
