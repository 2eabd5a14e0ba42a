"""The FastAPI benchmark app, one ``FastAPI`` per variant (see ``common.COMPARISONS``); asyncpg, pool 16 + 0.

No ``from __future__ import annotations`` here: FastAPI reads each route's ``Annotated`` dependency
at definition time, and the bare variant's dependency is local to its factory.

``outage()`` is the outage and overload benchmarks' app (``benchmarks.outage``, ``benchmarks.overload``),
with ``async def`` or ``def`` routes.
"""

from collections.abc import AsyncIterator, Iterator
from typing import Annotated, Any

import sqlalchemy as sa
from fastapi import Depends, FastAPI
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import Session, sessionmaker

import poolguard
from benchmarks.apps import common
from poolguard.fastapi import DbSession, PoolGuardMiddleware, SyncDbSession, poolguard_lifespan


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


def outage(variant: str, port: int, *, sync: bool, pool: int | None = None) -> FastAPI:
    """``GET /db`` (a 10 ms query), ``GET /work`` (``common.HOLD``), ``GET /nodb`` (no database) and
    ``GET /health/db``, as users write them.

    ``sync``: every route a ``def`` (run in the server's thread pool) on a psycopg engine; otherwise
    ``async def`` on asyncpg. Variants as in ``flask_app.outage``: ``bare`` (SQLAlchemy's defaults, a
    ``SELECT 1`` health route), ``guarded`` (the README's ``poolguard.create_engine`` /
    ``create_async_engine(url, service_name=...)``, ``Guard(engine)``, ``poolguard_lifespan`` and the
    middleware, defaults throughout), ``own-engine`` (the bare app's engine under the same guard).
    ``pool`` (the overload benchmark): every variant's engine gets ``pool_size=pool, max_overflow=0``,
    as a user sizes a pool, so bare and guarded have the same capacity.
    """
    sizing: dict[str, int] = {} if pool is None else {"pool_size": pool, "max_overflow": 0}
    overflow = None if pool is None else 0
    if variant == "bare":
        return _bare_sync(port, sizing) if sync else _bare_async(port, sizing)
    if sync:
        engine: sa.Engine | AsyncEngine = (
            poolguard.create_engine(
                common.sync_url(port), service_name="outage-bench", pool_size=pool, max_overflow=overflow
            )
            if variant == "guarded"
            else sa.create_engine(common.sync_url(port), **sizing)
        )
    elif variant == "guarded":
        engine = poolguard.create_async_engine(
            common.async_url(port), service_name="outage-bench", pool_size=pool, max_overflow=overflow
        )
    else:
        engine = create_async_engine(common.async_url(port), **sizing)
    guard = poolguard.Guard(engine)
    app = FastAPI(lifespan=poolguard_lifespan(guard))
    app.add_middleware(PoolGuardMiddleware, guard=guard, health_path="/health/db")
    if sync:

        @app.get("/db")
        def sync_work(db: SyncDbSession) -> dict[str, bool]:
            db.execute(common.WORK)
            return {"ok": True}

        @app.get("/work")
        def sync_hold(db: SyncDbSession) -> dict[str, bool]:
            db.execute(common.HOLD)
            return {"ok": True}

        @app.get("/nodb")
        def sync_nodb() -> dict[str, bool]:
            return {"ok": True}

    else:

        @app.get("/db")
        async def work(db: DbSession) -> dict[str, bool]:
            await db.execute(common.WORK)
            return {"ok": True}

        @app.get("/work")
        async def hold(db: DbSession) -> dict[str, bool]:
            await db.execute(common.HOLD)
            return {"ok": True}

        @app.get("/nodb")
        async def nodb() -> dict[str, bool]:
            return {"ok": True}

    return app


def _bare_async(port: int, sizing: dict[str, int]) -> FastAPI:
    engine = create_async_engine(common.async_url(port), **sizing)
    session_factory = async_sessionmaker(engine)

    async def get_db() -> AsyncIterator[AsyncSession]:
        async with session_factory.begin() as session:
            yield session

    app = FastAPI()

    @app.get("/db")
    async def work(db: Annotated[AsyncSession, Depends(get_db)]) -> dict[str, bool]:
        await db.execute(common.WORK)
        return {"ok": True}

    @app.get("/work")
    async def hold(db: Annotated[AsyncSession, Depends(get_db)]) -> dict[str, bool]:
        await db.execute(common.HOLD)
        return {"ok": True}

    @app.get("/health/db")
    async def health() -> dict[str, str]:
        async with engine.connect() as connection:
            await connection.execute(common.SELECT_1)
        return {"status": "ok"}

    @app.get("/nodb")
    async def nodb() -> dict[str, bool]:
        return {"ok": True}

    return app


def _bare_sync(port: int, sizing: dict[str, int]) -> FastAPI:
    engine = sa.create_engine(common.sync_url(port), **sizing)
    session_factory = sessionmaker(engine)

    def get_db() -> Iterator[Session]:
        with session_factory.begin() as session:
            yield session

    app = FastAPI()

    @app.get("/db")
    def work(db: Annotated[Session, Depends(get_db)]) -> dict[str, bool]:
        db.execute(common.WORK)
        return {"ok": True}

    @app.get("/work")
    def hold(db: Annotated[Session, Depends(get_db)]) -> dict[str, bool]:
        db.execute(common.HOLD)
        return {"ok": True}

    @app.get("/health/db")
    def health() -> dict[str, str]:
        with engine.connect() as connection:
            connection.execute(common.SELECT_1)
        return {"status": "ok"}

    @app.get("/nodb")
    def nodb() -> dict[str, bool]:
        return {"ok": True}

    return app
