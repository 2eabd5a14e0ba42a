"""A small FastAPI service guarded by poolguard.

Run it (from the project root)::

    .venv/bin/uvicorn examples.fastapi_app:app
    DATABASE_URL=postgresql+asyncpg://root@127.0.0.1/test .venv/bin/uvicorn examples.fastapi_app:app

Configured by environment variables only:

- ``DATABASE_URL``: an SQLAlchemy URL with an asyncio driver, default
  ``sqlite+aiosqlite:///poolguard-example.db``;
- ``ITEMS_TABLE``: the table it keeps its items in, default ``poolguard_example_items``;
- ``DB_POOL_SIZE``: a fixed pool size, no overflow (default: poolguard's sizing for 5 concurrent requests);
- ``POOLGUARD_*``: poolguard's options, e.g. ``POOLGUARD_MAX_WAIT=0.5``,
  ``POOLGUARD_BREAKER_CONSECUTIVE_FAILURES=3``, ``POOLGUARD_HEALTH_DETAIL=when-authorized`` with
  ``POOLGUARD_HEALTH_TOKEN=...``.

Routes: ``GET /`` never touches the database (it keeps answering during an outage), ``GET /items``
reads, ``POST /items`` with ``{"name": ...}`` writes (committed when the view returns),
``POST /items/fail`` writes then raises (rolled back), ``GET /items/slow?seconds=1`` reads and then
holds its connection (at most 5 s), ``GET /health/db`` is poolguard's health route, ``GET /metrics``
the pool metrics for Prometheus.
While the database is down or the pool is full, the database routes answer 503 with ``Retry-After``.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

import sqlalchemy as sa
from fastapi import FastAPI, Query
from prometheus_client import CollectorRegistry, make_asgi_app
from pydantic import BaseModel, Field

import poolguard
import poolguard.prometheus
from poolguard.config import PoolGuardConfig
from poolguard.fastapi import DbSession, PoolGuardMiddleware, poolguard_lifespan

logger = logging.getLogger("fastapi_example")

DATABASE_URL = os.environ.get("DATABASE_URL", "sqlite+aiosqlite:///poolguard-example.db")
ITEMS_TABLE = os.environ.get("ITEMS_TABLE", "poolguard_example_items")
POOL_SIZE = int(os.environ["DB_POOL_SIZE"]) if os.environ.get("DB_POOL_SIZE") else None

metadata = sa.MetaData()
items = sa.Table(
    ITEMS_TABLE,
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("name", sa.String(200), nullable=False),
)

engine = poolguard.create_async_engine(
    DATABASE_URL, service_name="fastapi-example", pool_size=POOL_SIZE, max_overflow=None if POOL_SIZE is None else 0
)
# The same POOLGUARD_* variables that configure the middleware tune the guard (max_wait, breaker, ...).
guard = poolguard.Guard(engine, **PoolGuardConfig.load().guard_options())


@asynccontextmanager
async def create_tables(app: FastAPI) -> AsyncIterator[None]:
    try:
        async with engine.begin() as connection:
            await connection.run_sync(metadata.create_all)
    except (OSError, sa.exc.SQLAlchemyError) as exc:
        # Starting during an outage is allowed: GET / and the health route work, the rest answers 503.
        logger.warning("database unreachable at startup (%s); table %s not created", type(exc).__name__, ITEMS_TABLE)
    yield


# poolguard_lifespan probes the database at startup, runs create_tables, and at shutdown disposes of
# the engine's connections (the guard stays usable, so the lifespan may run again, e.g. in tests).
app = FastAPI(title="poolguard FastAPI example", lifespan=poolguard_lifespan(guard, lifespan=create_tables))
app.add_middleware(PoolGuardMiddleware, guard=guard)
# Prometheus scrapes GET /metrics: the pool metrics under Prometheus names (poolguard[prometheus]).
registry = CollectorRegistry()
poolguard.prometheus.register(guard, registry=registry)
app.mount("/metrics", make_asgi_app(registry))


class NewItem(BaseModel):
    name: str = Field(min_length=1, max_length=200)


class Item(BaseModel):
    id: int
    name: str


@app.get("/")
async def index() -> dict[str, Any]:
    return {"service": "fastapi-example", "database": "not used by this route"}


@app.get("/items")
async def list_items(db: DbSession) -> dict[str, list[Item]]:
    rows = (await db.execute(sa.select(items.c.id, items.c.name).order_by(items.c.id))).all()
    return {"items": [Item(id=row.id, name=row.name) for row in rows]}


@app.post("/items", status_code=201)
async def create_item(new: NewItem, db: DbSession) -> Item:
    item_id = (await db.execute(items.insert().values(name=new.name).returning(items.c.id))).scalar_one()
    return Item(id=item_id, name=new.name)


@app.post("/items/fail")
async def create_item_then_fail(new: NewItem, db: DbSession) -> Item:
    await db.execute(items.insert().values(name=new.name))
    raise RuntimeError("failing after the write, on purpose: poolguard rolls it back")


@app.get("/items/slow")
async def hold_connection(db: DbSession, seconds: Annotated[float, Query(gt=0, le=5)] = 1.0) -> dict[str, Any]:
    # A request that keeps its connection while it waits (on another service, say): send more of
    # these at once than the pool holds and the database routes answer 503 pool_saturated within
    # max_wait instead of queueing for SQLAlchemy's pool_timeout.
    count = (await db.execute(sa.select(sa.func.count()).select_from(items))).scalar_one()
    await asyncio.sleep(seconds)
    return {"items": count, "held_seconds": seconds}
