"""The same small app in Flask, Starlette and FastAPI, written as their users write them.

Routes (``table`` is the test's table; ``name`` a row to write):

- ``GET /nodb``: never touches the database.
- ``GET /one``: ``SELECT 1`` on the request's session.
- ``POST /write/<name>``: inserts a row; committed when the view returns (``?sleep=S``: then
  ``pg_sleep(S)`` in the same transaction, a write in flight to kill).
- ``GET /sleep/<seconds>``: ``pg_sleep`` on the request's session (a backend to kill mid-query).
- ``GET /stream/<name>``: inserts, then streams a body in two parts; ``probe()`` runs between them.
- ``POST /background/<name>`` (Starlette, FastAPI): inserts, answers, then a background task writes
  ``<name>-later`` with its own ``guard.session()``.
- ``GET /leak``: checks a connection out of the engine and never returns it (poolguard reclaims it).

``serve(kind, guard, table)`` yields an async ``Caller`` for the app, whatever its framework.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import fastapi
import flask
import httpx
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from poolguard import Guard
from poolguard.fastapi import PoolGuardMiddleware as FastAPIMiddleware
from poolguard.fastapi import SyncDbSession
from poolguard.flask import PoolGuard, db
from poolguard.starlette import PoolGuardMiddleware, get_session
from tests.faults.helpers import Caller, Reply, timed

KINDS = ("flask", "starlette", "fastapi")
"""Flask on a sync (psycopg) engine, Starlette on an async (asyncpg) one, FastAPI with def routes on psycopg."""

Probe = Callable[[], None]
KEPT: list[Any] = []
"""Connections the leaking views check out and drop (kept referenced so only poolguard can return them)."""


_sleep = text("SELECT pg_sleep(:s)")


def _insert(table: str) -> Any:
    return text(f"INSERT INTO {table} (name) VALUES (:name)")


def _leak(guard: Guard) -> str:
    """A sync view that checks a connection out of the engine and drops it."""
    engine: Any = guard.engine
    KEPT.append(engine.connect())
    return "leaked"


def flask_app(guard: Guard, table: str, probe: Probe) -> flask.Flask:
    app = flask.Flask(__name__)
    PoolGuard(app, guard)

    @app.get("/nodb")
    def nodb() -> str:
        return "ok"

    @app.get("/one")
    def one() -> dict[str, Any]:
        return {"one": db.execute(text("SELECT 1")).scalar()}

    @app.post("/write/<name>")
    def write(name: str) -> dict[str, Any]:
        db.execute(_insert(table), {"name": name})
        db.execute(_sleep, {"s": float(flask.request.args.get("sleep", 0))})
        return {"written": name}

    @app.get("/sleep/<seconds>")
    def sleep(seconds: str) -> str:
        db.execute(_sleep, {"s": float(seconds)})
        return "slept"

    @app.get("/stream/<name>")
    def stream(name: str) -> flask.Response:
        db.execute(_insert(table), {"name": name})

        def body() -> Iterator[bytes]:
            yield b"first "
            probe()
            yield b"second"

        return flask.Response(flask.stream_with_context(body()))

    app.get("/leak")(lambda: _leak(guard))

    return app


def starlette_app(guard: Guard, table: str, probe: Probe) -> Starlette:
    async def nodb(request: Request) -> Response:
        return PlainTextResponse("ok")

    async def one(request: Request) -> Response:
        return JSONResponse({"one": (await get_session(request).execute(text("SELECT 1"))).scalar()})

    async def write(request: Request) -> Response:
        name = request.path_params["name"]
        await get_session(request).execute(_insert(table), {"name": name})
        await get_session(request).execute(_sleep, {"s": float(request.query_params.get("sleep", 0))})
        return JSONResponse({"written": name})

    async def sleep(request: Request) -> Response:
        await get_session(request).execute(_sleep, {"s": float(request.path_params["seconds"])})
        return PlainTextResponse("slept")

    async def stream(request: Request) -> Response:
        await get_session(request).execute(_insert(table), {"name": request.path_params["name"]})

        async def body() -> AsyncIterator[bytes]:
            yield b"first "
            await asyncio.to_thread(probe)
            yield b"second"

        return StreamingResponse(body())

    async def background(request: Request) -> Response:
        name = request.path_params["name"]
        await get_session(request).execute(_insert(table), {"name": name})

        async def later() -> None:
            async with guard.session() as session:
                await session.execute(_insert(table), {"name": f"{name}-later"})
                await asyncio.to_thread(probe)

        return JSONResponse({"written": name}, background=BackgroundTask(later))

    async def leak(request: Request) -> Response:
        engine: Any = guard.engine
        KEPT.append(await engine.connect().start())
        return PlainTextResponse("leaked")

    routes = [
        Route("/nodb", nodb),
        Route("/one", one),
        Route("/write/{name}", write, methods=["POST"]),
        Route("/sleep/{seconds}", sleep),
        Route("/stream/{name}", stream),
        Route("/background/{name}", background, methods=["POST"]),
        Route("/leak", leak),
    ]
    return Starlette(routes=routes, middleware=[Middleware(PoolGuardMiddleware, guard=guard)])


def fastapi_app(guard: Guard, table: str, probe: Probe) -> fastapi.FastAPI:
    app = fastapi.FastAPI()
    app.add_middleware(FastAPIMiddleware, guard=guard)

    @app.get("/nodb")
    def nodb() -> str:
        return "ok"

    @app.get("/one")
    def one(session: SyncDbSession) -> dict[str, Any]:
        return {"one": session.execute(text("SELECT 1")).scalar()}

    @app.post("/write/{name}")
    def write(name: str, session: SyncDbSession, sleep: float = 0.0) -> dict[str, Any]:
        session.execute(_insert(table), {"name": name})
        session.execute(_sleep, {"s": sleep})
        return {"written": name}

    @app.get("/sleep/{seconds}")
    def sleep(seconds: float, session: SyncDbSession) -> str:
        session.execute(_sleep, {"s": seconds})
        return "slept"

    @app.get("/stream/{name}")
    def stream(name: str, session: SyncDbSession) -> StreamingResponse:
        session.execute(_insert(table), {"name": name})

        def body() -> Iterator[bytes]:
            yield b"first "
            probe()
            yield b"second"

        return StreamingResponse(body())

    @app.post("/background/{name}")
    def background(name: str, session: SyncDbSession, tasks: fastapi.BackgroundTasks) -> dict[str, Any]:
        session.execute(_insert(table), {"name": name})

        def later() -> None:
            with guard.session() as own:
                own.execute(_insert(table), {"name": f"{name}-later"})
                probe()

        tasks.add_task(later)
        return {"written": name}

    app.get("/leak")(lambda: _leak(guard))

    return app


def _nothing() -> None:
    """The default probe."""


@contextlib.asynccontextmanager
async def serve(kind: str, guard: Guard, table: str, probe: Probe = _nothing) -> AsyncIterator[Caller]:
    """An async caller for ``kind``'s app (Flask's test client runs in a worker thread)."""
    if kind == "flask":
        client = flask_app(guard, table, probe).test_client()

        def flask_call(method: str, path: str) -> tuple[int, dict[str, str], bytes]:
            response = client.open(path, method=method)
            return response.status_code, dict(response.headers), response.get_data()

        async def call_flask(method: str, path: str) -> Reply:
            return await timed(lambda: asyncio.to_thread(flask_call, method, path))

        yield call_flask
        return
    app: Any = starlette_app(guard, table, probe) if kind == "starlette" else fastapi_app(guard, table, probe)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver", timeout=30) as http:

        async def asgi_call(method: str, path: str) -> tuple[int, dict[str, str], bytes]:
            response = await http.request(method, path)
            return response.status_code, dict(response.headers), response.content

        async def call_asgi(method: str, path: str) -> Reply:
            return await timed(lambda: asgi_call(method, path))

        yield call_asgi


def engine_kind(kind: str) -> str:
    """Which driver ``kind``'s app runs on: ``"asyncpg"`` (Starlette) or ``"psycopg"``."""
    return "asyncpg" if kind == "starlette" else "psycopg"


def is_async(engine: Any) -> bool:
    return isinstance(engine, AsyncEngine)
