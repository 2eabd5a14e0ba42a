"""poolguard.flask through Flask's test client, against the real PostgreSQL server.

Every engine is checked for connections left checked out after its test, then disposed; every
guard is closed. What was committed is read through a separate, unguarded engine.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any, cast

import flask
import pytest
import sqlalchemy
from flask import Flask, abort, stream_with_context
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.orm import Session, registry
from sqlalchemy.pool import NullPool, QueuePool

import poolguard
import poolguard.flask as pg_flask
from poolguard import Breaker, ConfigError, Guard
from poolguard.flask import PoolGuard, db, get_guard
from tests.support.databases import DEAD_PORT, PG_URL, pg_url

pytestmark = pytest.mark.postgres

PASSWORD = "secret-pw"
UNREACHABLE_URL = pg_url(password=PASSWORD, port=DEAD_PORT)
TABLE = f"flask_items_{uuid.uuid4().hex[:10]}"


class Item:
    """Mapped onto the module's table, for a write that needs no connection until commit."""

    def __init__(self, name: str) -> None:
        self.name = name


@pytest.fixture(scope="module")
def observer() -> Iterator[sqlalchemy.Engine]:
    """Its own connections (NullPool), to see what was really committed; creates the module's table."""
    engine = sqlalchemy.create_engine(PG_URL, poolclass=NullPool)
    metadata = sqlalchemy.MetaData()
    table = sqlalchemy.Table(
        TABLE,
        metadata,
        sqlalchemy.Column("id", sqlalchemy.Integer, primary_key=True),
        sqlalchemy.Column("name", sqlalchemy.Text, nullable=False),
        sqlalchemy.Column("parent", sqlalchemy.Integer),
    )
    mapper_registry = registry()
    mapper_registry.map_imperatively(Item, table)
    with engine.begin() as connection:
        connection.execute(
            text(
                f"CREATE TABLE {TABLE} (id serial PRIMARY KEY, name text NOT NULL, "
                f"parent integer REFERENCES {TABLE}(id) DEFERRABLE INITIALLY DEFERRED)"
            )
        )
    yield engine
    mapper_registry.dispose()
    with engine.begin() as connection:
        connection.execute(text(f"DROP TABLE {TABLE}"))
    engine.dispose()


def names(observer: sqlalchemy.Engine) -> list[str]:
    with observer.connect() as connection:
        return [row[0] for row in connection.execute(text(f"SELECT name FROM {TABLE} ORDER BY id"))]


@pytest.fixture
def make_engine() -> Iterator[Callable[..., sqlalchemy.Engine]]:
    """Engines that must have nothing checked out at the end of the test; disposed after."""
    engines: list[sqlalchemy.Engine] = []

    def factory(url: str = PG_URL, **kwargs: Any) -> sqlalchemy.Engine:
        kwargs.setdefault("pool_size", 2)
        kwargs.setdefault("max_overflow", 0)
        engine = sqlalchemy.create_engine(url, **kwargs)
        engines.append(engine)
        return engine

    yield factory
    left = {str(e.url): n for e in engines if (n := cast(QueuePool, e.pool).checkedout())}
    for engine in engines:
        engine.dispose()
    assert not left, f"connections left checked out: {left}"


@pytest.fixture
def make_guard(make_engine: Callable[..., sqlalchemy.Engine]) -> Iterator[Callable[..., Guard]]:
    guards: list[Guard] = []

    def factory(engine: sqlalchemy.Engine | None = None, **kwargs: Any) -> Guard:
        guard = Guard(engine if engine is not None else make_engine(), **kwargs)
        guards.append(guard)
        return guard

    yield factory
    for guard in guards:
        guard.close()


@pytest.fixture
def guard(make_guard: Callable[..., Guard]) -> Guard:
    return make_guard()


@pytest.fixture
def outage_guard(make_engine: Callable[..., sqlalchemy.Engine], make_guard: Callable[..., Guard]) -> Guard:
    """A guard whose database refuses connections; one failure opens its breaker."""
    engine = make_engine(UNREACHABLE_URL, connect_args={"connect_timeout": 2})
    return make_guard(engine, breaker=Breaker(consecutive_failures=1))


