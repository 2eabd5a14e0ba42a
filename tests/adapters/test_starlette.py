"""poolguard.starlette against the real PostgreSQL server, through httpx's ASGI transport.

Every behaviour runs with an AsyncEngine (asyncpg) and a synchronous Engine (psycopg), whose
sessions the endpoints use from worker threads. test_fastapi.py reuses the fixtures and helpers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
import traceback
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
import sqlalchemy
from sqlalchemy import event, text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import Session
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from poolguard import Breaker, CircuitOpen, ConfigError, Guard, PoolGuardConfig, PoolSaturated
from poolguard.http import unavailable_response
from poolguard.starlette import PoolGuardMiddleware, get_session, poolguard_lifespan
from tests.support.asgi import start
from tests.support.databases import PG_ASYNC_URL, PG_URL, pg_url

pytestmark = pytest.mark.postgres

SECRET = "secret-pw"
TOKEN = "s3cret-health-token"


# --- resources ----------------------------------------------------------------------------------------


def free_port() -> int:
    """A port nothing listens on (bound, then released), so connecting is refused at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def unreachable_url(flavor: str) -> str:
    driver = "asyncpg" if flavor == "async" else "psycopg"
    return pg_url(driver, password=SECRET, port=free_port())


def checked_out(engine: sqlalchemy.Engine | AsyncEngine) -> int:
    sync_engine = engine.sync_engine if isinstance(engine, AsyncEngine) else engine
    count: int = sync_engine.pool.checkedout()  # type: ignore[attr-defined]
    return count


class Resources:
    """Engines and guards of one test; at its end nothing may be checked out, then all is released."""

    def __init__(self) -> None:
        self.engines: list[sqlalchemy.Engine | AsyncEngine] = []
        self.guards: list[Guard] = []
        self.closed: list[Guard] = []  # closed by the test itself (poolguard_lifespan)

    def engine(self, flavor: str, url: str | None = None, **kwargs: Any) -> sqlalchemy.Engine | AsyncEngine:
        kwargs.setdefault("pool_size", 2)
        kwargs.setdefault("max_overflow", 0)
        if flavor == "async":
            engine: sqlalchemy.Engine | AsyncEngine = create_async_engine(url or PG_ASYNC_URL, **kwargs)
        else:
            engine = sqlalchemy.create_engine(url or PG_URL, **kwargs)
        self.engines.append(engine)
        return engine

    def guard(self, engine: sqlalchemy.Engine | AsyncEngine, **kwargs: Any) -> Guard:
        guard = Guard(engine, **kwargs)
        self.guards.append(guard)
        return guard

    async def release(self) -> None:
        problems = [
            f"guard {guard.name!r}: {guard.stats().checked_out} checked out"
            for guard in self.guards
            if guard not in self.closed and guard.stats().checked_out
        ]
        problems += [
            f"{engine.url!r}: {checked_out(engine)} checked out" for engine in self.engines if checked_out(engine)
        ]
        for guard in self.guards:
            if guard not in self.closed:
                guard.close()
        for engine in self.engines:
            if isinstance(engine, AsyncEngine):
                await engine.dispose()
            else:
                engine.dispose()
        assert not problems, problems


@pytest.fixture
async def resources() -> AsyncIterator[Resources]:
    held = Resources()
    yield held
    await held.release()


@pytest.fixture(params=["async", "sync"])
def flavor(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def table(observer: sqlalchemy.Engine) -> Iterator[str]:
    name = f"pg_adapters_{uuid.uuid4().hex[:12]}"
    with observer.begin() as connection:
        connection.execute(text(f"CREATE TABLE {name} (id serial PRIMARY KEY, name text NOT NULL)"))
    yield name
    with observer.begin() as connection:
        connection.execute(text(f"DROP TABLE {name}"))


def names(observer: sqlalchemy.Engine, table: str) -> list[str]:
    with observer.connect() as connection:
        return list(connection.execute(text(f"SELECT name FROM {table} ORDER BY id")).scalars())


def client(app: Any) -> httpx.AsyncClient:
    """Application errors come back as the 500 the app sent, as a server would answer."""
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app, raise_app_exceptions=False), base_url="http://test")


