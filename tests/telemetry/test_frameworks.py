"""poolguard under the real framework instrumentations (opentelemetry-instrumentation-flask, -fastapi/-asgi,
-django), real SDK in memory, real PostgreSQL.

The request span is the instrumentation's (kind SERVER): poolguard adds no second one, hangs a
``checkout <pool>`` span under it and puts shed requests and breaker transitions on it as events.
Flask and FastAPI get the test's providers injected (nothing global); Django's adapter builds its
Guards from settings and so uses the global providers, which only a child process may set
(``django_otel_check.py``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import flask
import httpx
import pytest
from fastapi import FastAPI
from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
from opentelemetry.instrumentation.flask import FlaskInstrumentor
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON, ParentBased
from sqlalchemy import text

from poolguard import Breaker, Guard
from poolguard.fastapi import DbSession, PoolGuardMiddleware
from poolguard.flask import PoolGuard, db
from tests.support.child import run_python
from tests.support.databases import DEAD_PORT, pg_url
from tests.telemetry.conftest import POOL_NAME, Otel, points

pytestmark = pytest.mark.postgres

GuardFactory = Callable[..., Guard]
PASSWORD = "Pw-5be07c-never-export"
PARAMETER = "param-91c3e4-never-export"
SECRET_URL = pg_url(password=PASSWORD)  # trust auth: the password is ignored
DEAD_URL = pg_url(password=PASSWORD, port=DEAD_PORT)
ASYNC_SECRET_URL = pg_url("asyncpg", password=PASSWORD)
ASYNC_DEAD_URL = pg_url("asyncpg", password=PASSWORD, port=DEAD_PORT)
FORBIDDEN = (PASSWORD, PARAMETER, "postgresql+psycopg://", "postgresql+asyncpg://", "SELECT")

FLASK_ROUTE = "/orders/<int:order_id>"
FASTAPI_ROUTE = "/orders/{order_id}"
DJANGO_ROUTE = "/orders/<int:order_id>/"


# -- helpers shared by the frameworks -------------------------------------------------------------


def server_spans(spans: list[Any]) -> list[Any]:
    return [s for s in spans if kind_of(s) == "SERVER"]


def checkout_spans(spans: list[Any], pool: str = "primary") -> list[Any]:
    return [s for s in spans if name_of(s) == f"checkout {pool}"]


def kind_of(span: Any) -> str:
    return span["kind"] if isinstance(span, dict) else span.kind.name


def name_of(span: Any) -> str:
    return span["name"] if isinstance(span, dict) else span.name


def ids(span: Any) -> tuple[str, str, str | None]:
    """(trace id, span id, parent span id) as hex, for SDK spans and the Django child's JSON alike."""
    if isinstance(span, dict):
        return span["trace_id"], span["span_id"], span["parent_id"]
    parent = span.parent
    return (
        format(span.context.trace_id, "032x"),
        format(span.context.span_id, "016x"),
        format(parent.span_id, "016x") if parent is not None else None,
    )


def attributes_of(span: Any) -> dict[str, Any]:
    return dict(span["attributes"] if isinstance(span, dict) else span.attributes or {})


def events_of(span: Any, name: str) -> list[dict[str, Any]]:
    if isinstance(span, dict):
        return [dict(e["attributes"]) for e in span["events"] if e["name"] == name]
    return [dict(e.attributes or {}) for e in span.events if e.name == name]


def status_of(span: Any) -> str:
    return span["status"] if isinstance(span, dict) else span.status.status_code.name


def scope_of(span: Any) -> str | None:
    if isinstance(span, dict):
        return span["scope"]
    return span.instrumentation_scope.name if span.instrumentation_scope is not None else None


