"""Every adapter answers an outage, a full pool and the health route with the same bytes.

The same situation is set up in each adapter (Flask test client, Starlette and FastAPI through
httpx's ASGITransport, Django's sync ``Client`` and its ``AsyncClient``), the same requests are made,
and the answers are compared: status, body bytes and the headers ``Content-Type``, ``Retry-After``
and ``Cache-Control`` (headers a server or framework adds on its own, such as ``Content-Length``,
``Date``, ``Server`` or ``Vary``, are not compared). Each answer is also checked against the bytes the
contract names, so adapters that all broke the same way do not pass by agreeing with each other.

To make every byte deterministic:

- The outage is a pool named ``down`` on 127.0.0.1:1 (nothing listens: connection refused at once, so
  the health ping fails with ``OperationalError`` everywhere) whose breaker (``consecutive_failures=1``,
  ``open_for=60``) reads a frozen clock and is tripped by hand, and no watchdog probes it
  (``probe_interval=None``): ``Retry-After`` is exactly 60.
  SQLAlchemy guards use a NullPool, which has no fixed size, like Django's per-thread connections,
  so even the detailed health report is the same byte for byte across all five clients.
- Saturation: a pool of one connection that is held elsewhere and ``max_wait=0``, so the request is
  shed at once and ``retry_after`` is the floor of 1 second.

Django is configured from ``tests/django/settings.py`` (its ``down`` and ``pooled`` aliases) unless
``tests/django/conftest.py`` did it first in this process.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import django
import httpx
import pytest
import sqlalchemy
from django.conf import settings
from fastapi import FastAPI
from flask import Flask
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from poolguard import Breaker, Guard
from poolguard.fastapi import DbSession
from poolguard.fastapi import PoolGuardMiddleware as FastAPIMiddleware
from poolguard.flask import PoolGuard, db
from poolguard.starlette import PoolGuardMiddleware, get_session
from tests.support.databases import DEAD_PORT, HOST, PG_URL, pg_url

if not settings.configured:
    from tests.django import settings as django_test_settings

    settings.configure(
        **{name: getattr(django_test_settings, name) for name in dir(django_test_settings) if name.isupper()}
    )
    django.setup()

from django.apps import apps
from django.db import connections
from django.test import AsyncClient, Client, override_settings

pytestmark = pytest.mark.postgres

PASSWORD = "secret-pw"
DOWN_URL = pg_url(password=PASSWORD, port=DEAD_PORT)
"""The same server as the Django ``down`` alias: port 1, refused at once."""
TOKEN = "identical-t0ken"
OPEN_FOR = 60.0
DOWN = "down"
POOLED = "pooled"
COMPARED_HEADERS = ("content-type", "retry-after", "cache-control")

ADAPTERS = ("flask", "starlette", "fastapi", "django", "django-async")


@dataclass(frozen=True)
class Answer:
    """What is compared of one response."""

    status: int
    body: bytes
    headers: tuple[tuple[str, str | None], ...]

    @classmethod
    def of(cls, status: int, body: bytes, get_header: Callable[[str], str | None]) -> Answer:
        return cls(status, body, tuple((name, get_header(name)) for name in COMPARED_HEADERS))

    def header(self, name: str) -> str | None:
        return dict(self.headers)[name]


# -- what the contract says, byte for byte ---------------------------------------------------------

CIRCUIT_OPEN = Answer(
    503,
    b'{"error":"database_unavailable","reason":"circuit_open","retry_after":60}',
    (("content-type", "application/json"), ("retry-after", "60"), ("cache-control", "no-store")),
)
POOL_SATURATED = Answer(
    503,
    b'{"error":"database_unavailable","reason":"pool_saturated","retry_after":1}',
    (("content-type", "application/json"), ("retry-after", "1"), ("cache-control", "no-store")),
)
HEALTH_STATUS_ONLY = Answer(
    503,
    b'{"status":"unavailable"}',
    (("content-type", "application/json"), ("retry-after", "1"), ("cache-control", "no-store")),
)
DETAIL_HEADERS = HEALTH_STATUS_ONLY.headers
EXPECTED_DETAIL = {
    "status": "unavailable",
    "pools": [
        {
            "name": DOWN,
            "status": "unavailable",
            "backend": "postgresql",
            "size": None,
            "max_overflow": None,
            "checked_out": 0,
            "idle": 0,
            "overflow": 0,
            "pending": 0,
            "utilization": 0.0,
            "wait_seconds": {"p50": None, "p99": None},
            "timeouts": 0,
            "suspected_leaks": 0,
            "ping_seconds": None,
            "breaker": {"state": "open", "failure_rate": 1.0, "retry_after": OPEN_FOR},
            "pooler": None,
        }
    ],
    "issues": [f"{DOWN}: circuit breaker open", f"{DOWN}: ping failed (OperationalError)"],
}

# The requests of the outage scenario: (key, Authorization header); "db" is a route that needs the database.
OUTAGE_REQUESTS = (
    ("db", None),
    ("health", None),
    ("health-wrong-token", "Bearer not-the-token"),
    ("health-detail", f"Bearer {TOKEN}"),
)


def frozen_clock() -> float:
    return 1000.0


def tripped_breaker() -> Breaker:
    breaker = Breaker(consecutive_failures=1, open_for=OPEN_FOR, clock=frozen_clock)
    trip(breaker)
    return breaker


def trip(breaker: Breaker) -> None:
    breaker.acquire()
    breaker.record_failure(0.0)
    assert breaker.state.value == "open"
    assert breaker.retry_after == OPEN_FOR


def headers_for(authorization: str | None) -> dict[str, str]:
    return {} if authorization is None else {"Authorization": authorization}


def health_path(key: str) -> str:
    return "/db" if key == "db" else "/health/db"


# -- Flask -------------------------------------------------------------------------------------------


def flask_app(guard: Guard) -> Flask:
    app = Flask("identical")
    PoolGuard(app, guard, health_detail="when-authorized", health_token=TOKEN)

    @app.get("/db")
    def needs_db() -> dict[str, int]:
        return {"one": db.execute(text("SELECT 1")).scalar_one()}

    return app


def flask_get(app: Flask, path: str, authorization: str | None = None) -> Answer:
    response = app.test_client().get(path, headers=headers_for(authorization))
    return Answer.of(response.status_code, response.get_data(), response.headers.get)


def flask_outage() -> dict[str, Answer]:
    engine = sqlalchemy.create_engine(DOWN_URL, poolclass=NullPool)
    guard = Guard(engine, name=DOWN, breaker=tripped_breaker(), probe_interval=None)
    try:
        app = flask_app(guard)
        return {key: flask_get(app, health_path(key), auth) for key, auth in OUTAGE_REQUESTS}
    finally:
        guard.close()
        engine.dispose()


def flask_saturated() -> Answer:
    engine = sqlalchemy.create_engine(PG_URL, pool_size=1, max_overflow=0)
    guard = Guard(engine, name=POOLED, max_wait=0.0)
    try:
        app = flask_app(guard)
        assert flask_get(app, "/db").status == 200  # the route works while the slot is free
        with guard.connection():
            assert guard.gate.admission.in_use == 1
            return flask_get(app, "/db")
    finally:
        guard.close()
        engine.dispose()


# -- Starlette and FastAPI ---------------------------------------------------------------------------


def starlette_app(guard: Guard) -> Starlette:
    async def needs_db(request: Request) -> JSONResponse:
        result = await get_session(request).execute(text("SELECT 1"))
        return JSONResponse({"one": result.scalar_one()})

    return Starlette(
        routes=[Route("/db", needs_db)],
        middleware=[Middleware(PoolGuardMiddleware, guard=guard, health_detail="when-authorized", health_token=TOKEN)],
    )


def fastapi_app(guard: Guard) -> FastAPI:
    app = FastAPI()
    app.add_middleware(FastAPIMiddleware, guard=guard, health_detail="when-authorized", health_token=TOKEN)

    @app.get("/db")
    async def needs_db(session: DbSession) -> dict[str, int]:
        return {"one": (await session.execute(text("SELECT 1"))).scalar_one()}

    return app


async def asgi_get(app: Any, path: str, authorization: str | None = None) -> Answer:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        response = await client.get(path, headers=headers_for(authorization))
    return Answer.of(response.status_code, response.content, response.headers.get)


async def asgi_outage(make_app: Callable[[Guard], Any]) -> dict[str, Answer]:
    engine = create_async_engine(DOWN_URL, poolclass=NullPool)
    guard = Guard(engine, name=DOWN, breaker=tripped_breaker(), probe_interval=None)
    try:
        app = make_app(guard)
        return {key: await asgi_get(app, health_path(key), auth) for key, auth in OUTAGE_REQUESTS}
    finally:
        guard.close()
        await engine.dispose()


async def asgi_saturated(make_app: Callable[[Guard], Any]) -> Answer:
    engine = create_async_engine(PG_URL, pool_size=1, max_overflow=0)
    guard = Guard(engine, name=POOLED, max_wait=0.0)
    try:
        app = make_app(guard)
        assert (await asgi_get(app, "/db")).status == 200
        async with guard.connection():
            assert guard.gate.admission.in_use == 1
            return await asgi_get(app, "/db")
    finally:
        guard.close()
        await engine.dispose()


# -- Django ------------------------------------------------------------------------------------------

DJANGO_OUTAGE = {
    "DATABASES": [DOWN],
    "BREAKER": {"CONSECUTIVE_FAILURES": 1, "OPEN_FOR": OPEN_FOR},
    "PROBE_INTERVAL": None,
    "HEALTH_DETAIL": "when-authorized",
    "HEALTH_TOKEN": TOKEN,
}
DJANGO_SATURATED = {"DATABASES": [POOLED], "MAX_WAIT": 0}


def django_guard(alias: str) -> Guard:
    guard: Guard = apps.get_app_config("poolguard").require_state().guards[alias]
    return guard


def django_path(key: str) -> str:
    """tests/django's ``/down/`` view queries the ``down`` alias (a sync view; ``/async/down/`` is async)."""
    return "/down/" if key == "db" else health_path(key)