@pytest.fixture(autouse=True)
def _no_poolguard_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The tests decide every option; a POOLGUARD_* variable of the caller's shell must not leak in."""
    for key in list(os.environ):
        if key.startswith("POOLGUARD_"):
            monkeypatch.delenv(key)


def make_app(guard: Guard | None, config: dict[str, Any] | None = None, **options: Any) -> Flask:
    """An app with a DB-free route, reads, writes (committed, raising, aborted, failing at commit)."""
    app = Flask(__name__)
    app.config.update(config or {})
    PoolGuard(app, guard, **options)
    register_routes(app)
    return app


def register_routes(app: Flask) -> None:
    @app.get("/")
    def index() -> str:
        return "no database here"

    @app.get("/one")
    def one() -> dict[str, Any]:
        return {"value": db.execute(text("SELECT 1")).scalar_one()}

    @app.post("/items")
    def create() -> tuple[dict[str, Any], int]:
        name = flask.request.get_json()["name"]
        db.execute(text(f"INSERT INTO {TABLE} (name) VALUES (:name)"), {"name": name})
        return {"name": name}, 201

    @app.post("/items/add")
    def add() -> tuple[dict[str, Any], int]:
        # No statement runs here: the connection is first needed by the commit after the view.
        db.add(Item(flask.request.get_json()["name"]))
        return {"queued": True}, 201

    @app.post("/items/fail")
    def create_then_fail() -> str:
        db.execute(text(f"INSERT INTO {TABLE} (name) VALUES (:name)"), {"name": flask.request.get_json()["name"]})
        raise RuntimeError("the view failed after writing")

    @app.post("/items/abort")
    def create_then_abort() -> str:
        db.execute(text(f"INSERT INTO {TABLE} (name) VALUES (:name)"), {"name": flask.request.get_json()["name"]})
        abort(409)

    @app.post("/items/deferred")
    def create_breaking_deferred_constraint() -> tuple[str, int]:
        # The foreign key is deferred: the insert succeeds, the commit fails.
        db.execute(
            text(f"INSERT INTO {TABLE} (name, parent) VALUES (:name, -1)"), {"name": flask.request.get_json()["name"]}
        )
        return "written", 201

    @app.get("/slow")
    def slow() -> str:
        db.execute(text("SELECT pg_sleep(0.5)"))
        return "slept"

    @app.get("/orders/<int:order_id>")
    def order(order_id: int) -> dict[str, Any]:
        scope = get_guard().gate.unit_var.get()
        return {"route": scope.route if scope else None, "id": order_id}


def checked_out(guard: Guard) -> int:
    return cast(QueuePool, cast(sqlalchemy.Engine, guard.engine).pool).checkedout()


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


# -- commit and rollback ----------------------------------------------------------------------------


def test_write_that_returns_commits(guard: Guard, observer: sqlalchemy.Engine) -> None:
    name = unique("committed")
    response = make_app(guard).test_client().post("/items", json={"name": name})
    assert response.status_code == 201
    assert name in names(observer)


def test_orm_write_is_committed_after_the_view(guard: Guard, observer: sqlalchemy.Engine) -> None:
    name = unique("orm")
    response = make_app(guard).test_client().post("/items/add", json={"name": name})
    assert response.status_code == 201
    assert name in names(observer)


def test_write_that_raises_rolls_back(guard: Guard, observer: sqlalchemy.Engine) -> None:
    name = unique("raised")
    response = make_app(guard).test_client().post("/items/fail", json={"name": name})
    assert response.status_code == 500
    assert name not in names(observer)


def test_write_then_abort_rolls_back(guard: Guard, observer: sqlalchemy.Engine) -> None:
    """A handled exception (abort, an error handler's response) is still the view raising."""
    name = unique("aborted")
    response = make_app(guard).test_client().post("/items/abort", json={"name": name})
    assert response.status_code == 409
    assert name not in names(observer)


