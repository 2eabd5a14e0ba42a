"""Settings: one alias per variant on Django's psycopg pool (min = max = 4), as ``benchmarks.server`` asks.

``BENCH_COMPARE`` (``poolguard`` or ``telemetry``) picks the variants; poolguard guards every alias
but ``bare``. ``BENCH_DJANGO_SETUP=example`` adds what ``examples/django_project`` sets besides
poolguard, on every alias: ``ATOMIC_REQUESTS`` and ``CommonMiddleware``.
"""

from __future__ import annotations

import os
from typing import Any

from benchmarks.apps import common

VARIANTS = common.variants("django", os.environ.get("BENCH_COMPARE", "poolguard"))

_DATABASE: dict[str, Any] = {
    "ENGINE": "django.db.backends.postgresql",
    "HOST": "127.0.0.1",
    "PORT": "5432",
    "NAME": "test",
    "USER": "root",
    "CONN_MAX_AGE": 0,
    "OPTIONS": {"pool": {"min_size": 4, "max_size": 4, "timeout": 10}},
}

SECRET_KEY = "benchmark-only"
DEBUG = False
ALLOWED_HOSTS = ["*"]
ROOT_URLCONF = "benchmarks.apps.django_project.urls"
USE_TZ = True
LOGGING_CONFIG = None
DATABASES: dict[str, dict[str, Any]] = {"default": {}, **{variant: dict(_DATABASE) for variant in VARIANTS}}
INSTALLED_APPS = ["poolguard.django"]
MIDDLEWARE = ["poolguard.django.PoolGuardMiddleware", "benchmarks.apps.django_project.urls.by_variant"]
POOLGUARD = {"DATABASES": [variant for variant in VARIANTS if variant != "bare"], "THREADS": 4}

if os.environ.get("BENCH_DJANGO_SETUP") == "example":
    for _variant in VARIANTS:
        DATABASES[_variant]["ATOMIC_REQUESTS"] = True
    MIDDLEWARE.append("django.middleware.common.CommonMiddleware")