def the_request_span(spans: list[Any]) -> Any:
    """The one SERVER span of a request: the instrumentation's, and no duplicate from poolguard."""
    servers = server_spans(spans)
    assert len(servers) == 1, f"expected one SERVER span, got {[(name_of(s), kind_of(s)) for s in spans]}"
    assert scope_of(servers[0]) != "poolguard"
    # poolguard's own spans are checkout spans and nothing else (no request span of its own)
    assert all(name_of(s).startswith("checkout ") for s in spans if scope_of(s) == "poolguard"), [
        name_of(s) for s in spans
    ]
    return servers[0]


def assert_under(span: Any, request: Any, spans: list[Any]) -> None:
    """``span`` is in ``request``'s trace and following its parent links reaches ``request``."""
    trace_id, _, parent_id = ids(span)
    request_trace, request_id, _ = ids(request)
    assert trace_id == request_trace
    by_id = {ids(s)[1]: s for s in spans}
    seen: set[str] = set()
    while parent_id is not None and parent_id != request_id:
        assert parent_id not in seen
        seen.add(parent_id)
        assert parent_id in by_id, f"{name_of(span)}: parent {parent_id} is not a span of this request"
        parent_id = ids(by_id[parent_id])[2]
    assert parent_id == request_id, f"{name_of(span)} is not under the request span {name_of(request)}"


def assert_acquired_checkout(spans: list[Any], pool: str = "primary", *, direct_child: bool = True) -> Any:
    """One acquired ``checkout <pool>`` span of the request, with the semantic-convention attributes."""
    request = the_request_span(spans)
    [checkout] = checkout_spans(spans, pool)
    assert kind_of(checkout) == "INTERNAL"
    assert scope_of(checkout) == "poolguard"
    assert attributes_of(checkout) == {POOL_NAME: pool, "db.system.name": "postgresql", "poolguard.outcome": "acquired"}
    assert status_of(checkout) == "UNSET"
    assert_under(checkout, request, spans)
    if direct_child:
        assert ids(checkout)[2] == ids(request)[1]
    return request


def assert_breaker_story(first: list[Any], second: list[Any], pool: str = "primary") -> None:
    """First request: the failing checkout opens the breaker (event on its request span); second: shed."""
    request = the_request_span(first)
    [failed] = checkout_spans(first, pool)
    assert attributes_of(failed)["poolguard.outcome"] == "error"
    assert status_of(failed) == "ERROR"
    assert_under(failed, request, first)
    assert events_of(request, "poolguard.breaker_transition") == [
        {POOL_NAME: pool, "poolguard.breaker.from": "closed", "poolguard.breaker.to": "open"}
    ]
    assert events_of(request, "poolguard.request_shed") == []

    request = the_request_span(second)
    [shed] = checkout_spans(second, pool)
    assert attributes_of(shed) == {POOL_NAME: pool, "db.system.name": "postgresql", "poolguard.outcome": "circuit_open"}
    assert status_of(shed) == "ERROR"
    assert_under(shed, request, second)
    assert events_of(request, "poolguard.request_shed") == [{POOL_NAME: pool, "poolguard.reason": "circuit_open"}]
    assert events_of(request, "poolguard.breaker_transition") == []


def assert_nothing_secret(text_exported: str) -> None:
    for secret in FORBIDDEN:
        assert secret not in text_exported, f"{secret!r} was exported"


def exported_text(otel: Otel) -> str:
    data = otel.reader.get_metrics_data()
    return "\n".join(span.to_json() for span in otel.spans()) + "\n" + (data.to_json() if data is not None else "")


def use_time_points(otel: Otel, pool: str = "primary") -> dict[str | None, int]:
    """Count of use_time records by http.route."""
    use_time = otel.collect()["db.client.connection.use_time"]
    return {p.attributes.get("http.route"): p.count for p in points(use_time, **{POOL_NAME: pool})}


def take(otel: Otel) -> list[ReadableSpan]:
    """The spans finished since the last call."""
    spans = list(otel.spans())
    otel.exporter.clear()
    return spans