def django_answer(response: Any) -> Answer:
    return Answer.of(response.status_code, response.content, response.headers.get)


def django_outage() -> tuple[dict[str, Answer], dict[str, Answer]]:
    """The sync Client's answers and the AsyncClient's (a sync and an async view for the database)."""
    with override_settings(POOLGUARD=DJANGO_OUTAGE):
        breaker = django_guard(DOWN).breaker
        assert breaker is not None
        breaker.use_clock(frozen_clock)
        trip(breaker)
        client = Client(raise_request_exception=False)
        sync = {
            key: django_answer(client.get(django_path(key), headers=headers_for(auth))) for key, auth in OUTAGE_REQUESTS
        }

        async def with_async_client() -> dict[str, Answer]:
            async_client = AsyncClient(raise_request_exception=False)
            answers = {
                key: django_answer(await async_client.get(django_path(key), headers=headers_for(auth)))
                for key, auth in OUTAGE_REQUESTS
            }
            answers["db-async-view"] = django_answer(await async_client.get("/async/down/"))
            return answers

        asynchronous = asyncio.run(with_async_client())
    connections.close_all()
    return sync, asynchronous


def django_saturated() -> tuple[Answer, Answer]:
    """``pooled`` has a psycopg pool of one connection: hold it outside any request, then ask."""
    with override_settings(POOLGUARD=DJANGO_SATURATED):
        try:
            client = Client(raise_request_exception=False)
            assert client.get("/pooled/").status_code == 200  # works while the connection is free
            connections.close_all()  # hands the pooled connection back
            pool = connections[POOLED].pool
            held = pool.getconn()
            try:
                sync = django_answer(client.get("/pooled/"))
                asynchronous = asyncio.run(AsyncClient(raise_request_exception=False).get("/pooled/"))
            finally:
                pool.putconn(held)
            return sync, django_answer(asynchronous)
        finally:
            connections.close_all()