def test_failing_commit_is_a_500_and_returns_the_connection(guard: Guard, observer: sqlalchemy.Engine) -> None:
    name = unique("deferred")
    client = make_app(guard).test_client()
    response = client.post("/items/deferred", json={"name": name})
    assert response.status_code == 500
    assert name not in names(observer)
    assert checked_out(guard) == 0
    assert guard.stats().checked_out == 0
    assert client.post("/items", json={"name": unique("after")}).status_code == 201


def test_session_is_finished_before_a_streamed_body(guard: Guard, observer: sqlalchemy.Engine) -> None:
    name = unique("streamed")
    app = make_app(guard)
    seen: dict[str, Any] = {}

    @app.post("/items/stream")
    def stream() -> flask.Response:
        db.execute(text(f"INSERT INTO {TABLE} (name) VALUES (:name)"), {"name": name})

        def body() -> Iterator[str]:
            # stream_with_context keeps the request open (teardown not run yet) while this runs.
            seen["checked_out"] = checked_out(guard)
            seen["committed"] = name in names(observer)
            yield "done"

        return flask.Response(stream_with_context(body()))

    response = app.test_client().post("/items/stream")
    assert response.status_code == 200
    assert response.data == b"done"
    assert seen == {"checked_out": 0, "committed": True}


def test_the_apps_own_hooks_use_db_and_their_writes_commit_with_the_view(
    guard: Guard, observer: sqlalchemy.Engine
) -> None:
    app = make_app(guard)
    before, after, teardown = unique("before"), unique("after"), unique("teardown")
    seen: list[Any] = []

    @app.before_request
    def write_before() -> None:
        if flask.request.path == "/one":
            db.execute(text(f"INSERT INTO {TABLE} (name) VALUES (:name)"), {"name": before})

    @app.after_request
    def write_after(response: flask.Response) -> flask.Response:
        if flask.request.path == "/one":
            db.execute(text(f"INSERT INTO {TABLE} (name) VALUES (:name)"), {"name": after})
        return response

    @app.teardown_request
    def write_in_teardown(exc: BaseException | None) -> None:
        if flask.request.path == "/one":
            # After the commit: the unit of work is still open, and its close commits this one.
            db.execute(text(f"INSERT INTO {TABLE} (name) VALUES (:name)"), {"name": teardown})
            seen.append(isinstance(db, Session))

    assert app.test_client().get("/one").status_code == 200
    assert {before, after, teardown} <= set(names(observer))
    assert seen == [True]
    assert checked_out(guard) == 0


def test_db_proxies_the_request_session(guard: Guard) -> None:
    app = make_app(guard)
    seen: dict[str, Any] = {}

    @app.get("/proxy")
    def proxy() -> str:
        session = get_guard().gate.unit_var.get().session  # type: ignore[union-attr]
        db.info["marker"] = "set through db"  # attribute reads and item writes reach the session
        seen["same info"] = session.info.get("marker")
        seen["isinstance"] = isinstance(db, Session)
        seen["bind"] = db.get_bind() is guard.engine
        return "ok"

    assert app.test_client().get("/proxy").status_code == 200
    assert seen == {"same info": "set through db", "isinstance": True, "bind": True}


def test_the_route_is_the_url_rule(guard: Guard) -> None:
    response = make_app(guard).test_client().get("/orders/42")
    assert response.get_json() == {"route": "/orders/<int:order_id>", "id": 42}


def test_db_outside_a_request_says_why(guard: Guard) -> None:
    app = make_app(guard)
    with pytest.raises(RuntimeError, match="no request"):
        db.execute(text("SELECT 1"))
    with app.app_context(), pytest.raises(RuntimeError, match=r"get_guard\(app\)\.session\(\)"):
        db.execute(text("SELECT 1"))


def test_db_in_an_app_without_poolguard_says_why() -> None:
    app = Flask(__name__)

    @app.get("/")
    def view() -> str:
        db.execute(text("SELECT 1"))
        return "unreachable"

    app.config["PROPAGATE_EXCEPTIONS"] = True
    with pytest.raises(RuntimeError, match="has no PoolGuard"):
        app.test_client().get("/")


# -- load shedding ----------------------------------------------------------------------------------