async def execute(db: AsyncSession | Session, statement: Any, params: dict[str, Any] | None = None) -> Any:
    """Runs on the event loop for an AsyncSession, in a worker thread for a Session (as a def view would)."""
    if isinstance(db, AsyncSession):
        return await db.execute(statement, params)
    return await run_in_threadpool(db.execute, statement, params)


def assert_unavailable(response: httpx.Response, reason: str) -> None:
    """The exact 503 of API.md: Retry-After whole seconds >= 1, no-store, the JSON body byte for byte."""
    assert response.status_code == 503
    seconds = int(response.headers["retry-after"])
    assert seconds >= 1
    assert response.headers["cache-control"] == "no-store"
    assert response.headers["content-type"] == "application/json"
    expected = f'{{"error":"database_unavailable","reason":"{reason}","retry_after":{seconds}}}'
    assert response.content == expected.encode()


def assert_no_secret(*responses: httpx.Response) -> None:
    for response in responses:
        assert SECRET not in response.text
        assert all(SECRET not in value for value in response.headers.values())


# --- the application ----------------------------------------------------------------------------------


def build_app(
    guard: Guard,
    table: str,
    *,
    observer: sqlalchemy.Engine | None = None,
    probes: list[tuple[int, int, bool]] | None = None,
    **options: Any,
) -> Starlette:
    insert = text(f"INSERT INTO {table} (name) VALUES (:name)")

    async def free(request: Request) -> Response:
        return PlainTextResponse("no database needed")

    async def write(request: Request) -> Response:
        await execute(get_session(request), insert, {"name": request.path_params["name"]})
        return JSONResponse({"written": request.path_params["name"]})

    def write_def(request: Request) -> Response:
        db: Session = get_session(request)
        db.execute(insert, {"name": request.path_params["name"]})
        return JSONResponse({"written": request.path_params["name"]})

    async def fail(request: Request) -> Response:
        await execute(get_session(request), insert, {"name": request.path_params["name"]})
        raise RuntimeError("the view failed after writing")

    async def conflict(request: Request) -> Response:
        await execute(get_session(request), insert, {"name": request.path_params["name"]})
        raise HTTPException(409, "taken")

    def refuse(request: Request) -> Response:
        get_session(request).execute(insert, {"name": request.path_params["name"]})
        raise Refused

    async def sleep(request: Request) -> Response:
        await execute(get_session(request), text("SELECT pg_sleep(0.5)"))
        return PlainTextResponse("slept")

    async def stream(request: Request) -> Response:
        name = request.path_params["name"]
        await execute(get_session(request), insert, {"name": name})

        async def body() -> AsyncIterator[bytes]:
            assert probes is not None
            assert observer is not None
            probes.append((guard.stats().checked_out, checked_out(guard.engine), name in names(observer, table)))
            yield b"first "
            await asyncio.sleep(0.01)
            yield b"second"

        return StreamingResponse(body(), media_type="text/plain")

    async def background(request: Request) -> Response:
        name = request.path_params["name"]
        db = get_session(request)
        await execute(db, insert, {"name": name})

        async def later() -> None:
            # The very session object the view held, as a FastAPI dependency would hand it on.
            await execute(db, insert, {"name": f"{name}-later"})

        return JSONResponse({"written": name}, background=BackgroundTask(later))

    async def route_name(request: Request) -> Response:
        get_session(request)
        return PlainTextResponse(str(request.state.poolguard.route))

    routes = [
        Route("/", free),
        Route("/write/{name}", write, methods=["POST"]),
        Route("/write-def/{name}", write_def, methods=["POST"]),
        Route("/fail/{name}", fail, methods=["POST"]),
        Route("/conflict/{name}", conflict, methods=["POST"]),
        Route("/refuse/{name}", refuse, methods=["POST"]),
        Route("/sleep", sleep),
        Route("/stream/{name}", stream),
        Route("/background/{name}", background, methods=["POST"]),
        Route("/route/{anything}", route_name),
    ]
    return Starlette(
        routes=routes,
        middleware=[Middleware(PoolGuardMiddleware, guard=guard, **options)],
        exception_handlers={Refused: lambda request, exc: PlainTextResponse("refused", status_code=422)},
    )


class Refused(Exception):
    """An application error the app answers with an exception handler of its own (a sync one)."""


# --- commit, rollback, streaming, background tasks ----------------------------------------------------


