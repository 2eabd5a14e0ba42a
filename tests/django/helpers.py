"""Assertions shared by the Django tests."""

from __future__ import annotations

import json
from typing import Any

from django.apps import apps

from tests.support.databases import DEAD_PORT, HOST

PASSWORD = "secret-pw"


def state() -> Any:
    return apps.get_app_config("poolguard").require_state()


def assert_503(response: Any, reason: str) -> int:
    """poolguard's 503, byte for byte; returns the Retry-After seconds."""
    assert response.status_code == 503, response.content
    retry_after = response["Retry-After"]
    assert retry_after.isdigit(), retry_after
    seconds = int(retry_after)
    assert seconds >= 1
    assert response["Cache-Control"] == "no-store"
    assert response["Content-Type"] == "application/json"
    expected = f'{{"error":"database_unavailable","reason":"{reason}","retry_after":{seconds}}}'.encode()
    assert response.content == expected
    assert_no_secret(response)
    return seconds


def assert_no_secret(response: Any) -> None:
    headers = json.dumps(dict(response.items()))
    assert PASSWORD not in headers
    assert PASSWORD.encode() not in response.content
    assert f"{HOST}:{DEAD_PORT}".encode() not in response.content