# -- the comparisons ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def outage() -> dict[str, dict[str, Answer]]:
    django_sync, django_async = django_outage()
    return {
        "flask": flask_outage(),
        "starlette": asyncio.run(asgi_outage(starlette_app)),
        "fastapi": asyncio.run(asgi_outage(fastapi_app)),
        "django": django_sync,
        "django-async": django_async,
    }


@pytest.fixture(scope="module")
def saturated() -> dict[str, Answer]:
    django_sync, django_async = django_saturated()
    return {
        "flask": flask_saturated(),
        "starlette": asyncio.run(asgi_saturated(starlette_app)),
        "fastapi": asyncio.run(asgi_saturated(fastapi_app)),
        "django": django_sync,
        "django-async": django_async,
    }


@pytest.fixture(scope="module", autouse=True)
def _close_django_pool() -> Iterator[None]:
    yield
    connections.close_all()
    connections[POOLED].close_pool()


def assert_all_equal(answers: dict[str, Answer], expected: Answer, what: str) -> None:
    """Every adapter's answer is the contract's, and so identical to every other's."""
    assert set(answers) >= set(ADAPTERS), f"{what}: missing adapters {set(ADAPTERS) - set(answers)}"
    differing = {name: answer for name, answer in answers.items() if answer != expected}
    assert not differing, f"{what}: expected {expected}, but got {differing}"
    assert len(set(answers.values())) == 1