async def test_write_that_returns_commits(resources: Resources, flavor: str, observer: Any, table: str):
    guard = resources.guard(resources.engine(flavor))
    async with client(build_app(guard, table)) as http:
        response = await http.post("/write/kept")
    assert response.status_code == 200
    assert names(observer, table) == ["kept"]


async def test_write_in_a_def_view_commits(resources: Resources, observer: Any, table: str):
    guard = resources.guard(resources.engine("sync"))
    async with client(build_app(guard, table)) as http:
        response = await http.post("/write-def/threaded")
    assert response.status_code == 200
    assert names(observer, table) == ["threaded"]


async def test_write_that_raises_rolls_back(resources: Resources, flavor: str, observer: Any, table: str):
    guard = resources.guard(resources.engine(flavor))
    async with client(build_app(guard, table)) as http:
        failed = await http.post("/fail/gone")
        kept = await http.post("/write/kept")
    assert failed.status_code == 500
    assert kept.status_code == 200
    assert names(observer, table) == ["kept"]


async def test_a_handled_error_rolls_back(resources: Resources, flavor: str, observer: Any, table: str):
    """Starlette answers ``HTTPException`` and errors with a handler inside the app, below the middleware."""
    guard = resources.guard(resources.engine(flavor))
    async with client(build_app(guard, table)) as http:
        conflict = await http.post("/conflict/gone")
        kept = await http.post("/write/kept")
        refused = await http.post("/refuse/gone-too") if flavor == "sync" else None
    assert conflict.status_code == 409
    assert kept.status_code == 200
    assert refused is None or refused.status_code == 422
    assert names(observer, table) == ["kept"]


async def test_connection_is_back_before_a_streamed_body(resources: Resources, flavor: str, observer: Any, table: str):
    guard = resources.guard(resources.engine(flavor))
    probes: list[tuple[int, int, bool]] = []
    async with client(build_app(guard, table, observer=observer, probes=probes)) as http:
        response = await http.get("/stream/streamed")
    assert response.status_code == 200
    assert response.text == "first second"
    # While the body streamed: nothing checked out, and the row already committed (seen from elsewhere).
    assert probes == [(0, 0, True)]


async def test_background_task_work_is_committed(resources: Resources, flavor: str, observer: Any, table: str):
    guard = resources.guard(resources.engine(flavor))
    async with client(build_app(guard, table)) as http:
        response = await http.post("/background/job")
    assert response.status_code == 200
    assert names(observer, table) == ["job", "job-later"]
    assert guard.stats().checked_out == 0


async def test_request_scope_is_named_by_the_route_template(resources: Resources, table: str):
    guard = resources.guard(resources.engine("async"))
    async with client(build_app(guard, table)) as http:
        response = await http.get("/route/123")
    assert response.text == "/route/{anything}"


# --- load shedding ------------------------------------------------------------------------------------


async def test_open_breaker_answers_503_and_db_free_routes_still_work(resources: Resources, flavor: str, table: str):
    engine = resources.engine(flavor, unreachable_url(flavor))
    guard = resources.guard(engine, breaker=Breaker(consecutive_failures=1))
    app = build_app(guard, table, health_detail="always")
    async with client(app) as http:
        first = await http.post("/write/x")  # the connection failure itself, counted by the breaker
        shed = await http.post("/write/x")
        free = await http.get("/")
        health = await http.get("/health/db")
    assert_unavailable(first, "circuit_open")  # a counted connection failure is a 503 too, never a 500
    assert_unavailable(shed, "circuit_open")
    assert free.status_code == 200
    assert free.text == "no database needed"
    assert health.status_code == 503
    assert health.json()["status"] == "unavailable"
    assert_no_secret(first, shed, free, health)


async def test_503_is_byte_identical_to_poolguard_http(resources: Resources, table: str):
    engine = resources.engine("async", unreachable_url("async"))
    guard = resources.guard(engine, breaker=Breaker(consecutive_failures=1))
    async with client(build_app(guard, table)) as http:
        await http.post("/write/x")
        shed = await http.post("/write/x")
    expected = unavailable_response(CircuitOpen("open", retry_after=float(shed.headers["retry-after"])))
    assert shed.status_code == expected.status
    assert shed.content == expected.body
    sent = [(k.lower(), v) for k, v in shed.headers.items() if k.lower() != "content-length"]
    assert sent == [(k.lower(), v) for k, v in expected.headers]


