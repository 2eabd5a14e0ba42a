"""Health status rules, the report's JSON shape and redaction of secrets."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest

from poolguard.health import HealthReport, PingResult, PoolHealth, assess, redact
from poolguard.stats import PoolStats
from tests.support.contract import HEALTH_POOL_KEYS
from tests.support.pools import pool_stats

MAX_WAIT = 1.0


BUSY = {
    "size": 10,
    "max_overflow": 5,
    "checked_out": 2,
    "idle": 8,
    "utilization": 0.13,
    "wait_p50": 0.0001,
    "wait_p99": 0.002,
    "use_p50": 0.01,
    "use_p99": 0.05,
    "checkouts": 100,
    "connections_created": 10,
    "create_p50": 0.003,
}
"""A pool of 10 + 5 that has served traffic, healthy: the base each test changes."""


def stats(**changes: Any) -> PoolStats:
    return pool_stats(**{**BUSY, **changes})


def check(pool_stats: PoolStats, ping: PingResult | None = None) -> PoolHealth:
    return assess(
        pool_stats,
        ping=ping if ping is not None else PingResult(seconds=0.0004),
        max_wait=MAX_WAIT,
        breaker_failure_rate=0.0,
        breaker_retry_after=None,
    )


# -- status rules -----------------------------------------------------------------------------------------


def test_a_healthy_pool_is_ok_without_issues() -> None:
    health = check(stats())
    assert health.status == "ok"
    assert health.issues == ()


def test_no_ping_is_not_a_failure() -> None:
    health = assess(stats(), ping=None, max_wait=MAX_WAIT, breaker_failure_rate=None, breaker_retry_after=None)
    assert health.status == "ok"


@pytest.mark.parametrize(("utilization", "status"), [(0.89, "ok"), (0.9, "degraded"), (1.0, "degraded")])
def test_high_utilization_degrades(utilization: float, status: str) -> None:
    health = check(stats(utilization=utilization))
    assert health.status == status
    assert bool(health.issues) == (status == "degraded")


@pytest.mark.parametrize(("wait_p99", "status"), [(0.49, "ok"), (0.5, "degraded"), (0.9, "degraded")])
def test_long_waits_degrade(wait_p99: float, status: str) -> None:
    health = check(stats(wait_p99=wait_p99))
    assert health.status == status


def test_no_wait_samples_are_not_long_waits() -> None:
    assert check(stats(wait_p50=None, wait_p99=None)).status == "ok"


def test_half_open_breaker_degrades() -> None:
    health = check(stats(breaker_state="half_open"))
    assert health.status == "degraded"
    assert any("half-open" in issue for issue in health.issues)


def test_open_breaker_is_unavailable() -> None:
    health = check(stats(breaker_state="open", utilization=0.95))
    assert health.status == "unavailable"
    assert any("open" in issue for issue in health.issues)


def test_failed_ping_is_unavailable_and_named_by_class() -> None:
    health = check(stats(), ping=PingResult(seconds=None, error="OperationalError"))
    assert health.status == "unavailable"
    assert any("OperationalError" in issue for issue in health.issues)


def test_disabled_breaker_is_ok() -> None:
    assert check(stats(breaker_state="disabled")).status == "ok"


def test_suspected_leaks_are_an_issue_but_not_a_status_change() -> None:
    health = check(stats(suspected_leaks=2))
    assert health.status == "ok"
    assert len(health.issues) == 1
    assert "2" in health.issues[0]


def test_leaks_are_reported_alongside_an_outage() -> None:
    health = check(stats(breaker_state="open", suspected_leaks=1))
    assert health.status == "unavailable"
    assert len(health.issues) == 2


# -- the report ---------------------------------------------------------------------------------------------


def pool(name: str, **changes: Any) -> PoolHealth:
    return check(stats(name=name, **changes))


@pytest.mark.parametrize(
    ("pools", "status"),
    [
        ([], "ok"),
        ([pool("a")], "ok"),
        ([pool("a"), pool("b", utilization=0.95)], "degraded"),
        ([pool("a", breaker_state="half_open"), pool("b", breaker_state="open"), pool("c")], "unavailable"),
        ([pool("a", breaker_state="open"), pool("b", utilization=0.95)], "unavailable"),
    ],
)
def test_the_worst_pool_decides(pools: list[PoolHealth], status: str) -> None:
    report = HealthReport.of(pools)
    assert report.status == status
    assert report.pools == tuple(pools)


def test_report_collects_every_pools_issues() -> None:
    report = HealthReport.of([pool("a", utilization=0.95), pool("b", suspected_leaks=1)])
    assert len(report.issues) == 2
    assert report.issues[0].startswith("a")
    assert report.issues[1].startswith("b")


@pytest.mark.parametrize(
    ("changes", "http_status"),
    [({}, 200), ({"utilization": 0.95}, 200), ({"breaker_state": "open"}, 503)],
)
def test_http_status(changes: dict[str, Any], http_status: int) -> None:
    assert HealthReport.of([pool("primary", **changes)]).http_status == http_status


def test_to_dict_has_exactly_the_documented_shape() -> None:
    health = assess(
        stats(),
        ping=PingResult(seconds=0.0004),
        max_wait=MAX_WAIT,
        breaker_failure_rate=0.0,
        breaker_retry_after=None,
    )
    data = HealthReport.of([health]).to_dict()
    assert data == {
        "status": "ok",
        "pools": [
            {
                "name": "primary",
                "status": "ok",
                "backend": "postgresql",
                "size": 10,
                "max_overflow": 5,
                "checked_out": 2,
                "idle": 8,
                "overflow": 0,
                "pending": 0,
                "utilization": 0.13,
                "wait_seconds": {"p50": 0.0001, "p99": 0.002},
                "timeouts": 0,
                "suspected_leaks": 0,
                "ping_seconds": 0.0004,
                "breaker": {"state": "closed", "failure_rate": 0.0, "retry_after": None},
                "pooler": None,
            }
        ],
        "issues": [],
    }
    assert json.loads(json.dumps(data)) == data


def test_to_dict_of_an_unavailable_pool_is_json_serialisable() -> None:
    health = assess(
        stats(breaker_state="open", wait_p50=None, wait_p99=None, size=None, max_overflow=None, utilization=0.123456),
        ping=PingResult(seconds=None, error="OperationalError"),
        max_wait=MAX_WAIT,
        breaker_failure_rate=0.75,
        breaker_retry_after=12.5,
    )
    data = HealthReport.of([health]).to_dict()
    text = json.dumps(data)
    entry = json.loads(text)["pools"][0]
    assert data["status"] == "unavailable"
    assert entry["wait_seconds"] == {"p50": None, "p99": None}
    assert entry["ping_seconds"] is None
    assert entry["utilization"] == 0.12
    assert entry["breaker"] == {"state": "open", "failure_rate": 0.75, "retry_after": 12.5}
    assert set(entry) == HEALTH_POOL_KEYS
    assert len(data["issues"]) == 2


def test_issues_are_redacted_in_the_report() -> None:
    leaky = dataclasses.replace(pool("primary"), issues=("primary: failed on postgresql://app:hunter2@db/orders",))
    data = HealthReport.of([leaky]).to_dict()
    assert "hunter2" not in json.dumps(data)
    assert data["issues"] == ["primary: failed on postgresql://app:***@db/orders"]


# -- redaction ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("postgresql://u:pw@h/db", "postgresql://u:***@h/db"),
        ("could not connect to mysql+pymysql://root:pw@h", "could not connect to mysql+pymysql://root:***@h"),
        ("password=secret host=x", "password=*** host=x"),
        ("host=x password='a b' dbname=orders", "host=x password=*** dbname=orders"),
        ('host=x PASSWORD="s3 cr3t" port=5432', "host=x PASSWORD=*** port=5432"),
        (
            "postgresql+psycopg://app:p%40ss%2Fw0rd@db:5432/orders",
            "postgresql+psycopg://app:***@db:5432/orders",
        ),
        ("postgresql://app:s3cr3t@[::1]:5432/orders", "postgresql://app:***@[::1]:5432/orders"),
        (
            "a: postgresql://u1:one@h1/db b: mysql://u2:two@h2/db",
            "a: postgresql://u1:***@h1/db b: mysql://u2:***@h2/db",
        ),
    ],
)
def test_redact_hides_passwords(text: str, expected: str) -> None:
    assert redact(text) == expected


def test_redact_hides_a_password_with_a_slash_that_sqlalchemy_accepts() -> None:
    # SQLAlchemy's URL parser takes everything up to the "@" as the password, "/" included:
    # make_url("postgresql://app:pa/ss@db/orders").password == "pa/ss"
    redacted = redact("postgresql://app:pa/ss@db/orders")
    assert "pa/ss" not in redacted
    assert "ss@db" not in redacted


@pytest.mark.parametrize(
    "text",
    [
        "pool 'primary' is saturated: 10 of 10 connections in use",
        "postgresql://app@db/orders",
        "connection to server at 10.0.0.5, port 5432 failed: Connection refused",
        "http://example.com/orders/1?page=2",
        "",
    ],
)
def test_redact_leaves_text_without_secrets_alone(text: str) -> None:
    assert redact(text) == text


def test_unavailable_body_hook_renders_the_body_and_keeps_the_headers() -> None:
    from poolguard.errors import PoolSaturated  # noqa: PLC0415
    from poolguard.http import unavailable_payload, unavailable_response  # noqa: PLC0415

    error = PoolSaturated("full", retry_after=1.2)
    plain = unavailable_response(error)
    hooked = unavailable_response(error, lambda exc: ({"title": exc.reason}, "application/problem+json"))
    assert hooked.status == plain.status == 503
    assert hooked.body == b'{"title":"pool_saturated"}'
    assert hooked.headers == (("Content-Type", "application/problem+json"), *plain.headers[1:])
    assert unavailable_response(error, lambda exc: ("<p>down</p>", "text/html")).body == b"<p>down</p>"
    assert unavailable_payload(error) == {"error": "database_unavailable", "reason": "pool_saturated", "retry_after": 2}
    bad_header = unavailable_response(error, lambda exc: (b"x", "text/plain\r\nSet-Cookie: a=b"))
    assert bad_header == plain
