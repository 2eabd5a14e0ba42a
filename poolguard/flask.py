"""Flask extension: a request-scoped session, 503 + Retry-After load shedding and a health route.

Usage::

    from poolguard.flask import PoolGuard, db

    guard = poolguard.Guard(poolguard.create_engine(url, service_name="orders"))
    PoolGuard(app, guard)              # or, in an app factory: ext = PoolGuard(guard=guard); ext.init_app(app)

    @app.post("/orders")
    def create_order():
        db.add(Order(...))             # committed when the view returns, rolled back when it raises
        return {"ok": True}

Everything per app lives in ``app.extensions["poolguard"]``; nothing is kept in module globals,
so one extension object serves any number of apps (app factories, tests).
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from typing import Any, Final, cast

from flask import Flask, Response, current_app, has_app_context, has_request_context, request
from flask import typing as ft
from sqlalchemy.orm import Session
from werkzeug.exceptions import HTTPException
from werkzeug.local import LocalProxy

from poolguard._serving import hidden_queue_warning
from poolguard.config import PoolGuardConfig
from poolguard.errors import ConfigError, Unavailable
from poolguard.guard import Guard, build_guard, check_passed_guard
from poolguard.http import (
    REQUEST_START_HEADER,
    HttpResponse,
    detail_allowed,
    health_response,
    queue_time,
    unavailable_response,
)
from poolguard.work import RequestScope

__all__ = ["PoolGuard", "db", "get_guard"]

EXTENSION_KEY: Final = "poolguard"
"""The key of this extension's state in ``app.extensions``."""

HEALTH_ENDPOINT: Final = "poolguard_health"
"""The endpoint name of the health view (for ``url_for``)."""

_CONFIG_PREFIX: Final = "POOLGUARD_"

logger = logging.getLogger("poolguard")


_current: ContextVar[tuple[RequestScope, Any] | None] = ContextVar("poolguard_flask_request", default=None)
"""The unit of work of the Flask request being handled, paired with the value it replaced (restored
at its end, so a request handled inside another one, e.g. through a test client, leaves the outer intact).
A contextvar rather than ``flask.g``: every ``g`` access goes through a LocalProxy, and ``db`` is
used several times per request."""

_NO_EXCEPTION_GIVEN: Any = object()

_ended: ContextVar[RequestScope | None] = ContextVar("poolguard_flask_ended", default=None)
"""A request's unit that ended still holding connections, reclaimed only after the app context's
teardown: Flask-SQLAlchemy (and any app that removes a scoped session there) returns its own then."""


class _AppState:
    """What one app's registration holds; the wrapped dispatch and teardown call its methods."""

    __slots__ = ("app", "config", "extension", "guard", "trust_request_start")

    def __init__(self, extension: PoolGuard, guard: Guard, config: PoolGuardConfig, app: Flask) -> None:
        self.extension = extension
        self.guard = guard
        self.config = config
        self.app = app
        self.trust_request_start = config.http.trust_request_start

    def _current(self) -> tuple[RequestScope, Any] | None:
        """This app's unit of work in the current request with the value it replaced (None in the
        health view or outside a request)."""
        current = _current.get()
        return current if current is not None and current[0].gate is self.guard.gate else None

    def dispatch(self, full_dispatch_request: Callable[[], Response]) -> Response:
        """Runs Flask's dispatch inside the request's unit of work, then commits (or rolls back).

        Opening the scope is cheap: nothing touches the pool until ``db`` is used. The commit comes
        before the response leaves, so a failed commit is never a lost 200: one that cannot get a
        connection becomes the 503, any other failure goes to Flask's 500 handling. It also comes
        before a streamed body is sent, so no connection sits idle in a transaction while a slow
        client reads. With ``trust_request_start`` the time the request queued before it got here
        (``X-Request-Start``) is spent of its wait budget already.
        """
        current = request._get_current_object()  # type: ignore[attr-defined]
        rule = current.url_rule
        if rule is not None and rule.endpoint == HEALTH_ENDPOINT:
            return full_dispatch_request()
        route = rule.rule if rule is not None else None
        if self.trust_request_start:
            queued = queue_time(current.headers.get(REQUEST_START_HEADER), time.time())
            scope = self.guard.request_scope(route, queued=queued).open()
        else:
            scope = self.guard.request_scope(route).open()
        _current.set((scope, _current.get()))
        response = full_dispatch_request()
        try:
            scope.finish()
        except Exception as exc:
            unavailable = self.guard.unavailable_for(exc)
            if unavailable is None:
                raise
            scope.fail(exc)
            return self.unavailable(unavailable)
        if not response.is_streamed and not self.app.teardown_appcontext_funcs:
            # Reported now, while the request's span (e.g. OpenTelemetry's) is still open. Not when the
            # app ends things of its own with the app context (Flask-SQLAlchemy returns its session's
            # connection there): what is still held then is reclaimed after that.
            scope.reclaim()
        return response

    def close_scope(self, exc: BaseException | None) -> None:
        """Runs even when the request failed: the connection always goes back to the pool."""
        current = self._current()
        if current is None:
            return
        scope, replaced = current
        _current.set(replaced)
        later = bool(self.app.teardown_appcontext_funcs)
        try:
            scope.close(exc, reclaim=not later)
        except Exception as error:
            # Teardown must not raise; reached only when ``db`` was used after the response was made
            # (inside a streamed body). The class name only: messages may carry SQL parameters.
            logger.error(
                "poolguard: ending the session of route %s failed (%s); its work was rolled back",
                scope.route or "(unmatched)",
                type(error).__name__,
            )
        finally:
            if later and scope.held > 0:
                _ended.set(scope)

    def record_error(self, error: BaseException) -> None:
        current = self._current()
        if current is not None:
            current[0].fail(error)

    def unavailable(self, exc: Unavailable) -> Response:
        """The 503, its body rendered by the ``unavailable_body`` hook when the app sets one."""
        return _to_flask(unavailable_response(exc, self.config.http.unavailable_body))

    def health(self) -> Response:
        http = self.config.http
        detail = detail_allowed(
            http.health_detail,
            http.health_token,
            request._get_current_object(),  # type: ignore[attr-defined]
            request.headers.get("Authorization"),
        )
        return _to_flask(health_response(self.guard.health(), detail=detail))


