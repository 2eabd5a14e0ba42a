"""examples/fastapi_asyncpg_app.py (DbConnection on a plain asyncpg pool) under a real uvicorn process:
200 on the real database, a full pool shed with 503, and an unreachable database answered 503 at once
while the DB-free route and the health route still answer."""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.databases import DATABASE, DEAD_PORT, HOST, PG_PORT, USER
from tests.support.servers import ServerProcess, serving

pytestmark = pytest.mark.postgres

ROOT = Path(__file__).resolve().parents[2]
COMMAND = [sys.executable, "-m", "uvicorn", "examples.fastapi_asyncpg_app:app", "--port", "{port}"]

Serve = Callable[..., ServerProcess]


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Serve]:
    with contextlib.ExitStack() as servers:

        def start(url: str, **env: str) -> ServerProcess:
            clean = {k: v for k, v in os.environ.items() if not k.startswith("POOLGUARD_")}
            log = tmp_path / f"uvicorn-{url.rpartition(':')[2].replace('/', '-')}.log"
            return servers.enter_context(serving(COMMAND, cwd=ROOT, env={**clean, "DATABASE_URL": url, **env}, log=log))

        yield start


def test_served_on_the_database_and_a_full_pool_is_shed(serve: Serve) -> None:
    server = serve(f"postgresql://{USER}@{HOST}:{PG_PORT}/{DATABASE}", WORKERS="1", POOLGUARD_MAX_WAIT="0.2")
    with httpx.Client(base_url=server.url, timeout=10) as http:
        assert http.get("/now").status_code == 200
        assert http.get("/health/db").json()["status"] == "ok"

        def slow() -> int:
            with httpx.Client(base_url=server.url, timeout=10) as own:
                return own.get("/slow", params={"seconds": 1.0}).status_code

        with concurrent.futures.ThreadPoolExecutor(8) as threads:
            statuses = sorted(threads.map(lambda _: slow(), range(8)))
        assert statuses.count(200) >= 1
        assert 503 in statuses
        assert set(statuses) <= {200, 503}
        assert http.get("/now").status_code == 200


def test_an_unreachable_database_answers_503_at_once_and_db_free_routes_answer(serve: Serve) -> None:
    server = serve(f"postgresql://{USER}@{HOST}:{DEAD_PORT}/{DATABASE}")
    with httpx.Client(base_url=server.url, timeout=10) as http:
        assert http.get("/").status_code == 200
        statuses = [http.get("/now").status_code for _ in range(8)]
        assert set(statuses) == {503}
        started = time.monotonic()
        refused = http.get("/now")
        assert refused.status_code == 503
        assert refused.json()["reason"] == "circuit_open"
        assert int(refused.headers["retry-after"]) >= 1
        assert time.monotonic() - started < 0.5
        assert http.get("/").status_code == 200
        assert http.get("/health/db").status_code == 503
