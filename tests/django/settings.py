"""Settings for the Django adapter tests (configured by conftest.py; no pytest-django).

Every alias the tests need is here from the start: overriding DATABASES in a test is unsupported by
Django (it warns, and warnings are errors in this suite).
"""

import uuid

from tests.support.databases import DATABASE, DEAD_PORT, HOST, PG_PORT, PG_URL, USER

SECRET_KEY = "poolguard-tests-not-secret"
DEBUG = False
ALLOWED_HOSTS = ["testserver", "localhost", "127.0.0.1"]
USE_TZ = True
ROOT_URLCONF = "tests.django.urls"
INSTALLED_APPS = ["poolguard.django"]
MIDDLEWARE = ["poolguard.django.PoolGuardMiddleware", "django.middleware.common.CommonMiddleware"]
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
LOGGING_CONFIG = None

_PG = {"ENGINE": "django.db.backends.postgresql", "HOST": HOST, "PORT": str(PG_PORT), "NAME": DATABASE, "USER": USER}

DATABASES = {
    "default": {**_PG, "ATOMIC_REQUESTS": True},
    # Nothing listens on port 1: connection refused at once. The password must never leak.
    "down": {**_PG, "PORT": str(DEAD_PORT), "PASSWORD": "secret-pw", "OPTIONS": {"connect_timeout": 2}},
    "pooled": {**_PG, "OPTIONS": {"pool": {"min_size": 1, "max_size": 1, "timeout": 10}}},
    "persistent": {**_PG, "CONN_MAX_AGE": 60},
}

POOLGUARD = {"DATABASES": ["default"]}

ITEMS_TABLE = f"poolguard_dj_items_{uuid.uuid4().hex[:10]}"
SA_URL = PG_URL
