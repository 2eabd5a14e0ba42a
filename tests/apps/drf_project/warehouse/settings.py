"""Settings of the warehouse API, from the environment.

The database: libpq's ``PGHOST``, ``PGPORT``, ``PGUSER``, ``PGPASSWORD`` and ``PGDATABASE``, plus
``DB_CONN_MAX_AGE`` (seconds to keep a connection; 0 closes it after each request),
``DB_POOL_MAX_SIZE`` (turns on Django's psycopg pool; needs ``DB_CONN_MAX_AGE=0``),
``DB_SEARCH_PATH`` (a schema of its own) and ``DB_APPLICATION_NAME`` (as pg_stat_activity shows it).
"""

import os
from pathlib import Path
from typing import Any

BASE_DIR = Path(__file__).resolve().parent.parent

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "warehouse-dev-only-not-a-secret")
DEBUG = os.environ.get("DJANGO_DEBUG") == "1"
ALLOWED_HOSTS = os.environ.get("DJANGO_ALLOWED_HOSTS", "localhost,127.0.0.1").split(",")

INSTALLED_APPS = [
    "django.contrib.contenttypes",
    "django.contrib.auth",
    "rest_framework",
    "inventory",
    "poolguard.django",
]

MIDDLEWARE = [
    "poolguard.django.PoolGuardMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "django.middleware.common.CommonMiddleware",
]

ROOT_URLCONF = "warehouse.urls"
WSGI_APPLICATION = "warehouse.wsgi.application"


def _database_options() -> dict[str, Any]:
    options: dict[str, Any] = {"application_name": os.environ.get("DB_APPLICATION_NAME", "warehouse")}
    if os.environ.get("DB_SEARCH_PATH"):
        options["options"] = f"-c search_path={os.environ['DB_SEARCH_PATH']}"
    if os.environ.get("DB_POOL_MAX_SIZE"):
        options["pool"] = {"min_size": 1, "max_size": int(os.environ["DB_POOL_MAX_SIZE"]), "timeout": 10}
    return options


DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.postgresql",
        "HOST": os.environ.get("PGHOST", "localhost"),
        "PORT": os.environ.get("PGPORT", "5432"),
        "NAME": os.environ.get("PGDATABASE", "warehouse"),
        "USER": os.environ.get("PGUSER", "warehouse"),
        "PASSWORD": os.environ.get("PGPASSWORD", ""),
        "CONN_MAX_AGE": int(os.environ.get("DB_CONN_MAX_AGE", "60")),
        "CONN_HEALTH_CHECKS": True,
        "ATOMIC_REQUESTS": True,
        "OPTIONS": _database_options(),
    }
}

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
USE_TZ = True
TIME_ZONE = "UTC"
LANGUAGE_CODE = "en-us"

REST_FRAMEWORK = {
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "DEFAULT_PAGINATION_CLASS": "rest_framework.pagination.PageNumberPagination",
    "PAGE_SIZE": 50,
}

POOLGUARD = {"UNAVAILABLE_BODY": "warehouse.errors.unavailable_body"}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "root": {"handlers": ["console"], "level": os.environ.get("DJANGO_LOG_LEVEL", "INFO")},
}
