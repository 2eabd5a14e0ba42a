"""The doctor on the shared MariaDB server, with trouble seeded on the test's own connections only."""

from __future__ import annotations

import json
from typing import Any

import pymysql
import pytest

from poolguard.cli import main
from poolguard.diagnose.doctor import diagnose
from poolguard.diagnose.findings import Report, Thresholds
from poolguard.diagnose.target import parse_url
from tests.diagnose.conftest import Held
from tests.support.clock import wait_until
from tests.support.databases import DATABASE, HOST, MARIADB_PORT, USER, mariadb_url

pytestmark = pytest.mark.mariadb

ONE_SECOND = Thresholds().scaled(idle_in_transaction=1.0, long_query=1.0)
"""MySQL counts these durations in whole seconds."""


def connect(held: Held) -> Any:
    return held.add(
        pymysql.connect(host=HOST, port=MARIADB_PORT, user=USER, database=DATABASE, connect_timeout=5, autocommit=True)
    )


def seconds_in(held: Held, thread_id: int) -> float:
    with connect(held).cursor() as cursor:
        cursor.execute("SELECT TIME FROM information_schema.PROCESSLIST WHERE ID = %s", [thread_id])
        row = cursor.fetchone()
        return float(row[0]) if row else -1.0


def run(thresholds: Thresholds) -> Report:
    return diagnose(parse_url(mariadb_url()), timeout=5.0, thresholds=thresholds)


def test_mariadb_reports_connections_and_counters_and_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    report = run(Thresholds())
    assert "MariaDB" in report.server
    assert report.facts["max_connections"] >= report.facts["threads_connected"] >= 1
    assert {"Aborted_clients", "Aborted_connects", "Connection_errors_max_connections"} <= set(report.facts["counters"])
    assert any(finding.code == "mysql.connections" for finding in report.findings)
    assert report.seconds < 1.0
    assert main(["doctor", "--json", mariadb_url().replace("mysql+pymysql", "mariadb+pymysql")]) == 0
    assert json.loads(capsys.readouterr().out)["kind"] == "mysql"


def test_a_long_query_is_found_by_its_id(held: Held) -> None:
    busy = connect(held)
    thread_id = busy.thread_id()
    held.background(lambda: busy.cursor().execute("SELECT SLEEP(20)"))
    try:
        wait_until(lambda: seconds_in(held, thread_id) >= 1, steps=10000)
        report = run(ONE_SECOND)
    finally:
        with connect(held).cursor() as cursor:
            cursor.execute(f"KILL QUERY {int(thread_id)}")
    findings = [finding for finding in report.findings if finding.code == "mysql.long_queries"]
    assert findings, report.to_dict()
    assert f"id {thread_id} ({USER}@{DATABASE}, Query" in findings[0].message
    assert "max_statement_time" in findings[0].action
    assert "SLEEP" not in json.dumps(report.to_dict())


def test_a_connection_asleep_in_a_transaction_is_found(held: Held) -> None:
    idle = connect(held)
    with idle.cursor() as cursor:
        cursor.execute("START TRANSACTION WITH CONSISTENT SNAPSHOT")
    wait_until(lambda: seconds_in(held, idle.thread_id()) >= 2, steps=10000)
    report = run(ONE_SECOND)
    findings = [finding for finding in report.findings if finding.code == "mysql.idle_in_transaction"]
    assert findings, report.to_dict()
    assert f"id {idle.thread_id()} ({USER}@{DATABASE}, Sleep" in findings[0].message
    assert any(row["id"] == idle.thread_id() for row in report.facts["idle_in_transaction"])
