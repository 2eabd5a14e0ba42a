"""``poolguard.create_asyncpg_pool`` on the real PostgreSQL server: the defaults reach the server, the
user's options win, bad options fail before anything connects."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import asyncpg
import pytest

import poolguard
from poolguard import ConfigError
from poolguard.asyncpg_pool import connect_kwargs
from poolguard.engine import CLIENT_MARGIN
from tests.support.databases import DATABASE, HOST, PG_PORT, USER

pytestmark = pytest.mark.postgres

URL = f"postgresql://{USER}@{HOST}:{PG_PORT}/{DATABASE}"


@pytest.fixture
async def make() -> AsyncIterator[Callable[..., Any]]:
    pools: list[asyncpg.Pool] = []

    async def factory(url: str = URL, **kwargs: Any) -> asyncpg.Pool:
        pool = await poolguard.create_asyncpg_pool(url, **kwargs)
        pools.append(pool)
        return pool

    yield factory
    for pool in pools:
        await pool.close()


async def test_defaults_reach_the_server(make: Any) -> None:
    service = f"orders-{uuid.uuid4().hex[:8]}"
    pool = await make(service_name=service, workers=4)
    assert (pool.get_min_size(), pool.get_max_size()) == (0, 6)
    async with pool.acquire() as conn:
        assert await conn.fetchval("SHOW statement_timeout") == "30s"
        assert await conn.fetchval("SHOW application_name") == service
        pid = await conn.fetchval("SELECT pg_backend_pid()")
        seen = await conn.fetchval("SELECT application_name FROM pg_stat_activity WHERE pid = $1", pid)
        assert seen == service
        assert conn._config.command_timeout == 30 + CLIENT_MARGIN
        with pytest.raises(asyncpg.QueryCanceledError):  # the server's own cancel, not the client's
            await conn.execute("SET statement_timeout = '100ms'; SELECT pg_sleep(1)")


@pytest.mark.parametrize("scheme", ["postgresql", "postgres", "postgresql+asyncpg"])
async def test_accepted_url_schemes(make: Any, scheme: str) -> None:
    pool = await make(URL.replace("postgresql", scheme, 1), statement_timeout=2.5)
    async with pool.acquire() as conn:
        assert await conn.fetchval("SHOW statement_timeout") == "2500ms"


async def test_the_users_options_win(make: Any) -> None:
    pool = await make(
        URL + "?application_name=from-url",
        service_name="from-argument",
        statement_timeout=None,
        max_size=3,
        command_timeout=7,
        server_settings={"search_path": "public"},
    )
    assert pool.get_max_size() == 3
    async with pool.acquire() as conn:
        assert await conn.fetchval("SHOW application_name") == "from-url"
        assert await conn.fetchval("SHOW statement_timeout") == "0"
        assert await conn.fetchval("SHOW search_path") == "public"
        assert conn._config.command_timeout == 7


async def test_it_starts_while_the_database_is_down() -> None:
    pool = await poolguard.create_asyncpg_pool(f"postgresql://{USER}@{HOST}:1/{DATABASE}", connect_timeout=0.5)
    try:
        with pytest.raises(OSError, match=r"[Cc]onnect"):
            await pool.fetchval("SELECT 1")
    finally:
        await pool.close()


@pytest.mark.parametrize(
    ("options", "setting"),
    [
        ({"url": "mysql://root@localhost/test"}, "create_asyncpg_pool.url"),
        ({"url": 42}, "create_asyncpg_pool.url"),
        ({"workers": 0}, "create_asyncpg_pool.workers"),
        ({"pgbouncer": "yes"}, "create_asyncpg_pool.pgbouncer"),
        ({"statement_timeout": -1}, "create_asyncpg_pool.statement_timeout"),
        ({"connect_timeout": 0}, "create_asyncpg_pool.connect_timeout"),
        ({"service_name": "x" * 64}, "create_asyncpg_pool.service_name"),
        ({"max_sise": 3}, "create_asyncpg_pool.max_sise"),
        ({"server_settings": "application_name=x"}, "create_asyncpg_pool.server_settings"),
        ({"min_size": 9}, "create_asyncpg_pool.min_size"),
    ],
)
async def test_bad_options_name_the_option(options: dict[str, Any], setting: str) -> None:
    url = options.pop("url", "postgresql://root:hunter2@127.0.0.1:1/test")
    with pytest.raises(ConfigError) as raised:
        await poolguard.create_asyncpg_pool(url, **options)
    assert raised.value.setting == setting
    assert "hunter2" not in str(raised.value)


def test_connect_kwargs_direct_and_behind_pgbouncer() -> None:
    direct = connect_kwargs(False, service_name="svc", connect_timeout=2.0, statement_ms=30000)
    assert direct == {
        "timeout": 2.0,
        "command_timeout": 30 + CLIENT_MARGIN,
        "server_settings": {"application_name": "svc", "statement_timeout": "30000"},
    }
    bouncer = connect_kwargs(True, service_name="svc", connect_timeout=2.0, statement_ms=30000)
    assert bouncer == {
        "timeout": 2.0,
        "command_timeout": 30 + CLIENT_MARGIN,
        "server_settings": {"application_name": "svc"},
        "statement_cache_size": 0,
    }
    assert connect_kwargs(False, service_name=None, connect_timeout=1.0, statement_ms=None) == {"timeout": 1.0}
