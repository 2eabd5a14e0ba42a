"""The example's routes: one without a database, a read, a write, a write that fails, and a slow read.

``ATOMIC_REQUESTS`` wraps the sync views in a transaction, so ``/items/fail`` leaves no row behind.
``/`` opts out of it (and is async): it never touches the database, so it keeps answering 200 while
the database is down and poolguard answers the other routes with a fast 503.
"""

import json
import time

from django.db import transaction
from django.http import HttpRequest, HttpResponse, HttpResponseBadRequest, JsonResponse
from django.views.decorators.http import require_POST

from catalog.models import Item

MAX_HOLD_SECONDS = 5.0


@transaction.non_atomic_requests
async def index(request: HttpRequest) -> HttpResponse:
    return JsonResponse({"service": "catalog", "database": "not used by this route"})


def items(request: HttpRequest) -> HttpResponse:
    names = list(Item.objects.order_by("-id").values_list("name", flat=True)[:50])
    return JsonResponse({"items": names})


def _name(request: HttpRequest) -> str:
    """``name`` from a JSON body (``{"name": "..."}``), a form field or the query string."""
    if request.content_type == "application/json":
        body = json.loads(request.body or b"{}")
        if isinstance(body, dict) and body.get("name"):
            return str(body["name"])
    return request.POST.get("name") or request.GET.get("name") or "unnamed"


@require_POST
def create(request: HttpRequest) -> HttpResponse:
    item = Item.objects.create(name=_name(request))
    return JsonResponse({"id": item.pk, "name": item.name}, status=201)


class SimulatedFailure(Exception):
    pass


@require_POST
def fail(request: HttpRequest) -> HttpResponse:
    Item.objects.create(name=_name(request))
    raise SimulatedFailure("the write above is rolled back by ATOMIC_REQUESTS")


def slow(request: HttpRequest) -> HttpResponse:
    """Reads, then keeps its connection (in the request's transaction) for ``?seconds=`` (at most 5).

    A request that waits on another service inside its transaction does this: send more of them at
    once than the pool holds and the database routes answer 503 ``pool_saturated`` within
    ``MAX_WAIT`` instead of queueing for the pool's own timeout.
    """
    try:
        seconds = float(request.GET.get("seconds", "1"))
    except ValueError:
        seconds = -1.0
    if not 0 < seconds <= MAX_HOLD_SECONDS:
        return HttpResponseBadRequest(f"seconds: a number above 0 and at most {MAX_HOLD_SECONDS:g}")
    count = Item.objects.count()
    time.sleep(seconds)
    return JsonResponse({"items": count, "held_seconds": seconds})