@pytest.fixture(params=["same provider", "always-on guard provider"])
def unsampled(request: pytest.FixtureRequest) -> Iterator[tuple[TracerProvider, TracerProvider, InMemorySpanExporter]]:
    """(the app's provider, the guard's provider, their exporter); the app's samples nothing (ParentBased(ALWAYS_OFF)).

    "same provider" is the real set-up. "always-on guard provider" gives the guard a sampler that ignores
    its parent, so only poolguard's own check of the parent's sampled flag keeps the checkout span away.
    """
    exporter = InMemorySpanExporter()
    app_provider = TracerProvider(sampler=ParentBased(ALWAYS_OFF))
    app_provider.add_span_processor(SimpleSpanProcessor(exporter))
    guard_provider = app_provider
    if request.param != "same provider":
        guard_provider = TracerProvider(sampler=ALWAYS_ON)
        guard_provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield app_provider, guard_provider, exporter
    app_provider.shutdown()
    guard_provider.shutdown()


Unsampled = tuple[TracerProvider, TracerProvider, InMemorySpanExporter]


# -- Flask ----------------------------------------------------------------------------------------


@pytest.fixture
def flask_app_for(otel: Otel) -> Iterator[Callable[[Guard], flask.Flask]]:
    made: list[flask.Flask] = []

    def factory(guard: Guard, tracer_provider: TracerProvider | None = None) -> flask.Flask:
        app = flask.Flask(__name__)
        FlaskInstrumentor().instrument_app(app, tracer_provider=tracer_provider or otel.tracer_provider)
        PoolGuard(app, guard)

        @app.get(FLASK_ROUTE)
        def order(order_id: int) -> dict[str, Any]:
            return {"id": db.execute(text("SELECT :id"), {"id": order_id}).scalar_one()}

        @app.get("/secret")
        def secret() -> dict[str, Any]:
            value = db.execute(text("SELECT :secret"), {"secret": PARAMETER}).scalar_one()
            return {"same": value == PARAMETER}

        @app.get("/ping")
        def ping() -> str:
            return "pong"

        made.append(app)
        return app

    yield factory
    for app in made:
        FlaskInstrumentor.uninstrument_app(app)


FlaskFactory = Callable[..., flask.Flask]


def test_flask_checkout_is_a_child_of_the_instrumentations_request_span(
    otel: Otel, guard_on: GuardFactory, flask_app_for: FlaskFactory
):
    client = flask_app_for(guard_on()).test_client()
    response = client.get("/orders/42")
    assert response.status_code == 200
    assert response.json == {"id": 42}
    spans = take(otel)
    request = assert_acquired_checkout(spans)
    assert name_of(request) == f"GET {FLASK_ROUTE}"
    assert scope_of(request) == "opentelemetry.instrumentation.flask"
    assert len(spans) == 2

    # a second request: its own request span and its own checkout, in another trace
    assert client.get("/orders/43").status_code == 200
    second = take(otel)
    assert_acquired_checkout(second)
    assert ids(the_request_span(second))[0] != ids(request)[0]

    assert use_time_points(otel) == {FLASK_ROUTE: 2}
    wait_time = otel.collect()["db.client.connection.wait_time"]
    assert sum(p.count for p in points(wait_time, **{POOL_NAME: "primary"})) == 2


def test_flask_db_free_route_has_no_checkout_span(otel: Otel, guard_on: GuardFactory, flask_app_for: FlaskFactory):
    guard = guard_on()
    response = flask_app_for(guard).test_client().get("/ping")
    assert response.status_code == 200
    spans = take(otel)
    the_request_span(spans)
    assert [name_of(s) for s in spans] == ["GET /ping"]
    assert guard.stats().checkouts == 0


