"""Starlette (and any ASGI app): a pure ASGI middleware, ``get_session`` and a lifespan helper.

Usage::

    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from poolguard.starlette import PoolGuardMiddleware, get_session, poolguard_lifespan

    app = Starlette(
        routes=[...],
        middleware=[Middleware(PoolGuardMiddleware, guard=guard, health_path="/health/db")],
        lifespan=poolguard_lifespan(guard),
    )

    async def view(request):
        db = get_session(request)      # AsyncSession (Session for a synchronous Engine)
        conn = await get_connection(request)  # or, for a guard over an asyncpg pool, its Connection

A guard over an asyncpg pool is made in the app's lifespan (the pool belongs to the serving event
loop), so the middleware takes a function that returns it once the lifespan has run:
``Middleware(PoolGuardMiddleware, guard=lambda: app.state.guard)``.

The middleware is plain ASGI rather than ``BaseHTTPMiddleware``: that one runs the endpoint in
another task (so contextvars set here would not reach it, and the request scope is carried by a
contextvar), breaks ``BackgroundTasks`` and costs a multiple in throughput.

Why the session commits when the response *starts* and not when the request ends: a
``StreamingResponse`` (or a slow client) may take seconds to receive its body, and a connection
held idle in a transaction all that time is what exhausts pools. The commit hands the connection
back before the first body byte; the session object stays usable, so ``BackgroundTasks`` (or a
stream generator) that keep using it open a new transaction, which is committed when the request
ends (rolled back if that later work raises).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Any, Final

from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.requests import HTTPConnection, Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from poolguard._starlette_handlers import STATE_KEY, watch_handled_errors
from poolguard.acquire import RequestConnection
from poolguard.config import (
    ENV_PREFIX,
    GUARD_OPTION_NAMES,
    HTTP_OPTION_NAMES,
    HealthToken,
    PoolGuardConfig,
    UnavailableBody,
)
from poolguard.errors import ConfigError, Unavailable
from poolguard.guard import Guard, check_passed_guard
from poolguard.http import (
    HEALTH_METHODS,
    HttpResponse,
    detail_allowed,
    health_response,
    queue_time,
    unavailable_response,
)
from poolguard.pools import AcquiringPool
from poolguard.work import RequestScope

__all__ = [
    "STARTUP_CHECKS",
    "STATE_KEY",
    "PoolGuardMiddleware",
    "check_app",
    "get_connection",
    "get_session",
    "poolguard_lifespan",
]

logger = logging.getLogger("poolguard")

CONNECTION_KEY: Final = "poolguard.connection"
"""The key of the request's asyncpg connection (a ``RequestConnection``) in ``scope["state"]``."""

STARTUP_CHECKS: list[Callable[[Guard, Any], None]] = []
"""Checks of the application run at startup (the lifespan), each given the guard and the ASGI app;
one raises ConfigError to refuse to start. :mod:`poolguard.fastapi` adds the one that finds routes
whose session dependency does not fit the guard's engine."""

_GUARD_ACCEPTED: Final = "a poolguard.Guard, or a function returning one (a guard the app's lifespan makes)"

_INTERNAL_ERROR: Final = HttpResponse(
    status=500, headers=(("Content-Type", "text/plain; charset=utf-8"),), body=b"Internal Server Error"
)