def assert_no_password(response: Any) -> None:
    assert PASSWORD not in response.get_data(as_text=True)
    assert all(PASSWORD not in value for _, value in response.headers.items())


def test_open_breaker_gives_503_while_db_free_routes_answer(outage_guard: Guard) -> None:
    client = make_app(outage_guard).test_client()
    first = client.get("/one")
    # The connection failure itself, counted by the breaker (which it opens): the same 503, never a 500.
    assert first.status_code == 503
    assert first.get_json()["reason"] == "circuit_open"
    assert outage_guard.breaker is not None
    assert outage_guard.breaker.state is poolguard.BreakerState.OPEN
    responses = [first]

    for path, method in (("/one", "GET"), ("/items", "POST"), ("/items/add", "POST")):
        response = client.open(path, method=method, json={"name": "x"})
        responses.append(response)
        assert response.status_code == 503, path
        retry_after = response.headers["Retry-After"]
        assert retry_after.isdigit()
        assert int(retry_after) >= 1
        assert response.headers["Cache-Control"] == "no-store"
        assert response.headers["Content-Type"] == "application/json"
        assert response.data == (
            b'{"error":"database_unavailable","reason":"circuit_open","retry_after":' + retry_after.encode() + b"}"
        )

    free = client.get("/")
    assert free.status_code == 200
    assert free.data == b"no database here"
    health = client.get("/health/db")
    assert health.status_code == 503
    assert health.get_json() == {"status": "unavailable"}
    for response in [*responses, free, health]:
        assert_no_password(response)


def test_open_breaker_health_detail_has_no_password(make_engine: Callable[..., Any], make_guard: Any) -> None:
    engine = make_engine(UNREACHABLE_URL, connect_args={"connect_timeout": 2})
    guard = make_guard(engine, breaker=Breaker(consecutive_failures=1))
    client = make_app(guard, health_detail="always").test_client()
    client.get("/one")
    health = client.get("/health/db")
    assert health.status_code == 503
    body = health.get_json()
    assert body["status"] == "unavailable"
    assert body["pools"][0]["breaker"]["state"] == "open"
    assert_no_password(health)


def test_saturated_pool_sheds_within_the_wait_budget(make_engine: Any, make_guard: Any) -> None:
    guard = make_guard(make_engine(pool_size=1, max_overflow=0), max_wait=0.3)
    app = make_app(guard)
    results: list[tuple[int, float, bytes]] = []
    lock = threading.Lock()
    start = threading.Barrier(4)

    def call() -> None:
        client = app.test_client()
        start.wait()
        began = time.monotonic()
        response = client.get("/slow")
        with lock:
            results.append((response.status_code, time.monotonic() - began, response.data))

    threads = [threading.Thread(target=call) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)

    assert len(results) == 4
    assert any(status == 200 for status, _, _ in results)
    shed = [(elapsed, body) for status, elapsed, body in results if status == 503]
    assert shed, results
    for elapsed, body in shed:
        assert elapsed < 1.0
        assert json.loads(body)["reason"] == "pool_saturated"
    assert all(status in (200, 503) for status, _, _ in results)


# -- health -----------------------------------------------------------------------------------------


def test_health_without_token_is_status_only(guard: Guard) -> None:
    response = make_app(guard).test_client().get("/health/db")
    assert response.status_code == 200
    assert response.data == b'{"status":"ok"}'
    assert response.headers["Cache-Control"] == "no-store"


def test_health_detail_with_the_right_bearer_token(guard: Guard) -> None:
    client = make_app(guard, health_detail="when-authorized", health_token="s3cret").test_client()
    detailed = client.get("/health/db", headers={"Authorization": "Bearer s3cret"})
    assert detailed.status_code == 200
    body = detailed.get_json()
    assert body["status"] == "ok"
    assert body["pools"][0]["name"] == "primary"
    assert body["pools"][0]["backend"] == "postgresql"
    for headers in ({"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret"}, {}):
        plain = client.get("/health/db", headers=headers)
        assert plain.status_code == 200
        assert plain.data == b'{"status":"ok"}'


