"""The SQLModel app of ``tests/apps/sqlmodel_app`` on the real PostgreSQL server, through FastAPI's TestClient.

The app is adopted as docs/fastapi.md says (``SessionDep = SyncDbSession[Session]``, a guard
whose ``session_factory`` makes ``sqlmodel.Session``, ``poolguard_lifespan`` and the middleware) and
tested the way its users test it: ``with TestClient(create_app(...)) as client``. Each test gets a
schema of its own (``search_path``), so the tutorial's ``hero`` table never meets another test's.
"""

from __future__ import annotations

import subprocess
import sys
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy
from fastapi import FastAPI
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.orm import sessionmaker
from sqlmodel import Session

import poolguard
from poolguard import Breaker, ConfigError
from poolguard.fastapi import DbSession, PoolGuardMiddleware, SyncDbSession, poolguard_lifespan
from tests.adapters.test_starlette import assert_unavailable
from tests.apps.sqlmodel_app.database import Settings
from tests.apps.sqlmodel_app.main import create_app
from tests.support.child import PROJECT_ROOT
from tests.support.databases import HOST, PG_ASYNC_URL, PG_PORT, PG_URL, pg_url
from tests.support.tcpproxy import TcpProxy

with warnings.catch_warnings():
    # Starlette 1.x asks for httpx2 under its TestClient; the client works the same with httpx.
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

pytestmark = pytest.mark.postgres

APP = Path(__file__).parent / "sqlmodel_app"


@pytest.fixture
def schema(observer: sqlalchemy.Engine) -> Iterator[str]:
    name = f"sqlmodel_app_{uuid.uuid4().hex[:12]}"
    with observer.begin() as connection:
        connection.execute(text(f"CREATE SCHEMA {name}"))
    yield name
    with observer.begin() as connection:
        connection.execute(text(f"DROP SCHEMA {name} CASCADE"))


def settings(schema: str, url: str = PG_URL, **options: Any) -> Settings:
    return Settings(database_url=url, connect_args={"options": f"-c search_path={schema}"}, **options)


def guard_of(app: FastAPI) -> poolguard.Guard:
    guard: poolguard.Guard = app.state.guard
    return guard


@pytest.fixture
def apps() -> Iterator[list[FastAPI]]:
    """The apps a test made: at its end none holds a connection, then their guards and engines go."""
    made: list[FastAPI] = []
    yield made
    for app in made:
        guard = guard_of(app)
        assert guard.stats().checked_out == 0
        guard.close()
        guard.engine.sync_engine.dispose() if guard.is_async else guard.engine.dispose()  # type: ignore[union-attr]


def heroes(observer: sqlalchemy.Engine, schema: str) -> list[tuple[str, int | None]]:
    with observer.connect() as connection:
        rows = connection.execute(text(f"SELECT name, age FROM {schema}.hero ORDER BY id"))
        return [(name, age) for name, age in rows]


def test_writes_commit_and_reads_see_them(apps: list[FastAPI], schema: str, observer: sqlalchemy.Engine):
    app = create_app(settings(schema))
    apps.append(app)
    with TestClient(app) as client:
        created = client.post("/heroes/", json={"name": "Deadpond", "secret_name": "Dive Wilson"})
        hero_id = created.json()["id"]
        patched = client.patch(f"/heroes/{hero_id}", json={"age": 30})  # no session.commit() in the route
        listed = client.get("/heroes/")
        missing = client.get("/heroes/999999")
    assert created.status_code == 200
    assert patched.json() == {"name": "Deadpond", "age": 30, "id": hero_id}
    assert listed.json() == [{"name": "Deadpond", "age": 30, "id": hero_id}]
    assert missing.status_code == 404
    assert heroes(observer, schema) == [("Deadpond", 30)]


def test_http_exception_after_a_write_rolls_back(apps: list[FastAPI], schema: str, observer: sqlalchemy.Engine):
    app = create_app(settings(schema))
    apps.append(app)
    with TestClient(app) as client:
        first = client.post("/heroes/unique/", json={"name": "Rusty-Man", "secret_name": "Tommy Sharp"})
        taken = client.post("/heroes/unique/", json={"name": "Rusty-Man", "secret_name": "Someone Else"})
        after = client.post("/heroes/unique/", json={"name": "Spider-Boy", "secret_name": "Pedro Parqueador"})
    assert first.status_code == 200
    assert taken.status_code == 409
    assert taken.json() == {"detail": "Hero name already taken"}
    assert after.status_code == 200
    assert heroes(observer, schema) == [("Rusty-Man", None), ("Spider-Boy", None)]


