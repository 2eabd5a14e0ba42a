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
may be passed to ``BackgroundTasks``: what they write is committed when the request ends. An
endpoint that raises (``HTTPException`` included) is rolled back, as in every other adapter.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from poolguard.starlette import STATE_KEY, PoolGuardMiddleware, get_session, poolguard_lifespan
from poolguard.work import RequestScope

__all__ = ["DbSession", "PoolGuardMiddleware", "SyncDbSession", "get_session", "poolguard_lifespan"]


async def _async_session(request: Request) -> AsyncIterator[AsyncSession]:
    """``async def`` so FastAPI resolves it on the event loop, not in a worker thread."""
    session = get_session(request)
    if not isinstance(session, AsyncSession):
        raise TypeError(
            "DbSession needs a poolguard.Guard on an AsyncEngine, but this guard's engine is synchronous: "
            "annotate the parameter with poolguard.fastapi.SyncDbSession instead"
        )
    with _rollback_on_error(request):
        yield session


async def _sync_session(request: Request) -> AsyncIterator[Session]:
    session = get_session(request)
    if not isinstance(session, Session):
        raise TypeError(
            "SyncDbSession needs a poolguard.Guard on a synchronous Engine, but this guard's engine is an "
            "AsyncEngine: annotate the parameter with poolguard.fastapi.DbSession instead"
        )
    with _rollback_on_error(request):
        yield session


@contextlib.contextmanager
def _rollback_on_error(request: Request) -> Iterator[None]:
    """An endpoint that raises, even an ``HTTPException`` FastAPI turns into a response, is rolled back.

    The middleware only sees the finished response, so the dependency tells the request scope.
    """
    try:
        yield
    except Exception as exc:
        request_scope: RequestScope = request.scope["state"][STATE_KEY]
        request_scope.fail(exc)
        raise


DbSession = Annotated[AsyncSession, Depends(_async_session)]
"""The request's ``AsyncSession`` (the guard's engine is an AsyncEngine): ``async def view(db: DbSession)``."""

SyncDbSession = Annotated[Session, Depends(_sync_session)]
"""The request's ``Session`` (the guard's engine is a synchronous Engine), for ``def`` endpoints."""