def test_health_token_callable_gets_the_flask_request(guard: Guard) -> None:
    seen: list[Any] = []

    def allow(req: Any) -> bool:
        seen.append(req)
        return bool(req.headers.get("X-Internal") == "yes")

    client = make_app(guard, health_detail="when-authorized", health_token=allow).test_client()
    assert "pools" in client.get("/health/db", headers={"X-Internal": "yes"}).get_json()
    assert client.get("/health/db").get_json() == {"status": "ok"}
    assert all(isinstance(req, flask.Request) for req in seen)


def test_health_from_flask_config_and_no_scope(guard: Guard) -> None:
    app = make_app(guard, {"POOLGUARD_HEALTH_PATH": "/-/db", "POOLGUARD_HEALTH_DETAIL": "always"})
    scopes: list[Any] = []

    @app.after_request
    def record(response: flask.Response) -> flask.Response:
        scopes.append(guard.gate.unit_var.get())
        return response

    client = app.test_client()
    assert client.get("/health/db").status_code == 404
    response = client.get("/-/db")
    assert response.status_code == 200
    assert response.get_json()["pools"][0]["checked_out"] == 0
    assert client.post("/-/db").status_code == 405
    assert scopes[0] is not None
    assert scopes[1] is None, "the health view opened a request scope"


def test_health_path_none_turns_it_off(guard: Guard) -> None:
    app = make_app(guard, health_path=None)
    assert app.test_client().get("/health/db").status_code == 404
    assert pg_flask.HEALTH_ENDPOINT not in app.view_functions


# -- configuration and registration -----------------------------------------------------------------


def test_second_registration_on_the_same_app_is_refused(guard: Guard) -> None:
    app = make_app(guard)
    with pytest.raises(RuntimeError, match="already been registered"):
        PoolGuard(app, guard)
    with pytest.raises(RuntimeError, match="already been registered"):
        PoolGuard(guard=guard).init_app(app)


def test_unknown_config_key_fails_at_init_app(guard: Guard) -> None:
    app = Flask(__name__)
    app.config["POOLGUARD_HEALTH_PATHS"] = "/x"
    with pytest.raises(ConfigError, match="POOLGUARD_HEALTH_PATHS"):
        PoolGuard(app, guard)
    assert "poolguard" not in app.extensions


def test_invalid_config_value_fails_at_init_app(guard: Guard) -> None:
    app = Flask(__name__)
    app.config["POOLGUARD_HEALTH_DETAIL"] = "sometimes"
    with pytest.raises(ConfigError, match="health_detail"):
        PoolGuard(app, guard)


def test_unknown_keyword_fails_at_once(guard: Guard) -> None:
    with pytest.raises(ConfigError, match="health_pth"):
        PoolGuard(guard=guard, health_pth="/x")


