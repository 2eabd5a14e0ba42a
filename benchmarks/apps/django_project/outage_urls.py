"""The outage and overload benchmarks' Django routes: ``db`` (a 10 ms query), ``work`` (``common.HOLD_SQL``),
``nodb``, and the bare app's ``health/db``.

The guarded app's ``/health/db`` is poolguard's middleware's.
"""

from __future__ import annotations

from django.conf import settings  # type: ignore[import-untyped]
from django.db import connection  # type: ignore[import-untyped]
from django.http import HttpRequest, JsonResponse  # type: ignore[import-untyped]
from django.urls import URLPattern, path  # type: ignore[import-untyped]

from benchmarks.apps import common


def work(request: HttpRequest) -> JsonResponse:
    with connection.cursor() as cursor:
        cursor.execute(common.WORK_SQL)
    return JsonResponse({"ok": True})


def hold(request: HttpRequest) -> JsonResponse:
    with connection.cursor() as cursor:
        cursor.execute(common.HOLD_SQL)
    return JsonResponse({"ok": True})


def nodb(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"ok": True})


def health(request: HttpRequest) -> JsonResponse:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
    return JsonResponse({"status": "ok"})


urlpatterns: list[URLPattern] = [path("db", work), path("work", hold), path("nodb", nodb)]
if not settings.GUARDED:
    urlpatterns.append(path("health/db", health))