async def test_the_503_body_in_the_apps_own_shape(resources: Resources, table: str):
    def problem(exc: Any) -> tuple[dict[str, Any], str]:
        return {"title": "Service Unavailable", "status": 503, "detail": exc.reason}, "application/problem+json"

    engine = resources.engine("async", unreachable_url("async"))
    guard = resources.guard(engine, breaker=Breaker(consecutive_failures=1))
    async with client(build_app(guard, table, unavailable_body=problem)) as http:
        await http.post("/write/x")
        shed = await http.post("/write/x")
    assert shed.status_code == 503
    assert shed.headers["content-type"] == "application/problem+json"
    assert shed.headers["cache-control"] == "no-store"
    assert int(shed.headers["retry-after"]) >= 1  # status and headers stay poolguard's
    assert shed.json() == {"title": "Service Unavailable", "status": 503, "detail": "circuit_open"}


async def test_saturated_pool_sheds_within_the_wait_budget(resources: Resources, flavor: str, table: str):
    engine = resources.engine(flavor, pool_size=1, max_overflow=0)
    guard = resources.guard(engine, max_wait=0.3)

    async with client(build_app(guard, table)) as http:

        async def timed() -> tuple[httpx.Response, float]:
            started = time.monotonic()
            response = await http.get("/sleep")
            return response, time.monotonic() - started

        results = await asyncio.gather(*(timed() for _ in range(10)))
    statuses = sorted(response.status_code for response, _ in results)
    assert 200 in statuses
    assert 503 in statuses
    for response, elapsed in results:
        assert elapsed < 1.2, elapsed
        if response.status_code == 503:
            assert_unavailable(response, "pool_saturated")


async def test_commit_refused_at_response_start_becomes_the_503(resources: Resources, observer: Any, table: str):
    class SaturatedOnCommit(AsyncSession):
        async def commit(self) -> None:
            raise PoolSaturated("no slot for the commit", retry_after=2.5)

    engine = resources.engine("async")
    guard = resources.guard(engine, session_factory=async_sessionmaker(engine, class_=SaturatedOnCommit))
    async with client(build_app(guard, table)) as http:
        response = await http.post("/write/refused")
    assert_unavailable(response, "pool_saturated")
    assert response.headers["retry-after"] == "3"
    assert names(observer, table) == []


async def test_commit_failing_at_response_start_becomes_a_500(resources: Resources, observer: Any, table: str):
    class BrokenCommit(AsyncSession):
        async def commit(self) -> None:
            raise RuntimeError("deferred constraint violated")

    engine = resources.engine("async")
    guard = resources.guard(engine, session_factory=async_sessionmaker(engine, class_=BrokenCommit))
    async with client(build_app(guard, table)) as http:
        response = await http.post("/write/refused")
    assert response.status_code == 500
    assert response.text == "Internal Server Error"
    assert names(observer, table) == []


# --- health -------------------------------------------------------------------------------------------


async def test_health_answers_status_only_by_default(resources: Resources, flavor: str, table: str):
    guard = resources.guard(resources.engine(flavor))
    async with client(build_app(guard, table)) as http:
        response = await http.get("/health/db")
        head = await http.head("/health/db")
    assert response.status_code == 200
    assert response.content == b'{"status":"ok"}'
    assert response.headers["cache-control"] == "no-store"
    assert head.status_code == 200
    assert head.content == b""


async def test_health_detail_needs_the_bearer_token(resources: Resources, table: str):
    guard = resources.guard(resources.engine("async"), name="primary")
    app = build_app(guard, table, health_detail="when-authorized", health_token=TOKEN)
    async with client(app) as http:
        anonymous = await http.get("/health/db")
        wrong = await http.get("/health/db", headers={"Authorization": "Bearer not-the-token"})
        basic = await http.get("/health/db", headers={"Authorization": f"Basic {TOKEN}"})
        authorized = await http.get("/health/db", headers={"Authorization": f"Bearer {TOKEN}"})
    for response in (anonymous, wrong, basic):
        assert response.json() == {"status": "ok"}
    detail = authorized.json()
    assert detail["status"] == "ok"
    assert [pool["name"] for pool in detail["pools"]] == ["primary"]
    assert detail["pools"][0]["breaker"]["state"] == "closed"


