"""Starlette's exception handlers, wrapped so that an error the app answers itself still rolls back.

Split from :mod:`poolguard.starlette` (its one user) to keep that module within the size limit.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

from starlette._utils import is_async_callable
from starlette.middleware.exceptions import ExceptionMiddleware
from starlette.requests import HTTPConnection
from starlette.types import ASGIApp

from poolguard.work import RequestScope

__all__ = ["STATE_KEY", "watch_handled_errors"]

STATE_KEY: Final = "poolguard"
"""The key of the request's :class:`RequestScope` in ``scope["state"]`` (``request.state.poolguard``)."""


def watch_handled_errors(app: ASGIApp) -> None:
    """Wraps the exception handlers of the app's exception middleware so a handled error rolls back.

    Starlette answers an ``HTTPException`` (and any error with a handler) inside the application,
    below this middleware, which then sees only the response; without this a write followed by
    ``raise HTTPException(409)`` would be committed. Starlette and FastAPI build their middleware
    innermost first, so the exception middleware below this one exists by now. Its handler tables
    are private attributes: if they are missing, the endpoint has to roll back itself.
    """
    inner: Any = app
    for _ in range(32):  # the middleware between this one and the router
        if isinstance(inner, ExceptionMiddleware):
            for table in (getattr(inner, "_exception_handlers", None), getattr(inner, "_status_handlers", None)):
                if isinstance(table, dict):
                    for key, handler in table.items():
                        table[key] = _failing_first(handler)
            return
        inner = getattr(inner, "app", None)
        if inner is None:
            return


_WATCHED_HANDLER: Final = "poolguard_watched"
"""Marks a handler already wrapped (a second middleware over the same stack must not wrap it again)."""


def _failing_first(handler: Callable[..., Any]) -> Callable[..., Any]:
    """``handler``, after marking the request's unit of work failed (sync or async, as it was)."""
    if getattr(handler, _WATCHED_HANDLER, False):
        return handler

    def fail(conn: HTTPConnection, exc: Exception) -> None:
        request_scope = conn.scope.get("state", {}).get(STATE_KEY)
        if isinstance(request_scope, RequestScope):
            request_scope.fail(exc)

    watched: Callable[..., Any]
    if is_async_callable(handler):

        async def watched_async(conn: HTTPConnection, exc: Exception) -> Any:
            fail(conn, exc)
            return await handler(conn, exc)

        watched = watched_async
    else:

        def watched_sync(conn: HTTPConnection, exc: Exception) -> Any:
            fail(conn, exc)
            return handler(conn, exc)

        watched = watched_sync
    setattr(watched, _WATCHED_HANDLER, True)
    return watched
