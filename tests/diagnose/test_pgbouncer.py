"""The doctor on a private PgBouncer's admin console, with clients waiting for a server connection."""

from __future__ import annotations

import json

import psycopg
import pytest

from poolguard.cli import main
from poolguard.diagnose.doctor import diagnose
from poolguard.diagnose.findings import Report, Thresholds
from poolguard.diagnose.pgbouncer import _judge
from poolguard.diagnose.target import parse_url
from tests.diagnose.conftest import ADMIN, SECRET, Held
from tests.support.clock import wait_until
from tests.support.pgcluster import PgBouncer


def waiting(bouncer: PgBouncer) -> int:
    with psycopg.connect(
        f"host=127.0.0.1 port={bouncer.port} dbname=pgbouncer user={ADMIN}", autocommit=True
    ) as console:
        cursor = psycopg.ClientCursor(console)
        cursor.execute("SHOW POOLS")
        names = [column.name for column in cursor.description or ()]
        return sum(int(dict(zip(names, row, strict=True))["cl_waiting"]) for row in cursor.fetchall())


def test_an_idle_pgbouncer_is_healthy(bouncer: PgBouncer, capsys: pytest.CaptureFixture[str]) -> None:
    report = diagnose(parse_url(bouncer.admin_url(ADMIN, password=SECRET)), timeout=5.0)
    assert report.kind == "pgbouncer"
    assert report.server.startswith("PgBouncer 1.")
    assert report.facts["config"]["pool_mode"] == "transaction"
    assert report.facts["config"]["default_pool_size"] == "2"
    assert not report.critical, report.to_dict()
    assert report.seconds < 1.0
    assert main(["doctor", bouncer.admin_url(ADMIN, password=SECRET)]) == 0
    out = capsys.readouterr().out
    assert "pool_mode transaction, default_pool_size 2" in out
    assert SECRET not in out
    assert "pgbouncer.prepared_statements" not in out  # 1.18: no max_prepared_statements


def test_max_prepared_statements_on_says_how_to_keep_the_drivers_prepares() -> None:
    """PgBouncer 1.21+ (this machine has 1.18): the finding comes from SHOW CONFIG's row, as the console gives it."""
    report = Report(kind="pgbouncer", target="127.0.0.1:6432/pgbouncer")
    config = {"pool_mode": "transaction", "max_prepared_statements": "100"}
    _judge(report, thresholds=Thresholds(), config=config, pools=[], stats=[], lists={})
    (finding,) = [finding for finding in report.findings if finding.code == "pgbouncer.prepared_statements"]
    assert finding.severity == "info"
    assert "max_prepared_statements 100" in finding.message
    assert "prepare_threshold" in finding.action
    off = Report(kind="pgbouncer", target="127.0.0.1:6432/pgbouncer")
    _judge(
        off, thresholds=Thresholds(), config={**config, "max_prepared_statements": "0"}, pools=[], stats=[], lists={}
    )
    assert "pgbouncer.prepared_statements" not in [finding.code for finding in off.findings]


def test_clients_waiting_for_a_server_connection_are_found(
    bouncer: PgBouncer, held: Held, capsys: pytest.CaptureFixture[str]
) -> None:
    for _ in range(2):  # default_pool_size: every server connection held by an open transaction
        held.pg(bouncer.port).execute("SELECT 1")
    late = held.pg(bouncer.port, autocommit=True)
    held.background(lambda: late.execute("SELECT 1"))
    wait_until(lambda: waiting(bouncer) >= 1)
    url = bouncer.admin_url(ADMIN, password=SECRET)
    report = diagnose(parse_url(url), timeout=5.0)
    findings = [finding for finding in report.findings if finding.code == "pgbouncer.clients_waiting"]
    assert findings, report.to_dict()
    assert findings[0].severity == "warning"
    assert "pool faults/app: 1 client(s) waiting" in findings[0].message
    assert "default_pool_size" in findings[0].action
    pool = next(row for row in report.facts["pools"] if row["database"] == "faults")
    assert pool["cl_waiting"] == 1
    assert pool["sv_active"] == 2
    strict = Thresholds(wait_critical=0.0)
    assert diagnose(parse_url(url), timeout=5.0, thresholds=strict).critical
    assert main(["doctor", "--json", url]) == 0  # waiting briefly is a warning, not a failure
    data = json.loads(capsys.readouterr().out)
    assert data["status"] == "warning"
    assert SECRET not in json.dumps(data)


def test_a_database_behind_pgbouncer_is_examined_through_it(bouncer: PgBouncer) -> None:
    """A DATABASE_URL that points at PgBouncer (transaction pooling) still reaches pg_stat_activity."""
    report = diagnose(parse_url(bouncer.url("psycopg", password=SECRET)), timeout=5.0)
    assert report.kind == "postgresql"
    assert report.server.startswith("15.")
    assert not report.critical, report.to_dict()
    assert any(finding.code == "pg.connections" for finding in report.findings)