class PoolGuardMiddleware:
    """Gives each HTTP request a guarded unit of work and turns ``Unavailable`` into the 503.

    Options (keyword-only), also read from ``POOLGUARD_*`` environment variables when not passed:
    ``health_path`` (default ``"/health/db"``, ``None`` turns the route off), ``health_detail``
    (``"never"``, ``"when-authorized"``, ``"always"``), ``health_token`` (a bearer token or a
    callable taking the ``Request``), ``unavailable_body`` and ``trust_request_start`` (False: set it
    when a proxy of yours sets ``X-Request-Start``, so the time a request queued before it got here
    counts against the guard's ``max_wait``). Pool options (``max_wait``, the breaker, ...) belong to the
    :class:`~poolguard.Guard`; passing them here is refused rather than ignored, and so is an unknown
    or invalid option. A ``POOLGUARD_*`` variable of a pool option (``POOLGUARD_MAX_WAIT``,
    ``POOLGUARD_BREAKER_OPEN_FOR``, ...) must agree with the guard passed in, or it is refused the same way.

    A refusal is a ConfigError that fails the server's startup: the lifespan answers
    ``lifespan.startup.failed`` with the message (uvicorn logs it and exits; a ``TestClient`` raises it),
    and under a server that runs no lifespan every request raises it. It cannot be raised when the
    middleware is built: Starlette and FastAPI build their middleware inside the first ASGI call, the
    lifespan, and a server that sees that call fail takes it for "lifespan not supported" and serves
    500s (uvicorn's default ``--lifespan auto`` does).

    Only ``http`` scopes are handled: ``websocket`` passes through untouched, and so does ``lifespan``
    once the startup checks (:data:`STARTUP_CHECKS`) found nothing wrong with the application.
    """

    app: ASGIApp
    _refusal: ConfigError | None
    """Why this middleware must not serve: raised at startup and on every request."""

    if TYPE_CHECKING:
        # What type checkers see: the options by name. Starlette's Middleware()/add_middleware() check
        # their arguments against this signature, which a **kwargs catch-all would defeat.
        def __init__(
            self,
            app: ASGIApp,
            *,
            guard: Guard | Callable[[], Guard],
            health_path: str | None = ...,
            health_detail: str = ...,
            health_token: HealthToken = ...,
            unavailable_body: UnavailableBody | None = ...,
            trust_request_start: bool = ...,
        ) -> None: ...

    else:

        def __init__(self, app: ASGIApp, **options: Any) -> None:
            self.app = app
            self._refusal = None
            watch_handled_errors(app)
            try:
                # Any keyword reaches _configure, so a misspelt option is a ConfigError like everywhere else.
                self._configure(options)
            except ConfigError as exc:
                self._refusal = exc

    def _configure(self, options: dict[str, Any]) -> None:
        """Validates the options (explicit ones over ``POOLGUARD_*`` variables) once, at construction."""
        options = dict(options)
        if "guard" not in options:
            raise ConfigError(
                "PoolGuardMiddleware.guard", None, "a poolguard.Guard: PoolGuardMiddleware(app, guard=guard)"
            )
        guard = options.pop("guard")
        self._guard_factory: Callable[[], object] | None = None
        if not isinstance(guard, Guard):
            if not callable(guard):
                raise ConfigError("PoolGuardMiddleware.guard", f"<{type(guard).__name__}>", _GUARD_ACCEPTED)
            self._guard_factory, guard = guard, None
        for name in options:
            # Never echo the value: it may be a token or a URL with a password.
            if name in GUARD_OPTION_NAMES:
                raise ConfigError(
                    f"PoolGuardMiddleware.{name}",
                    "(an option of the Guard)",
                    f"set it on the Guard you pass: poolguard.Guard(engine, {name}=...); the middleware takes "
                    + ", ".join(HTTP_OPTION_NAMES),
                )
            if name not in HTTP_OPTION_NAMES:
                raise ConfigError(
                    f"PoolGuardMiddleware.{name}", "(unknown option)", "one of guard, " + ", ".join(HTTP_OPTION_NAMES)
                )
        config = PoolGuardConfig.load(options)
        if guard is not None:
            check_passed_guard(guard, config, setting_of=_environment_key)
        self._config = config
        http = config.http
        self.guard: Guard | None = guard
        """The guard (None until a ``guard=`` function gave it, after the app's lifespan started)."""
        self.health_path = http.health_path
        self.health_detail = http.health_detail
        self.health_token = http.health_token
        self.trust_request_start = http.trust_request_start
        self._unavailable = functools.partial(unavailable_response, body=http.unavailable_body)
        """The 503, its body rendered by the ``unavailable_body`` hook when the app sets one."""

    def _resolve(self) -> Guard:
        """The guard a ``guard=`` function returns, checked as a passed guard is (again at each startup)."""
        assert self._guard_factory is not None
        guard = self._guard_factory()
        if not isinstance(guard, Guard):
            returned = f"a function returning <{type(guard).__name__}>"
            raise ConfigError("PoolGuardMiddleware.guard", returned, _GUARD_ACCEPTED)
        check_passed_guard(guard, self._config, setting_of=_environment_key)
        self.guard = guard
        return guard

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "lifespan":
                send = await self._start(scope, receive, send)
            await self.app(scope, receive, send)
            return
        if self._refusal is not None:
            raise self._refusal.with_traceback(None)
        guard = self.guard or self._resolve()
        if self.health_path is not None and scope["method"] in HEALTH_METHODS and _path(scope) == self.health_path:
            await self._health(guard, scope, receive, send)
            return

        if self.trust_request_start:
            request_scope = guard.request_scope(queued=_queued(scope)).open()
        else:
            request_scope = guard.request_scope().open()
        state = scope.setdefault("state", {})
        state[STATE_KEY] = request_scope
        acquiring = guard.acquiring
        started = False
        answered = False  # a commit at response start failed and this middleware sent the response

        async def send_after_commit(message: Message) -> None:
            nonlocal started, answered
            if answered:
                return  # the app's own response was replaced; drop the rest of it
            if message["type"] == "http.response.start" and not started:
                started = True
                _take_route(request_scope, scope)
                try:
                    await request_scope.afinish(offload=run_in_threadpool)
                except Exception as exc:
                    answered = True
                    unavailable = _unavailable(exc, guard)
                    await _answer(send, self._unavailable(unavailable) if unavailable else _INTERNAL_ERROR)
                    raise
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                if acquiring is not None:  # the request's asyncpg connection goes back with the response
                    await _release_connection(state)
                # The body is complete: report leftovers while the request's span is still open.
                await request_scope.areclaim()
            await send(message)

        try:
            await self.app(scope, receive, send_after_commit)
        except BaseException as exc:
            _take_route(request_scope, scope)
            if acquiring is not None:
                await _release_connection(state, exc)
            await request_scope.aclose(exc, offload=run_in_threadpool)
            unavailable = _unavailable(exc, guard)
            if unavailable is not None and (answered or not started):
                if not answered:
                    await _answer(send, self._unavailable(unavailable))
                # Handled: its traceback holds the request's frames, one of which holds it, a cycle the
                # GC would free only in its next full pass (tens of ms with every request stopped).
                exc.__traceback__ = unavailable.__traceback__ = None
                return
            raise
        _take_route(request_scope, scope)
        if acquiring is not None:
            await _release_connection(state)
        await request_scope.aclose(offload=run_in_threadpool)

    async def _start(self, scope: Scope, receive: Receive, send: Send) -> Send:
        """Refuses the server's startup, with the reason, when an option or a startup check is wrong.

        The server learns why (uvicorn logs the message and exits, a ``TestClient`` raises), rather
        than taking an error before startup for "lifespan not supported" and serving anyway. A guard
        given as a function is asked for once the app's lifespan has started (it made the guard), and
        checked then: the ``send`` returned reports a refusal instead of the startup's completion.
        """
        refusal = self._refusal
        if refusal is None and self.guard is not None and self._guard_factory is None:
            try:
                check_app(self.guard, scope.get("app"))
            except ConfigError as exc:
                refusal = exc
        if refusal is None:
            return send if self._guard_factory is None else functools.partial(self._started, scope, send)
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.failed", "message": str(refusal)})
        raise refusal.with_traceback(None)

    async def _started(self, scope: Scope, send: Send, message: Message) -> None:
        if message["type"] == "lifespan.startup.complete":
            try:
                check_app(self._resolve(), scope.get("app"))
            except Exception as exc:
                refusal = exc if isinstance(exc, ConfigError) else None
                if refusal is None:
                    raised = f"a function raising {type(exc).__name__}"
                    refusal = ConfigError("PoolGuardMiddleware.guard", raised, _GUARD_ACCEPTED)
                self._refusal = refusal
                message = {"type": "lifespan.startup.failed", "message": str(refusal)}
        await send(message)

    async def _health(self, guard: Guard, scope: Scope, receive: Receive, send: Send) -> None:
        """Answers from the guard's health alone: no request scope, so it works while the pool is full."""
        report = await guard.ahealth()
        authorization = Headers(scope=scope).get("authorization")
        detail = detail_allowed(self.health_detail, self.health_token, Request(scope, receive), authorization)
        await _answer(send, health_response(report, detail=detail), body=scope["method"] != "HEAD")


