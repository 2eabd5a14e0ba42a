"""poolguard.fastapi.DbConnection and poolguard.starlette.get_connection: a guard over an asyncpg pool made in
the app's lifespan, against the real PostgreSQL server."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import pytest
from fastapi import FastAPI, HTTPException
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

import poolguard
from poolguard import ConfigError, Guard
from poolguard.fastapi import DbConnection, DbSession, PoolGuardMiddleware
from poolguard.starlette import PoolGuardMiddleware as StarletteMiddleware
from poolguard.starlette import get_connection
from tests.adapters.test_starlette import assert_unavailable, client, serving
from tests.support.databases import DATABASE, HOST, PG_PORT, USER

pytestmark = pytest.mark.postgres

URL = f"postgresql://{USER}@{HOST}:{PG_PORT}/{DATABASE}"
LIFESPAN: dict[str, Any] = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}


def build(*, wrong: bool = False, **guard_options: Any) -> FastAPI:
    """The app as its users write it: pool and guard made in the lifespan, the middleware given a function."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        pool = await poolguard.create_asyncpg_pool(URL, service_name="asyncpg-api", workers=2)
        app.state.pool = pool
        app.state.guard = Guard(pool, **{"probe_interval": None, **guard_options})
        try:
            yield
        finally:
            app.state.guard.close()
            await pool.close()

    app = FastAPI(lifespan=lifespan)
    app.add_middleware(PoolGuardMiddleware, guard=lambda: app.state.guard)

    @app.get("/one")
    async def one(conn: DbConnection) -> dict[str, Any]:
        assert isinstance(conn, asyncpg.Connection)
        return {"one": await conn.fetchval("SELECT 1"), "again": await conn.fetchval("SELECT pg_backend_pid()")}

    @app.get("/twice")
    async def twice(request: Request) -> dict[str, bool]:
        # Two first uses at once (a task group's): one acquire, one connection.
        first, second = await asyncio.gather(get_connection(request), get_connection(request))
        return {"same": first is second}

    @app.get("/fails")
    async def fails(conn: DbConnection) -> None:
        await conn.fetchval("SELECT 1")
        raise RuntimeError("the view failed")

    @app.get("/refused")
    async def refused(conn: DbConnection) -> None:
        await conn.fetchval("SELECT 1")
        raise HTTPException(409)

    @app.get("/nodb")
    async def nodb() -> dict[str, str]:
        return {"db": "not used"}

    if wrong:

        @app.get("/wrong")
        async def wrong_route(db: DbSession) -> None:
            pass

    return app


def acquired(app: FastAPI) -> int:
    pool: asyncpg.Pool = app.state.pool
    return pool.get_size() - pool.get_idle_size()


async def test_routes_get_the_requests_connection_and_it_goes_back(caplog: pytest.LogCaptureFixture) -> None:
    app = build()
    async with serving(app), client(app) as http:
        one = await http.get("/one")
        assert one.status_code == 200
        assert one.json()["one"] == 1
        assert (await http.get("/twice")).json() == {"same": True}
        assert (await http.get("/fails")).status_code == 500
        assert (await http.get("/refused")).status_code == 409
        assert (await http.get("/nodb")).status_code == 200
        health = await http.get("/health/db")
        assert health.status_code == 200
        assert acquired(app) == 0
        guard: Guard = app.state.guard
        stats = guard.stats()
        assert stats.checkouts == 4
        assert stats.leaks_reported == 0
        assert guard.gate.held == 0
        assert guard.breaker is not None
        assert guard.breaker.failure_rate == 0.0
    assert "still holding a connection" not in caplog.text


async def test_an_open_breaker_answers_503_and_db_free_routes_still_answer() -> None:
    app = build()
    async with serving(app), client(app) as http:
        assert (await http.get("/one")).status_code == 200
        guard: Guard = app.state.guard
        assert guard.breaker is not None
        guard.breaker.trip()
        assert_unavailable(await http.get("/one"), "circuit_open")
        assert (await http.get("/nodb")).status_code == 200
        assert acquired(app) == 0


async def test_a_full_pool_answers_503_pool_saturated() -> None:
    app = build(max_wait=0.0)
    async with serving(app), client(app) as http:
        guard: Guard = app.state.guard
        async with guard.connection(), guard.connection(), guard.connection():  # workers=2: max_size 3
            assert_unavailable(await http.get("/one"), "pool_saturated")
        assert (await http.get("/one")).status_code == 200


async def test_a_connection_lost_in_a_request_answers_503() -> None:
    app = build()

    @app.get("/killed")
    async def killed(conn: DbConnection) -> None:
        pid = await conn.fetchval("SELECT pg_backend_pid()")
        killer = await asyncpg.connect(URL)
        try:
            await killer.execute("SELECT pg_terminate_backend($1)", pid)
        finally:
            await killer.close()
        await asyncio.sleep(0.1)
        await conn.fetchval("SELECT 1")

    async with serving(app), client(app) as http:
        assert_unavailable(await http.get("/killed"), "circuit_open")
        assert (await http.get("/one")).status_code == 200
        assert acquired(app) == 0


async def test_a_session_dependency_on_an_asyncpg_guard_fails_at_startup_naming_dbconnection() -> None:
    app = build(wrong=True)
    inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    outbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    task = asyncio.create_task(app(dict(LIFESPAN), inbox.get, outbox.put))
    await inbox.put({"type": "lifespan.startup"})
    answer = await outbox.get()
    assert answer["type"] == "lifespan.startup.failed"
    assert re.search(r"GET /wrong.*DbSession.*poolguard\.fastapi\.DbConnection", answer["message"])
    await inbox.put({"type": "lifespan.shutdown"})
    assert (await outbox.get())["type"] == "lifespan.shutdown.complete"
    await task


async def test_a_guard_function_that_returns_something_else_fails_at_startup() -> None:
    app = FastAPI()
    app.add_middleware(PoolGuardMiddleware, guard=lambda: "not a guard")
    inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    outbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    task = asyncio.create_task(app(dict(LIFESPAN), inbox.get, outbox.put))
    await inbox.put({"type": "lifespan.startup"})
    answer = await outbox.get()
    assert answer["type"] == "lifespan.startup.failed"
    assert "PoolGuardMiddleware.guard" in answer["message"]
    assert "a function returning <str>" in answer["message"]
    await inbox.put({"type": "lifespan.shutdown"})
    await outbox.get()
    await task
    with pytest.raises(ConfigError, match=r"PoolGuardMiddleware\.guard"):
        await app({"type": "http"}, inbox.get, outbox.put)


async def test_starlette_get_connection_and_its_misuse() -> None:
    pool = await poolguard.create_asyncpg_pool(URL, workers=1)
    guard = Guard(pool, probe_interval=None)

    async def view(request: Request) -> JSONResponse:
        conn = await get_connection(request)
        return JSONResponse({"same": conn is await get_connection(request), "one": await conn.fetchval("SELECT 1")})

    app = Starlette(routes=[Route("/", view)], middleware=[Middleware(StarletteMiddleware, guard=guard)])
    bare = Starlette(routes=[Route("/", view)])
    try:
        async with client(app) as http:
            assert (await http.get("/")).json() == {"same": True, "one": 1}
        async with client(bare) as http:
            assert (await http.get("/")).status_code == 500
        with pytest.raises(RuntimeError, match=r"get_connection\(\) found no request scope"):
            await get_connection(Request({"type": "http", "state": {}}))
        assert pool.get_size() - pool.get_idle_size() == 0
    finally:
        guard.close()
        await pool.close()