def test_keywords_win_over_config_and_config_over_environment(guard: Guard, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POOLGUARD_HEALTH_PATH", "/from-env")
    monkeypatch.setenv("POOLGUARD_HEALTH_DETAIL", "always")
    from_env = make_app(guard).test_client()
    assert "pools" in from_env.get("/from-env").get_json()
    from_config = make_app(guard, {"POOLGUARD_HEALTH_PATH": "/from-config"}).test_client()
    assert from_config.get("/from-config").status_code == 200
    assert from_config.get("/from-env").status_code == 404
    from_kwargs = make_app(guard, {"POOLGUARD_HEALTH_PATH": "/from-config"}, health_path="/from-kwargs")
    assert from_kwargs.test_client().get("/from-kwargs").status_code == 200


def test_app_factory_with_two_apps(guard: Guard, observer: sqlalchemy.Engine) -> None:
    extension = PoolGuard(guard=guard)

    def create_app(health_path: str) -> Flask:
        app = Flask(__name__)
        app.config["POOLGUARD_HEALTH_PATH"] = health_path
        extension.init_app(app)
        register_routes(app)
        return app

    first, second = create_app("/first/health"), create_app("/second/health")
    assert first.extensions["poolguard"] is not second.extensions["poolguard"]
    assert get_guard(first) is get_guard(second) is guard
    with first.app_context():
        assert get_guard() is guard
    for app, path in ((first, "/first/health"), (second, "/second/health")):
        client = app.test_client()
        assert client.get(path).get_json() == {"status": "ok"}
        name = unique(app.config["POOLGUARD_HEALTH_PATH"].strip("/").replace("/", "-"))
        assert client.post("/items", json={"name": name}).status_code == 201
        assert name in names(observer)
        assert client.post("/items/fail", json={"name": name + "-x"}).status_code == 500
        assert name + "-x" not in names(observer)


def test_guard_built_from_flask_config(observer: sqlalchemy.Engine) -> None:
    app = make_app(
        None,
        {
            "POOLGUARD_SQLALCHEMY": {"URL": PG_URL, "POOL_SIZE": 2, "SERVICE_NAME": "flask-tests"},
            "POOLGUARD_MAX_WAIT": 0.5,
            "POOLGUARD_BREAKER": {"CONSECUTIVE_FAILURES": 2},
        },
    )
    guard = get_guard(app)
    try:
        assert guard.max_wait == 0.5
        name = unique("configured")
        assert app.test_client().post("/items", json={"name": name}).status_code == 201
        assert name in names(observer)
        assert checked_out(guard) == 0
    finally:
        guard.close()
        cast(sqlalchemy.Engine, guard.engine).dispose()


def test_guard_options_from_flask_config_apply_to_a_built_guard() -> None:
    app = make_app(
        None,
        {
            "POOLGUARD_SQLALCHEMY": {"URL": UNREACHABLE_URL, "CONNECT_TIMEOUT": 2},
            "POOLGUARD_BREAKER_CONSECUTIVE_FAILURES": 1,
            "POOLGUARD_BREAKER_OPEN_FOR": 7,
        },
    )
    guard = get_guard(app)
    try:
        client = app.test_client()
        assert client.get("/one").status_code == 503  # the counted connection failure
        shed = client.get("/one")
        assert shed.status_code == 503
        assert 1 <= int(shed.headers["Retry-After"]) <= 7
        assert_no_password(shed)
    finally:
        guard.close()
        cast(sqlalchemy.Engine, guard.engine).dispose()


def test_flat_breaker_keys_with_breaker_off_is_a_config_error(guard: Guard) -> None:
    app = Flask(__name__)
    app.config.update(POOLGUARD_BREAKER=False, POOLGUARD_BREAKER_OPEN_FOR=3)
    with pytest.raises(ConfigError, match="POOLGUARD_BREAKER"):
        PoolGuard(app, guard)


def test_no_guard_and_no_engine_config_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="POOLGUARD_SQLALCHEMY"):
        PoolGuard(Flask(__name__))


def test_guard_and_engine_config_together_is_a_config_error(guard: Guard) -> None:
    app = Flask(__name__)
    app.config["POOLGUARD_SQLALCHEMY"] = {"URL": PG_URL}
    with pytest.raises(ConfigError, match="POOLGUARD_SQLALCHEMY"):
        PoolGuard(app, guard)


def test_async_guard_is_refused() -> None:
    engine = create_async_engine(PG_URL)
    guard = Guard(engine)
    try:
        with pytest.raises(ConfigError, match="synchronous"):
            PoolGuard(Flask(__name__), guard)
    finally:
        guard.close()
        engine.sync_engine.dispose()


@pytest.mark.parametrize(("threads", "warned"), [(2, True), (4, False)])
def test_a_startup_warning_when_the_servers_threads_do_not_outnumber_the_pool(
    make_guard: Callable[..., Guard],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    threads: int,
    warned: bool,
) -> None:
    """With 2 threads on a pool of 2 the excess waits in gunicorn, where poolguard cannot refuse it."""
    monkeypatch.setenv("GUNICORN_CMD_ARGS", f"--threads {threads}")
    with caplog.at_level(logging.WARNING, logger="poolguard"):
        make_app(make_guard())
    found = [r.getMessage() for r in caplog.records if "threads per process" in r.getMessage()]
    if warned:
        (message,) = found
        assert "2 threads per process (gunicorn --threads) and the pool has 2 connections" in message
        assert "gunicorn --threads 4" in message
    else:
        assert found == []
