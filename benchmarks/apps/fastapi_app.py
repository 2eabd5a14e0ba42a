"""The FastAPI benchmark app, one ``FastAPI`` per variant (see ``common.COMPARISONS``); asyncpg, pool 16 + 0.

No ``from __future__ import annotations`` here: FastAPI reads each route's ``Annotated`` dependency
at definition time, and the bare variant's dependency is local to its factory.
"""

from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import Depends, FastAPI
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

import poolguard
from benchmarks.apps import common
from poolguard.fastapi import DbSession, PoolGuardMiddleware


def _engine() -> AsyncEngine:
    return create_async_engine(common.ASYNC_URL, pool_size=16, max_overflow=0)


def bare(*, instrumented: bool = False) -> FastAPI:
    engine = _engine()
    if instrumented:
        common.instrument_sqlalchemy(engine.sync_engine)
    session_factory = async_sessionmaker(engine, expire_on_commit=False)

    async def get_db() -> AsyncIterator[AsyncSession]:
        async with session_factory() as session:
            yield session
            await session.commit()

    app = FastAPI()

    @app.get("/select1")
    async def select1(db: Annotated[AsyncSession, Depends(get_db)]) -> dict[str, int]:
        return {"one": (await db.execute(common.SELECT_1)).scalar_one()}

    return app


def guarded(**guard_options: Any) -> FastAPI:
    app = FastAPI()
    app.add_middleware(PoolGuardMiddleware, guard=poolguard.Guard(_engine(), name="bench", **guard_options))

    @app.get("/select1")
    async def select1(db: DbSession) -> dict[str, int]:
        return {"one": (await db.execute(common.SELECT_1)).scalar_one()}

    return app


def make(variant: str) -> FastAPI:
    if variant == "bare":
        return bare()
    if variant == "otel":
        return bare(instrumented=True)
    return guarded(**common.guard_options(variant))
