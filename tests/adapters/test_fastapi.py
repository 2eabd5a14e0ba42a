"""poolguard.fastapi: DbSession (AsyncEngine) and SyncDbSession (Engine) against the real PostgreSQL server."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Iterator
from typing import Annotated, Any

import httpx
import pytest
import sqlalchemy
from fastapi import BackgroundTasks, Depends, FastAPI, HTTPException
from fastapi.responses import StreamingResponse
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from poolguard import Breaker, ConfigError, Guard
from poolguard.fastapi import DbSession, PoolGuardMiddleware, SyncDbSession, get_session, poolguard_lifespan
from tests.adapters.test_starlette import (
    TOKEN,
    Resources,
    assert_no_secret,
    assert_unavailable,
    checked_out,
    client,
    flavor,
    names,
    resources,
    serving,
    table,
    unreachable_url,
)

pytestmark = pytest.mark.postgres

__all__ = ["flavor", "resources", "table"]  # fixtures shared with test_starlette.py (observer: tests/conftest.py)


def build_api(
    guard: Guard,
    table: str,
    *,
    observer: sqlalchemy.Engine | None = None,
    probes: list[tuple[int, int, bool]] | None = None,
    lifespan: Any = None,
    wrong: bool = False,
    **options: Any,
) -> FastAPI:
    """The same routes for both engines: async views with DbSession, def views with SyncDbSession.

    ``wrong``: also a route taking the dependency meant for the other kind of engine."""
    app = FastAPI(lifespan=lifespan)
    app.add_middleware(PoolGuardMiddleware, guard=guard, **options)
    insert = text(f"INSERT INTO {table} (name) VALUES (:name)")

    def probe(name: str) -> None:
        assert probes is not None
        assert observer is not None
        probes.append((guard.stats().checked_out, checked_out(guard.engine), name in names(observer, table)))

    @app.get("/")
    async def free() -> dict[str, str]:
        return {"database": "not used"}

    if guard.is_async:

        @app.post("/items/{name}")
        async def write(name: str, db: DbSession) -> dict[str, str]:
            await db.execute(insert, {"name": name})
            return {"written": name}

        @app.post("/items/{name}/fail")
        async def fail(name: str, db: DbSession) -> dict[str, str]:
            await db.execute(insert, {"name": name})
            raise RuntimeError("the view failed after writing")

        @app.post("/items/{name}/conflict")
        async def conflict(name: str, db: DbSession) -> dict[str, str]:
            await db.execute(insert, {"name": name})
            raise HTTPException(status_code=409, detail="conflict after writing")

        @app.get("/sleep")
        async def sleep(db: DbSession) -> dict[str, str]:
            await db.execute(text("SELECT pg_sleep(0.5)"))
            return {"slept": "yes"}

        @app.get("/stream/{name}")
        async def stream(name: str, db: DbSession) -> StreamingResponse:
            await db.execute(insert, {"name": name})

            async def body() -> AsyncIterator[bytes]:
                probe(name)
                yield b"first "
                yield b"second"

            return StreamingResponse(body(), media_type="text/plain")

        async def later(db: AsyncSession, name: str) -> None:
            await db.execute(insert, {"name": f"{name}-later"})

        @app.post("/background/{name}")
        async def background(name: str, db: DbSession, tasks: BackgroundTasks) -> dict[str, str]:
            await db.execute(insert, {"name": name})
            tasks.add_task(later, db, name)
            return {"written": name}

    else:

        @app.post("/items/{name}")
        def write_sync(name: str, db: SyncDbSession) -> dict[str, str]:
            db.execute(insert, {"name": name})
            return {"written": name}

        @app.post("/items/{name}/fail")
        def fail_sync(name: str, db: SyncDbSession) -> dict[str, str]:
            db.execute(insert, {"name": name})
            raise RuntimeError("the view failed after writing")

        @app.post("/items/{name}/conflict")
        def conflict_sync(name: str, db: SyncDbSession) -> dict[str, str]:
            db.execute(insert, {"name": name})
            raise HTTPException(status_code=409, detail="conflict after writing")

        @app.get("/sleep")
        def sleep_sync(db: SyncDbSession) -> dict[str, str]:
            db.execute(text("SELECT pg_sleep(0.5)"))
            return {"slept": "yes"}

        @app.get("/stream/{name}")
        def stream_sync(name: str, db: SyncDbSession) -> StreamingResponse:
            db.execute(insert, {"name": name})

            def body() -> Iterator[bytes]:
                probe(name)
                yield b"first "
                yield b"second"

            return StreamingResponse(body(), media_type="text/plain")

        def later_sync(db: Session, name: str) -> None:
            db.execute(insert, {"name": f"{name}-later"})

        @app.post("/background/{name}")
        def background_sync(name: str, db: SyncDbSession, tasks: BackgroundTasks) -> dict[str, str]:
            db.execute(insert, {"name": name})
            tasks.add_task(later_sync, db, name)
            return {"written": name}

    if guard.is_async and wrong:

        @app.get("/wrong-annotation")
        def wrong_sync(db: SyncDbSession) -> dict[str, str]:
            return {"never": "reached"}

    elif wrong:

        @app.get("/wrong-annotation")
        async def wrong_async(db: DbSession) -> dict[str, str]:
            return {"never": "reached"}

    return app


async def test_write_that_returns_commits_and_one_that_raises_rolls_back(
    resources: Resources, flavor: str, observer: Any, table: str
):
    guard = resources.guard(resources.engine(flavor))
    async with client(build_api(guard, table)) as http:
        kept = await http.post("/items/kept")
        failed = await http.post("/items/gone/fail")
    assert kept.json() == {"written": "kept"}
    assert failed.status_code == 500
    assert names(observer, table) == ["kept"]


async def test_http_exception_after_a_write_rolls_back(resources: Resources, flavor: str, observer: Any, table: str):
    guard = resources.guard(resources.engine(flavor))
    async with client(build_api(guard, table)) as http:
        refused = await http.post("/items/refused/conflict")
        kept = await http.post("/items/kept")
    assert refused.status_code == 409
    assert kept.status_code == 200
    assert names(observer, table) == ["kept"]


async def test_streaming_response_holds_no_connection(resources: Resources, flavor: str, observer: Any, table: str):
    guard = resources.guard(resources.engine(flavor))
    probes: list[tuple[int, int, bool]] = []
    async with client(build_api(guard, table, observer=observer, probes=probes)) as http:
        response = await http.get("/stream/streamed")
    assert response.text == "first second"
    assert probes == [(0, 0, True)]


async def test_background_task_with_the_same_session_is_committed(
    resources: Resources, flavor: str, observer: Any, table: str
):
    guard = resources.guard(resources.engine(flavor))
    async with client(build_api(guard, table)) as http:
        response = await http.post("/background/job")
    assert response.json() == {"written": "job"}
    assert names(observer, table) == ["job", "job-later"]


async def test_open_breaker_503_while_db_free_route_answers(resources: Resources, flavor: str, table: str):
    engine = resources.engine(flavor, unreachable_url(flavor))
    guard = resources.guard(engine, breaker=Breaker(consecutive_failures=1))
    async with client(build_api(guard, table, health_detail="always")) as http:
        first = await http.post("/items/x")
        shed = await http.post("/items/x")
        free = await http.get("/")
        health = await http.get("/health/db")
    assert_unavailable(first, "circuit_open")  # a counted connection failure is a 503 too, never a 500
    assert_unavailable(shed, "circuit_open")
    assert free.json() == {"database": "not used"}
    assert health.status_code == 503
    assert health.json()["status"] == "unavailable"
    assert_no_secret(first, shed, free, health)


async def test_saturated_pool_sheds_within_the_wait_budget(resources: Resources, flavor: str, table: str):
    guard = resources.guard(resources.engine(flavor, pool_size=1, max_overflow=0), max_wait=0.3)
    async with client(build_api(guard, table)) as http:

        async def timed() -> tuple[httpx.Response, float]:
            started = time.monotonic()
            response = await http.get("/sleep")
            return response, time.monotonic() - started

        results = await asyncio.gather(*(timed() for _ in range(10)))
    statuses = [response.status_code for response, _ in results]
    assert 200 in statuses
    assert 503 in statuses
    for response, elapsed in results:
        assert elapsed < 1.2, elapsed
        if response.status_code == 503:
            assert_unavailable(response, "pool_saturated")


async def test_health_status_only_unless_authorized(resources: Resources, flavor: str, table: str):
    guard = resources.guard(resources.engine(flavor))
    app = build_api(guard, table, health_detail="when-authorized", health_token=TOKEN)
    async with client(app) as http:
        anonymous = await http.get("/health/db")
        authorized = await http.get("/health/db", headers={"Authorization": f"Bearer {TOKEN}"})
    assert anonymous.status_code == 200
    assert anonymous.content == b'{"status":"ok"}'
    assert authorized.json()["pools"][0]["status"] == "ok"


async def test_session_annotation_must_match_the_engine(resources: Resources, flavor: str, table: str):
    guard = resources.guard(resources.engine(flavor))
    transport = httpx.ASGITransport(app=build_api(guard, table, wrong=True))  # no lifespan: found per request
    expected = "SyncDbSession" if flavor == "sync" else "DbSession"
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        with pytest.raises(TypeError, match=f"use poolguard.fastapi.{expected}|with poolguard.fastapi.{expected}"):
            await http.get("/wrong-annotation")


async def test_lifespan_and_middleware_in_a_fastapi_app(resources: Resources, observer: Any, table: str):
    engine = resources.engine("async")
    guard = resources.guard(engine)
    app = build_api(guard, table, lifespan=poolguard_lifespan(guard))
    async with serving(app), client(app) as http:
        assert (await http.post("/items/served")).status_code == 200
        assert (await http.get("/health/db")).json() == {"status": "ok"}
    resources.closed.append(guard)
    assert names(observer, table) == ["served"]
    assert checked_out(engine) == 0


async def test_get_session_as_a_dependency_rolls_back_on_http_exception(
    resources: Resources, flavor: str, observer: Any, table: str
):
    """``Depends(poolguard.starlette.get_session)`` behaves as DbSession does: an HTTPException rolls back."""
    guard = resources.guard(resources.engine(flavor))
    app = FastAPI()
    app.add_middleware(PoolGuardMiddleware, guard=guard)
    insert = text(f"INSERT INTO {table} (name) VALUES (:name)")

    if guard.is_async:

        @app.post("/items/{name}")
        async def write(name: str, db: Annotated[AsyncSession, Depends(get_session)]) -> dict[str, str]:
            await db.execute(insert, {"name": name})
            if name.startswith("refused"):
                raise HTTPException(status_code=409, detail="conflict after writing")
            return {"written": name}

    else:

        @app.post("/items/{name}")
        def write_sync(name: str, db: Annotated[Session, Depends(get_session)]) -> dict[str, str]:
            db.execute(insert, {"name": name})
            if name.startswith("refused"):
                raise HTTPException(status_code=409, detail="conflict after writing")
            return {"written": name}

    async with client(app) as http:
        refused = await http.post("/items/refused")
        kept = await http.post("/items/kept")
        refused_again = await http.post("/items/refused-again")
    assert refused.status_code == 409
    assert refused_again.status_code == 409
    assert kept.json() == {"written": "kept"}
    assert names(observer, table) == ["kept"]


async def test_wrong_session_dependency_fails_at_startup(resources: Resources, flavor: str, table: str):
    """Through the lifespan the server runs: startup fails, naming the route and the dependency to use."""
    guard = resources.guard(resources.engine(flavor))
    expected = "DbSession" if flavor == "async" else "SyncDbSession"
    pattern = rf"GET /wrong-annotation.*poolguard\.fastapi\.{expected}:"
    for lifespan in (None, poolguard_lifespan(guard, dispose_engine=False)):
        app = build_api(guard, table, lifespan=lifespan, wrong=True)
        inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        outbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
        task = asyncio.create_task(app(scope, inbox.get, outbox.put))
        await inbox.put({"type": "lifespan.startup"})
        answer = await outbox.get()
        assert answer["type"] == "lifespan.startup.failed"  # the server is told why, and does not serve
        assert re.search(pattern, answer["message"])
        with pytest.raises(ConfigError, match=pattern):
            await task


async def test_a_def_route_waits_for_its_connection_on_the_event_loop_not_in_a_worker_thread(
    resources: Resources, table: str
):
    """FastAPI runs ``def`` routes in a pool of 40 threads: a route waiting there for a slot would hold one,
    and enough of them starve the routes that hold connections of a thread to finish in."""
    import anyio.to_thread  # noqa: PLC0415

    guard = resources.guard(resources.engine("sync", pool_size=1), max_wait=5.0, probe_interval=None)
    limiter = anyio.to_thread.current_default_thread_limiter()
    seen: list[tuple[int, float]] = []

    async def watch() -> None:
        for _ in range(500):
            if guard.gate.admission.waiting == 2 and guard.stats().checked_out == 1:
                seen.append((guard.gate.admission.waiting, limiter.borrowed_tokens))
                return
            await asyncio.sleep(0.005)  # a poll for the moment one holds the connection and two wait

    async with client(build_api(guard, table)) as http:
        results = await asyncio.gather(http.get("/sleep"), http.get("/sleep"), http.get("/sleep"), watch())
    assert [response.status_code for response in results[:3]] == [200, 200, 200]
    assert seen == [(2, 1)]  # two requests waiting, one worker thread busy: the one holding the connection
