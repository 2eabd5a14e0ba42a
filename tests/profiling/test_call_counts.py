"""poolguard's cost per checkout and per request, in calls, pinned so that a change that adds one fails.

Each scenario runs warm (connections made, caches filled, the breaker's window full) and is counted
twice; both counts must agree, then match the pin in call_counts.txt. The guards' clocks stand
still, so work poolguard does at most once a second never lands in a counted run. Requests go
straight into the WSGI or ASGI app, in this thread: the profiler sees one thread, which is also why
FastAPI's ``def`` routes (SyncDbSession, run in worker threads) are not pinned here.
Rewrite the pins after a deliberate change: POOLGUARD_WRITE_CALL_COUNTS=1 python -m pytest tests/profiling
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any
from unittest import mock

import asyncpg
import django
import pytest
import sqlalchemy
from django.conf import settings
from fastapi import FastAPI
from flask import Flask
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF
from sqlalchemy import text
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route
from werkzeug.test import EnvironBuilder

from poolguard import Guard
from poolguard.fastapi import DbSession
from poolguard.fastapi import PoolGuardMiddleware as FastAPIMiddleware
from poolguard.flask import PoolGuard, db
from poolguard.starlette import PoolGuardMiddleware, get_session
from tests.profiling.calls import acount_calls, assert_pinned, count_calls
from tests.support.clock import FakeClock, arrived
from tests.support.databases import DATABASE, HOST, PG_PORT, USER

if not settings.configured:
    from tests.django import settings as django_test_settings

    settings.configure(
        **{name: getattr(django_test_settings, name) for name in dir(django_test_settings) if name.isupper()}
    )
    django.setup()

from django.core.handlers.wsgi import WSGIHandler
from django.db import connections
from django.test import RequestFactory, override_settings

pytestmark = pytest.mark.postgres

WARM_UP = 30
"""Requests before counting: more than the breaker's window (20), whose fast path starts once it is full."""

SELECT_1 = text("SELECT 1")
PG_DSN = f"postgresql://{USER}@{HOST}:{PG_PORT}/{DATABASE}"


def warm_then_pin(scenario: str, run: Callable[[], object]) -> None:
    for _ in range(WARM_UP):
        run()
    assert_pinned(scenario, count_calls(run), count_calls(run))


# -- one checkout and checkin ------------------------------------------------------------------------


def test_checkout_and_checkin_in_a_request_scope(guard: Guard, engine: sqlalchemy.Engine):
    def run() -> None:
        with guard.request_scope():
            engine.pool.connect().close()

    warm_then_pin("checkout_checkin_in_scope", run)


def test_checkout_and_checkin_outside_any_scope(guard: Guard, engine: sqlalchemy.Engine):
    """Counted, not gated: a checkout no unit of work of the guard made (a script, a migration)."""
    warm_then_pin("checkout_checkin_unscoped", lambda: engine.pool.connect().close())


def test_connection_block(guard: Guard):
    def run() -> None:
        with guard.connection():
            pass

    warm_then_pin("connection_block", run)


def test_checkouts_of_an_unsampled_request_with_the_sdk(engine: sqlalchemy.Engine):
    """With the OpenTelemetry SDK behind the guard and the request's span not sampled (the common case).

    A run is 16 checkouts: the SDK path queues two samples per checkout and records them every 32.
    """
    meter_provider = MeterProvider(metric_readers=[InMemoryMetricReader()])
    tracer_provider = TracerProvider(sampler=ALWAYS_OFF)
    guard = Guard(engine, clock=FakeClock(), tracer_provider=tracer_provider, meter_provider=meter_provider)
    tracer = tracer_provider.get_tracer(__name__)

    def run() -> None:
        with tracer.start_as_current_span("GET /"):
            for _ in range(16):
                with guard.request_scope():
                    engine.pool.connect().close()

    try:
        warm_then_pin("checkout_checkin_in_scope_sdk_unsampled_x16", run)
    finally:
        guard.close()
        meter_provider.shutdown()
        tracer_provider.shutdown()


# -- Flask ---------------------------------------------------------------------------------------------


def wsgi_get(app: Any, environ: Callable[[], dict[str, Any]]) -> Callable[[], None]:
    """One GET through a WSGI app, in this thread: response read and closed, as a server does."""

    def run() -> None:
        statuses: list[str] = []
        response = app(environ(), lambda status, headers, exc_info=None: statuses.append(status))
        try:
            b"".join(response)
        finally:
            response.close()
        assert statuses == ["200 OK"]

    return run


@pytest.fixture
def flask_app(guard: Guard) -> Flask:
    app = Flask(__name__)
    PoolGuard(app, guard)

    @app.get("/db")
    def with_db() -> str:
        db.execute(SELECT_1)
        return "ok"

    @app.get("/free")
    def free() -> str:
        return "ok"

    return app


@pytest.mark.parametrize("path", ["/db", "/free"])
def test_flask_request(flask_app: Flask, path: str):
    run = wsgi_get(flask_app, lambda: EnvironBuilder(path=path).get_environ())
    warm_then_pin(f"flask_{path.strip('/')}", run)


def test_flask_request_with_a_trusted_request_start(guard: Guard):
    """What reading ``X-Request-Start`` adds, with the header present (the pins above are of the option off)."""
    app = Flask(__name__)
    PoolGuard(app, guard, trust_request_start=True)

    @app.get("/db")
    def with_db() -> str:
        db.execute(SELECT_1)
        return "ok"

    run = wsgi_get(app, lambda: EnvironBuilder(path="/db", headers={"X-Request-Start": arrived(0.01)}).get_environ())
    warm_then_pin("flask_db_request_start", run)


