"""A small FastAPI service on a plain asyncpg pool, guarded by poolguard.

Run it (from the project root)::

    DATABASE_URL=postgresql://root@127.0.0.1/test .venv/bin/uvicorn examples.fastapi_asyncpg_app:app

Configured by environment variables: ``DATABASE_URL`` (``postgresql://`` or ``postgresql+asyncpg://``),
``WORKERS`` (requests served at once, default 5: the pool's size) and ``POOLGUARD_*`` (e.g.
``POOLGUARD_MAX_WAIT=0.5``). The pool belongs to the event loop
that serves, so it and its guard are made in the lifespan; the middleware is given a function that
returns the guard.

Routes: ``GET /`` never touches the database (it keeps answering during an outage), ``GET /now``
reads the server's clock, ``GET /slow?seconds=1`` holds its connection (at most 5 s),
``GET /health/db`` is poolguard's health route. While the database is down or the pool is full, the
database routes answer 503 with ``Retry-After``.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated

from fastapi import FastAPI, Query

import poolguard
from poolguard.config import PoolGuardConfig
from poolguard.fastapi import DbConnection, PoolGuardMiddleware

DATABASE_URL = os.environ.get("DATABASE_URL", "postgresql://root@127.0.0.1/test")
WORKERS = int(os.environ.get("WORKERS", "5"))


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    pool = await poolguard.create_asyncpg_pool(DATABASE_URL, service_name="fastapi-asyncpg-example", workers=WORKERS)
    app.state.guard = poolguard.Guard(pool, **PoolGuardConfig.load().guard_options())  # POOLGUARD_* variables
    try:
        yield
    finally:
        app.state.guard.close()
        await pool.close()


app = FastAPI(lifespan=lifespan)
app.add_middleware(PoolGuardMiddleware, guard=lambda: app.state.guard)


@app.get("/")
async def index() -> dict[str, str]:
    return {"service": "fastapi-asyncpg-example", "database": "not used by this route"}


@app.get("/now")
async def now(conn: DbConnection) -> dict[str, str]:
    return {"now": str(await conn.fetchval("SELECT now()"))}


@app.get("/slow")
async def slow(conn: DbConnection, seconds: Annotated[float, Query(ge=0, le=5)] = 1.0) -> dict[str, float]:
    await conn.execute("SELECT pg_sleep($1)", seconds)
    return {"slept": seconds}
