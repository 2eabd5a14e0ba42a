"""A small DRF project: API views over the ORM, answering errors in DRF's shape, adopted as the docs say.

``unavailable_body`` renders poolguard's 503 as DRF renders its own errors (``{"detail": ..., "code": ...}``);
``problem_json`` renders it as RFC 9457 problem details.
"""

from __future__ import annotations

from typing import Any

from django.db import connections, transaction
from django.urls import path
from rest_framework import status
from rest_framework.exceptions import APIException
from rest_framework.renderers import JSONRenderer
from rest_framework.response import Response
from rest_framework.views import APIView

from poolguard.errors import Unavailable
from poolguard.http import retry_after_seconds


class ServiceUnavailable(APIException):
    status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    default_detail = "The database is unavailable; retry later."
    default_code = "database_unavailable"


def unavailable_body(error: Unavailable) -> tuple[bytes, str]:
    """poolguard's 503 in DRF's error shape, rendered by DRF's own renderer."""
    exc = ServiceUnavailable()
    data = {"detail": exc.detail, "code": exc.detail.code, "reason": error.reason}
    return JSONRenderer().render(data), "application/json"


def problem_json(error: Unavailable) -> tuple[dict[str, Any], str]:
    return {
        "type": "https://example.com/problems/database-unavailable",
        "title": "Database unavailable",
        "status": 503,
        "detail": f"Retry in {retry_after_seconds(error.retry_after)} s.",
        "reason": error.reason,
    }, "application/problem+json"


class Items(APIView):
    renderer_classes = (JSONRenderer,)

    @transaction.non_atomic_requests
    def dispatch(self, request: Any, *args: Any, **kwargs: Any) -> Any:
        return super().dispatch(request, *args, **kwargs)

    def get(self, request: Any) -> Response:
        with connections["down"].cursor() as cursor:
            cursor.execute("SELECT 1")
        return Response({"items": []})


class Missing(APIView):
    renderer_classes = (JSONRenderer,)

    def get(self, request: Any) -> Response:
        from rest_framework.exceptions import NotFound  # noqa: PLC0415

        raise NotFound()


urlpatterns = [path("api/items/", Items.as_view()), path("api/missing/", Missing.as_view())]