class PoolGuard:
    """Guards a Flask app's database access: ``db`` session per request, 503 when unavailable, health view.

    ``PoolGuard(app, guard)``, or ``PoolGuard(guard=guard)`` then ``init_app(app)`` for app factories;
    one extension object may be registered on several apps. Each request gets a session (``db``)
    that commits when the view returns and rolls back when it raises (also when an error handler
    or ``abort()`` turned the exception into a response); the connection goes back to the pool at
    the end of every request, whatever happened. ``poolguard.Unavailable`` raised anywhere in a
    request (breaker open, no connection slot within ``max_wait``) becomes a 503 with
    ``Retry-After``; routes that never use ``db`` keep answering during an outage.

    Options, as keyword arguments here or as Flask config keys (keyword arguments win over the
    config, the config over ``POOLGUARD_*`` environment variables); all are read and validated by
    ``init_app``, so a typo or a bad value fails at startup with ConfigError:

    - ``POOLGUARD_HEALTH_PATH`` (``health_path``): the health route, default ``"/health/db"``;
      ``None`` turns it off. GET only; it never opens a database session of its own.
    - ``POOLGUARD_HEALTH_DETAIL`` (``health_detail``): ``"never"`` (default), ``"when-authorized"``
      or ``"always"``: who sees the full report instead of ``{"status": ...}`` only.
    - ``POOLGUARD_HEALTH_TOKEN`` (``health_token``): the bearer token (compared in constant time)
      or a callable taking the Flask request and returning True to allow the detail; required
      with ``"when-authorized"``.
    - ``POOLGUARD_MAX_WAIT`` (``max_wait``, 1.0 s), ``POOLGUARD_LEAK_THRESHOLD`` (30.0 s),
      ``POOLGUARD_CAPTURE_STACKS`` (False), ``POOLGUARD_PING_TIMEOUT`` (1.0 s) and
      ``POOLGUARD_BREAKER`` (a dict of :class:`poolguard.Breaker` options such as
      ``{"CONSECUTIVE_FAILURES": 3, "OPEN_FOR": 10}``, or False for no breaker; the flat form
      ``POOLGUARD_BREAKER_OPEN_FOR = 10`` works too, as in the environment): the guard's
      options. They apply to the guard the extension builds; with a ``Guard`` of your own, setting
      one that differs from the guard's is a ConfigError at startup (set it on ``Guard(...)``).
    - With no guard passed and Flask-SQLAlchemy registered on the app (``db.init_app(app)``
      first), the extension guards Flask-SQLAlchemy's engine: ``PoolGuard(app)`` is the whole
      adoption, and ``db.session`` / ``Model.query`` keep working as they do.
    - ``POOLGUARD_SQLALCHEMY``: when no guard is passed, a dict with ``URL`` and optional
      :func:`poolguard.create_engine` keywords (``SERVICE_NAME``, ``POOL_SIZE``, ...); the extension
      builds the engine and the guard from it. The app owns them then: dispose with
      ``get_guard(app).engine.dispose()`` when the app shuts down.
    - ``POOLGUARD_TRUST_REQUEST_START`` (``trust_request_start``, False): the proxy in front of the
      app (nginx, Heroku's router) sets ``X-Request-Start``; the time a request queued before it got
      here counts against ``max_wait``, and one that queued past it gets the 503 at its first use of ``db``.
    - ``POOLGUARD_DATABASES`` names Django's database aliases: setting it for Flask is a ConfigError.

    Environment variables ``POOLGUARD_<OPTION>`` (and ``POOLGUARD_BREAKER_<OPTION>``) fill in what
    neither the keyword arguments nor the config set.
    """

    def __init__(self, app: Flask | None = None, guard: Guard | None = None, **options: Any) -> None:
        if guard is not None and not isinstance(guard, Guard):
            raise ConfigError("PoolGuard(guard)", type(guard).__name__, "a poolguard.Guard")
        unknown = sorted(set(options) - set(PoolGuardConfig.option_names()))
        if unknown:
            # Names fail here; values are validated per app by init_app, together with that app's config.
            raise ConfigError(unknown[0], options[unknown[0]], "one of " + ", ".join(PoolGuardConfig.option_names()))
        self.guard = guard
        self.options: Mapping[str, Any] = dict(options)
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> None:
        """Wraps the app's dispatch and teardown, registers the error handler and the health view on ``app``."""
        if EXTENSION_KEY in app.extensions:
            raise RuntimeError(
                "A 'PoolGuard' instance has already been registered on this Flask app. "
                "Import and use that instance (or get_guard(app)) instead of creating another one."
            )
        config = PoolGuardConfig.load(self.options, settings=app.config, source="Flask config", prefix=_CONFIG_PREFIX)
        if "databases" in config.explicit:
            raise ConfigError(
                config.setting("databases"),
                config.databases,
                "unset: it names Django's database aliases, and a Flask app's PoolGuard guards one engine",
            )
        state = _AppState(self, self._guard_for(config, app), config, app)
        app.extensions[EXTENSION_KEY] = state
        hidden = hidden_queue_warning(state.guard.gate.admission.capacity)
        if hidden is not None:
            logger.warning("poolguard: pool %r: %s", state.guard.name, hidden)

        _wrap_request_handling(app, state)
        app.register_error_handler(Unavailable, state.unavailable)
        _watch_view_errors(app, state)
        if config.http.health_path is not None:
            app.add_url_rule(config.http.health_path, HEALTH_ENDPOINT, state.health, methods=["GET"])

    def _guard_for(self, config: PoolGuardConfig, app: Flask) -> Guard:
        if self.guard is not None:
            if config.sqlalchemy is not None:
                raise ConfigError(
                    "POOLGUARD_SQLALCHEMY",
                    "(set)",
                    "unset when a Guard is passed to PoolGuard (the guard's engine is used), or pass no guard",
                )
            check_passed_guard(self.guard, config)
            guard = self.guard
        elif config.sqlalchemy is None and _FLASK_SQLALCHEMY in app.extensions:
            guard = _guard_flask_sqlalchemy(app, config)
        else:
            guard = build_guard(config)
        if guard.is_async:
            raise ConfigError(
                "PoolGuard(guard)",
                "a Guard on an AsyncEngine",
                "a Guard on a synchronous Engine: Flask runs views synchronously",
            )
        return guard


