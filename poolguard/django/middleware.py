"""``PoolGuardMiddleware``: one middleware, sync and async capable, placed first in MIDDLEWARE.

Like Django's ``MiddlewareMixin`` it runs in the mode of the handler it wraps: under WSGI a plain
call, under ASGI a coroutine, so an ASGI server never spends a thread on the middleware itself.
It answers the health URL without a urls.py entry, opens the request's scopes (nothing touches a
database until the view does), turns ``Unavailable`` and connection failures the breaker has
counted into poolguard's 503, and closes the scopes at the end. The ORM's transactions stay
Django's (``ATOMIC_REQUESTS``); only the optional SQLAlchemy session is committed here.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from asgiref.sync import iscoroutinefunction, markcoroutinefunction, sync_to_async
from django.apps import apps  # type: ignore[import-untyped]
from django.core.exceptions import ImproperlyConfigured  # type: ignore[import-untyped]
from django.http import HttpResponse as DjangoHttpResponse  # type: ignore[import-untyped]

from poolguard.django.conf import DjangoRequestScope, PoolGuardState, sqlalchemy_scope
from poolguard.http import HEALTH_METHODS, HttpResponse

__all__ = ["PoolGuardMiddleware", "get_session"]

APP_LABEL = "poolguard"
_REQUEST_ATTRIBUTE = "_poolguard"


def _app_config() -> Any:
    try:
        return apps.get_app_config(APP_LABEL)
    except LookupError:
        raise ImproperlyConfigured(
            "poolguard.django.PoolGuardMiddleware needs the app: add 'poolguard.django' to INSTALLED_APPS "
            "(poolguard.E003)"
        ) from None


def to_django(response: HttpResponse) -> Any:
    """poolguard's framework-neutral response as a Django HttpResponse, headers in the same order."""
    django_response = DjangoHttpResponse(response.body, status=response.status)
    for name, value in response.headers:
        django_response[name] = value
    return django_response


def _unavailable_or_raise(state: PoolGuardState, exc: Exception) -> Any:
    """Ending the request failed: poolguard's 503 when the database was unavailable, else ``exc`` again."""
    converted = state.unavailable_http(exc)
    if converted is None:
        raise exc
    return to_django(converted)


def get_session(request: Any) -> Any:
    """The request's SQLAlchemy Session (``POOLGUARD["SQLALCHEMY"]``): committed when the view returns,
    rolled back when it raises, closed at the end of the request.
    """
    scopes: list[DjangoRequestScope] | None = getattr(request, _REQUEST_ATTRIBUTE, None)
    if scopes is None:
        raise ImproperlyConfigured(
            "poolguard.django.get_session() found no poolguard request: put "
            "'poolguard.django.PoolGuardMiddleware' first in MIDDLEWARE"
        )
    scope = sqlalchemy_scope(scopes)
    if scope is None:
        raise ImproperlyConfigured(
            "poolguard.django.get_session() needs POOLGUARD['SQLALCHEMY'] = {'URL': ..., 'POOL_SIZE': ...} in settings"
        )
    return scope.session


class PoolGuardMiddleware:
    """Guards each request's database use; see the module docstring."""

    sync_capable = True
    async_capable = True

    def __init__(self, get_response: Callable[[Any], Any]) -> None:
        if get_response is None:
            raise ValueError("get_response must be provided.")
        self.get_response = get_response
        self.app_config = _app_config()
        self.app_config.require_state()  # an invalid POOLGUARD fails at startup, not on a request
        self.async_mode = iscoroutinefunction(get_response)
        if self.async_mode:
            markcoroutinefunction(self)

    def __repr__(self) -> str:
        return f"<PoolGuardMiddleware get_response={getattr(self.get_response, '__qualname__', '?')}>"

    def __call__(self, request: Any) -> Any:
        if self.async_mode:
            return self.__acall__(request)
        state: PoolGuardState = self.app_config.state or self.app_config.require_state()
        if request.path_info == state.health_path and request.method in HEALTH_METHODS:
            return to_django(state.health_http(request))
        scopes = state.open_request(request)
        setattr(request, _REQUEST_ATTRIBUTE, scopes)
        try:
            response = self.get_response(request)
        except BaseException as exc:
            _fail(scopes, exc)
            state.close_request(scopes)
            raise
        try:
            state.close_request(scopes)
        except Exception as exc:
            return _unavailable_or_raise(state, exc)
        return response

    async def __acall__(self, request: Any) -> Any:
        state: PoolGuardState = self.app_config.state or self.app_config.require_state()
        if request.path_info == state.health_path and request.method in HEALTH_METHODS:
            http = await sync_to_async(state.health_http, thread_sensitive=False)(request)
            return to_django(http)
        scopes = state.open_request(request)
        setattr(request, _REQUEST_ATTRIBUTE, scopes)
        get_response: Callable[[Any], Awaitable[Any]] = self.get_response
        try:
            response = await get_response(request)
        except BaseException as exc:
            _fail(scopes, exc)
            await _aclose(state, scopes)
            raise
        try:
            await _aclose(state, scopes)
        except Exception as exc:
            return _unavailable_or_raise(state, exc)
        return response

    def process_exception(self, request: Any, exception: Exception) -> Any:
        """A view raised: the SQLAlchemy session will roll back; Unavailable becomes poolguard's 503."""
        scopes: list[DjangoRequestScope] | None = getattr(request, _REQUEST_ATTRIBUTE, None)
        if scopes is None:
            return None
        _fail(scopes, exception)
        converted = self.app_config.require_state().unavailable_http(exception)
        return None if converted is None else to_django(converted)


def _fail(scopes: list[DjangoRequestScope], error: BaseException) -> None:
    """The view raised: the SQLAlchemy session rolls back (Django's ORM keeps its own rules)."""
    scope = sqlalchemy_scope(scopes)
    if scope is not None:
        scope.fail(error)


async def _aclose(state: PoolGuardState, scopes: list[DjangoRequestScope]) -> None:
    """Under ASGI the commit is blocking I/O: it runs in the request's own thread, like the sync view
    that used the session; the rest of the close is bookkeeping."""
    scope = sqlalchemy_scope(scopes)
    try:
        if scope is not None and scope.has_session:
            await sync_to_async(scope.finish, thread_sensitive=True)()
    finally:
        state.close_request(scopes)
