"""The 503 poolguard answers while the database is unavailable, in this API's error shape.

Settings name it: ``POOLGUARD = {"UNAVAILABLE_BODY": "warehouse.errors.unavailable_body"}``. poolguard
keeps the status and the ``Retry-After`` / ``Cache-Control`` headers; the body is DRF's, rendered by
DRF's own JSONRenderer like every other error of the API.
"""

from rest_framework import status
from rest_framework.exceptions import APIException
from rest_framework.renderers import JSONRenderer

from poolguard import Unavailable


class DatabaseUnavailable(APIException):
    status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    default_detail = "The database is unavailable; retry later."
    default_code = "database_unavailable"


def unavailable_body(error: Unavailable) -> tuple[bytes, str]:
    """``{"detail": ..., "code": ...}``, as DRF answers its own APIExceptions."""
    exc = DatabaseUnavailable()
    return JSONRenderer().render({"detail": exc.detail, "code": exc.detail.code}), "application/json"
