"""Django integration, enabled by settings only.

::

    INSTALLED_APPS += ["poolguard.django"]
    MIDDLEWARE = ["poolguard.django.PoolGuardMiddleware", *MIDDLEWARE]
    POOLGUARD = {"MAX_WAIT": 1.0, "BREAKER": {"FAILURE_RATE": 0.5, "OPEN_FOR": 30.0}, "DATABASES": ["default"]}

Guards Django's own connections (the ORM, persistent connections and Django 5.1+'s psycopg pool),
serves the health URL, turns an unavailable database into the same 503 as every poolguard adapter,
and, with ``POOLGUARD["SQLALCHEMY"]``, gives each request a SQLAlchemy session: :func:`get_session`.
"""

from __future__ import annotations

from poolguard.django import checks as _checks  # noqa: F401  (registers the system checks, with or without the app)
from poolguard.django.middleware import PoolGuardMiddleware as PoolGuardMiddleware
from poolguard.django.middleware import get_session as get_session

__all__ = ["PoolGuardMiddleware", "get_session"]
