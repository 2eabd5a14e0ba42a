"""The doctor's bounds and manners: a silent or refusing server, the password, the URL, the exit codes."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import poolguard.diagnose
from poolguard.cli import main
from poolguard.diagnose.doctor import diagnose
from poolguard.diagnose.findings import Report, render_text
from poolguard.diagnose.target import Session, TargetError, parse_url, target_from_django
from tests.diagnose.conftest import SECRET
from tests.support.databases import DEAD_PORT, HOST, pg_url

SCHEMES = ["postgresql+psycopg", "postgresql+asyncpg", "mysql+pymysql", "mariadb+pymysql"]


@pytest.mark.parametrize("scheme", [*SCHEMES, "pgbouncer"])
def test_a_silent_server_is_critical_within_the_timeout(
    silent_port: int, scheme: str, capsys: pytest.CaptureFixture[str]
) -> None:
    url = (
        f"postgresql://admin:{SECRET}@{HOST}:{silent_port}/pgbouncer"
        if scheme == "pgbouncer"
        else f"{scheme}://app:{SECRET}@{HOST}:{silent_port}/app"
    )
    started = time.monotonic()
    code = main(["doctor", "--json", "--timeout", "1", url])
    elapsed = time.monotonic() - started
    assert code == 1
    assert 0.9 <= elapsed < 1.5
    captured = capsys.readouterr()
    data = json.loads(captured.out)
    assert data["status"] == "critical"
    assert data["findings"][0]["code"] in ("unreachable", "no_answer")
    assert "within 1 s" in data["findings"][0]["message"] or "timed out" in data["findings"][0]["message"]
    assert data["target"].endswith(f"@{HOST}:{silent_port}/{'pgbouncer' if scheme == 'pgbouncer' else 'app'}")
    assert SECRET not in captured.out + captured.err


@pytest.mark.parametrize("scheme", SCHEMES)
def test_a_refused_port_is_critical_at_once_with_the_error_class(
    scheme: str, capsys: pytest.CaptureFixture[str]
) -> None:
    started = time.monotonic()
    assert main(["doctor", f"{scheme}://app:{SECRET}@{HOST}:{DEAD_PORT}/app"]) == 1
    assert time.monotonic() - started < 1.0
    captured = capsys.readouterr()
    assert "CRITICAL unreachable: cannot connect: OperationalError" in captured.out
    assert f"app:***@{HOST}:{DEAD_PORT}/app" in captured.out
    assert "what to do:" in captured.out
    assert captured.out.rstrip().endswith("status: critical")
    assert SECRET not in captured.out + captured.err


def test_a_wrong_password_is_critical_and_never_shown(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["doctor", f"mysql://root:{SECRET}@{HOST}:3306/test"]) == 1
    captured = capsys.readouterr()
    assert "Access denied" in captured.out
    assert SECRET not in captured.out + captured.err


def test_the_password_is_scrubbed_from_driver_text_in_both_encodings() -> None:
    target = parse_url("postgresql://app:p%40ss%2Fw0rd@db.internal/app")
    assert target.password == "p@ss/w0rd"
    assert target.shown() == "postgresql://app:***@db.internal:5432/app"
    assert "p@ss" not in repr(target)
    text = target.redact("dsn password=p@ss/w0rd url postgresql://app:p%40ss%2Fw0rd@db")
    assert "p@ss" not in text
    assert "p%40ss" not in text
    assert text.count("***") == 2


@pytest.mark.parametrize(
    ("url", "kind", "port", "database"),
    [
        ("postgresql+psycopg://u@h/app", "postgresql", 5432, "app"),
        ("postgres://u@h:5433/app?sslmode=disable", "postgresql", 5433, "app"),
        ("postgresql+asyncpg://u@h:6432/pgbouncer", "pgbouncer", 6432, "pgbouncer"),
        ("mysql+pymysql://u@h/app", "mysql", 3306, "app"),
        ("mariadb://u@h:3307/app", "mysql", 3307, "app"),
    ],
)
def test_urls_of_every_accepted_form(url: str, kind: str, port: int, database: str) -> None:
    target = parse_url(url)
    assert (target.kind, target.host, target.port, target.database) == (kind, "h", port, database)


@pytest.mark.parametrize("url", ["sqlite:///x.db", "postgresql://", "not a url", "postgresql://h:99999/x"])
def test_a_url_the_doctor_cannot_use_is_a_usage_error_that_does_not_echo_it(
    url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(TargetError, match="expected postgresql://"):
        parse_url(url)
    assert main(["doctor", url.replace("//", f"//u:{SECRET}@", 1)]) == 2
    err = capsys.readouterr().err
    assert "argument URL:" in err
    assert SECRET not in err


def test_the_url_can_come_from_database_url(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DATABASE_URL", pg_url(password=SECRET))
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert "postgresql at postgresql://root:***@127.0.0.1:5432/test" in out
    assert SECRET not in out
    monkeypatch.delenv("DATABASE_URL")
    assert main(["doctor"]) == 2
    assert "set DATABASE_URL" in capsys.readouterr().err


@pytest.mark.parametrize(
    "options",
    [
        ["--timeout", "0"],
        ["--timeout", "61"],
        ["--timeout", "x"],
        ["--long-query", "0"],
        ["--idle-in-transaction", "-1"],
    ],
)
def test_bad_options_exit_2_naming_the_option(options: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["doctor", pg_url(), *options]) == 2
    assert f"argument {options[0]}" in capsys.readouterr().err


def test_help_documents_the_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["doctor", "--help"]) == 0
    out = capsys.readouterr().out
    assert "exit codes:" in out
    assert "1  a critical finding" in out
    assert "DATABASE_URL" in out


def test_the_deadline_shuts_a_connected_session_down() -> None:
    """A read blocked on a server that went silent after the connect wakes (end of file) at the deadline."""
    left, right = socket.socketpair()
    with left, right:
        session = Session()
        session.attach(left.fileno())
        session.abort()
        assert left.recv(1) == b""
        late = Session()
        late.abort()
        with pytest.raises(TimeoutError):
            late.attach(None)


def test_django_settings_become_a_target_without_django_only_options() -> None:
    target = target_from_django(
        {
            "ENGINE": "django.db.backends.postgresql",
            "HOST": "",
            "PORT": "",
            "NAME": "app",
            "USER": "web",
            "PASSWORD": SECRET,
            "OPTIONS": {"pool": {"max_size": 4}, "sslmode": "require", "isolation_level": 1, "connect_timeout": 3},
        }
    )
    assert target is not None
    assert (target.kind, target.host, target.port, target.database, target.user) == (
        "postgresql",
        "",
        5432,
        "app",
        "web",
    )
    assert dict(target.options) == {"sslmode": "require", "connect_timeout": 3}
    assert target.shown() == "postgresql://web:***@localhost:5432/app"
    assert target_from_django({"ENGINE": "django.db.backends.sqlite3", "NAME": "db.sqlite3"}) is None
    mysql = target_from_django({"ENGINE": "django.db.backends.mysql", "NAME": "app", "OPTIONS": {"charset": "utf8mb4"}})
    assert mysql is not None
    assert (mysql.kind, mysql.host, mysql.port, dict(mysql.options)) == (
        "mysql",
        "localhost",
        3306,
        {"charset": "utf8mb4"},
    )


def test_findings_are_shown_most_severe_first_and_only_critical_fails() -> None:
    report = Report(target="postgresql://app:***@db:5432/app", kind="postgresql")
    report.add("info", "a.info", "fyi")
    report.add("warning", "a.warning", "careful", "do this")
    assert (report.status, report.exit_code) == ("warning", 0)
    report.add("critical", "a.critical", "broken", "do that")
    assert (report.status, report.exit_code) == ("critical", 1)
    assert [finding["code"] for finding in report.to_dict()["findings"]] == ["a.critical", "a.warning", "a.info"]
    text = render_text(report)
    assert text.index("a.critical") < text.index("a.warning") < text.index("a.info")
    assert "what to do: do that" in text


def test_the_command_ends_within_its_timeout_start_included(silent_port: int) -> None:
    """Run as a script (what a probe waits for), the interpreter's start counts against --timeout."""
    started = time.monotonic()
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "poolguard",
            "doctor",
            "--timeout",
            "1.5",
            f"postgresql://app:{SECRET}@{HOST}:{silent_port}/app",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        cwd=Path(__file__).parents[2],
    )
    elapsed = time.monotonic() - started
    assert completed.returncode == 1
    assert "CRITICAL unreachable: the connection got no answer within" in completed.stdout
    assert elapsed < 1.5 + 0.2  # process exit and the 10 ms resolution of /proc/uptime
    assert SECRET not in completed.stdout + completed.stderr


def test_a_missing_driver_is_a_critical_finding_that_names_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    """An environment without pymysql (simulated: the module made unimportable) gets a finding, not a traceback."""
    monkeypatch.setitem(sys.modules, "pymysql", None)
    monkeypatch.delitem(sys.modules, "poolguard.diagnose.mysql", raising=False)
    monkeypatch.delattr(poolguard.diagnose, "mysql", raising=False)
    report = diagnose(parse_url(f"mysql://root:{SECRET}@{HOST}:3306/test"), timeout=2.0)
    [finding] = report.findings
    assert (finding.severity, finding.code) == ("critical", "driver_missing")
    assert "pip install pymysql" in finding.action
    assert report.exit_code == 1
