"""examples/fastapi_app.py under a real uvicorn process, configured by environment variables only.

Commit, rollback and health on the real database; a two-connection pool filled by slow requests
(503 pool_saturated within the wait budget, health detail only for the token, every connection
handed back); an unreachable database (503 circuit_open while the DB-free route answers).
"""

from __future__ import annotations

import os
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

from tests.e2e.saturation import TOKEN, check_full_pool_is_shed
from tests.support.databases import PG_ASYNC_URL, pg_url

pytestmark = pytest.mark.postgres

ROOT = Path(__file__).resolve().parents[2]
SECRET = "secret-pw"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Server:
    """One uvicorn process serving the example app; its output goes to a file (no pipe to fill up)."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        clean = {k: v for k, v in os.environ.items() if not k.startswith("POOLGUARD_")}
        command = [sys.executable, "-m", "uvicorn", "examples.fastapi_app:app", "--port", str(self.port)]
        with log.open("wb") as out:
            self.process = subprocess.Popen(
                command, cwd=ROOT, env={**clean, **env}, stdout=out, stderr=subprocess.STDOUT
            )

    def wait_until_up(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"uvicorn exited with {self.process.returncode}:\n{self.output()}")
            try:
                httpx.get(self.url + "/", timeout=0.5)
                return
            except httpx.TransportError:
                time.sleep(0.1)
        pytest.fail(f"uvicorn did not answer within {timeout}s:\n{self.output()}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[[dict[str, str]], Server]]:
    servers: list[Server] = []

    def start(env: dict[str, str]) -> Server:
        server = Server(env, tmp_path / f"uvicorn-{len(servers)}.log")
        servers.append(server)
        server.wait_until_up()
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def items_table(observer: sqlalchemy.Engine) -> Iterator[str]:
    """A table of this test's own; the example app creates it at startup."""
    name = f"e2e_fastapi_{uuid.uuid4().hex[:12]}"
    yield name
    with observer.begin() as connection:
        connection.execute(text(f"DROP TABLE IF EXISTS {name}"))


def http_client(server: Server) -> httpx.Client:
    """No keep-alive: uvicorn closes the connection after an app error, and reusing it races that close."""
    return httpx.Client(base_url=server.url, timeout=10, limits=httpx.Limits(max_keepalive_connections=0))


def stored_names(observer: sqlalchemy.Engine, table: str) -> list[str]:
    with observer.connect() as connection:
        return list(connection.execute(text(f"SELECT name FROM {table} ORDER BY id")).scalars())


def idle_in_transaction(observer: sqlalchemy.Engine) -> int:
    with observer.connect() as connection:
        count: int = connection.execute(
            text(
                "SELECT count(*) FROM pg_stat_activity "
                "WHERE application_name = 'fastapi-example' AND state LIKE 'idle in transaction%'"
            )
        ).scalar_one()
        return count


def test_example_app_commits_rolls_back_and_reports_health(
    serve: Callable[[dict[str, str]], Server], observer: sqlalchemy.Engine, items_table: str
):
    server = serve({"DATABASE_URL": PG_ASYNC_URL, "ITEMS_TABLE": items_table})
    with http_client(server) as http:
        assert http.get("/").json() == {"service": "fastapi-example", "database": "not used by this route"}
        created = http.post("/items", json={"name": "kept"})
        failed = http.post("/items/fail", json={"name": "gone"})
        listed = http.get("/items")
        health = http.get("/health/db")
        invalid = http.post("/items", json={"name": ""})
        scraped = http.get("/metrics/")
    assert created.status_code == 201
    assert created.json()["name"] == "kept"
    assert failed.status_code == 500
    assert listed.json() == {"items": [{"id": created.json()["id"], "name": "kept"}]}
    assert health.status_code == 200
    assert health.content == b'{"status":"ok"}'
    assert invalid.status_code == 422
    assert scraped.status_code == 200
    assert 'db_client_connection_wait_time_seconds_count{pool_name="primary"}' in scraped.text
    assert 'db_client_connection_use_time_seconds_count{pool_name="primary",route="/items"}' in scraped.text
    assert stored_names(observer, items_table) == ["kept"]
    assert idle_in_transaction(observer) == 0


def test_example_app_with_a_full_pool(serve: Callable[[dict[str, str]], Server], items_table: str):
    server = serve(
        {
            "DATABASE_URL": pg_url("asyncpg", password=SECRET),
            "ITEMS_TABLE": items_table,
            "DB_POOL_SIZE": "2",
            "POOLGUARD_MAX_WAIT": "0.5",
            "POOLGUARD_HEALTH_DETAIL": "when-authorized",
            "POOLGUARD_HEALTH_TOKEN": TOKEN,
        }
    )
    check_full_pool_is_shed(server.url, capacity=2, max_wait=0.5, password=SECRET)


def test_example_app_during_an_outage(serve: Callable[[dict[str, str]], Server], items_table: str):
    unreachable = pg_url("asyncpg", password=SECRET, port=free_port())
    server = serve(
        {"DATABASE_URL": unreachable, "ITEMS_TABLE": items_table, "POOLGUARD_BREAKER_CONSECUTIVE_FAILURES": "1"}
    )
    with http_client(server) as http:
        first = http.post("/items", json={"name": "x"})
        shed = http.post("/items", json={"name": "x"})
        read = http.get("/items")
        free = http.get("/")
        health = http.get("/health/db")
    # The connection failure that opens the breaker is answered with the same 503, never a 500.
    for response in (first, shed, read):
        assert response.status_code == 503
        seconds = int(response.headers["retry-after"])
        assert seconds >= 1
        assert response.headers["cache-control"] == "no-store"
        assert response.content == (
            f'{{"error":"database_unavailable","reason":"circuit_open","retry_after":{seconds}}}'.encode()
        )
    assert free.status_code == 200
    assert health.status_code == 503
    assert health.json() == {"status": "unavailable"}
    for response in (first, shed, read, free, health):
        assert SECRET not in response.text
    server.stop()
    output = server.output()
    assert "unavailable at startup" in output
    assert SECRET not in output


def test_a_misspelt_option_stops_uvicorn_at_startup(tmp_path: Path):
    """``add_middleware`` builds the middleware inside the first ASGI call, the lifespan: a ConfigError
    raised there would be taken by uvicorn's default ``--lifespan auto`` for "lifespan not supported",
    and every request would get a 500. The server must refuse to start instead, saying why."""
    (tmp_path / "misspelt_app.py").write_text(
        "import poolguard\n"
        "from fastapi import FastAPI\n"
        "from poolguard.fastapi import PoolGuardMiddleware\n"
        f"guard = poolguard.Guard(poolguard.create_async_engine({PG_ASYNC_URL!r}))\n"
        "app = FastAPI()\n"
        "app.add_middleware(PoolGuardMiddleware, guard=guard, health_detial='always')\n"
    )
    clean = {k: v for k, v in os.environ.items() if not k.startswith("POOLGUARD_")}
    port = free_port()
    command = [sys.executable, "-m", "uvicorn", "misspelt_app:app", "--port", str(port)]
    env = {**clean, "PYTHONPATH": str(ROOT)}
    started = subprocess.run(command, check=False, cwd=tmp_path, env=env, capture_output=True, timeout=30, text=True)
    assert started.returncode != 0
    assert "PoolGuardMiddleware.health_detial" in started.stderr
    assert "Application startup failed" in started.stderr