def test_flask_breaker_transition_and_shed_are_events_on_the_request_span(
    otel: Otel, guard_on: GuardFactory, flask_app_for: FlaskFactory
):
    guard = guard_on(DEAD_URL, breaker=Breaker(consecutive_failures=1, open_for=60.0))
    client = flask_app_for(guard).test_client()
    assert client.get("/orders/1").status_code == 503
    first = take(otel)
    assert client.get("/orders/2").status_code == 503
    second = take(otel)
    assert_breaker_story(first, second)
    # the DB-free route still answers with the breaker open, and no checkout is attempted
    assert client.get("/ping").status_code == 200
    assert checkout_spans(take(otel)) == []


def test_flask_unsampled_request_makes_no_span_but_records_metrics(
    otel: Otel, guard_on: GuardFactory, flask_app_for: FlaskFactory, unsampled: Unsampled
):
    app_provider, guard_provider, exporter = unsampled
    guard = guard_on(tracer_provider=guard_provider)
    client = flask_app_for(guard, app_provider).test_client()
    assert client.get("/orders/5").status_code == 200
    assert exporter.get_finished_spans() == ()
    assert otel.spans() == []
    assert use_time_points(otel) == {FLASK_ROUTE: 1}
    wait_time = otel.collect()["db.client.connection.wait_time"]
    assert sum(p.count for p in points(wait_time, **{POOL_NAME: "primary"})) == 1
    assert guard.stats().checkouts == 1


def test_flask_password_and_parameters_are_never_exported(
    otel: Otel, guard_on: GuardFactory, flask_app_for: FlaskFactory
):
    client = flask_app_for(guard_on(SECRET_URL)).test_client()
    response = client.get("/secret")
    assert response.status_code == 200
    assert response.json == {"same": True}
    dead = flask_app_for(guard_on(DEAD_URL, name="dead", breaker=Breaker(consecutive_failures=1))).test_client()
    assert dead.get("/orders/1").status_code == 503
    assert dead.get("/orders/1").status_code == 503
    names = [s.name for s in otel.spans()]
    assert names.count("checkout primary") == 1
    assert names.count("checkout dead") == 2
    assert_nothing_secret(exported_text(otel))


def test_flask_connection_left_open_is_a_leak_event_on_the_request_span(
    otel: Otel, guard_on: GuardFactory, flask_app_for: FlaskFactory
):
    guard = guard_on()
    app = flask_app_for(guard)
    kept: list[Any] = []

    @app.get("/forgetful/<name>")
    def forgetful(name: str) -> str:
        kept.append(guard.engine.connect())  # never closed by the view: poolguard reclaims it at the end
        return "ok"

    try:
        assert app.test_client().get("/forgetful/x").status_code == 200
    finally:
        for connection in kept:
            connection.close()
    request = the_request_span(take(otel))
    [leak] = events_of(request, "poolguard.leak_suspected")
    assert leak[POOL_NAME] == "primary"
    assert leak["http.route"] == "/forgetful/<name>"


# -- FastAPI (ASGI) --------------------------------------------------------------------------------


def fastapi_app(guard: Guard, tracer_provider: TracerProvider) -> FastAPI:
    app = FastAPI()
    app.add_middleware(PoolGuardMiddleware, guard=guard)

    @app.get(FASTAPI_ROUTE)
    async def order(order_id: int, session: DbSession) -> dict[str, Any]:
        return {"id": (await session.execute(text("SELECT CAST(:id AS integer)"), {"id": order_id})).scalar_one()}

    @app.get("/secret")
    async def secret(session: DbSession) -> dict[str, Any]:
        value = (await session.execute(text("SELECT :secret"), {"secret": PARAMETER})).scalar_one()
        return {"same": value == PARAMETER}

    @app.get("/ping")
    async def ping() -> str:
        return "pong"

    FastAPIInstrumentor.instrument_app(app, tracer_provider=tracer_provider)
    return app


