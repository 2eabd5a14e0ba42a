"""A small Flask service guarded by poolguard.

Run it (from the project root)::

    .venv/bin/flask --app examples/flask_app.py run
    DATABASE_URL=postgresql+psycopg://root@127.0.0.1/test .venv/bin/gunicorn \
        --worker-class gthread --threads 4 -w 1 --chdir examples flask_app:app

Configured by environment variables only:

- ``DATABASE_URL``: any SQLAlchemy URL, default ``sqlite:///poolguard-example.db``;
- ``ITEMS_TABLE``: the table it keeps its items in, default ``poolguard_example_items``;
- ``POOLGUARD_*``: poolguard's options, e.g. ``POOLGUARD_MAX_WAIT=0.5``,
  ``POOLGUARD_BREAKER_CONSECUTIVE_FAILURES=3``, ``POOLGUARD_HEALTH_DETAIL=when-authorized`` with
  ``POOLGUARD_HEALTH_TOKEN=...``.

Routes: ``GET /`` never touches the database (it keeps answering during an outage), ``GET /items``
reads, ``POST /items`` with ``{"name": ...}`` writes (committed when the view returns),
``POST /items/fail`` writes then raises (rolled back), ``GET /health/db`` is poolguard's health view,
``GET /metrics`` the pool metrics for Prometheus.
While the database is down or the pool is full, the database routes answer 503 with ``Retry-After``.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import sqlalchemy as sa
from flask import Flask, abort, request
from prometheus_client import CollectorRegistry, make_wsgi_app
from werkzeug.middleware.dispatcher import DispatcherMiddleware

import poolguard
import poolguard.prometheus
from poolguard.config import PoolGuardConfig
from poolguard.flask import PoolGuard, db

logger = logging.getLogger("flask_example")

DATABASE_URL = os.environ.get("DATABASE_URL", "sqlite:///poolguard-example.db")
ITEMS_TABLE = os.environ.get("ITEMS_TABLE", "poolguard_example_items")

metadata = sa.MetaData()
items = sa.Table(
    ITEMS_TABLE,
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("name", sa.String(200), nullable=False),
)


def create_app(database_url: str = DATABASE_URL) -> Flask:
    """The app factory: one engine and one guard per process (gunicorn imports this in each worker)."""
    # workers=4: the threads gunicorn runs per process, so one warm connection per thread.
    engine = poolguard.create_engine(database_url, service_name="flask-example", workers=4)
    # The same POOLGUARD_* variables that configure the extension tune the guard (max_wait, breaker, ...).
    guard = poolguard.Guard(engine, **PoolGuardConfig.load().guard_options())
    try:
        metadata.create_all(engine)
    except sa.exc.OperationalError as exc:
        # Starting during an outage is allowed: GET / and the health route work, the rest answers 503.
        logger.warning("database unreachable at startup (%s); table %s not created", type(exc).__name__, ITEMS_TABLE)

    app = Flask(__name__)
    PoolGuard(app, guard)
    # Prometheus scrapes GET /metrics: the pool metrics under Prometheus names (poolguard[prometheus]).
    registry = CollectorRegistry()
    poolguard.prometheus.register(guard, registry=registry)
    app.wsgi_app = DispatcherMiddleware(app.wsgi_app, {"/metrics": make_wsgi_app(registry)})  # type: ignore[method-assign]

    @app.get("/")
    def index() -> dict[str, Any]:
        return {"service": "flask-example", "database": "not used by this route"}

    @app.get("/items")
    def list_items() -> dict[str, Any]:
        rows = db.execute(sa.select(items.c.id, items.c.name).order_by(items.c.id)).all()
        return {"items": [{"id": row.id, "name": row.name} for row in rows]}

    @app.post("/items")
    def create_item() -> tuple[dict[str, Any], int]:
        name = _name()
        item_id = db.execute(items.insert().values(name=name).returning(items.c.id)).scalar_one()
        return {"id": item_id, "name": name}, 201

    @app.post("/items/fail")
    def create_item_then_fail() -> dict[str, Any]:
        db.execute(items.insert().values(name=_name()))
        raise RuntimeError("failing after the write, on purpose: poolguard rolls it back")

    return app


def _name() -> str:
    payload = request.get_json(silent=True)
    name = payload.get("name") if isinstance(payload, dict) else None
    if not isinstance(name, str) or not name or len(name) > 200:
        abort(400, description='send JSON {"name": "..."} with 1 to 200 characters')
    return name


app = create_app()
