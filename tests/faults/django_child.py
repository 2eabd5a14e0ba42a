"""A Django app guarded by poolguard.django, driven line by line from the fault tests (a child process).

Django's settings are process-wide and the pytest process has its own (tests/django), so the fault
tests run this app in a child: ``python -m tests.faults.django_child PORT TABLE``, from the project
root. ``default`` is the private cluster at ``PORT`` (a proxy's) as the app role with the secret in
its settings (``ATOMIC_REQUESTS``); ``auth`` is a role that needs a password, given the wrong one.

With ``POOLGUARD_FAULTS_SILENCE_DIR`` set, the app has a ``connection_created`` receiver of its own (a
``SET``, as apps do), which the parent can arm to have the server silenced while a new connection is set
up (see :func:`_set_up_connections`).

Protocol: each stdin line ``METHOD PATH`` is one request through ``django.test.Client``; the answer is
one JSON line on stdout: ``{"status": int, "headers": {...}, "body": str, "seconds": float}``. Every
log record (INFO and above) goes to stderr, which the parent searches for the secret.
"""

from __future__ import annotations

import io
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import django
from django.conf import settings
from django.db import connections, transaction
from django.http import HttpResponse, JsonResponse
from django.urls import path

from tests.faults.helpers import PASSWORD_ROLE, SECRET
from tests.support.pgcluster import APP_USER, DATABASE, HOST


@transaction.non_atomic_requests
def nodb(request: Any) -> HttpResponse:
    return HttpResponse("ok")


def one(request: Any) -> HttpResponse:
    with connections["default"].cursor() as cursor:
        cursor.execute("SELECT 1")
        return JsonResponse({"one": cursor.fetchone()[0]})


def write(request: Any, name: str) -> HttpResponse:
    with connections["default"].cursor() as cursor:
        cursor.execute(f"INSERT INTO {settings.FAULTS_TABLE} (name) VALUES (%s)", [name])
        cursor.execute("SELECT pg_sleep(%s)", [float(request.GET.get("sleep", "0"))])
    return JsonResponse({"written": name})


@transaction.non_atomic_requests
def auth(request: Any) -> HttpResponse:
    with connections["auth"].cursor() as cursor:
        cursor.execute("SELECT 1")
    return HttpResponse("unreachable")


urlpatterns = [
    path("nodb", nodb),
    path("one", one),
    path("write/<str:name>", write),
    path("auth", auth),
]


CONNECTION_MODES = {
    "per-request": {},
    "persistent": {"CONN_MAX_AGE": 600},
    "pool": {"OPTIONS": {"connect_timeout": 2, "pool": {"min_size": 2, "max_size": 4, "timeout": 5}}},
}
"""How the ``default`` alias connects: Django's default, persistent per-thread connections, its psycopg pool."""


def configure(port: int, table: str, mode: str = "per-request") -> None:
    base = {"ENGINE": "django.db.backends.postgresql", "HOST": HOST, "PORT": str(port), "NAME": DATABASE}
    settings.configure(
        SECRET_KEY="poolguard-faults-not-secret",
        DEBUG=False,
        ALLOWED_HOSTS=["testserver"],
        USE_TZ=True,
        ROOT_URLCONF=__name__,
        INSTALLED_APPS=["poolguard.django"],
        MIDDLEWARE=["poolguard.django.PoolGuardMiddleware"],
        DATABASES={
            "default": {
                **base,
                "USER": APP_USER,
                "PASSWORD": SECRET,
                "ATOMIC_REQUESTS": True,
                "OPTIONS": {"connect_timeout": 2},
                **CONNECTION_MODES[mode],
            },
            "auth": {**base, "USER": PASSWORD_ROLE, "PASSWORD": f"{SECRET}-wrong", "OPTIONS": {"connect_timeout": 2}},
        },
        POOLGUARD={"DATABASES": ["default", "auth"] if mode == "per-request" else ["default"]},
        LOGGING_CONFIG=None,
        FAULTS_TABLE=table,
    )
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s %(message)s")
    django.setup()


def _set_up_connections(directory: Path) -> None:
    """The app's own ``connection_created`` receiver: ``SET application_name`` on every new connection.

    Armed (the parent made ``armed`` in ``directory``), the next one says ``ready`` and waits (at most
    10 s) for ``silenced``, which the parent makes once the proxy is silent: its ``SET`` then meets a
    silent server in the middle of the request's first use of the connection.
    """
    from django.db.backends.signals import connection_created  # noqa: PLC0415

    def set_up(sender: Any, connection: Any, **kwargs: Any) -> None:
        if connection.alias != "default":
            return
        armed = directory / "armed"
        if armed.exists():
            armed.unlink()
            (directory / "ready").touch()
            deadline = time.monotonic() + 10.0
            while not (directory / "silenced").exists() and time.monotonic() < deadline:
                time.sleep(0.01)
        with connection.cursor() as cursor:
            cursor.execute("SET application_name = 'faults'")

    connection_created.connect(set_up, weak=False)


def _manage(command: str) -> dict[str, Any]:
    """Runs a management command in this process; its exit status as an HTTP-like status (0 -> 200, else 503)."""
    from django.core.management import call_command  # noqa: PLC0415
    from django.core.management.base import CommandError  # noqa: PLC0415

    out = io.StringIO()
    try:
        call_command(command, "doctor", stdout=out)
        status = 200
    except CommandError as exc:
        out.write(f"error: {exc}")
        status = 503
    return {"status": status, "headers": {}, "body": out.getvalue()}


def main() -> None:
    configure(int(sys.argv[1]), sys.argv[2], *sys.argv[3:4])
    if silence_dir := os.environ.get("POOLGUARD_FAULTS_SILENCE_DIR"):
        _set_up_connections(Path(silence_dir))
    from django.test import Client  # noqa: PLC0415 - needs configured settings

    client = Client(raise_request_exception=False)
    for line in sys.stdin:
        method, target = line.split()
        started = time.monotonic()
        if method == "MANAGE":  # ``MANAGE poolguard`` runs ``manage.py poolguard doctor``
            answer = _manage(target)
        else:
            response = client.generic(method, target)
            answer = {
                "status": response.status_code,
                "headers": dict(response.headers),
                "body": response.content.decode(errors="replace"),
            }
        answer["seconds"] = time.monotonic() - started
        print(json.dumps(answer), flush=True)
    connections.close_all()


if __name__ == "__main__":
    main()
