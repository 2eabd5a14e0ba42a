"""Connection URLs for the real servers the integration tests run against (trust auth, no password)."""

from __future__ import annotations

import pytest


@pytest.fixture
def pg_url() -> str:
    """PostgreSQL through psycopg 3 (sync, and async with create_async_engine)."""
    return "postgresql+psycopg://root@127.0.0.1:5432/test"


@pytest.fixture
def pg_async_url() -> str:
    """PostgreSQL through asyncpg."""
    return "postgresql+asyncpg://root@127.0.0.1:5432/test"


@pytest.fixture
def mysql_url() -> str:
    """MariaDB (MySQL protocol) through pymysql."""
    return "mysql+pymysql://root@127.0.0.1:3306/test"
