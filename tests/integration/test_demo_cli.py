"""`poolguard demo` end to end: the CLI in-process on SQLite and PostgreSQL, and its option checks.

The demo is the project's main job, so these tests hold it to its claims with short phases: under
overload the guard sheds instead of queueing past the deadline, and in an outage it fails fast.
"""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import make_url

from poolguard.cli import main
from poolguard.demo import DemoSettings, create_sqlite_schema, open_side, run_outage, run_overload

SECONDS = 2.0


def run_json(*args: str) -> dict[str, Any]:
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main(["demo", "--json", *args])
    assert code == 0, stderr.getvalue()
    report: dict[str, Any] = json.loads(stdout.getvalue())
    return report


@pytest.fixture(scope="module")
def sqlite_report() -> dict[str, Any]:
    """One short demo run on the default temporary SQLite file, shared by the assertions below."""
    return run_json("--seconds", str(SECONDS))


def test_overload_guard_sheds_instead_of_queueing(sqlite_report: dict[str, Any]) -> None:
    plain = sqlite_report["segments"]["overload"]["plain"]
    guarded = sqlite_report["segments"]["overload"]["guarded"]
    assert guarded["shed"] > 0
    assert guarded["shed_reasons"] == {"pool_saturated": guarded["shed"]}
    assert plain["shed"] == 0
    assert guarded["p99"] < plain["p99"]
    assert guarded["p99_completed"] < sqlite_report["settings"]["deadline"]
    assert plain["late"] > 0
    assert guarded["late"] <= plain["late"] // 4
    assert guarded["goodput"] > plain["goodput"]


def test_outage_guard_fails_fast(sqlite_report: dict[str, Any]) -> None:
    plain = sqlite_report["segments"]["outage"]["plain"]
    guarded = sqlite_report["segments"]["outage"]["guarded"]
    connect_timeout = sqlite_report["settings"]["connect_timeout"]
    assert plain["errors"] > 0
    assert plain["p50"] >= connect_timeout
    assert guarded["shed"] > 0
    assert guarded["p50"] < connect_timeout / 2


def test_outage_breaker_opens_and_recovers(sqlite_report: dict[str, Any]) -> None:
    guarded = sqlite_report["segments"]["outage"]["guarded"]
    states = [t["state"] for t in sqlite_report["breaker_transitions"]]
    assert guarded["shed_reasons"].get("circuit_open", 0) > 0
    assert states[0] == "open"
    assert states[-1] == "closed"
    assert sqlite_report["segments"]["recovery"]["guarded"]["completed"] > 0


def test_db_free_route_keeps_answering(sqlite_report: dict[str, Any]) -> None:
    for side in ("plain", "guarded"):
        route = sqlite_report["db_free_route"][side]
        assert route["requests"] > 0
        assert route["completed"] == route["requests"]


def test_workload_functions_run_with_a_short_duration(tmp_path: Path) -> None:
    """The phases are importable and take their duration from DemoSettings, as the CLI does."""
    url = make_url(f"sqlite:///{tmp_path / 'demo.db'}")
    settings = DemoSettings(clients=16, seconds=0.5)
    create_sqlite_schema(url)
    with open_side(url, settings, guarded=True) as side:
        overload = run_overload(side, settings)
    assert overload.requests == overload.completed + overload.shed + overload.errors
    assert overload.shed > 0
    assert overload.late == 0
    with open_side(url, settings, guarded=False) as side:
        outage = run_outage(side, settings)
    assert outage.outage.errors > 0
    assert outage.db_free.completed == outage.db_free.requests > 0


def test_text_output_has_the_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--seconds", "0.5", "--clients", "8"]) == 0
    out = capsys.readouterr().out
    assert "shed (503)" in out
    assert "goodput" in out
    for row in ("overload  plain", "overload  guarded", "outage    plain", "recovery  guarded"):
        assert row in out


@pytest.mark.postgres
def test_demo_on_postgresql(pg_url: str) -> None:
    report = run_json("--seconds", "2", "--url", pg_url)
    assert report["backend"] == "postgresql"
    overload = report["segments"]["overload"]
    assert overload["guarded"]["shed"] > 0
    assert overload["guarded"]["p99"] < overload["plain"]["p99"]
    outage = report["segments"]["outage"]
    assert outage["plain"]["errors"] > 0
    assert outage["guarded"]["p50"] < report["settings"]["connect_timeout"] / 2
    assert "circuit_open" in outage["guarded"]["shed_reasons"]


def test_unreachable_server_is_reported_without_the_password(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["demo", "--url", "postgresql+psycopg://app:s3cret-pw@127.0.0.1:1/app", "--seconds", "0.5"])
    err = capsys.readouterr().err
    assert code == 1
    assert "cannot run against postgresql+psycopg://app:***@127.0.0.1:1/app" in err
    assert "s3cret-pw" not in err


def test_help_runs_as_a_module() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "poolguard", "demo", "--help"], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    for option in ("--url", "--clients", "--seconds", "--json"):
        assert option in result.stdout


@pytest.mark.parametrize(
    ("args", "option"),
    [
        (["--seconds", "0"], "--seconds"),
        (["--seconds", "soon"], "--seconds"),
        (["--seconds", "nan"], "--seconds"),
        (["--clients", "0"], "--clients"),
        (["--clients", "1.5"], "--clients"),
        (["--url", "not a url"], "--url"),
        (["--url", "nosuchdb://app:s3cret-pw@host/db"], "--url"),
        (["--url", "postgresql+asyncpg://app:s3cret-pw@host/db"], "--url"),
    ],
)
def test_invalid_options_exit_2_naming_the_option(
    args: list[str], option: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["demo", *args]) == 2
    err = capsys.readouterr().err
    assert f"argument {option}" in err
    assert "s3cret-pw" not in err


def test_no_command_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "COMMAND" in capsys.readouterr().err