async def get_connection(request: HTTPConnection) -> Any:
    """The request's asyncpg ``Connection``, for a guard over an asyncpg pool; acquired on first call.

    Guarded as a session's checkout is (breaker, admission within ``max_wait``, timed and traced), and
    released once the response is complete, or when the endpoint raises: a background task that needs
    the database takes its own, ``async with guard.connection() as conn``. Transactions are the
    endpoint's (``async with conn.transaction()``). Also a FastAPI dependency (``DbConnection``).
    """
    scope = request.scope
    state = scope.get("state", {})
    connection: RequestConnection | None = state.get(CONNECTION_KEY)
    if connection is None:
        request_scope: RequestScope | None = state.get(STATE_KEY)
        if request_scope is None:
            raise _no_scope("get_connection")
        _take_route(request_scope, scope)
        pool = request_scope.gate.pool
        if not isinstance(pool, AcquiringPool):
            raise TypeError(
                f"poolguard.starlette.get_connection() needs a guard over an asyncpg pool; pool "
                f"{request_scope.gate.name!r} is a SQLAlchemy engine: use get_session(request)"
            )
        connection = state[CONNECTION_KEY] = RequestConnection(request_scope.gate, pool, request_scope)
    return await connection.get()


async def _release_connection(state: dict[str, Any], error: BaseException | None = None) -> None:
    connection: RequestConnection | None = state.pop(CONNECTION_KEY, None)
    if connection is not None:
        await connection.aclose(error)