_FLASK_SQLALCHEMY: Final = "sqlalchemy"
"""Flask-SQLAlchemy's key in ``app.extensions``."""


def _guard_flask_sqlalchemy(app: Flask, config: PoolGuardConfig) -> Guard:
    """A Guard over Flask-SQLAlchemy's default engine, with the guard options of the app's config.

    The engine stays Flask-SQLAlchemy's (it disposes of it); ``db.session`` keeps working as it
    does, its checkouts now gated, timed and watched. Other binds are not guarded.
    """
    with app.app_context():
        engine = app.extensions[_FLASK_SQLALCHEMY].engine
    return Guard(engine, **config.guard_options())


def _wrap_request_handling(app: Flask, state: _AppState) -> None:
    """Opens the unit of work around ``full_dispatch_request`` and closes it after the teardown functions.

    Around, not in ``before_request``/``after_request``/``teardown_request`` hooks: the scope is then
    open for every hook, signal and error handler of the request (any of them may use ``db``), and
    the request pays no hook dispatch (Flask runs each hook through ``ensure_sync``, three of them
    cost more than all of poolguard's own per-request work). The commit comes after Flask has made
    the response (after the app's ``after_request`` hooks); the close after the app's teardown
    functions, so it runs even when the request failed, and after a streamed body has ended.
    Connections still held then are reclaimed after the app context's teardown, where
    Flask-SQLAlchemy (or an app's own ``scoped_session.remove()``) gives its own back. Wrapped on
    this app object only.
    """
    dispatch = app.full_dispatch_request
    teardown = app.do_teardown_request
    teardown_appcontext = app.do_teardown_appcontext

    def full_dispatch_request() -> Response:
        return state.dispatch(dispatch)

    def do_teardown_request(exc: BaseException | None = _NO_EXCEPTION_GIVEN) -> None:
        if exc is _NO_EXCEPTION_GIVEN:
            exc = sys.exc_info()[1]
        try:
            teardown(exc)
        finally:
            state.close_scope(exc)

    def do_teardown_appcontext(exc: BaseException | None = _NO_EXCEPTION_GIVEN) -> None:
        if exc is _NO_EXCEPTION_GIVEN:
            exc = sys.exc_info()[1]
        try:
            teardown_appcontext(exc)
        finally:
            # What the request's unit still holds after the app's own teardown was forgotten.
            ended = _ended.get()
            if ended is not None:
                _ended.set(None)
                ended.reclaim()

    app.full_dispatch_request = full_dispatch_request  # type: ignore[method-assign]
    app.do_teardown_request = do_teardown_request  # type: ignore[method-assign]
    app.do_teardown_appcontext = do_teardown_appcontext  # type: ignore[method-assign]


