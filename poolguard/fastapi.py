"""FastAPI: the request's session as an ``Annotated`` dependency, on top of :mod:`poolguard.starlette`.

Usage::

    from fastapi import FastAPI
    from poolguard.fastapi import DbSession, PoolGuardMiddleware, poolguard_lifespan

    app = FastAPI(lifespan=poolguard_lifespan(guard))
    app.add_middleware(PoolGuardMiddleware, guard=guard)

    @app.post("/orders")
    async def create_order(db: DbSession) -> dict[str, int]:
        ...

The dependency only hands out the session the middleware's request scope owns; the middleware
decides when it commits (when the response starts, so a ``StreamingResponse`` never holds a
connection idle in a transaction) and turns ``Unavailable`` into the 503. The same session object
may be passed to ``BackgroundTasks``: what they write is committed when the request ends.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from poolguard.starlette import PoolGuardMiddleware, get_session, poolguard_lifespan

__all__ = ["DbSession", "PoolGuardMiddleware", "SyncDbSession", "get_session", "poolguard_lifespan"]


async def _async_session(request: Request) -> AsyncSession:
    """``async def`` so FastAPI resolves it on the event loop, not in a worker thread."""
    session = get_session(request)
    if not isinstance(session, AsyncSession):
        raise TypeError(
            "DbSession needs a poolguard.Guard on an AsyncEngine, but this guard's engine is synchronous: "
            "annotate the parameter with poolguard.fastapi.SyncDbSession instead"
        )
    return session


async def _sync_session(request: Request) -> Session:
    session = get_session(request)
    if not isinstance(session, Session):
        raise TypeError(
            "SyncDbSession needs a poolguard.Guard on a synchronous Engine, but this guard's engine is an "
            "AsyncEngine: annotate the parameter with poolguard.fastapi.DbSession instead"
        )
    return session


DbSession = Annotated[AsyncSession, Depends(_async_session)]
"""The request's ``AsyncSession`` (the guard's engine is an AsyncEngine): ``async def view(db: DbSession)``."""

SyncDbSession = Annotated[Session, Depends(_sync_session)]
"""The request's ``Session`` (the guard's engine is a synchronous Engine), for ``def`` endpoints."""