async def test_health_detail_by_callable(resources: Resources, table: str):
    guard = resources.guard(resources.engine("async"))

    def from_inside(request: Request) -> bool:
        return request.headers.get("x-internal") == "yes"

    app = build_app(guard, table, health_detail="when-authorized", health_token=from_inside)
    async with client(app) as http:
        outside = await http.get("/health/db")
        inside = await http.get("/health/db", headers={"X-Internal": "yes"})
    assert outside.json() == {"status": "ok"}
    assert "pools" in inside.json()


async def test_health_unavailable_when_the_breaker_is_open(resources: Resources, table: str):
    engine = resources.engine("async", unreachable_url("async"))
    guard = resources.guard(engine, breaker=Breaker(consecutive_failures=1))
    async with client(build_app(guard, table)) as http:
        await http.post("/write/x")
        response = await http.get("/health/db")
    assert response.status_code == 503
    assert response.content == b'{"status":"unavailable"}'
    assert response.headers["retry-after"] == "1"
    assert_no_secret(response)


async def test_health_path_can_be_moved_or_turned_off(
    resources: Resources, table: str, monkeypatch: pytest.MonkeyPatch
):
    guard = resources.guard(resources.engine("async"))
    async with client(build_app(guard, table, health_path=None)) as http:
        assert (await http.get("/health/db")).status_code == 404
    monkeypatch.setenv("POOLGUARD_HEALTH_PATH", "/healthz")
    async with client(build_app(guard, table)) as http:
        assert (await http.get("/healthz")).json() == {"status": "ok"}
        assert (await http.get("/health/db")).status_code == 404


# --- plumbing -----------------------------------------------------------------------------------------


async def test_websocket_and_lifespan_scopes_pass_through_untouched(resources: Resources):
    guard = resources.guard(resources.engine("async"))
    seen: list[tuple[dict[str, Any], Any, Any]] = []

    async def inner(scope: dict[str, Any], receive: Any, send: Any) -> None:
        seen.append((scope, receive, send))

    middleware = PoolGuardMiddleware(inner, guard=guard)

    async def receive() -> dict[str, Any]:
        return {}

    async def send(message: dict[str, Any]) -> None:
        return None

    for kind in ("websocket", "lifespan"):
        scope: dict[str, Any] = {"type": kind, "path": "/health/db", "method": "GET"}
        await middleware(scope, receive, send)
        assert seen[-1] == ({"type": kind, "path": "/health/db", "method": "GET"}, receive, send)
        assert seen[-1][0] is scope


async def test_a_refused_middleware_serves_nothing_without_a_lifespan():
    """Under a server that runs no lifespan, every request raises the refusal (the server's 500 and its log)."""
    guard = Guard(sqlalchemy.create_engine(PG_URL), probe_interval=None)
    try:
        app = Starlette(routes=[Route("/", lambda request: PlainTextResponse("free"))])
        app.add_middleware(PoolGuardMiddleware, guard=guard, health_pth="/x")  # type: ignore[call-arg]
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            depths = []
            for _ in range(3):
                with pytest.raises(ConfigError, match="health_pth") as raised:
                    await http.get("/")
                depths.append(len(list(traceback.walk_tb(raised.value.__traceback__))))
        assert depths[0] == depths[2]  # one error raised again and again: its traceback must not grow
    finally:
        guard.close()


def test_bad_options_fail_the_startup(monkeypatch: pytest.MonkeyPatch):
    engine = sqlalchemy.create_engine(PG_URL)
    guard = Guard(engine)
    try:

        async def app(scope: Any, receive: Any, send: Any) -> None:
            return None

        with pytest.raises(ConfigError, match="health_pth"):
            start(PoolGuardMiddleware(app, guard=guard, health_pth="/x"))  # type: ignore[call-arg]
        with pytest.raises(ConfigError, match=r"max_wait.*poolguard\.Guard"):
            start(PoolGuardMiddleware(app, guard=guard, max_wait=2.0))  # type: ignore[call-arg]
        with pytest.raises(ConfigError, match="guard"):
            start(PoolGuardMiddleware(app))  # type: ignore[call-arg]
        with pytest.raises(ConfigError, match="health_detail"):
            start(PoolGuardMiddleware(app, guard=guard, health_detail="sometimes"))
        with pytest.raises(ConfigError, match="health_token"):
            start(PoolGuardMiddleware(app, guard=guard, health_detail="when-authorized"))
        with pytest.raises(ConfigError, match="guard"):
            start(PoolGuardMiddleware(app, guard=engine))  # type: ignore[arg-type]
        monkeypatch.setenv("POOLGUARD_HEALTH_DETAIL", "sometimes")
        with pytest.raises(ConfigError, match="health_detail"):
            start(PoolGuardMiddleware(app, guard=guard))
    finally:
        guard.close()
        engine.dispose()