def _no_scope(caller: str) -> RuntimeError:
    return RuntimeError(
        f"poolguard.starlette.{caller}() found no request scope: add "
        "Middleware(poolguard.starlette.PoolGuardMiddleware, guard=guard) to the application's middleware"
    )


def get_session(request: HTTPConnection) -> Any:
    """The request's session: an ``AsyncSession`` for an AsyncEngine, a ``Session`` for an Engine.

    It is created on first call and checks out a connection only when first used (so a route that
    never queries keeps working during an outage). It commits when the response starts and rolls
    back when the endpoint raises, also an error the app answers itself (``HTTPException``, an
    exception handler's); do not commit or close it yourself unless you mean to. Also a FastAPI
    dependency: ``db: Session = Depends(get_session)``.
    """
    scope = request.scope
    try:
        request_scope: RequestScope = scope["state"][STATE_KEY]
    except KeyError:
        raise _no_scope("get_session") from None
    _take_route(request_scope, scope)
    return request_scope.session


def poolguard_lifespan(
    guard: Guard,
    *,
    lifespan: Callable[[Any], AbstractAsyncContextManager[Any]] | None = None,
    dispose_engine: bool = True,
) -> Callable[[Any], AbstractAsyncContextManager[Any]]:
    """A ``lifespan=`` for Starlette or FastAPI: check the database at startup, release it at shutdown.

    Startup probes the database and only logs a warning when it is unreachable: the app should come
    up (and answer its DB-free routes and the 503s) during an outage, not crash-loop. ``lifespan``
    is an app's own lifespan, entered after the probe and left before the shutdown; whatever state it
    yields is passed on. Shutdown disposes of the engine's connections (``dispose_engine=False``
    keeps them, for an engine shared with something else). The guard stays open, so the lifespan
    can run again in the same process (two ``TestClient`` blocks in one test run); close it with
    ``guard.close()`` when the process is done with it.
    """

    @contextlib.asynccontextmanager
    async def poolguard_lifespan_context(app: Any) -> AsyncIterator[Any]:
        check_app(guard, app)
        await _check_database(guard)
        try:
            if lifespan is None:
                yield None
            else:
                async with lifespan(app) as state:
                    yield state
        finally:
            if dispose_engine and guard.acquiring is None:  # an asyncpg pool is closed by the app that made it
                engine = guard.engine
                if isinstance(engine, AsyncEngine):
                    await engine.dispose()
                else:
                    await run_in_threadpool(engine.dispose)

    return poolguard_lifespan_context


