"""What a Django alias's settings say about its connections: Django's psycopg pool, when it has one.

Read by the pool adapter (:mod:`poolguard.pools.django`) and by the system checks alike.
"""

from __future__ import annotations

from typing import Any

from poolguard.errors import ConfigError

__all__ = ["PSYCOPG_POOL_DEFAULT_MIN_SIZE", "pool_option", "pool_settings"]

PSYCOPG_POOL_DEFAULT_MIN_SIZE = 4
"""psycopg_pool's own default ``min_size`` (and ``max_size`` follows it when unset)."""


def pool_option(settings_dict: dict[str, Any]) -> Any:
    """``OPTIONS["pool"]`` of a PostgreSQL alias when it turns Django's psycopg pool on, else None."""
    options = settings_dict.get("OPTIONS") or {}
    pool = options.get("pool") if isinstance(options, dict) else None
    if not pool or not str(settings_dict.get("ENGINE", "")).endswith("postgresql"):
        return None
    return pool


def pool_settings(settings_dict: dict[str, Any]) -> tuple[int, int] | None:
    """(max_size, min_size) of Django's psycopg pool for this alias, or None without one."""
    pool = pool_option(settings_dict)
    if pool is None:
        return None
    if pool is True:
        return PSYCOPG_POOL_DEFAULT_MIN_SIZE, PSYCOPG_POOL_DEFAULT_MIN_SIZE
    if not isinstance(pool, dict):
        raise ConfigError(
            "DATABASES[...]['OPTIONS']['pool']", pool, "True or a dict of psycopg_pool.ConnectionPool options"
        )
    min_size = int(pool.get("min_size", PSYCOPG_POOL_DEFAULT_MIN_SIZE))
    max_size = pool.get("max_size")
    return (int(max_size) if max_size is not None else min_size), min_size
