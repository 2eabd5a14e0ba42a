"""examples/django_project under real servers against real PostgreSQL: gunicorn (WSGI, threads) and uvicorn (ASGI).

Under each: commit, rollback and health; Django's psycopg pool of two connections filled by slow
requests (503 pool_saturated within the wait budget, health detail only for the token, every
connection handed back); an unreachable database (503 circuit_open while the DB-free route answers).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import psycopg
import pytest

from tests.e2e.saturation import TOKEN, check_full_pool_is_shed
from tests.support.databases import DATABASE, DEAD_PORT, HOST, PG_CONNINFO, PG_PORT, USER
from tests.support.servers import ServerProcess, serving

pytestmark = pytest.mark.postgres

ROOT = Path(__file__).resolve().parents[2]
PROJECT = ROOT / "examples" / "django_project"
PG = {"PGHOST": HOST, "PGPORT": str(PG_PORT), "PGUSER": USER, "PGDATABASE": DATABASE}
PASSWORD = "secret-pw"


def _env(**extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith(("PG", "POOLGUARD_", "DATABASE_URL"))}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["DJANGO_SETTINGS_MODULE"] = "example.settings"
    env.update(extra)
    return env


COMMANDS = {
    "gunicorn": [
        sys.executable, "-m", "gunicorn", "example.wsgi:application", "--chdir", str(PROJECT),
        "--bind", "127.0.0.1:{port}", "--workers", "1", "--threads", "4", "--log-level", "warning",
    ],
    "uvicorn": [
        sys.executable, "-m", "uvicorn", "example.asgi:application", "--app-dir", str(PROJECT),
        "--host", "127.0.0.1", "--port", "{port}", "--log-level", "warning",
    ],
}  # fmt: skip


@pytest.fixture(scope="module")
def migrated() -> None:
    subprocess.run(
        [sys.executable, "manage.py", "migrate", "--verbosity", "0"],
        cwd=PROJECT,
        env=_env(**PG),
        check=True,
        timeout=60,
    )


@contextlib.contextmanager
def _running(server: str, env: dict[str, str]) -> Iterator[ServerProcess]:
    with (
        tempfile.TemporaryDirectory(prefix="poolguard-django-e2e-") as tmp,
        serving(COMMANDS[server], cwd=PROJECT, env=env, log=Path(tmp) / f"{server}.log") as running,
    ):
        yield running


@pytest.fixture(params=["gunicorn", "uvicorn"])
def server(request: pytest.FixtureRequest, migrated: None) -> Iterator[ServerProcess]:
    with _running(request.param, _env(**PG)) as running:
        yield running


@pytest.fixture(params=["gunicorn", "uvicorn"])
def small_pool_server(request: pytest.FixtureRequest, migrated: None) -> Iterator[ServerProcess]:
    """Django's psycopg pool of at most two connections; the example's POOLGUARD keeps MAX_WAIT at 1 s."""
    env = _env(**{**PG, "PGPASSWORD": PASSWORD}, DB_POOL_MAX_SIZE="2", HEALTH_TOKEN=TOKEN)
    with _running(request.param, env) as running:
        yield running


@pytest.fixture(params=["gunicorn", "uvicorn"])
def down_server(request: pytest.FixtureRequest) -> Iterator[ServerProcess]:
    env = _env(**{**PG, "PGPORT": str(DEAD_PORT), "PGPASSWORD": PASSWORD}, POOLGUARD_BREAKER_CONSECUTIVE_FAILURES="1")
    with _running(request.param, env) as running:
        yield running


def _row_exists(name: str) -> bool:
    with psycopg.connect(PG_CONNINFO) as conn:
        row = conn.execute("SELECT count(*) FROM catalog_item WHERE name = %s", [name]).fetchone()
    return bool(row and row[0])


def test_routes_commit_roll_back_and_report_health(server: ServerProcess) -> None:
    with httpx.Client(base_url=server.url, timeout=10) as client:
        assert client.get("/").status_code == 200
        kept, dropped = f"e2e-{uuid.uuid4().hex[:10]}", f"e2e-{uuid.uuid4().hex[:10]}"
        created = client.post("/items/create", data={"name": kept})
        assert created.status_code == 201, created.text
        assert client.post("/items/fail", json={"name": dropped}).status_code == 500
        assert kept in client.get("/items").json()["items"]
        assert _row_exists(kept)
        assert not _row_exists(dropped)
        health = client.get("/health/db")
        assert health.status_code == 200
        assert health.content == b'{"status":"ok"}'


def test_unreachable_database_gives_503_while_the_db_free_route_answers(down_server: ServerProcess) -> None:
    with httpx.Client(base_url=down_server.url, timeout=10) as client:
        first = client.get("/items")  # the refused connect: counted on the breaker, answered with the 503
        assert first.status_code == 503
        started = time.monotonic()
        response = client.get("/items")
        assert time.monotonic() - started < 1.0
        assert response.status_code == 503
        seconds = int(response.headers["retry-after"])
        assert seconds >= 1
        assert response.headers["cache-control"] == "no-store"
        expected = f'{{"error":"database_unavailable","reason":"circuit_open","retry_after":{seconds}}}'
        assert response.content == expected.encode()
        assert client.get("/").status_code == 200
        health = client.get("/health/db")
        assert health.status_code == 503
        assert health.content == b'{"status":"unavailable"}'
        for answer in (first, response, health):
            assert PASSWORD not in answer.text
            assert PASSWORD not in str(answer.headers)


def test_full_pool_sheds_with_503_pool_saturated(small_pool_server: ServerProcess) -> None:
    check_full_pool_is_shed(small_pool_server.url, capacity=2, max_wait=1.0, password=PASSWORD)
