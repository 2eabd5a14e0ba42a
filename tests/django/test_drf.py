"""Item 5 for Django: a DRF project renders poolguard's 503 its own way; status and headers stay poolguard's."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest
from django.test import Client, override_settings

from poolguard.errors import Unavailable
from tests.django.drf import problem_json
from tests.django.helpers import assert_503, assert_no_secret

BREAKER_AT_ONE = {"CONSECUTIVE_FAILURES": 1, "OPEN_FOR": 30}
REST_FRAMEWORK = {
    # the test settings have no django.contrib.auth: DRF's anonymous user would import it
    "DEFAULT_AUTHENTICATION_CLASSES": [],
    "DEFAULT_PERMISSION_CLASSES": [],
    "UNAUTHENTICATED_USER": None,
}


def _project(body: Any) -> Any:
    return override_settings(
        ROOT_URLCONF="tests.django.drf",
        REST_FRAMEWORK=REST_FRAMEWORK,
        POOLGUARD={"DATABASES": ["default", "down"], "BREAKER": BREAKER_AT_ONE, "UNAVAILABLE_BODY": body},
    )


def _assert_headers(response: Any, content_type: str) -> None:
    assert response.status_code == 503
    assert int(response["Retry-After"]) >= 1
    assert response["Cache-Control"] == "no-store"
    assert response["Content-Type"] == content_type
    assert_no_secret(response)


def test_drf_view_with_the_database_down_answers_in_drfs_shape() -> None:
    with _project("tests.django.drf.unavailable_body"):
        client = Client()
        for _ in range(2):  # the refused connect (counted, then the 503), then the open breaker
            response = client.get("/api/items/")
            _assert_headers(response, "application/json")
            assert response.json() == {
                "detail": "The database is unavailable; retry later.",
                "code": "database_unavailable",
                "reason": "circuit_open",
            }
        assert client.get("/api/missing/").json() == {"detail": "Not found."}  # DRF's own errors, untouched


def test_problem_json_from_a_callable() -> None:
    with _project(problem_json):
        response = Client().get("/api/items/")
    _assert_headers(response, "application/problem+json")
    body = json.loads(response.content)
    assert body["title"] == "Database unavailable"
    assert body["detail"] == f"Retry in {response['Retry-After']} s."


def _raises(error: Unavailable) -> tuple[bytes, str]:
    raise RuntimeError("the hook's own bug")


def _wrong_shape(error: Unavailable) -> Any:
    return {"detail": "no content type"}


@pytest.mark.parametrize("hook", [_raises, _wrong_shape])
def test_a_broken_hook_still_sends_poolguards_503(hook: Any, caplog: pytest.LogCaptureFixture) -> None:
    with _project(hook), caplog.at_level(logging.ERROR, logger="poolguard"):
        response = Client().get("/api/items/")
    assert_503(response, "circuit_open")
    (record,) = [r for r in caplog.records if "unavailable_body" in r.getMessage()]
    assert record.exc_info is None
    assert "the hook's own bug" not in record.getMessage()


def test_without_the_hook_the_body_is_poolguards() -> None:
    with override_settings(
        ROOT_URLCONF="tests.django.drf",
        REST_FRAMEWORK=REST_FRAMEWORK,
        POOLGUARD={"DATABASES": ["default", "down"], "BREAKER": BREAKER_AT_ONE},
    ):
        assert_503(Client().get("/api/items/"), "circuit_open")
