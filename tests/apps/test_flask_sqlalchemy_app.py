"""A Flask-SQLAlchemy factory app adopted with ``PoolGuard(app)``, on real PostgreSQL (and in-memory SQLite).

What issue 13 found: poolguard reclaimed the connection Flask-SQLAlchemy's session still held when
the request ended, before FSA's own teardown returned it: a WARNING and a "leak" per request, a new
PostgreSQL session per request, an in-memory SQLite database wiped, a teardown_request that queries
broken. Here FSA returns its connections as it always does, and only what is still held after its
teardown is reclaimed.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from flask import Flask
from sqlalchemy import text

import poolguard
from poolguard.flask import PoolGuard, get_guard
from tests.apps.flask_sqlalchemy_app import create_app, db
from tests.support.databases import DEAD_PORT, PG_URL, pg_url

pytestmark = pytest.mark.postgres

AppFactory = Callable[..., Flask]


@pytest.fixture
def make_app() -> Iterator[AppFactory]:
    apps: list[Flask] = []

    def factory(**config: Any) -> Flask:
        config.setdefault("SQLALCHEMY_DATABASE_URI", PG_URL)
        app = create_app(config)
        with app.app_context():
            if config["SQLALCHEMY_DATABASE_URI"].startswith(("sqlite", PG_URL)):
                db.create_all()
        apps.append(app)
        return app

    yield factory
    for app in apps:
        guard = get_guard(app)
        with app.app_context():
            if app.config["SQLALCHEMY_DATABASE_URI"] == PG_URL:
                db.drop_all()
            checked_out = db.engine.pool.checkedout() if hasattr(db.engine.pool, "checkedout") else 0
            db.engine.dispose()
        guard.close()
        assert checked_out == 0


def body(response: Any) -> Any:
    return json.loads(response.get_data())


def test_reads_give_their_connection_back_without_a_warning_or_a_new_session(
    make_app: AppFactory, caplog: pytest.LogCaptureFixture
) -> None:
    app = make_app(SQLALCHEMY_ENGINE_OPTIONS={"pool_size": 2, "max_overflow": 0})
    client = app.test_client()
    with caplog.at_level(logging.WARNING, logger="poolguard"):
        pids = {body(client.get("/backend"))["pid"] for _ in range(50)}
        assert client.get("/authors").status_code == 200
    assert len(pids) == 1  # one PostgreSQL session serves every request, as without poolguard
    stats = get_guard(app).stats()
    assert stats.checkouts >= 51  # gated and counted
    assert stats.leaks_reported == 0
    assert stats.connections_created == 1
    assert stats.checked_out == 0
    assert [r.getMessage() for r in caplog.records if "unbounded" not in r.getMessage()] == []


def test_the_apps_own_commits_and_rollbacks_hold(make_app: AppFactory) -> None:
    client = make_app().test_client()
    assert client.post("/authors", json={"name": "Ursula"}).status_code == 201
    assert client.post("/authors/uncommitted", json={"name": "Iain"}).status_code == 409
    assert body(client.get("/authors")) == {"authors": ["Ursula"]}
    assert body(client.get("/count")) == {"count": 1}  # Model.query works as before


def test_an_in_memory_sqlite_database_survives_between_requests(make_app: AppFactory) -> None:
    client = make_app(SQLALCHEMY_DATABASE_URI="sqlite://").test_client()
    assert client.post("/authors", json={"name": "Octavia"}).status_code == 201
    assert body(client.get("/count")) == {"count": 1}
    assert body(client.get("/authors")) == {"authors": ["Octavia"]}


def test_a_teardown_request_may_still_query(make_app: AppFactory) -> None:
    app = make_app()
    seen: list[int] = []

    @app.teardown_request
    def audit(exc: BaseException | None) -> None:
        seen.append(db.session.execute(text("SELECT 1")).scalar_one())

    client = app.test_client()
    for _ in range(3):
        assert client.get("/authors").status_code == 200
    assert seen == [1, 1, 1]


def test_a_forgotten_connection_is_reclaimed_after_flask_sqlalchemys_teardown(
    make_app: AppFactory, caplog: pytest.LogCaptureFixture
) -> None:
    app = make_app()
    client = app.test_client()
    with caplog.at_level(logging.WARNING, logger="poolguard"):
        assert client.get("/forgets").status_code == 200
        assert client.get("/authors").status_code == 200
    warnings = [r.getMessage() for r in caplog.records if "still holding a connection" in r.getMessage()]
    assert len(warnings) == 1
    assert "/forgets" in warnings[0]
    assert get_guard(app).stats().leaks_reported == 1
    assert get_guard(app).stats().checked_out == 0


def test_a_full_pool_answers_503_pool_saturated(make_app: AppFactory) -> None:
    app = make_app(POOLGUARD_MAX_WAIT=0.1, SQLALCHEMY_ENGINE_OPTIONS={"pool_size": 1, "max_overflow": 0})
    assert get_guard(app).max_wait == 0.1  # the config's guard options apply to the guard PoolGuard builds
    client = app.test_client()
    assert client.get("/authors").status_code == 200
    release = threading.Event()
    held = threading.Event()

    def hold() -> None:
        with app.test_request_context(), get_guard(app).connection():
            held.set()
            release.wait(10)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert held.wait(5)
        response = client.get("/authors")
        assert response.status_code == 503
        assert body(response)["reason"] == "pool_saturated"
        assert response.headers["Retry-After"] == "1"
        assert client.get("/nodb").status_code == 200
    finally:
        release.set()
        holder.join(5)
    assert client.get("/authors").status_code == 200


def test_a_database_that_refuses_answers_503_never_500(make_app: AppFactory) -> None:
    app = make_app(SQLALCHEMY_DATABASE_URI=pg_url(port=DEAD_PORT))
    client = app.test_client()
    for _ in range(3):
        response = client.get("/authors")
        assert response.status_code == 503
        assert body(response)["reason"] == "circuit_open"
    assert client.get("/nodb").status_code == 200
    assert client.get("/health/db").status_code == 503


def test_guard_options_in_the_config_never_silently_miss_a_guard_you_pass() -> None:
    app = Flask(__name__)
    app.config.update(SQLALCHEMY_DATABASE_URI=PG_URL, POOLGUARD_MAX_WAIT=0.2)
    db.init_app(app)
    with app.app_context():
        guard = poolguard.Guard(db.engine, max_wait=0.5)
    try:
        with pytest.raises(poolguard.ConfigError, match="POOLGUARD_MAX_WAIT"):
            PoolGuard(app, guard)
        app.config["POOLGUARD_MAX_WAIT"] = 0.5  # the same as the guard's: nothing is ignored
        PoolGuard(app, guard)
    finally:
        guard.close()
        with app.app_context():
            db.engine.dispose()


def test_a_django_only_option_is_refused_not_ignored() -> None:
    app = Flask(__name__)
    app.config.update(SQLALCHEMY_DATABASE_URI=PG_URL, POOLGUARD_DATABASES=["default"])
    db.init_app(app)
    try:
        with pytest.raises(poolguard.ConfigError, match="POOLGUARD_DATABASES"):
            PoolGuard(app)
    finally:
        with app.app_context():
            db.engine.dispose()


def problem(exc: poolguard.Unavailable) -> tuple[dict[str, Any], str]:
    return {"type": "about:blank", "title": "Service Unavailable", "status": 503, "detail": exc.reason}, (
        "application/problem+json"
    )


def test_the_503_body_in_the_apps_own_shape(make_app: AppFactory) -> None:
    app = make_app(SQLALCHEMY_DATABASE_URI=pg_url(port=DEAD_PORT), POOLGUARD_UNAVAILABLE_BODY=problem)
    response = app.test_client().get("/authors")
    assert response.status_code == 503
    assert response.headers["Content-Type"] == "application/problem+json"
    assert response.headers["Retry-After"] == "1"  # status and headers stay poolguard's
    assert response.headers["Cache-Control"] == "no-store"
    assert body(response) == {
        "type": "about:blank",
        "title": "Service Unavailable",
        "status": 503,
        "detail": "circuit_open",
    }
