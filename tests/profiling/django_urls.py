"""The Django routes the call-count tests request: one ORM cursor ``SELECT 1``, and none."""

from __future__ import annotations

from django.db import connection, transaction
from django.http import HttpRequest, HttpResponse
from django.urls import path


def with_db(request: HttpRequest) -> HttpResponse:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
    return HttpResponse("ok")


@transaction.non_atomic_requests
def free(request: HttpRequest) -> HttpResponse:
    return HttpResponse("ok")


urlpatterns = [path("db/", with_db), path("free/", free)]
