"""FastAPI: the request's session as an ``Annotated`` dependency, on top of :mod:`poolguard.starlette`.

Usage (an AsyncEngine and ``async def`` routes)::

    from fastapi import FastAPI
    from poolguard.fastapi import DbSession, PoolGuardMiddleware, poolguard_lifespan

    app = FastAPI(lifespan=poolguard_lifespan(guard))
    app.add_middleware(PoolGuardMiddleware, guard=guard)

    @app.post("/orders")
    async def create_order(db: DbSession) -> dict[str, int]:
        ...

A synchronous Engine and ``def`` routes take :data:`SyncDbSession` instead; a guard over an asyncpg
pool (made in the lifespan, given to the middleware as a function) :data:`DbConnection`::

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        pool = await poolguard.create_asyncpg_pool(URL, service_name="orders")
        app.state.guard = poolguard.Guard(pool)
        yield
        app.state.guard.close()
        await pool.close()

    app = FastAPI(lifespan=lifespan)
    app.add_middleware(PoolGuardMiddleware, guard=lambda: app.state.guard)

    @app.get("/orders/{id}")
    async def order(id: int, conn: DbConnection) -> dict[str, Any]:
        ...

``DbSession`` and ``SyncDbSession`` are generic in the session class, defaulting to SQLAlchemy's:
``SyncDbSession[sqlmodel.Session]`` (or ``DbSession[MySession]``) is the same dependency typed as the app's
own class, so a SQLModel app keeps its tutorial's alias::

    SessionDep = SyncDbSession[Session]          # Session from sqlmodel; the guard makes them:
    guard = poolguard.Guard(engine, session_factory=sessionmaker(engine, class_=Session))

Startup (the lifespan, through the middleware or :func:`poolguard_lifespan`) checks every route:
``DbSession`` on a synchronous engine, ``SyncDbSession`` on an AsyncEngine, or a session class the
guard's ``session_factory`` does not make, or a session on an asyncpg guard (or ``DbConnection`` on an
engine's), is a ConfigError naming the route and the right choice.

The dependency only hands out the session the middleware's request scope owns; the middleware
decides when it commits (when the response starts, so a ``StreamingResponse`` never holds a
connection idle in a transaction) and turns ``Unavailable`` into the 503. The same session object
may be passed to ``BackgroundTasks``: what they write is committed when the request ends. An
endpoint that raises (``HTTPException`` included) is rolled back, as in every other adapter.
"""

from __future__ import annotations

import contextlib
import typing
from collections.abc import AsyncIterator, Callable, Iterator
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import Depends, Request
from fastapi.dependencies.models import Dependant
from fastapi.dependencies.utils import get_typed_signature
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session
from typing_extensions import TypeVar

from poolguard.errors import ConfigError
from poolguard.guard import Guard
from poolguard.starlette import (
    STARTUP_CHECKS,
    STATE_KEY,
    PoolGuardMiddleware,
    get_connection,
    get_session,
    poolguard_lifespan,
)
from poolguard.work import RequestScope

if TYPE_CHECKING:
    from asyncpg import Connection

__all__ = [
    "DbConnection",
    "DbSession",
    "PoolGuardMiddleware",
    "SyncDbSession",
    "get_connection",
    "get_session",
    "poolguard_lifespan",
]

AsyncSessionT = TypeVar("AsyncSessionT", bound=AsyncSession, default=AsyncSession)
SessionT = TypeVar("SessionT", bound=Session, default=Session)


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
    """``async def`` too: the wait for a connection slot happens here, on the event loop, so a ``def``
    endpoint takes one of the thread pool's workers only once it can have a connection."""
    session = get_session(request)
    if not isinstance(session, Session):
        raise TypeError(
            "SyncDbSession needs a poolguard.Guard on a synchronous Engine, but this guard's engine is an "
            "AsyncEngine: annotate the parameter with poolguard.fastapi.DbSession instead"
        )
    request_scope: RequestScope = request.scope["state"][STATE_KEY]
    await request_scope.gate.areserve(request_scope)
    with _rollback_on_error(request):
        yield session


async def _connection(request: Request) -> AsyncIterator[Any]:
    """The request's asyncpg connection; an endpoint that raises marks the request's unit failed."""
    connection = await get_connection(request)
    with _rollback_on_error(request):
        yield connection


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


DbSession = Annotated[AsyncSessionT, Depends(_async_session)]
"""The request's ``AsyncSession`` (the guard's engine is an AsyncEngine): ``async def view(db: DbSession)``.

``DbSession[MyAsyncSession]`` types it as the class the guard's ``session_factory`` makes
(``async_sessionmaker(engine, class_=MyAsyncSession)``, e.g. SQLModel's ``AsyncSession``)."""

