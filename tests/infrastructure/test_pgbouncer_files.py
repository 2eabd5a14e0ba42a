"""integrations/pgbouncer: the pgbouncer.ini really runs, in transaction mode, and poolguard works through it.

A temporary copy of the file, with only the addresses changed (listen address and port, the
database entry pointing at a private cluster, the auth file), starts a private PgBouncer 1.18 as the
postgres OS user. ``poolguard.create_engine(url, pgbouncer=True)`` then queries through it from more
threads than PgBouncer has server connections: the server sees at most ``max_db_connections``, and
repeated parameterised queries (which psycopg would prepare) keep working across server connections.
The stats user reads ``SHOW POOLS`` on the admin console, as ``poolguard doctor`` does.
"""

from __future__ import annotations

import configparser
import contextlib
import json
import re
import secrets
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import text

import poolguard
from poolguard.cli import main
from tests.support.pgcluster import (
    APP_USER,
    DATABASE,
    HOST,
    PGBOUNCER,
    PgCluster,
    _as_owner,
    _owned_temp_dir,
    _wait_for_port,
    free_port,
)

ROOT = Path(__file__).resolve().parents[2]
INI = ROOT / "integrations" / "pgbouncer" / "pgbouncer.ini"
USERLIST = ROOT / "integrations" / "pgbouncer" / "userlist.txt"
STATS_USER = "poolguard_doctor"
SERVER_CAP = 3
"""max_db_connections in the test's copy: small, so that sharing the server connections shows."""