def by_adapter(outage: dict[str, dict[str, Answer]], key: str) -> dict[str, Answer]:
    return {name: answers[key] for name, answers in outage.items()}


def test_circuit_open_503_is_identical(outage: dict[str, dict[str, Answer]]) -> None:
    answers = by_adapter(outage, "db")
    answers["django-async (async view)"] = outage["django-async"]["db-async-view"]
    assert_all_equal(answers, CIRCUIT_OPEN, "503 circuit_open")


def test_health_without_token_is_identical(outage: dict[str, dict[str, Answer]]) -> None:
    assert_all_equal(by_adapter(outage, "health"), HEALTH_STATUS_ONLY, "health without a token")
    assert_all_equal(by_adapter(outage, "health-wrong-token"), HEALTH_STATUS_ONLY, "health with a wrong token")


def test_detailed_health_is_identical(outage: dict[str, dict[str, Answer]]) -> None:
    answers = by_adapter(outage, "health-detail")
    for name, answer in answers.items():
        assert answer.status == 503, (name, answer)
        assert answer.headers == DETAIL_HEADERS, (name, answer.headers)
        # Django's per-thread connections and a SQLAlchemy NullPool report the same shape and values.
        assert json.loads(answer.body) == EXPECTED_DETAIL, (name, answer.body)
        assert PASSWORD.encode() not in answer.body
        assert HOST.encode() not in answer.body
    bodies = {name: answer.body for name, answer in answers.items()}
    reference = bodies["flask"]
    assert all(body == reference for body in bodies.values()), bodies
    # Also the shape, should a pool kind ever report a different number: same keys, same value types.
    shapes = {name: _shape(json.loads(body)) for name, body in bodies.items()}
    assert all(shape == shapes["flask"] for shape in shapes.values()), shapes


def test_pool_saturated_503_is_identical(saturated: dict[str, Answer]) -> None:
    assert_all_equal(saturated, POOL_SATURATED, "503 pool_saturated")


def test_answers_differ_between_situations(outage: dict[str, dict[str, Answer]], saturated: dict[str, Answer]) -> None:
    """The comparisons above are between different answers, not one answer every path happens to give."""
    flask_answers = outage["flask"]
    distinct = {flask_answers["db"], flask_answers["health"], flask_answers["health-detail"], saturated["flask"]}
    assert len(distinct) == 4


def _shape(value: Any) -> Any:
    """Keys and value types of a JSON document (None stays None: the contract says which keys may be null)."""
    if isinstance(value, dict):
        return {key: _shape(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_shape(item) for item in value]
    return None if value is None else type(value).__name__
