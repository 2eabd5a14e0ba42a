"""A small Flask service guarded by poolguard.

Run it (from the project root)::

    .venv/bin/flask --app examples/flask_app.py run
    DATABASE_URL=postgresql+psycopg://root@127.0.0.1/test .venv/bin/gunicorn \
        --worker-class gthread --threads 4 -w 1 --chdir examples flask_app:app

Configured by environment variables only:

- ``DATABASE_URL``: any SQLAlchemy URL, default ``sqlite:///poolguard-example.db``;
- ``ITEMS_TABLE``: the table it keeps its items in, default ``poolguard_example_items``;
- ``DB_POOL_SIZE``: a fixed pool size, no overflow (default: sized for gunicorn's 4 threads);
- ``POOLGUARD_*``: poolguard's options, e.g. ``POOLGUARD_MAX_WAIT=0.5``,
  ``POOLGUARD_BREAKER_CONSECUTIVE_FAILURES=3``, ``POOLGUARD_HEALTH_DETAIL=when-authorized`` with
  ``POOLGUARD_HEALTH_TOKEN=...``.

Routes: ``GET /`` never touches the database (it keeps answering during an outage), ``GET /items``
reads, ``POST /items`` with ``{"name": ...}`` writes (committed when the view returns),
``POST /items/fail`` writes then raises (rolled back), ``GET /items/slow?seconds=1`` reads and then
holds its connection (at most 5 s), ``GET /health/db`` is poolguard's health view, ``GET /metrics``
the pool metrics for Prometheus.
While the database is down or the pool is full, the database routes answer 503 with ``Retry-After``.
"""

from __future__ import annotations

import logging
import os
import time
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
POOL_SIZE = int(os.environ["DB_POOL_SIZE"]) if os.environ.get("DB_POOL_SIZE") else None
MAX_HOLD_SECONDS = 5.0

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
    engine = poolguard.create_engine(
        database_url,
        service_name="flask-example",
        workers=4,
        pool_size=POOL_SIZE,
        max_overflow=None if POOL_SIZE is None else 0,
    )
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

    @app.get("/items/slow")
    def hold_connection() -> dict[str, Any]:
        # A request that keeps its connection while it waits (on another service, say): send more of
        # these at once than the pool holds and the database routes answer 503 pool_saturated
        # within max_wait instead of queueing for SQLAlchemy's pool_timeout.
        seconds = _seconds()
        count = db.execute(sa.select(sa.func.count()).select_from(items)).scalar_one()
        time.sleep(seconds)
        return {"items": count, "held_seconds": seconds}

    return app


def _seconds() -> float:
    try:
        seconds = float(request.args.get("seconds", "1"))
    except ValueError:
        seconds = -1.0
    if not 0 < seconds <= MAX_HOLD_SECONDS:
        abort(400, description=f"seconds: a number above 0 and at most {MAX_HOLD_SECONDS:g}")
    return seconds


def _name() -> str:
    payload = request.get_json(silent=True)
    name = payload.get("name") if isinstance(payload, dict) else None
    if not isinstance(name, str) or not name or len(name) > 200:
        abort(400, description='send JSON {"name": "..."} with 1 to 200 characters')
    return name


app = create_app()
