"""manage.py poolguard doctor."""

from __future__ import annotations

import io

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
    assert "secret-pw" not in text
