"""``<variant>/select1`` for every variant, each on its own alias."""

from __future__ import annotations

from collections.abc import Callable

from django.conf import settings  # type: ignore[import-untyped]
from django.db import connections, transaction  # type: ignore[import-untyped]
from django.http import HttpRequest, JsonResponse  # type: ignore[import-untyped]
from django.urls import path  # type: ignore[import-untyped]


def select1(alias: str) -> Callable[[HttpRequest], JsonResponse]:
    def view(request: HttpRequest) -> JsonResponse:
        with connections[alias].cursor() as cursor:
            cursor.execute("SELECT 1")
            (one,) = cursor.fetchone()
        return JsonResponse({"one": one})

    # With ATOMIC_REQUESTS Django opens a transaction (a checkout) on every such alias around a
    # view: each variant's view opts out of all aliases but its own.
    for other in settings.VARIANTS:
        if other != alias:
            view = transaction.non_atomic_requests(using=other)(view)
    return view


urlpatterns = [path(f"{variant}/select1", select1(variant)) for variant in settings.VARIANTS]