@pytest.fixture
async def fastapi_client_for(otel: Otel) -> AsyncIterator[Callable[..., httpx.AsyncClient]]:
    made: list[tuple[FastAPI, httpx.AsyncClient]] = []

    def factory(
        guard: Guard, tracer_provider: TracerProvider | None = None, *, setup: Callable[[FastAPI], None] | None = None
    ) -> httpx.AsyncClient:
        """A client of a fresh instrumented app; ``setup`` adds a test's own routes to it."""
        app = fastapi_app(guard, tracer_provider or otel.tracer_provider)
        if setup is not None:
            setup(app)
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver")
        made.append((app, client))
        return client

    yield factory
    for app, client in made:
        await client.aclose()
        FastAPIInstrumentor.uninstrument_app(app)


ClientFactory = Callable[..., httpx.AsyncClient]


async def test_fastapi_checkout_is_under_the_instrumentations_server_span(
    otel: Otel, async_guard_on: GuardFactory, fastapi_client_for: ClientFactory
):
    client = fastapi_client_for(async_guard_on())
    response = await client.get("/orders/42")
    assert response.status_code == 200
    assert response.json() == {"id": 42}
    spans = take(otel)
    request = assert_acquired_checkout(spans, direct_child=False)
    assert name_of(request) == f"GET {FASTAPI_ROUTE}"
    assert scope_of(request) == "opentelemetry.instrumentation.fastapi"

    assert (await client.get("/orders/43")).status_code == 200
    second = take(otel)
    assert_acquired_checkout(second, direct_child=False)
    assert ids(the_request_span(second))[0] != ids(request)[0]

    assert use_time_points(otel) == {FASTAPI_ROUTE: 2}
    wait_time = otel.collect()["db.client.connection.wait_time"]
    assert sum(p.count for p in points(wait_time, **{POOL_NAME: "primary"})) == 2


async def test_fastapi_db_free_route_has_no_checkout_span(
    otel: Otel, async_guard_on: GuardFactory, fastapi_client_for: ClientFactory
):
    guard = async_guard_on()
    assert (await fastapi_client_for(guard).get("/ping")).status_code == 200
    spans = take(otel)
    the_request_span(spans)
    assert [s for s in spans if s.instrumentation_scope and s.instrumentation_scope.name == "poolguard"] == []
    assert guard.stats().checkouts == 0


async def test_fastapi_breaker_transition_and_shed_are_events_on_the_request_span(
    otel: Otel, async_guard_on: GuardFactory, fastapi_client_for: ClientFactory
):
    guard = async_guard_on(ASYNC_DEAD_URL, breaker=Breaker(consecutive_failures=1, open_for=60.0))
    client = fastapi_client_for(guard)
    assert (await client.get("/orders/1")).status_code == 503
    first = take(otel)
    assert (await client.get("/orders/2")).status_code == 503
    second = take(otel)
    assert_breaker_story(first, second)
    assert (await client.get("/ping")).status_code == 200
    assert checkout_spans(take(otel)) == []


async def test_fastapi_unsampled_request_makes_no_span_but_records_metrics(
    otel: Otel, async_guard_on: GuardFactory, fastapi_client_for: ClientFactory, unsampled: Unsampled
):
    app_provider, guard_provider, exporter = unsampled
    guard = async_guard_on(tracer_provider=guard_provider)
    assert (await fastapi_client_for(guard, app_provider).get("/orders/5")).status_code == 200
    assert exporter.get_finished_spans() == ()
    assert otel.spans() == []
    assert use_time_points(otel) == {FASTAPI_ROUTE: 1}
    wait_time = otel.collect()["db.client.connection.wait_time"]
    assert sum(p.count for p in points(wait_time, **{POOL_NAME: "primary"})) == 1
    assert guard.stats().checkouts == 1