def read_ini(source: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(comment_prefixes=(";", "#"), interpolation=None)
    parser.read_string(source)
    return parser


def substituted(source: str, section: str, values: dict[str, str]) -> str:
    """``source`` with the ``key = value`` lines of ``section`` replaced; every key must already be there."""
    lines = source.splitlines()
    current = None
    seen: set[str] = set()
    for index, line in enumerate(lines):
        header = re.fullmatch(r"\[(\w+)\]", line.strip())
        if header:
            current = header.group(1)
            continue
        match = re.match(r"(\w+)\s*=", line)
        if current == section and match and match.group(1) in values:
            lines[index] = f"{match.group(1)} = {values[match.group(1)]}"
            seen.add(match.group(1))
    assert seen == set(values), f"keys missing from [{section}]: {set(values) - seen}"
    return "\n".join(lines) + "\n"


@dataclass
class RunningBouncer:
    port: int
    app_password: str
    stats_password: str
    log: Path


@pytest.fixture(scope="module")
def cluster() -> Iterator[PgCluster]:
    with PgCluster.bootstrapped(max_connections=30) as server:
        server.sql(f"CREATE ROLE {STATS_USER} LOGIN")
        yield server


@contextlib.contextmanager
def running(ini: str, userlist: str, **settings: str) -> Iterator[tuple[int, Path]]:
    """PgBouncer started as the postgres OS user from ``ini`` with its listen address, port and auth
    file (holding ``userlist``) substituted, and ``settings`` too; yields its port and its log file."""
    root = _owned_temp_dir("poolguard-pgbouncer-ini-")
    port = free_port()
    (root / "userlist.txt").write_text(userlist)
    ini = substituted(
        ini,
        "pgbouncer",
        {"listen_addr": HOST, "listen_port": str(port), "auth_file": str(root / "userlist.txt"), **settings},
    )
    (root / "pgbouncer.ini").write_text(ini)
    log = root / "pgbouncer.log"
    with log.open("wb") as output:
        process = subprocess.Popen(
            [str(PGBOUNCER), str(root / "pgbouncer.ini")], stdout=output, stderr=output, **_as_owner()
        )
    try:
        _wait_for_port(port, time.monotonic() + 15, process)
        yield port, log
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def bouncer(cluster: PgCluster) -> Iterator[RunningBouncer]:
    app_password, stats_password = secrets.token_hex(8), secrets.token_hex(8)
    ini = substituted(INI.read_text(), "databases", {"app": f"host={HOST} port={cluster.port} dbname={DATABASE}"})
    userlist = f'"{APP_USER}" "{app_password}"\n"{STATS_USER}" "{stats_password}"\n'
    with running(ini, userlist, max_db_connections=str(SERVER_CAP)) as (port, log):
        yield RunningBouncer(port=port, app_password=app_password, stats_password=stats_password, log=log)


def test_the_ini_is_transaction_pooling_with_the_documented_settings() -> None:
    settings = read_ini(INI.read_text())["pgbouncer"]
    assert settings["pool_mode"] == "transaction"
    assert settings["ignore_startup_parameters"] == "extra_float_digits"  # "options" is refused on purpose
    assert int(settings["reserve_pool_size"]) == 0
    assert int(settings["default_pool_size"]) <= int(settings["max_db_connections"])
    assert STATS_USER in settings["stats_users"]
    for key in ("server_lifetime", "server_idle_timeout", "idle_transaction_timeout", "query_wait_timeout"):
        assert int(settings[key]) > 0, key
    assert settings["auth_type"] == "scram-sha-256"


def test_the_userlist_example_holds_no_secret_and_names_every_user_the_ini_does() -> None:
    users = dict(re.findall(r'^"([^"]+)" "([^"]+)"$', USERLIST.read_text(), flags=re.MULTILINE))
    settings = read_ini(INI.read_text())["pgbouncer"]
    assert set(users) == {"app", settings["admin_users"], settings["stats_users"]}
    assert all("PLACEHOLDER" in secret for secret in users.values())


def test_create_engine_with_pgbouncer_true_queries_through_it(cluster: PgCluster, bouncer: RunningBouncer) -> None:
    url = f"postgresql+psycopg://{APP_USER}:{bouncer.app_password}@{HOST}:{bouncer.port}/app"
    workers = 4 * SERVER_CAP
    engine = poolguard.create_engine(url, service_name="pgbouncer-ini", workers=workers, pgbouncer=True)
    guard = poolguard.Guard(engine, name="through-pgbouncer")
    seen_backends: set[int] = set()
    most_on_server = 0
    lock = threading.Lock()

    def work(worker: int) -> int:
        nonlocal most_on_server
        total = 0
        for round_ in range(12):  # more than psycopg's prepare_threshold (5): prepared if it were on
            with guard.session() as session:
                row = session.execute(
                    text("SELECT pg_backend_pid(), CAST(:n AS int) + 1, pg_sleep(0.005)"), {"n": worker * 100 + round_}
                ).one()
                total += row[1]
                on_server = len(cluster.backends(user=APP_USER))
                with lock:
                    seen_backends.add(row[0])
                    most_on_server = max(most_on_server, on_server)
        return total

    try:
        with ThreadPoolExecutor(workers) as pool:
            totals = list(pool.map(work, range(workers)))
        assert totals == [sum(worker * 100 + round_ + 1 for round_ in range(12)) for worker in range(workers)]
        assert guard.health().status == "ok"
        assert guard.stats().timeouts == 0
    finally:
        guard.close()
        engine.dispose()
    # Twelve clients shared at most SERVER_CAP server connections: transaction pooling with the cap.
    assert 1 <= len(seen_backends) <= SERVER_CAP
    assert most_on_server <= SERVER_CAP
    assert bouncer.app_password not in bouncer.log.read_text()


def test_the_stats_user_reads_show_pools_on_the_admin_console(bouncer: RunningBouncer) -> None:
    conninfo = f"host={HOST} port={bouncer.port} dbname=pgbouncer user={STATS_USER} connect_timeout=5"
    with psycopg.connect(
        conninfo, password=bouncer.stats_password, autocommit=True, cursor_factory=psycopg.ClientCursor
    ) as console:
        cursor = console.cursor()
        cursor.execute("SHOW POOLS")
        columns = [column.name for column in cursor.description or ()]
        rows = [dict(zip(columns, row, strict=True)) for row in cursor.fetchall()]
    assert {"database", "user", "cl_active", "cl_waiting", "sv_active", "sv_idle", "maxwait", "pool_mode"} <= set(
        columns
    )
    app = [row for row in rows if row["database"] == "app"]
    assert app
    assert {row["pool_mode"] for row in app} == {"transaction"}


def test_a_client_sending_options_is_refused_not_silently_stripped(bouncer: RunningBouncer) -> None:
    conninfo = f"host={HOST} port={bouncer.port} dbname=app user={APP_USER} connect_timeout=5"
    with pytest.raises(psycopg.OperationalError, match="unsupported startup parameter: options"):
        psycopg.connect(conninfo, password=bouncer.app_password, options="-c statement_timeout=1000")


def test_pgbouncer_reads_the_userlist_example_and_knows_its_users() -> None:
    """The example's format is PgBouncer's: with it, PgBouncer starts and knows "app" (a wrong secret
    fails authentication) and not a user it does not list."""
    with running(INI.read_text(), USERLIST.read_text()) as (port, log):
        for user in (APP_USER, "nobody"):
            conninfo = f"host={HOST} port={port} dbname=app user={user} connect_timeout=5"
            with pytest.raises(psycopg.OperationalError, match="authentication failed"):
                psycopg.connect(conninfo, password="not-the-secret")
        logged = log.read_text()
    assert "no such user: nobody" in logged
    assert f"no such user: {APP_USER}" not in logged


def test_budget_reads_the_servers_limits_through_pgbouncer(
    cluster: PgCluster, bouncer: RunningBouncer, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"postgresql://{APP_USER}:{bouncer.app_password}@{HOST}:{bouncer.port}/app"
    code = main(["budget", "--url", url, "--service", "orders:replicas=2,workers=4,pgbouncer=true", "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    server = json.loads(out)["server"]
    assert server["max_connections"] == int(cluster.sql("SHOW max_connections")[0][0])
    assert server["source"] == f"postgresql at {HOST}:{bouncer.port}"
    assert bouncer.app_password not in out + err