def check_app(guard: Guard, app: Any) -> None:
    """Runs the :data:`STARTUP_CHECKS` on ``app`` (a Starlette or FastAPI application); ConfigError if one fails."""
    if app is None:
        return
    for check in STARTUP_CHECKS:
        check(guard, app)


def _environment_key(name: str) -> str:
    """The ``POOLGUARD_*`` variable that set option ``name`` (the middleware reads guard options only there)."""
    key = ENV_PREFIX + name.upper()
    if name == "breaker":
        flat = sorted(k for k in os.environ if k == key or k.startswith(key + "_"))
        return flat[0] if flat else key
    return key


async def _check_database(guard: Guard) -> None:
    try:
        report = await guard.ahealth()
    except Exception as exc:
        logger.warning("poolguard: could not check pool %r at startup (%s)", guard.name, type(exc).__name__)
        return
    if report.status == "unavailable":
        logger.warning(
            "poolguard: the database of pool %r is unavailable at startup (%s); starting anyway, "
            "requests that need it get 503 until it is back",
            guard.name,
            "; ".join(report.to_dict()["issues"]) or "no detail",
        )


def _path(scope: Scope) -> str:
    """The path without the mount prefix, so ``health_path`` works behind a ``root_path``."""
    path: str = scope["path"]
    root_path: str = scope.get("root_path", "")
    if root_path and path.startswith(root_path):
        return path[len(root_path) :] or "/"
    return path


def _queued(scope: Scope) -> float | None:
    """The seconds the request queued before it got here, from ``X-Request-Start`` (the last one sent)."""
    header = None
    for name, value in scope["headers"]:
        if name == b"x-request-start":
            header = value
    return None if header is None else queue_time(header.decode("latin-1"), time.time())


def _take_route(request_scope: RequestScope, scope: Mapping[str, Any]) -> None:
    """Names the unit of work by the matched route's template (known only once the router ran)."""
    template = getattr(scope.get("route"), "path", None)
    if isinstance(template, str):
        request_scope.route = template


def _unavailable(exc: BaseException, guard: Guard) -> Unavailable | None:
    """What ``exc`` answers 503 for (``Unavailable``, or a connection failure the breaker counted).

    Also when a task group wrapped it, and only it.
    """
    if isinstance(exc, BaseExceptionGroup):
        matched, rest = exc.split(lambda leaf: guard.unavailable_for(leaf) is not None)
        if matched is None or rest is not None:
            return None
        leaf: BaseException = matched
        while isinstance(leaf, BaseExceptionGroup):
            leaf = leaf.exceptions[0]
        exc = leaf
    return guard.unavailable_for(exc)


async def _answer(send: Send, response: HttpResponse, *, body: bool = True) -> None:
    """Sends one of poolguard.http's responses as it is, so every adapter's bytes are the same."""
    headers = [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in response.headers]
    headers.append((b"content-length", str(len(response.body)).encode("latin-1")))
    await send({"type": "http.response.start", "status": response.status, "headers": headers})
    await send({"type": "http.response.body", "body": response.body if body else b""})
