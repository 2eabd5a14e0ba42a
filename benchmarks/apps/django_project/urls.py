"""``<variant>/select1`` for every variant, each on its own alias, each in a URLconf of its own.

Django tries a URLconf's patterns in order, so in one list a later variant would pay for matching
the ones before it (about 0.4 µs each); ``by_variant`` hands each request its variant's URLconf.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from django.conf import settings  # type: ignore[import-untyped]
from django.db import connections, transaction  # type: ignore[import-untyped]
from django.http import HttpRequest, HttpResponse, JsonResponse  # type: ignore[import-untyped]
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


class VariantUrls:
    def __init__(self, variant: str) -> None:
        self.urlpatterns = [path(f"{variant}/select1", select1(variant))]


URLCONFS = {variant: VariantUrls(variant) for variant in settings.VARIANTS}
urlpatterns = [pattern for urlconf in URLCONFS.values() for pattern in urlconf.urlpatterns]


def by_variant(get_response: Callable[[HttpRequest], HttpResponse]) -> Callable[[HttpRequest], HttpResponse]:
    """Middleware: the request's URLconf is its variant's (the first segment of its path)."""

    def middleware(request: Any) -> HttpResponse:
        request.urlconf = URLCONFS[request.path_info.split("/", 2)[1]]
        return get_response(request)

    return middleware