def _watch_view_errors(app: Flask, state: _AppState) -> None:
    """Notes every exception a view raises, including those an error handler turns into a response.

    Flask's teardown only sees unhandled exceptions, and no hook or signal sees handled ones
    (``abort(409)`` after a write, an app's own ``errorhandler``); without this the write would be
    committed. Every view exception passes through ``handle_user_exception``, so it is wrapped on
    this app object only.
    """
    original = app.handle_user_exception

    def handle_user_exception(e: Exception) -> HTTPException | ft.ResponseReturnValue:
        state.record_error(e)
        unavailable = state.guard.unavailable_for(e)
        if unavailable is not None and not isinstance(e, Unavailable):
            # A connection failure the breaker counted: the same 503 as a refused request, not a 500.
            return state.unavailable(unavailable)
        return original(e)

    app.handle_user_exception = handle_user_exception  # type: ignore[method-assign]


def _to_flask(response: HttpResponse) -> Response:
    """The framework-neutral answer from ``poolguard.http`` as the app's response class, body untouched."""
    response_class: type[Response] = current_app.response_class
    return response_class(response.body, status=response.status, headers=list(response.headers))


def get_guard(app: Flask | None = None) -> Guard:
    """The Guard registered on ``app`` (default: the current app), e.g. for ``guard.session()`` in a CLI."""
    if app is None:
        if not has_app_context():
            raise RuntimeError("poolguard.flask.get_guard() needs an app: pass it, or call it inside an app context.")
        app = cast(Flask, current_app._get_current_object())  # type: ignore[attr-defined]
    state = app.extensions.get(EXTENSION_KEY)
    if not isinstance(state, _AppState):
        raise RuntimeError(f"PoolGuard is not registered on the Flask app {app.name!r}: call PoolGuard(app, guard).")
    return state.guard


def _current_session() -> Session:
    current = _current.get()
    if current is not None:
        return cast(Session, current[0].session)
    if not has_request_context():
        raise RuntimeError(
            "poolguard.flask.db is the session of the current request, and no request is being handled here. "
            "Outside a request (CLI commands, jobs), use 'with get_guard(app).session() as session:'."
        )
    if EXTENSION_KEY not in current_app.extensions:
        raise RuntimeError(
            f"poolguard.flask.db was used in a request of the Flask app {current_app.name!r}, "
            "which has no PoolGuard: call PoolGuard(app, guard) or init_app(app) first."
        )
    raise RuntimeError(
        "poolguard.flask.db has no session in this request: it was used outside the request's dispatch "
        "(a test_request_context without a request being handled), after the request ended (e.g. in a "
        "streamed body without stream_with_context), or in the health view, which opens none."
    )


class _SessionProxy(LocalProxy):  # type: ignore[type-arg]
    """Werkzeug's LocalProxy, with attribute access (``db.execute``, ``db.add``) in one step.

    LocalProxy resolves every attribute through a descriptor, a bound lookup and the context-local
    getter (five calls); ``db`` is used several times per request, so its plain attribute path is
    direct. Everything else (``isinstance``, ``repr``, operators) is LocalProxy's.
    """

    __slots__ = ()

    def __getattr__(self, name: str) -> Any:
        return getattr(_current_session(), name)


db: Session = cast(Session, _SessionProxy(_current_session))
"""The current request's ``sqlalchemy.orm.Session``: ``db.execute(...)``, ``db.add(...)``.

Created on first use; the first statement checks out a connection (breaker, then admission, then
the pool). Outside a request it raises RuntimeError saying why.
"""
