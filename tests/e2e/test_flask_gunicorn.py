"""examples/flask_app.py under gunicorn (gthread), end to end over HTTP, against real PostgreSQL.

One server on the real database (commit, rollback, health), one whose two-connection pool is filled
by slow requests (503 pool_saturated within the wait budget, health detail only for the token, every
connection handed back), then one on an unreachable database with a breaker that opens on the first
failure (503 circuit_open while the DB-free route answers).
Each server is configured by environment variables only, as in production, and always terminated.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import sqlalchemy
from sqlalchemy import text
from sqlalchemy.pool import NullPool

from tests.e2e.saturation import TOKEN, check_full_pool_is_shed
from tests.support.databases import DEAD_PORT, PG_URL, pg_url

pytestmark = pytest.mark.postgres

ROOT = Path(__file__).resolve().parents[2]
GUNICORN = Path(sys.executable).parent / "gunicorn"
PASSWORD = "secret-pw"
UNREACHABLE_URL = pg_url(password=PASSWORD, port=DEAD_PORT)
TABLE = f"flask_e2e_items_{uuid.uuid4().hex[:10]}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[Callable[[dict[str, str]], str]]:
    """Starts gunicorn on the example with the given environment; returns its base URL."""
    servers: list[subprocess.Popen[bytes]] = []

    def start(environment: dict[str, str]) -> str:
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("POOLGUARD_")}
        env.update(environment, ITEMS_TABLE=TABLE, PYTHONPATH=str(ROOT))
        log = (tmp_path / f"gunicorn-{port}.log").open("wb")
        server = subprocess.Popen(
            [
                str(GUNICORN),
                "--worker-class",
                "gthread",
                "--threads",
                "4",
                "-w",
                "1",
                "--bind",
                f"127.0.0.1:{port}",
                "--graceful-timeout",
                "2",
                "--chdir",
                str(ROOT / "examples"),
                "flask_app:app",
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        servers.append(server)
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 15
        while True:
            if server.poll() is not None:
                pytest.fail(
                    f"gunicorn exited with {server.returncode}: {(tmp_path / f'gunicorn-{port}.log').read_text()}"
                )
            try:
                if httpx.get(base + "/", timeout=1).status_code == 200:
                    return base
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("gunicorn did not answer within 15 s")
            time.sleep(0.1)

    yield start
    for server in servers:
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(10)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()


@pytest.fixture
def observer() -> Iterator[sqlalchemy.Engine]:
    """Reads what the server committed; drops the example's table (created by the server) at the end."""
    engine = sqlalchemy.create_engine(PG_URL, poolclass=NullPool)
    yield engine
    with engine.begin() as connection:
        connection.execute(text(f"DROP TABLE IF EXISTS {TABLE}"))
    engine.dispose()


def names(observer: sqlalchemy.Engine) -> list[str]:
    with observer.connect() as connection:
        return [row[0] for row in connection.execute(text(f"SELECT name FROM {TABLE}"))]


def assert_no_password(response: httpx.Response) -> None:
    assert PASSWORD not in response.text
    assert all(PASSWORD not in value for value in response.headers.values())


def test_commit_rollback_and_health(start_server: Callable[[dict[str, str]], str], observer: sqlalchemy.Engine) -> None:
    base = start_server({"DATABASE_URL": PG_URL})
    with httpx.Client(base_url=base, timeout=10) as client:
        assert client.get("/").status_code == 200

        committed = f"kept-{uuid.uuid4().hex[:8]}"
        created = client.post("/items", json={"name": committed})
        assert created.status_code == 201
        assert created.json()["name"] == committed
        assert committed in names(observer)
        assert committed in [item["name"] for item in client.get("/items").json()["items"]]

        rolled_back = f"gone-{uuid.uuid4().hex[:8]}"
        assert client.post("/items/fail", json={"name": rolled_back}).status_code == 500
        assert rolled_back not in names(observer)

        health = client.get("/health/db")
        assert health.status_code == 200
        assert health.json() == {"status": "ok"}
        assert health.headers["cache-control"] == "no-store"

        scraped = client.get("/metrics")
        assert scraped.status_code == 200
        assert 'db_client_connection_wait_time_seconds_count{pool_name="primary"}' in scraped.text
        assert 'db_client_connection_use_time_seconds_count{pool_name="primary",route="/items"}' in scraped.text

    with observer.connect() as connection:
        stuck = connection.execute(
            text(
                "SELECT count(*) FROM pg_stat_activity "
                "WHERE application_name = 'flask-example' AND state LIKE 'idle in transaction%'"
            )
        ).scalar_one()
    assert stuck == 0, "a connection of the example sits idle in a transaction after the requests"


def test_full_pool_sheds_with_503_pool_saturated(
    start_server: Callable[[dict[str, str]], str], observer: sqlalchemy.Engine
) -> None:
    base = start_server(
        {
            "DATABASE_URL": pg_url(password=PASSWORD),
            "DB_POOL_SIZE": "2",
            "POOLGUARD_MAX_WAIT": "0.5",
            "POOLGUARD_HEALTH_DETAIL": "when-authorized",
            "POOLGUARD_HEALTH_TOKEN": TOKEN,
        }
    )
    check_full_pool_is_shed(base, capacity=2, max_wait=0.5, password=PASSWORD)


def test_outage_sheds_with_503_while_db_free_route_answers(start_server: Callable[[dict[str, str]], str]) -> None:
    base = start_server(
        {
            "DATABASE_URL": UNREACHABLE_URL,
            "POOLGUARD_BREAKER_CONSECUTIVE_FAILURES": "1",
            "POOLGUARD_BREAKER_OPEN_FOR": "30",
        }
    )
    responses: list[httpx.Response] = []
    with httpx.Client(base_url=base, timeout=10) as client:
        first = client.get("/items")
        responses.append(first)
        assert first.status_code == 503  # the refused connection itself, counted by the breaker it opens

        for _ in range(3):
            response = client.get("/items")
            responses.append(response)
            assert response.status_code == 503
            retry_after = response.headers["retry-after"]
            assert retry_after.isdigit()
            assert int(retry_after) >= 1
            assert response.headers["cache-control"] == "no-store"
            assert response.content == (
                b'{"error":"database_unavailable","reason":"circuit_open","retry_after":' + retry_after.encode() + b"}"
            )

        write = client.post("/items", json={"name": "never"})
        responses.append(write)
        assert write.status_code == 503
        assert write.json()["reason"] == "circuit_open"

        free = client.get("/")
        responses.append(free)
        assert free.status_code == 200

        health = client.get("/health/db")
        responses.append(health)
        assert health.status_code == 503
        assert health.json() == {"status": "unavailable"}

    for response in responses:
        assert_no_password(response)
