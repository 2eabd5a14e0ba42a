"""The full-pool scenario every example runs under its real server: shed fast, hide detail, hand everything back.

An example started with a pool of ``capacity`` connections, a health token and a password in its
database settings gets ``capacity`` requests to its slow route (each reads, then keeps its
connection for a few seconds). Once the health detail shows the pool full, a read must be answered
with the 503 ``pool_saturated`` body within the wait budget while the database-free route keeps
answering; the health route must give its detail only to the token; and after the slow requests
have finished, no connection may still be checked out. No answer may contain the password.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import httpx

HOLD_SECONDS = 3
TOKEN = "e2e-health-token"


def health_detail(client: httpx.Client) -> dict[str, Any]:
    response = client.get("/health/db", headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status_code == 200, response.text
    detail: dict[str, Any] = response.json()
    assert len(detail["pools"]) == 1, detail
    return detail


def wait_for_checked_out(client: httpx.Client, expected: int, timeout: float = 10.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        detail = health_detail(client)
        if detail["pools"][0]["checked_out"] == expected:
            return detail
        assert time.monotonic() < deadline, f"checked_out never reached {expected}: {detail}"
        time.sleep(0.05)


def check_full_pool_is_shed(base_url: str, *, capacity: int, max_wait: float, password: str) -> None:
    """Runs the scenario against a server at ``base_url`` (see the module docstring)."""
    slow_answers: list[httpx.Response] = []

    def hold() -> None:
        with httpx.Client(base_url=base_url, timeout=30) as own:
            slow_answers.append(own.get("/items/slow", params={"seconds": HOLD_SECONDS}))

    holders = [threading.Thread(target=hold) for _ in range(capacity)]
    answers: list[httpx.Response] = []
    with httpx.Client(base_url=base_url, timeout=30, limits=httpx.Limits(max_keepalive_connections=0)) as client:
        assert client.get("/items").status_code == 200  # the pool has a connection open, the table exists
        for holder in holders:
            holder.start()
        full = wait_for_checked_out(client, capacity)

        started = time.monotonic()
        shed = client.get("/items")
        took = time.monotonic() - started
        answers.append(shed)
        assert shed.status_code == 503, shed.text
        assert took < max_wait + 1.0, f"shed after {took:.2f}s with max_wait={max_wait}"
        seconds = int(shed.headers["retry-after"])
        assert seconds >= 1
        assert shed.headers["cache-control"] == "no-store"
        expected = f'{{"error":"database_unavailable","reason":"pool_saturated","retry_after":{seconds}}}'
        assert shed.content == expected.encode()

        free = client.get("/")
        answers.append(free)
        assert free.status_code == 200

        for headers in ({}, {"Authorization": "Bearer not-the-token"}):
            hidden = client.get("/health/db", headers=headers)
            answers.append(hidden)
            assert hidden.status_code == 200
            assert set(hidden.json()) == {"status"}

        for holder in holders:
            holder.join(30)
        after = wait_for_checked_out(client, 0)

    assert [answer.status_code for answer in slow_answers] == [200] * capacity
    assert after["pools"][0]["timeouts"] >= 1
    for answer in [*answers, *slow_answers]:
        assert password not in answer.text
        assert all(password not in value for value in answer.headers.values())
    assert password not in str(full)
    assert password not in str(after)
