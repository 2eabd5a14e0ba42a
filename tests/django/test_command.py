"""manage.py poolguard doctor."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator

import psycopg
import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connections
from django.test import override_settings

from tests.support.pgcluster import APP_USER, SUPERUSER, PgCluster
from tests.support.pgcluster import DATABASE as CLUSTER_DATABASE


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


@pytest.fixture(scope="module")
def private() -> Iterator[PgCluster]:
    """A server of this module's own, so what the doctor finds there is known (the shared one is everyone's)."""
    with PgCluster.bootstrapped(max_connections=20) as cluster:
        yield cluster


def test_doctor_adds_what_the_server_sees_and_fails_only_on_a_critical_finding(
    private: PgCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    connections.close_all()
    for alias in ("default", "persistent"):  # both on the private server, as Django's own settings say
        for key, value in {"PORT": str(private.port), "NAME": CLUSTER_DATABASE, "USER": SUPERUSER}.items():
            monkeypatch.setitem(connections[alias].settings_dict, key, value)
    out = io.StringIO()
    with override_settings(POOLGUARD={"DATABASES": ["default", "persistent"]}):
        call_command("poolguard", "doctor", stdout=out)
        healthy = out.getvalue()
        # both aliases use the same server: it is examined once
        assert healthy.count("database default, persistent: what the server sees") == 1
        assert f"poolguard doctor: postgresql at postgresql://{SUPERUSER}@127.0.0.1:{private.port}/" in healthy
        assert "pg.connections:" in healthy
        assert "CRITICAL" not in healthy
        assert healthy.rstrip().endswith("status: ok")

        private.set_connection_limit(APP_USER, 1)
        try:
            with psycopg.connect(private.conninfo(user=APP_USER)):  # the role's only connection, taken
                out = io.StringIO()
                with pytest.raises(CommandError, match="server-side doctor found a critical problem"):
                    call_command("poolguard", "doctor", stdout=out)
        finally:
            private.set_connection_limit(APP_USER, -1)
    assert f"CRITICAL pg.role_connection_limit: role '{APP_USER}' has 1 of its 1 connections" in out.getvalue()


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
