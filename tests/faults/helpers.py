"""What the fault tests share besides fixtures: the secret, tracked engines, reading what was committed."""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import sqlalchemy
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.ext.asyncio import create_async_engine as sa_create_async_engine

import poolguard
from tests.support.clock import drive_the_watchdog
from tests.support.pgcluster import PgCluster

SECRET = "Fault-Pw-7c1e9"
"""In every URL an app under test uses (sent and ignored under trust auth); must never leak."""

PASSWORD_ROLE = "pw_user"
"""A role that really needs SECRET (scram-sha-256)."""

Engine = sqlalchemy.Engine | AsyncEngine


def names_in(cluster: PgCluster, table: str) -> set[str]:
    """What is really committed in ``table``, read on a connection of its own."""
    return {str(row[0]) for row in cluster.sql(f"SELECT name FROM {table}")}


def checked_out(engine: Engine) -> int:
    sync_engine = engine.sync_engine if isinstance(engine, AsyncEngine) else engine
    pool: Any = sync_engine.pool
    return int(pool.checkedout()) if hasattr(pool, "checkedout") else 0


class Fleet:
    """The engines and guards of one test, built as users build them; all checked and released after it.

    ``guarded``: poolguard.create_engine / create_async_engine (poolguard's production defaults);
    otherwise plain sqlalchemy.create_engine / create_async_engine with the given options only.
    """

    def __init__(self) -> None:
        self.engines: list[Engine] = []
        self.guards: list[poolguard.Guard] = []

    def engine(self, url: str, *, guarded: bool = True, **options: Any) -> sqlalchemy.Engine:
        engine = poolguard.create_engine(url, **options) if guarded else sqlalchemy.create_engine(url, **options)
        self.engines.append(engine)
        return engine

    def async_engine(self, url: str, *, guarded: bool = True, **options: Any) -> AsyncEngine:
        engine = poolguard.create_async_engine(url, **options) if guarded else sa_create_async_engine(url, **options)
        self.engines.append(engine)
        return engine

    def guard(self, engine: Engine, **options: Any) -> poolguard.Guard:
        guard = poolguard.Guard(engine, **drive_the_watchdog(options))
        self.guards.append(guard)
        return guard

    def problems(self) -> list[str]:
        found = [f"guard {g.name!r}: {g.stats().checked_out} checked out" for g in self.guards if g.stats().checked_out]
        found += [f"{e.url!r}: {checked_out(e)} checked out" for e in self.engines if checked_out(e)]
        return found

    async def release(self) -> None:
        problems = self.problems()
        for guard in self.guards:
            guard.close()
        for engine in self.engines:
            if isinstance(engine, AsyncEngine):
                await engine.dispose()
            else:
                engine.dispose()
        assert not problems, problems


def scalar(engine: sqlalchemy.Engine, query: str) -> Any:
    with engine.connect() as connection:
        return connection.execute(text(query)).scalar()


# --- HTTP --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    """One HTTP answer, whichever adapter gave it (header names lower-case)."""

    status: int
    headers: dict[str, str]
    body: bytes
    seconds: float

    def json(self) -> Any:
        return json.loads(self.body)


Caller = Callable[[str, str], Awaitable[Reply]]
"""``await call(method, path)``: one request to the app under test."""


async def timed(call: Callable[[], Awaitable[tuple[int, dict[str, str], bytes]]]) -> Reply:
    started = time.monotonic()
    status, headers, body = await call()
    return Reply(status, {k.lower(): v for k, v in headers.items()}, body, time.monotonic() - started)


def assert_503(reply: Reply, reason: str | None = None, *, within: float = 3.0) -> None:
    """The 503 of API.md, exactly: body, Retry-After (whole seconds, at least 1), no-store; and fast."""
    assert reply.status == 503, (reply.status, reply.body[:500])
    body = reply.json()
    assert set(body) == {"error", "reason", "retry_after"}, body
    assert body["error"] == "database_unavailable"
    assert body["reason"] in ({reason} if reason else {"circuit_open", "pool_saturated"})
    seconds = body["retry_after"]
    assert isinstance(seconds, int)
    assert seconds >= 1
    assert reply.headers["retry-after"] == str(seconds)
    assert reply.headers["cache-control"] == "no-store"
    assert reply.headers["content-type"].startswith("application/json")
    assert reply.body == json.dumps(body, separators=(",", ":")).encode()
    assert reply.seconds < within, f"503 after {reply.seconds:.2f}s"


def assert_no_secret(*texts: str | bytes) -> None:
    for item in texts:
        value = item.decode(errors="replace") if isinstance(item, bytes) else item
        assert SECRET not in value
        assert "Traceback" not in value


def assert_clean(cluster: PgCluster, *engines: Engine) -> None:
    """No connection checked out and no backend idle in a transaction (now, not only after the test)."""
    assert [checked_out(engine) for engine in engines] == [0] * len(engines)
    assert cluster.idle_in_transaction() == []
