"""Settings of the poolguard Django example.

The database comes from the environment: ``DATABASE_URL`` (``postgresql://user:password@host:port/name``
or ``sqlite:///path``), else libpq's ``PGHOST``/``PGPORT``/``PGUSER``/``PGPASSWORD``/``PGDATABASE``,
else a SQLite file next to manage.py. ``DB_POOL_MAX_SIZE`` turns on Django's psycopg pool.
poolguard options can also come from ``POOLGUARD_*`` variables (e.g. ``POOLGUARD_MAX_WAIT=0.5``).
"""

import os
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

BASE_DIR = Path(__file__).resolve().parent.parent

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "example-only-not-a-secret")
DEBUG = os.environ.get("DJANGO_DEBUG") == "1"
ALLOWED_HOSTS = os.environ.get("DJANGO_ALLOWED_HOSTS", "localhost,127.0.0.1,[::1]").split(",")

INSTALLED_APPS = ["poolguard.django", "catalog"]
MIDDLEWARE = ["poolguard.django.PoolGuardMiddleware", "django.middleware.common.CommonMiddleware"]
ROOT_URLCONF = "example.urls"
WSGI_APPLICATION = "example.wsgi.application"
USE_TZ = True
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"


def _database() -> dict[str, Any]:
    url = os.environ.get("DATABASE_URL")
    if url:
        parts = urlsplit(url)
        if parts.scheme.startswith("sqlite"):
            return {"ENGINE": "django.db.backends.sqlite3", "NAME": parts.path[1:] or BASE_DIR / "db.sqlite3"}
        if not parts.scheme.startswith("postgres"):
            raise ValueError(f"DATABASE_URL: unsupported scheme {parts.scheme!r} (postgresql:// or sqlite:///)")
        database = {
            "ENGINE": "django.db.backends.postgresql",
            "HOST": parts.hostname or "",
            "PORT": str(parts.port or ""),
            "NAME": parts.path.lstrip("/"),
            "USER": unquote(parts.username or ""),
            "PASSWORD": unquote(parts.password or ""),
        }
    elif os.environ.get("PGHOST"):
        database = {
            "ENGINE": "django.db.backends.postgresql",
            "HOST": os.environ["PGHOST"],
            "PORT": os.environ.get("PGPORT", ""),
            "NAME": os.environ.get("PGDATABASE", "postgres"),
            "USER": os.environ.get("PGUSER", ""),
            "PASSWORD": os.environ.get("PGPASSWORD", ""),
        }
    else:
        return {"ENGINE": "django.db.backends.sqlite3", "NAME": BASE_DIR / "db.sqlite3", "ATOMIC_REQUESTS": True}
    options: dict[str, Any] = {"connect_timeout": 5}
    if os.environ.get("DB_POOL_MAX_SIZE"):
        size = int(os.environ["DB_POOL_MAX_SIZE"])
        options["pool"] = {"min_size": 1, "max_size": size, "timeout": 10}
    return {**database, "ATOMIC_REQUESTS": True, "CONN_MAX_AGE": 0, "OPTIONS": options}


DATABASES = {"default": _database()}

POOLGUARD: dict[str, Any] = {"HEALTH_PATH": "/health/db", "MAX_WAIT": 1.0, "DATABASES": ["default"]}
if os.environ.get("HEALTH_TOKEN"):
    POOLGUARD |= {"HEALTH_DETAIL": "when-authorized", "HEALTH_TOKEN": os.environ["HEALTH_TOKEN"]}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "loggers": {"poolguard": {"handlers": ["console"], "level": "INFO"}},
}
