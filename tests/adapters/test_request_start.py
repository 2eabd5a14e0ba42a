"""``trust_request_start`` in Flask, Starlette and FastAPI, on PostgreSQL.

A request whose ``X-Request-Start`` says it queued 2 s in front of the app (past ``max_wait``, 1 s)
gets poolguard's 503 at its first database use, before it touches the pool; a DB-free route still
answers. Without the option, or with a header the app cannot read, nothing changes.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx
import pytest
import sqlalchemy
from fastapi import FastAPI
from flask import Flask
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine
from sqlalchemy.orm import Session
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from poolguard import ConfigError, Guard
from poolguard.fastapi import DbSession
from poolguard.fastapi import PoolGuardMiddleware as FastAPIMiddleware
from poolguard.flask import PoolGuard, db
from poolguard.starlette import PoolGuardMiddleware, get_session
from tests.support.asgi import astart
from tests.support.clock import arrived
from tests.support.databases import PG_ASYNC_URL, PG_URL

pytestmark = pytest.mark.postgres

SELECT_1 = text("SELECT 1")
UNREADABLE = ("soon", "t=", "t=1.7e15", "t=17000000000000000000000", "t=100")


def assert_pool_saturated(status: int, headers: Any, body: bytes) -> None:
    """poolguard's 503, byte for byte: Retry-After whole seconds, no-store, its JSON body."""
    assert status == 503, body
    assert headers["Retry-After"] == "1"
    assert headers["Cache-Control"] == "no-store"
    assert headers["Content-Type"] == "application/json"
    assert body == b'{"error":"database_unavailable","reason":"pool_saturated","retry_after":1}'


def assert_never_reached_the_pool(guard: Guard) -> None:
    stats = guard.stats()
    assert (stats.connections_created, stats.checkouts, stats.checked_out) == (0, 0, 0)
    assert stats.shed_by_reason["pool_saturated"] >= 1


@pytest.fixture
def make_guard() -> Iterator[Callable[..., Guard]]:
    """Guards over fresh PostgreSQL engines (pool of 2); nothing may be left checked out."""
    made: list[tuple[Guard, sqlalchemy.Engine]] = []

    def factory(**options: Any) -> Guard:
        engine = sqlalchemy.create_engine(PG_URL, pool_size=2, max_overflow=0)
        guard = Guard(engine, **options)
        made.append((guard, engine))
        return guard

    yield factory
    left = [guard.stats().checked_out for guard, _ in made]
    for guard, engine in made:
        guard.close()
        engine.dispose()
    assert not any(left), left


@pytest.fixture
async def make_async_guard() -> AsyncIterator[Callable[..., Guard]]:
    made: list[tuple[Guard, AsyncEngine]] = []

    def factory(**options: Any) -> Guard:
        engine = create_async_engine(PG_ASYNC_URL, pool_size=2, max_overflow=0)
        guard = Guard(engine, **options)
        made.append((guard, engine))
        return guard

    yield factory
    left = [guard.stats().checked_out for guard, _ in made]
    for guard, engine in made:
        guard.close()
        await engine.dispose()
    assert not any(left), left


# -- Flask ---------------------------------------------------------------------------------------------


def flask_app(guard: Guard, config: dict[str, Any] | None = None, **options: Any) -> Flask:
    app = Flask(__name__)
    app.config.update(config or {})
    PoolGuard(app, guard, **options)

    @app.get("/db")
    def with_db() -> str:
        db.execute(SELECT_1)
        return "ok"

    @app.get("/free")
    def free() -> str:
        return "free"

    return app


@pytest.mark.parametrize(
    ("options", "config"),
    [({"trust_request_start": True}, {}), ({}, {"POOLGUARD_TRUST_REQUEST_START": True})],
    ids=["keyword", "flask-config"],
)
def test_flask_a_request_that_queued_past_max_wait_gets_the_503_and_db_free_routes_answer(
    make_guard: Callable[..., Guard], options: dict[str, Any], config: dict[str, Any]
) -> None:
    guard = make_guard()
    client = flask_app(guard, config, **options).test_client()

    response = client.get("/db", headers={"X-Request-Start": arrived(2.0)})
    assert_pool_saturated(response.status_code, response.headers, response.data)
    free = client.get("/free", headers={"X-Request-Start": arrived(2.0)})
    assert (free.status_code, free.data) == (200, b"free")
    assert_never_reached_the_pool(guard)

    recent = client.get("/db", headers={"X-Request-Start": arrived(0.05)})
    assert (recent.status_code, recent.data) == (200, b"ok")


def test_flask_ignores_the_header_unless_trusted(make_guard: Callable[..., Guard]) -> None:
    guard = make_guard()
    client = flask_app(guard).test_client()
    response = client.get("/db", headers={"X-Request-Start": arrived(2.0)})
    assert (response.status_code, response.data) == (200, b"ok")
    assert guard.stats().shed == 0


@pytest.mark.parametrize("header", UNREADABLE)
def test_flask_ignores_a_header_it_cannot_read(make_guard: Callable[..., Guard], header: str) -> None:
    guard = make_guard()
    client = flask_app(guard, trust_request_start=True).test_client()
    response = client.get("/db", headers={"X-Request-Start": header})
    assert (response.status_code, response.data) == (200, b"ok")
    assert client.get("/db").status_code == 200
    assert guard.stats().shed == 0


