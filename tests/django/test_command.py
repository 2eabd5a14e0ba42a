"""manage.py poolguard doctor."""

from __future__ import annotations

import io
import json

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.test import override_settings


def test_doctor_reports_each_guarded_database() -> None:
    out = io.StringIO()
    with override_settings(POOLGUARD={"DATABASES": ["default", "pooled"]}):
        call_command("poolguard", "doctor", stdout=out)
    text = out.getvalue()
    assert "- default [postgresql] ok: a new connection per request (CONN_MAX_AGE=0)" in text
    assert "- pooled [postgresql] ok: psycopg pool (min_size=1, max_size=1)" in text
    assert "breaker closed" in text
    assert "ping " in text
    assert " ms" in text
    assert text.rstrip().endswith("status: ok")


def test_doctor_fails_on_an_unreachable_database_without_leaking_the_password() -> None:
    out = io.StringIO()
    with override_settings(POOLGUARD={"DATABASES": ["down"]}), pytest.raises(CommandError, match="unavailable"):
        call_command("poolguard", "doctor", stdout=out)
    text = out.getvalue()
    assert "ping failed (OperationalError)" in text
    assert "CRITICAL unreachable: cannot connect: OperationalError" in text
    assert "secret-pw" not in text


def test_doctor_adds_what_the_server_sees_and_fails_only_on_a_critical_finding() -> None:
    out = io.StringIO()
    with override_settings(POOLGUARD={"DATABASES": ["default", "persistent"]}):
        failure = ""
        try:
            call_command("poolguard", "doctor", stdout=out)
        except CommandError as error:  # the shared server may really be in trouble; then it must say so
            failure = str(error)
    failed = "server-side doctor found a critical problem" in failure
    assert failed or not failure
    text = out.getvalue()
    # both aliases use the same server: it is examined once
    assert text.count("database default, persistent: what the server sees") == 1
    assert "poolguard doctor: postgresql at postgresql://root@127.0.0.1:5432/test" in text
    assert "pg.connections:" in text
    assert failed == ("CRITICAL" in text)


def test_doctor_json_holds_the_server_side_report() -> None:
    out = io.StringIO()
    with override_settings(POOLGUARD={"DATABASES": ["down"]}), pytest.raises(CommandError, match="unavailable"):
        call_command("poolguard", "doctor", "--json", "--timeout", "2", stdout=out)
    data = json.loads(out.getvalue())
    assert data["status"] == "unavailable"
    [server] = data["doctor"]
    assert server["aliases"] == ["down"]
    assert server["target"] == "postgresql://root:***@127.0.0.1:1/test"
    assert server["status"] == "critical"
    assert server["findings"][0]["code"] == "unreachable"
    assert "secret-pw" not in out.getvalue()


@pytest.mark.parametrize("value", ["0", "-1", "x", "61"])
def test_doctor_refuses_a_bad_timeout_naming_the_option(value: str) -> None:
    with pytest.raises(CommandError, match=r"--timeout.*expected a number of seconds"):
        call_command("poolguard", "doctor", "--timeout", value, stdout=io.StringIO())