async def test_fastapi_password_and_parameters_are_never_exported(
    otel: Otel, async_guard_on: GuardFactory, fastapi_client_for: ClientFactory
):
    client = fastapi_client_for(async_guard_on(ASYNC_SECRET_URL))
    response = await client.get("/secret")
    assert response.status_code == 200
    assert response.json() == {"same": True}
    dead = fastapi_client_for(async_guard_on(ASYNC_DEAD_URL, name="dead", breaker=Breaker(consecutive_failures=1)))
    assert (await dead.get("/orders/1")).status_code == 503
    assert (await dead.get("/orders/1")).status_code == 503
    names = [s.name for s in otel.spans()]
    assert names.count("checkout primary") == 1
    assert names.count("checkout dead") == 2
    assert_nothing_secret(exported_text(otel))


# -- Django (child process: global providers, process-wide settings) ------------------------------


@pytest.fixture(scope="module")
def django_run() -> dict[str, Any]:
    result: dict[str, Any] = run_python("-m", "tests.telemetry.django_otel_check", PASSWORD, PARAMETER)
    return result


def test_django_checkouts_are_children_of_the_instrumentations_request_span(django_run: dict[str, Any]):
    orders = django_run["requests"]["orders"]
    assert orders["status"] == 200
    spans = orders["spans"]
    request = assert_acquired_checkout(spans, "default")
    assert_acquired_checkout(spans, "sqlalchemy")
    assert scope_of(request) == "opentelemetry.instrumentation.django"
    assert len(spans) == 3
    use_time = django_run["metrics"]["db.client.connection.use_time"]
    on_route = {
        p["attributes"][POOL_NAME]: p["count"] for p in use_time if p["attributes"].get("http.route") == DJANGO_ROUTE
    }
    assert on_route == {"default": 1, "sqlalchemy": 1}


def test_django_db_free_route_has_no_checkout_span(django_run: dict[str, Any]):
    ping = django_run["requests"]["ping"]
    assert ping["status"] == 200
    the_request_span(ping["spans"])
    assert [s["name"] for s in ping["spans"] if s["scope"] == "poolguard"] == []


def test_django_breaker_transition_and_shed_are_events_on_the_request_span(django_run: dict[str, Any]):
    requests = django_run["requests"]
    assert requests["down1"]["status"] == 503
    assert requests["down2"]["status"] == 503
    assert_breaker_story(requests["down1"]["spans"], requests["down2"]["spans"], "down")


def test_django_connection_left_open_is_a_leak_event_on_the_request_span(django_run: dict[str, Any]):
    leak_request = django_run["requests"]["leak"]
    assert leak_request["status"] == 200
    request = the_request_span(leak_request["spans"])
    [leak] = events_of(request, "poolguard.leak_suspected")
    assert leak[POOL_NAME] == "sqlalchemy"
    assert leak["http.route"] == "/forgetful/<str:name>/"


def test_django_password_and_parameters_are_never_exported(django_run: dict[str, Any]):
    assert django_run["requests"]["orders"]["status"] == 200  # the secret query ran
    assert "checkout down" in django_run["exported"]
    assert_nothing_secret(django_run["exported"])


async def test_fastapi_connection_left_open_is_a_leak_event_on_the_request_span(
    otel: Otel, async_guard_on: GuardFactory, fastapi_client_for: ClientFactory
):
    guard = async_guard_on()
    kept: list[Any] = []

    def add_route(app: FastAPI) -> None:
        @app.get("/forgetful/{name}")
        async def forgetful(name: str, session: DbSession) -> str:
            # The unused session names the request scope's route before the checkout: holder.route is
            # read at checkout time, so without it the leak event would carry no http.route.
            kept.append(await guard.engine.connect())  # never closed by the endpoint: poolguard reclaims it
            return "ok"

    client = fastapi_client_for(guard, setup=add_route)
    try:
        assert (await client.get("/forgetful/x")).status_code == 200
    finally:
        for connection in kept:
            await connection.close()
    request = the_request_span(take(otel))
    [leak] = events_of(request, "poolguard.leak_suspected")
    assert leak[POOL_NAME] == "primary"
    assert leak["http.route"] == "/forgetful/{name}"