def test_flask_reads_the_option_from_the_environment(
    make_guard: Callable[..., Guard], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("POOLGUARD_TRUST_REQUEST_START", "true")
    client = flask_app(make_guard()).test_client()
    response = client.get("/db", headers={"X-Request-Start": arrived(2.0)})
    assert response.status_code == 503


def test_flask_refuses_a_bad_value_at_startup(make_guard: Callable[..., Guard]) -> None:
    guard = make_guard()
    with pytest.raises(ConfigError, match="trust_request_start"):
        flask_app(guard, {"POOLGUARD_TRUST_REQUEST_START": "yes"})


# -- Starlette and FastAPI ----------------------------------------------------------------------------------


def starlette_app(guard: Guard, **options: Any) -> Starlette:
    async def with_db(request: Request) -> Response:
        session = get_session(request)
        if isinstance(session, AsyncSession):
            await session.execute(SELECT_1)
        else:
            sync_session: Session = session
            await run_in_threadpool(sync_session.execute, SELECT_1)
        return PlainTextResponse("ok")

    async def free(request: Request) -> Response:
        return PlainTextResponse("free")

    return Starlette(
        routes=[Route("/db", with_db), Route("/free", free)],
        middleware=[Middleware(PoolGuardMiddleware, guard=guard, **options)],
    )


def fastapi_app(guard: Guard, **options: Any) -> FastAPI:
    app = FastAPI()
    app.add_middleware(FastAPIMiddleware, guard=guard, **options)

    @app.get("/db")
    async def with_db(session: DbSession) -> str:
        await session.execute(SELECT_1)
        return "ok"

    @app.get("/free")
    async def free() -> str:
        return "free"

    return app


def client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app, raise_app_exceptions=False), base_url="http://test")


@pytest.fixture(params=["starlette-async", "starlette-sync", "fastapi"])
def asgi_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def make_asgi_app(
    asgi_kind: str, make_guard: Callable[..., Guard], make_async_guard: Callable[..., Guard]
) -> Callable[..., tuple[Any, Guard]]:
    def factory(**options: Any) -> tuple[Any, Guard]:
        guard = make_guard() if asgi_kind == "starlette-sync" else make_async_guard()
        build = fastapi_app if asgi_kind == "fastapi" else starlette_app
        return build(guard, **options), guard

    return factory


async def test_asgi_a_request_that_queued_past_max_wait_gets_the_503_and_db_free_routes_answer(
    make_asgi_app: Callable[..., tuple[Any, Guard]],
) -> None:
    app, guard = make_asgi_app(trust_request_start=True)
    await astart(app)
    async with client(app) as http:
        response = await http.get("/db", headers={"X-Request-Start": arrived(2.0)})
        assert_pool_saturated(response.status_code, response.headers, response.content)
        free = await http.get("/free", headers={"X-Request-Start": arrived(2.0)})
        assert free.status_code == 200
        assert_never_reached_the_pool(guard)
        recent = await http.get("/db", headers={"X-Request-Start": arrived(0.05)})
        assert recent.status_code == 200


async def test_asgi_ignores_the_header_unless_trusted(make_asgi_app: Callable[..., tuple[Any, Guard]]) -> None:
    app, guard = make_asgi_app()
    async with client(app) as http:
        response = await http.get("/db", headers={"X-Request-Start": arrived(2.0)})
    assert response.status_code == 200
    assert guard.stats().shed == 0


async def test_asgi_ignores_a_header_it_cannot_read(make_asgi_app: Callable[..., tuple[Any, Guard]]) -> None:
    app, guard = make_asgi_app(trust_request_start=True)
    async with client(app) as http:
        for header in UNREADABLE:
            response = await http.get("/db", headers={"X-Request-Start": header})
            assert response.status_code == 200, header
        assert (await http.get("/db")).status_code == 200
    assert guard.stats().shed == 0


async def test_asgi_the_last_of_several_headers_counts(make_asgi_app: Callable[..., tuple[Any, Guard]]) -> None:
    """A client's own ``X-Request-Start`` before the proxy's cannot shed or speed up the request."""
    app, _guard = make_asgi_app(trust_request_start=True)
    async with client(app) as http:
        late_last = [("X-Request-Start", arrived(0.0)), ("X-Request-Start", arrived(2.0))]
        assert (await http.get("/db", headers=late_last)).status_code == 503
        recent_last = [("X-Request-Start", arrived(2.0)), ("X-Request-Start", arrived(0.0))]
        assert (await http.get("/db", headers=recent_last)).status_code == 200


async def test_asgi_reads_the_option_from_the_environment(
    make_asgi_app: Callable[..., tuple[Any, Guard]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("POOLGUARD_TRUST_REQUEST_START", "1")
    app, _guard = make_asgi_app()
    async with client(app) as http:
        assert (await http.get("/db", headers={"X-Request-Start": arrived(2.0)})).status_code == 503


async def test_asgi_refuses_a_bad_value_at_startup(make_asgi_app: Callable[..., tuple[Any, Guard]]) -> None:
    app, _guard = make_asgi_app(trust_request_start="yes")
    with pytest.raises(ConfigError, match="trust_request_start"):
        await astart(app)
