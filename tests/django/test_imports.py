"""A Django app that guards only its own connections never loads SQLAlchemy.

Loading it costs each worker process about 18 MB and a quarter of a second at start, and makes every
full garbage collection walk a larger heap. It runs in a fresh interpreter: this test process has
SQLAlchemy loaded already. The app is set up, checked and served a request that queries the real
PostgreSQL server through the guarded ORM connection, and a health request.
"""

from __future__ import annotations

import textwrap

from tests.support.child import run_python

APP = """
import json
import sys

import django
from django.conf import settings
from django.db import connection
from django.http import JsonResponse
from django.urls import path

from tests.support.databases import DATABASE, HOST, PG_PORT, USER


def select1(request):
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
        return JsonResponse({"one": cursor.fetchone()[0]})


urlpatterns = [path("select1/", select1)]

settings.configure(
    SECRET_KEY="not-secret",
    ALLOWED_HOSTS=["testserver"],
    ROOT_URLCONF="__main__",
    INSTALLED_APPS=["poolguard.django"],
    MIDDLEWARE=["poolguard.django.PoolGuardMiddleware"],
    DATABASES={"default": {"ENGINE": "django.db.backends.postgresql", "HOST": HOST, "PORT": str(PG_PORT),
                           "NAME": DATABASE, "USER": USER, "OPTIONS": {"pool": {"min_size": 1, "max_size": 2}}}},
    POOLGUARD={"HEALTH_DETAIL": "always"},
    LOGGING_CONFIG=None,
)
django.setup()
from django.core.checks import run_checks
from django.test import Client

problems = [message.id for message in run_checks()]
client = Client()
answer = client.get("/select1/")
health = client.get("/health/db")
connection.close_pool()
print(json.dumps({
    "status": answer.status_code,
    "body": answer.json(),
    "health": health.status_code,
    "health_pools": [pool["name"] for pool in health.json()["pools"]],
    "checks": problems,
    "sqlalchemy_loaded": sorted(name for name in sys.modules if name.split(".")[0] == "sqlalchemy"),
}))
"""


def test_a_django_app_without_the_sqlalchemy_option_never_imports_sqlalchemy() -> None:
    result = run_python("-c", textwrap.dedent(APP))
    assert result["status"] == 200
    assert result["body"] == {"one": 1}
    assert result["health"] == 200
    assert result["health_pools"] == ["default"]
    assert result["checks"] == []
    assert result["sqlalchemy_loaded"] == []