# -- Starlette and FastAPI -----------------------------------------------------------------------------


def asgi_get(app: Any, path: str, headers: Callable[[], list[tuple[bytes, bytes]]] = list) -> Callable[[], Any]:
    """One GET through an ASGI app, awaited on the test's event loop (no test client, no other thread)."""

    async def run() -> None:
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "GET",
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "root_path": "",
            "query_string": b"",
            "headers": [(b"host", b"testserver"), *headers()],
            "client": ("127.0.0.1", 50000),
            "server": ("testserver", 80),
        }
        sent: list[dict[str, Any]] = []

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        await app(scope, receive, send)
        assert sent[0]["status"] == 200, sent

    return run


async def awarm_then_pin(scenario: str, run: Callable[[], Any]) -> None:
    for _ in range(WARM_UP):
        await run()
    assert_pinned(scenario, await acount_calls(run), await acount_calls(run))


@pytest.fixture
def fastapi_app(async_guard: Guard) -> FastAPI:
    app = FastAPI()
    app.add_middleware(FastAPIMiddleware, guard=async_guard)

    @app.get("/db")
    async def with_db(db: DbSession) -> str:
        await db.execute(SELECT_1)
        return "ok"

    @app.get("/free")
    async def free() -> str:
        return "ok"

    return app


@pytest.fixture
def starlette_app(async_guard: Guard) -> Starlette:
    async def with_db(request: Request) -> Response:
        await get_session(request).execute(SELECT_1)
        return PlainTextResponse("ok")

    async def free(request: Request) -> Response:
        return PlainTextResponse("ok")

    return Starlette(
        routes=[Route("/db", with_db), Route("/free", free)],
        middleware=[Middleware(PoolGuardMiddleware, guard=async_guard)],
    )


@pytest.mark.parametrize("path", ["/db", "/free"])
async def test_fastapi_request(fastapi_app: FastAPI, path: str):
    await awarm_then_pin(f"fastapi_{path.strip('/')}", asgi_get(fastapi_app, path))


@pytest.mark.parametrize("path", ["/db", "/free"])
async def test_starlette_request(starlette_app: Starlette, path: str):
    await awarm_then_pin(f"starlette_{path.strip('/')}", asgi_get(starlette_app, path))


async def test_starlette_request_with_a_trusted_request_start(async_guard: Guard):
    async def with_db(request: Request) -> Response:
        await get_session(request).execute(SELECT_1)
        return PlainTextResponse("ok")

    app = Starlette(
        routes=[Route("/db", with_db)],
        middleware=[Middleware(PoolGuardMiddleware, guard=async_guard, trust_request_start=True)],
    )
    run = asgi_get(app, "/db", lambda: [(b"x-request-start", arrived(0.01).encode())])
    await awarm_then_pin("starlette_db_request_start", run)


# -- Django --------------------------------------------------------------------------------------------


class CountedClock(FakeClock):
    """A clock that stands still and counts its reads."""

    reads = 0

    def __call__(self) -> float:
        self.reads += 1
        return self.now


@pytest.fixture
def django_clock() -> CountedClock:
    return CountedClock()


@pytest.fixture
def django_handler(django_clock: CountedClock) -> Iterator[WSGIHandler]:
    """Django's WSGI handler with poolguard's middleware, its guards rebuilt on a clock that stands still.

    Django's guards are built from settings, which take no clock; ``time.monotonic`` is the clock they
    take when built, so it is replaced while they are rebuilt (and only then).
    """
    with mock.patch("time.monotonic", django_clock):
        override = override_settings(POOLGUARD=settings.POOLGUARD, ROOT_URLCONF="tests.profiling.django_urls")
        override.enable()
    try:
        yield WSGIHandler()
    finally:
        override.disable()
        connections.close_all()


@pytest.mark.parametrize("path", ["/db/", "/free/"])
def test_django_request(django_handler: WSGIHandler, django_clock: CountedClock, path: str):
    run = wsgi_get(django_handler, lambda: RequestFactory().get(path).environ)
    warm_then_pin(f"django_{path.strip('/')}", run)
    if path == "/db/":
        assert django_clock.reads > 0, "Django's guards no longer take time.monotonic when built: give them a clock"


# -- asyncpg: the checkout poolguard makes itself ------------------------------------------------------


@pytest.fixture
async def asyncpg_guard() -> AsyncIterator[Guard]:
    pool = await asyncpg.create_pool(PG_DSN, min_size=0, max_size=2)
    guard = Guard(pool, clock=FakeClock())
    yield guard
    guard.close()
    held = pool.get_size() - pool.get_idle_size()
    await pool.close()
    assert held == 0


async def test_asyncpg_connection_block(asyncpg_guard: Guard):
    """``async with guard.connection()`` on an asyncpg pool: its own unit, admission, acquire, release."""

    async def run() -> None:
        async with asyncpg_guard.connection():
            pass

    await awarm_then_pin("asyncpg_connection_block", run)


async def test_asyncpg_connection_block_in_a_request_scope(asyncpg_guard: Guard):
    """Joining a request's unit of work (what a route's ``guard.connection()`` does)."""

    async def run() -> None:
        async with asyncpg_guard.request_scope(), asyncpg_guard.connection():
            pass

    await awarm_then_pin("asyncpg_connection_block_in_scope", run)
