"""Settings of the outage benchmark's Django app (``benchmarks.outage``), one project per server.

``BENCH_ROW``: ``django-pool`` (Django 5.1+'s psycopg pool, ``OPTIONS={"pool": True}``: its own
defaults) or ``django-persistent`` (``CONN_MAX_AGE=60``, a connection per thread kept across
requests). ``BENCH_VARIANT``: ``bare`` (no poolguard; its health route is a ``SELECT 1`` view) or
``guarded`` (poolguard as the README adopts it: the app and the middleware, no ``POOLGUARD``
options). ``BENCH_DB_PORT``: where the database is (the outage benchmark's TCP proxy, or PostgreSQL).
``BENCH_POOL`` (the overload benchmark): the psycopg pool's size, ``min_size = max_size``, for both
variants, given as a user sizes it in ``OPTIONS``; per-thread connections have no pool, their
capacity is the server's thread count (the benchmark sets it to the same number), and guarded
they get ``POOLGUARD["CAPACITY"]`` = ``BENCH_POOL`` under twice the threads, as docs/adopting.md says.
"""

from __future__ import annotations

import os
from typing import Any

ROW = os.environ["BENCH_ROW"]
GUARDED = os.environ["BENCH_VARIANT"] != "bare"

_DATABASE: dict[str, Any] = {
    "ENGINE": "django.db.backends.postgresql",
    "HOST": "127.0.0.1",
    "PORT": os.environ["BENCH_DB_PORT"],
    "NAME": "test",
    "USER": "root",
}
_POOL = os.environ.get("BENCH_POOL")
if ROW == "django-pool":
    _DATABASE["OPTIONS"] = {"pool": {"min_size": int(_POOL), "max_size": int(_POOL)} if _POOL else True}
else:
    _DATABASE["CONN_MAX_AGE"] = 60

SECRET_KEY = "benchmark-only"
DEBUG = False
ALLOWED_HOSTS = ["*"]
ROOT_URLCONF = "benchmarks.apps.django_project.outage_urls"
USE_TZ = True
LOGGING_CONFIG = None
DATABASES = {"default": _DATABASE}
INSTALLED_APPS = ["poolguard.django"] if GUARDED else []
MIDDLEWARE = ["poolguard.django.PoolGuardMiddleware"] if GUARDED else []
if GUARDED and ROW == "django-persistent" and _POOL:
    POOLGUARD = {"CAPACITY": int(_POOL)}