async def test_get_session_without_the_middleware_says_what_to_add():
    request = Request({"type": "http", "method": "GET", "path": "/", "headers": []})
    with pytest.raises(RuntimeError, match="PoolGuardMiddleware"):
        get_session(request)


# --- lifespan -----------------------------------------------------------------------------------------


async def test_lifespan_probes_then_disposes_and_can_run_again(
    resources: Resources, flavor: str, caplog: pytest.LogCaptureFixture
):
    engine = resources.engine(flavor)
    guard = resources.guard(engine)
    disposed: list[bool] = []
    sync_engine = engine.sync_engine if isinstance(engine, AsyncEngine) else engine
    event.listen(sync_engine, "engine_disposed", lambda _: disposed.append(True))

    @contextlib.asynccontextmanager
    async def own(app: Any) -> AsyncIterator[dict[str, str]]:
        yield {"mine": "yes"}

    with caplog.at_level(logging.WARNING, logger="poolguard"):
        lifespan = poolguard_lifespan(guard, lifespan=own)
        async with lifespan(object()) as state:
            assert state == {"mine": "yes"}
            latest = guard.prober.latest
            assert latest is not None  # the startup probe ran
            assert latest.error is None
        assert disposed == [True]
        assert not guard.closed
        async with lifespan(object()):  # a second TestClient in the same test run
            if guard.is_async:
                async with guard.connection() as connection:
                    assert (await connection.execute(text("SELECT 1"))).scalar() == 1
            else:
                with guard.connection() as connection:
                    assert connection.execute(text("SELECT 1")).scalar() == 1
            assert guard.stats().checkouts == 1
        resources.closed.append(guard)
    assert disposed == [True, True]
    # The test's plain engines get the one warning that their reads are unbounded; nothing else.
    assert [r.getMessage() for r in caplog.records if "are unbounded" not in r.getMessage()] == []


async def test_lifespan_starts_while_the_database_is_down(
    resources: Resources, flavor: str, caplog: pytest.LogCaptureFixture
):
    guard = resources.guard(resources.engine(flavor, unreachable_url(flavor)))
    with caplog.at_level(logging.WARNING, logger="poolguard"):
        async with poolguard_lifespan(guard, dispose_engine=False)(object()) as state:
            assert state is None
        resources.closed.append(guard)
    warnings = [record.getMessage() for record in caplog.records]
    assert any("unavailable at startup" in message for message in warnings), warnings
    assert all(SECRET not in message for message in warnings)


@contextlib.asynccontextmanager
async def serving(app: Any) -> AsyncIterator[None]:
    """Runs the app's ASGI lifespan as a server does (startup before the block, shutdown after)."""
    inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    outbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
    task = asyncio.create_task(app(scope, inbox.get, outbox.put))
    await inbox.put({"type": "lifespan.startup"})
    assert (await outbox.get())["type"] == "lifespan.startup.complete"
    try:
        yield
    finally:
        await inbox.put({"type": "lifespan.shutdown"})
        assert (await outbox.get())["type"] == "lifespan.shutdown.complete"
        await task


async def test_whole_stack_with_a_sync_engine(resources: Resources, observer: Any, table: str):
    """Lifespan through the middleware, a def view, health; the lifespan closes and disposes at the end."""
    engine = resources.engine("sync")
    guard = resources.guard(engine)
    insert = text(f"INSERT INTO {table} (name) VALUES (:name)")

    def write(request: Request) -> Response:
        get_session(request).execute(insert, {"name": "whole-stack"})
        return PlainTextResponse("ok")

    app = Starlette(
        routes=[Route("/write", write, methods=["POST"])],
        middleware=[Middleware(PoolGuardMiddleware, guard=guard)],
        lifespan=poolguard_lifespan(guard),
    )
    async with serving(app), client(app) as http:
        assert (await http.post("/write")).text == "ok"
        assert (await http.get("/health/db")).json() == {"status": "ok"}
        assert guard.stats().checked_out == 0
    resources.closed.append(guard)
    assert names(observer, table) == ["whole-stack"]
    assert checked_out(engine) == 0


