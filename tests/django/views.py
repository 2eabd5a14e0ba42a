"""Views for the adapter tests: DB-free, writes (ATOMIC_REQUESTS), async, other aliases, SQLAlchemy."""

from __future__ import annotations

from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import connections, transaction
from django.http import HttpResponse, JsonResponse
from sqlalchemy import text

from poolguard.django import get_session


class Boom(Exception):
    """An application error after a write."""


def _insert(name: str, using: str = "default") -> None:
    with connections[using].cursor() as cursor:
        cursor.execute(f"INSERT INTO {settings.ITEMS_TABLE} (name) VALUES (%s)", [name])


@transaction.non_atomic_requests
def nodb(request):
    return HttpResponse("no database here")


def write(request):
    _insert(request.GET["name"])
    return JsonResponse({"written": request.GET["name"]})


def write_fail(request):
    _insert(request.GET["name"])
    raise Boom("after the write")


def duplicate(request):
    _insert(request.GET["name"])
    _insert(request.GET["name"])  # IntegrityError: an application error, never a breaker failure
    return HttpResponse("unreachable")


@transaction.non_atomic_requests
def down(request):
    with connections["down"].cursor() as cursor:
        cursor.execute("SELECT 1")
    return HttpResponse("unreachable")


@transaction.non_atomic_requests
def pooled(request):
    with connections["pooled"].cursor() as cursor:
        cursor.execute("SELECT pg_sleep(%s)", [float(request.GET.get("sleep", "0"))])
    return HttpResponse("pooled ok")


@transaction.non_atomic_requests
def persistent(request):
    with connections["persistent"].cursor() as cursor:
        cursor.execute("SELECT pg_sleep(%s)", [float(request.GET.get("sleep", "0"))])
    return HttpResponse("persistent ok")


@transaction.non_atomic_requests
async def async_nodb(request):
    return HttpResponse("async, no database")


def _atomic_insert(name: str, fail: bool) -> None:
    with transaction.atomic():
        _insert(name)
        if fail:
            raise Boom("after the write")


@transaction.non_atomic_requests
async def async_write(request):
    await sync_to_async(_atomic_insert)(request.GET["name"], request.GET.get("fail") == "1")
    return JsonResponse({"written": request.GET["name"]})


@transaction.non_atomic_requests
async def async_down(request):
    def query() -> None:
        with connections["down"].cursor() as cursor:
            cursor.execute("SELECT 1")

    await sync_to_async(query)()
    return HttpResponse("unreachable")


@transaction.non_atomic_requests
def sa_write(request):
    session = get_session(request)
    session.execute(text(f"INSERT INTO {settings.ITEMS_TABLE} (name) VALUES (:name)"), {"name": request.GET["name"]})
    if request.GET.get("fail") == "1":
        raise Boom("after the write")
    return JsonResponse({"written": request.GET["name"]})