SyncDbSession = Annotated[SessionT, Depends(_sync_session)]
"""The request's ``Session`` (the guard's engine is a synchronous Engine), for ``def`` endpoints.

``SyncDbSession[sqlmodel.Session]`` types it as the class the guard's ``session_factory`` makes
(``sessionmaker(engine, class_=sqlmodel.Session)``), so ``session.exec(select(Hero))`` type-checks."""


if TYPE_CHECKING:
    DbConnection = Annotated[Connection, Depends(_connection)]
else:  # asyncpg is an extra: the alias needs it only for type checkers
    DbConnection = Annotated[Any, Depends(_connection)]
"""The request's asyncpg ``Connection`` (the guard's pool is an asyncpg pool): ``async def view(conn: DbConnection)``.

Acquired on first use, guarded (breaker, admission, timing), released once the response is complete."""


_DEPENDENCIES: dict[Callable[..., Any], tuple[str, bool]] = {
    _async_session: ("DbSession", True),
    _sync_session: ("SyncDbSession", False),
    _connection: ("DbConnection", True),
}
"""Each dependency: its public name, and whether it needs an asyncio pool (an AsyncEngine or asyncpg)."""


def _check_routes(guard: Guard, app: Any) -> None:
    """Refuses an app whose routes take a session that does not fit the guard (a STARTUP_CHECKS entry)."""
    for route in _routes(app):
        dependant = getattr(route, "dependant", None)
        if isinstance(dependant, Dependant):
            methods = ",".join(sorted(getattr(route, "methods", None) or ()))
            _check_dependant(guard, dependant, f"{methods} {getattr(route, 'path', '?')}".strip())


def _routes(app: Any, depth: int = 0) -> Iterator[Any]:
    """The app's routes, and those of the routers and apps mounted in it."""
    for route in getattr(app, "routes", None) or ():
        yield route
        if depth < 8 and getattr(route, "routes", None):
            yield from _routes(route, depth + 1)


def _check_dependant(guard: Guard, dependant: Dependant, where: str) -> None:
    for sub in dependant.dependencies:
        known = _DEPENDENCIES.get(sub.call) if sub.call is not None else None
        if known is not None:
            _check_parameter(guard, dependant, sub.name or "?", known, where)
        _check_dependant(guard, sub, where)


def _check_parameter(guard: Guard, parent: Dependant, name: str, known: tuple[str, bool], where: str) -> None:
    alias, needs_async = known
    setting = f"the annotation of parameter {name!r} of {where}"
    factory = guard.session_factory
    if (alias == "DbConnection") != (guard.acquiring is not None):
        if guard.acquiring is not None:
            accepted = f"poolguard.fastapi.DbConnection: guard {guard.name!r} watches an asyncpg pool (no sessions)"
        elif factory is not None:
            right = "DbSession" if guard.is_async else "SyncDbSession"
            accepted = f"poolguard.fastapi.{right}: DbConnection needs a guard over an asyncpg pool"
        else:
            accepted = f"a guard over a SQLAlchemy engine or an asyncpg pool (pool {guard.name!r} is neither)"
        raise ConfigError(setting, alias, accepted)
    if alias == "DbConnection":
        return
    if factory is None:
        raise ConfigError(setting, alias, f"a guard over a SQLAlchemy engine (pool {guard.name!r} has no sessions)")
    if needs_async != guard.is_async:
        right, engine = ("DbSession", "an AsyncEngine") if guard.is_async else ("SyncDbSession", "a synchronous Engine")
        raise ConfigError(setting, alias, f"poolguard.fastapi.{right}: the engine of guard {guard.name!r} is {engine}")
    wanted = _annotated_class(parent, name)
    made = getattr(factory, "class_", None)
    if isinstance(wanted, type) and isinstance(made, type) and not issubclass(made, wanted):
        qualified = f"{wanted.__module__}.{wanted.__qualname__}"
        maker = "async_sessionmaker" if guard.is_async else "sessionmaker"
        raise ConfigError(
            setting,
            f"{alias}[{wanted.__qualname__}]",
            f"a class guard {guard.name!r} makes ({made.__module__}.{made.__qualname__}); for {qualified}, "
            f"pass poolguard.Guard(engine, session_factory={maker}(engine, class_={wanted.__qualname__}))",
        )


def _annotated_class(parent: Dependant, name: str) -> Any:
    """The session class a parameter's ``Annotated[...]`` names (None when it cannot be read)."""
    if parent.call is None:
        return None
    try:
        parameter = get_typed_signature(parent.call).parameters.get(name)
    except Exception:  # an annotation FastAPI itself resolved in its own way: nothing to compare
        return None
    if parameter is None or typing.get_origin(parameter.annotation) is not Annotated:
        return None
    return typing.get_args(parameter.annotation)[0]


STARTUP_CHECKS.append(_check_routes)