def test_guard_options_in_the_environment_must_agree_with_the_guard_passed(monkeypatch: pytest.MonkeyPatch):
    """A POOLGUARD_* pool option cannot apply to a Guard built before: refused, unless the guard has that value."""
    engines: list[sqlalchemy.Engine] = []
    guards: list[Guard] = []

    def guard(**options: Any) -> Guard:
        """A guard over an engine of its own (one guard per engine); nothing connects."""
        engines.append(sqlalchemy.create_engine(PG_URL))
        guards.append(Guard(engines[-1], **{"probe_interval": None, **options}))
        return guards[-1]

    async def app(scope: Any, receive: Any, send: Any) -> None:
        return None

    monkeypatch.setenv("POOLGUARD_PROBE_INTERVAL", "none")  # as every guard here has it: agreed
    try:
        monkeypatch.setenv("POOLGUARD_MAX_WAIT", "2.5")
        with pytest.raises(ConfigError, match=r"POOLGUARD_MAX_WAIT.*poolguard\.Guard\(engine, max_wait=\.\.\.\)"):
            start(PoolGuardMiddleware(app, guard=guard()))
        start(PoolGuardMiddleware(app, guard=guard(max_wait=2.5)))  # the guard has it: nothing ignored
        monkeypatch.delenv("POOLGUARD_MAX_WAIT")

        monkeypatch.setenv("POOLGUARD_BREAKER_OPEN_FOR", "10")
        with pytest.raises(ConfigError, match=r"POOLGUARD_BREAKER_OPEN_FOR.*breaker=poolguard\.Breaker"):
            start(PoolGuardMiddleware(app, guard=guard()))
        start(PoolGuardMiddleware(app, guard=guard(breaker=Breaker(open_for=10))))
        # The documented way to let the variables tune a guard of one's own:
        start(PoolGuardMiddleware(app, guard=guard(**PoolGuardConfig.load().guard_options())))
        monkeypatch.delenv("POOLGUARD_BREAKER_OPEN_FOR")

        monkeypatch.setenv("POOLGUARD_BREAKER", "false")
        with pytest.raises(ConfigError, match="POOLGUARD_BREAKER"):
            start(PoolGuardMiddleware(app, guard=guard()))
        start(PoolGuardMiddleware(app, guard=guard(breaker=False)))
        monkeypatch.setenv("POOLGUARD_CAPTURE_STACKS", "true")
        with pytest.raises(ConfigError, match="POOLGUARD_CAPTURE_STACKS"):
            start(PoolGuardMiddleware(app, guard=guard(breaker=False)))
        start(PoolGuardMiddleware(app, guard=guard(breaker=False, capture_stacks=True)))
    finally:
        for made in guards:
            made.close()
        for engine in engines:
            engine.dispose()


async def test_a_shed_request_leaves_no_reference_cycle(resources: Resources, table: str):
    """The 503's exception held the request's frames through its traceback, and a frame held it: a cycle
    that only the GC's full pass frees, tens of milliseconds with every request stopped (measured with
    benchmarks/overload.py: 503 p99 of 40-50 ms on FastAPI, from gen2 collections)."""
    import gc  # noqa: PLC0415

    guard = resources.guard(resources.engine("async", pool_size=1), max_wait=0.0)
    app = build_app(guard, table)
    async with client(app) as http:
        guard.gate.admission.acquire(0.0)  # the only slot, held: every checkout is refused
        try:
            assert (await http.post("/write/warm")).status_code == 503
            gc.collect()
            gc.set_debug(gc.DEBUG_SAVEALL)
            try:
                for _ in range(5):
                    assert (await http.post("/write/shed")).status_code == 503
                gc.collect()
                garbage = list(gc.garbage)
            finally:
                gc.set_debug(0)
                gc.garbage.clear()
        finally:
            guard.gate.admission.release()
    assert [o for o in garbage if isinstance(o, BaseException)] == []