def test_saturated_pool_answers_the_503(apps: list[FastAPI], schema: str):
    app = create_app(settings(schema, pool_size=1, max_wait=0.1))
    apps.append(app)
    with TestClient(app) as client:
        with guard_of(app).connection():  # the only connection, held by a unit of work of the guard
            shed = client.get("/heroes/")
            free = client.get("/version")
        served = client.get("/heroes/")
    assert_unavailable(shed, "pool_saturated")
    assert free.json() == {"version": "1.0"}
    assert served.json() == []


def test_database_gone_opens_the_breaker_and_answers_the_503(apps: list[FastAPI], schema: str):
    with TcpProxy((HOST, PG_PORT)) as proxy:
        app = create_app(settings(schema, pg_url(port=proxy.port), breaker=Breaker(consecutive_failures=1)))
        apps.append(app)
        with TestClient(app) as client:
            assert client.get("/heroes/").json() == []
            proxy.stop()
            first = client.get("/heroes/")
            shed = client.get("/heroes/")
            free = client.get("/version")
    assert_unavailable(first, "circuit_open")
    assert_unavailable(shed, "circuit_open")
    assert free.status_code == 200


def test_two_test_clients_in_one_run_stay_guarded(apps: list[FastAPI], schema: str, observer: sqlalchemy.Engine):
    """The lifespan runs twice (as with a TestClient per test module); the guard guards both times."""
    app = create_app(settings(schema, pool_size=1, max_wait=0.1))
    apps.append(app)
    guard = guard_of(app)
    for name in ("first", "second"):
        with TestClient(app) as client:
            assert client.post("/heroes/", json={"name": name, "secret_name": "x"}).status_code == 200
            with guard.connection():
                assert_unavailable(client.get("/heroes/"), "pool_saturated")
        assert not guard.closed
    assert heroes(observer, schema) == [("first", None), ("second", None)]


def wrong_app(guard: poolguard.Guard, *, lifespan: bool = True) -> FastAPI:
    app = FastAPI(lifespan=poolguard_lifespan(guard) if lifespan else None)
    app.add_middleware(PoolGuardMiddleware, guard=guard)

    @app.get("/fine")
    def fine() -> dict[str, str]:
        return {"database": "not used"}

    if guard.is_async:

        @app.get("/heroes/")
        def read_heroes(session: SyncDbSession[Session]) -> int:
            return 0

    else:

        @app.get("/heroes/")
        async def read_heroes_async(session: DbSession) -> int:
            return 0

    app.state.guard = guard
    return app


@pytest.mark.parametrize("lifespan", [True, False], ids=["poolguard_lifespan", "middleware-only"])
def test_dependency_for_the_wrong_engine_fails_at_startup(apps: list[FastAPI], lifespan: bool):
    engine = sqlalchemy.create_engine(PG_URL)
    app = wrong_app(poolguard.Guard(engine), lifespan=lifespan)
    apps.append(app)
    with pytest.raises(ConfigError, match=r"'session' of GET /heroes/.*poolguard\.fastapi\.SyncDbSession"):
        TestClient(app).__enter__()


def test_sync_dependency_on_an_async_engine_fails_at_startup(apps: list[FastAPI]):
    engine = create_async_engine(PG_ASYNC_URL)
    app = wrong_app(poolguard.Guard(engine))
    apps.append(app)
    with pytest.raises(ConfigError, match=r"poolguard\.fastapi\.DbSession: the engine .* is an AsyncEngine"):
        TestClient(app).__enter__()


def test_session_class_the_guard_does_not_make_fails_at_startup(apps: list[FastAPI], schema: str):
    """``SyncDbSession[sqlmodel.Session]`` on a guard making SQLAlchemy's plain Session: ``.exec`` would fail."""
    engine = sqlalchemy.create_engine(PG_URL)
    guard = poolguard.Guard(engine)
    app = FastAPI(lifespan=poolguard_lifespan(guard))
    app.add_middleware(PoolGuardMiddleware, guard=guard)
    app.state.guard = guard
    apps.append(app)

    @app.get("/heroes/")
    def read_heroes(session: SyncDbSession[Session]) -> int:
        return 0

    with pytest.raises(ConfigError, match=r"session_factory=sessionmaker\(engine, class_=Session\)"):
        TestClient(app).__enter__()
    guard.session_factory = sessionmaker(engine, class_=Session)
    with TestClient(app) as client:
        assert client.get("/heroes/").json() == 0


def test_the_app_type_checks_under_mypy_strict():
    completed = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-error-summary", str(APP.relative_to(PROJECT_ROOT))],
        capture_output=True,
        text=True,
        cwd=PROJECT_ROOT,
        timeout=300,
        check=False,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert completed.stdout == ""
