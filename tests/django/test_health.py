"""The health URL, served by the middleware without a urls.py entry."""

from __future__ import annotations

import json

from django.test import AsyncClient, Client, override_settings

from tests.django.helpers import assert_no_secret, state

GATED = {"DATABASES": ["default"], "HEALTH_DETAIL": "when-authorized", "HEALTH_TOKEN": "t0ken"}


def test_health_ok_without_detail() -> None:
    response = Client().get("/health/db")
    assert response.status_code == 200
    assert response.content == b'{"status":"ok"}'
    assert response["Content-Type"] == "application/json"
    assert response["Cache-Control"] == "no-store"


def test_health_answers_get_and_head_and_leaves_other_methods_to_the_app() -> None:
    client = Client()
    head = client.head("/health/db")
    assert head.status_code == 200
    assert head["Cache-Control"] == "no-store"
    # No urls.py entry exists for the path: a POST reaching the app is Django's own 404, not health.
    post = client.post("/health/db")
    assert post.status_code == 404
    assert b"status" not in post.content


async def test_health_async() -> None:
    response = await AsyncClient().get("/health/db")
    assert response.status_code == 200
    assert response.content == b'{"status":"ok"}'


@override_settings(POOLGUARD=GATED)
def test_detail_only_with_the_token() -> None:
    client = Client()
    assert client.get("/health/db").content == b'{"status":"ok"}'
    assert client.get("/health/db", headers={"Authorization": "Bearer wrong"}).content == b'{"status":"ok"}'
    assert client.get("/health/db", headers={"Authorization": "Basic t0ken"}).content == b'{"status":"ok"}'
    response = client.get("/health/db", headers={"Authorization": "Bearer t0ken"})
    assert response.status_code == 200
    body = json.loads(response.content)
    assert body["status"] == "ok"
    (pool,) = body["pools"]
    assert pool["name"] == "default"
    assert pool["backend"] == "postgresql"
    assert pool["size"] is None  # per-thread connections: no fixed size
    assert pool["breaker"] == {"state": "closed", "failure_rate": 0.0, "retry_after": None}
    assert pool["ping_seconds"] is not None


@override_settings(
    POOLGUARD={
        "DATABASES": ["default", "down", "pooled"],
        "HEALTH_DETAIL": "always",
        "BREAKER": {"CONSECUTIVE_FAILURES": 1},
    }
)
def test_unavailable_when_the_breaker_is_open_and_detail_hides_the_password() -> None:
    client = Client(raise_request_exception=False)
    assert client.get("/down/").status_code == 503
    response = client.get("/health/db")
    assert response.status_code == 503
    assert response["Retry-After"] == "1"
    body = json.loads(response.content)
    assert body["status"] == "unavailable"
    pools = {pool["name"]: pool for pool in body["pools"]}
    assert pools["down"]["status"] == "unavailable"
    assert pools["down"]["breaker"]["state"] == "open"
    assert pools["default"]["status"] == "ok"
    assert pools["pooled"]["size"] == 1
    assert any("down: circuit breaker open" in issue for issue in body["issues"])
    assert_no_secret(response)


@override_settings(POOLGUARD={"DATABASES": ["default", "down"], "BREAKER": {"CONSECUTIVE_FAILURES": 1}})
def test_unavailable_status_only() -> None:
    client = Client(raise_request_exception=False)
    client.get("/down/")
    response = client.get("/health/db")
    assert response.status_code == 503
    assert response.content == b'{"status":"unavailable"}'


@override_settings(POOLGUARD={"DATABASES": ["down"]})
def test_failed_ping_makes_health_unavailable_without_counting_on_the_breaker() -> None:
    response = Client().get("/health/db")
    assert response.status_code == 503
    assert response.content == b'{"status":"unavailable"}'
    breaker = state().guards["down"].gate.breaker
    assert breaker is not None
    assert breaker.state.value == "closed"


@override_settings(POOLGUARD={"HEALTH_PATH": "/_status/db"})
def test_health_path_is_configurable() -> None:
    client = Client()
    assert client.get("/_status/db").content == b'{"status":"ok"}'
    assert client.get("/health/db").status_code == 404


@override_settings(POOLGUARD={"HEALTH_PATH": None})
def test_health_can_be_turned_off() -> None:
    assert Client().get("/health/db").status_code == 404
