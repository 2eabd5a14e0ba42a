"""Flask, Starlette (asyncpg) and FastAPI (psycopg) apps while the private server fails in every way.

Each failure at the connection level is the exact 503 of API.md, soon, never a 500; routes without the
database keep answering; no connection stays checked out or idle in a transaction; what was
acknowledged is committed and nothing else. Breaker intervals run on a fake clock.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import psycopg
import pytest

from poolguard import Breaker, BreakerState, Guard
from tests.faults.apps import KINDS, engine_kind, serve
from tests.faults.helpers import (
    PASSWORD_ROLE,
    SECRET,
    Engine,
    Fleet,
    Reply,
    assert_503,
    assert_clean,
    assert_no_secret,
    checked_out,
    names_in,
)
from tests.support.clock import FakeClock
from tests.support.pgcluster import APP_USER, PgCluster
from tests.support.tcpproxy import TcpProxy

pytestmark = pytest.mark.postgres


@pytest.fixture(params=KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def build(
    fleet: Fleet,
    kind: str,
    port: int,
    cluster: PgCluster,
    *,
    guarded: bool = True,
    user: str = APP_USER,
    password: str = SECRET,
    guard_options: dict[str, Any] | None = None,
    **engine_options: Any,
) -> tuple[Engine, Guard]:
    """The engine ``kind``'s app runs on (poolguard's defaults, or plain SQLAlchemy's) and its guard."""
    driver = engine_kind(kind)
    url = cluster.url(driver, user=user, password=password, port=port)
    engine_options.setdefault("pool_size", 2)
    engine_options.setdefault("max_overflow", 0)
    if guarded:
        engine_options.setdefault("connect_timeout", 2)
    engine: Engine = (
        fleet.async_engine(url, guarded=guarded, **engine_options)
        if driver == "asyncpg"
        else fleet.engine(url, guarded=guarded, **engine_options)
    )
    return engine, fleet.guard(engine, **(guard_options or {}))


def assert_no_500(replies: list[Reply]) -> None:
    assert [r.status for r in replies if r.status not in (200, 503)] == [], [r.body[:300] for r in replies]
    for reply in replies:
        assert_no_secret(reply.body)
        if reply.status == 503:
            assert_503(reply)


async def test_stopped_server_is_503_then_serves_again(kind: str, cluster: PgCluster, fleet: Fleet) -> None:
    clock = FakeClock()
    engine, guard = build(fleet, kind, cluster.port, cluster, guard_options={"clock": clock})
    async with serve(kind, guard, "unused") as call:
        assert (await call("GET", "/one")).status == 200
        cluster.stop()
        down = [await call("GET", "/one") for _ in range(7)]
        for reply in down:
            assert_503(reply)
        assert down[-1].json()["reason"] == "circuit_open"
        assert down[-1].seconds < 0.5
        assert guard.breaker is not None
        assert guard.breaker.state is BreakerState.OPEN
        assert (await call("GET", "/nodb")).status == 200
        health = await call("GET", "/health/db")
        assert health.status == 503
        assert health.json() == {"status": "unavailable"}
        cluster.start()
        clock.advance(400.0)  # past any open interval: the next calls are the half-open probes
        back = [await call("GET", "/one") for _ in range(4)]
        assert [r.status for r in back] == [200] * 4
        assert (await call("GET", "/health/db")).status == 200
    assert_clean(cluster, engine)


@pytest.mark.parametrize("guarded", [True, False], ids=["poolguard-engine", "plain-engine"])
async def test_idle_backends_terminated(kind: str, guarded: bool, cluster: PgCluster, fleet: Fleet) -> None:
    engine, guard = build(fleet, kind, cluster.port, cluster, guarded=guarded)
    async with serve(kind, guard, "unused") as call:
        warm = await asyncio.gather(call("GET", "/sleep/0.2"), call("GET", "/sleep/0.2"))
        assert [r.status for r in warm] == [200, 200]
        assert cluster.terminate(state="idle") == 2
        replies = [await call("GET", "/one") for _ in range(5)]
    assert_no_500(replies)
    if guarded:  # pre-ping replaces the dead connections: nobody notices
        assert [r.status for r in replies] == [200] * 5
    else:  # a plain engine fails the request that draws a dead connection, then the pool is refreshed
        assert [r.status for r in replies[-3:]] == [200] * 3
    assert_clean(cluster, engine)


async def test_backend_killed_mid_write_is_503_and_not_committed(
    kind: str, cluster: PgCluster, fleet: Fleet, table: str
) -> None:
    engine, guard = build(fleet, kind, cluster.port, cluster)
    async with serve(kind, guard, table) as call:
        assert (await call("POST", "/write/before")).status == 200
        request = asyncio.ensure_future(call("POST", "/write/killed?sleep=20"))
        await wait_for_backend(cluster, "%pg_sleep%")
        assert cluster.terminate(query_like="%pg_sleep%") == 1
        reply = await asyncio.wait_for(request, 10)
        assert_503(reply, "circuit_open", within=5.0)
        assert (await call("POST", "/write/after")).status == 200
    assert names_in(cluster, table) == {"before", "after"}
    assert_clean(cluster, engine)


async def wait_for_backend(cluster: PgCluster, query_like: str) -> None:
    for _ in range(500):
        if any(state == "active" and "pg_sleep" in query for _, state, query in cluster.backends()):
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"no backend runs {query_like}")


async def test_crash_and_restart_loses_no_acknowledged_write(
    kind: str, cluster: PgCluster, fleet: Fleet, table: str
) -> None:
    clock = FakeClock()
    engine, guard = build(fleet, kind, cluster.port, cluster, guard_options={"clock": clock})
    replies: dict[str, Reply] = {}
    async with serve(kind, guard, table) as call:
        for i in range(5):
            replies[f"a{i}"] = await call("POST", f"/write/a{i}")
        in_flight = asyncio.ensure_future(call("POST", "/write/inflight?sleep=20"))
        await wait_for_backend(cluster, "%pg_sleep%")
        cluster.crash()
        replies["inflight"] = await asyncio.wait_for(in_flight, 10)
        for i in range(3):
            replies[f"down{i}"] = await call("POST", f"/write/down{i}")
        cluster.start()
        clock.advance(400.0)
        for i in range(5):
            replies[f"b{i}"] = await call("POST", f"/write/b{i}")
    assert_no_500(list(replies.values()))
    acknowledged = {name for name, reply in replies.items() if reply.status == 200}
    assert acknowledged >= {f"a{i}" for i in range(5)} | {f"b{i}" for i in range(2, 5)}
    present = names_in(cluster, table)
    assert present == acknowledged, "a write was lost or appeared without being acknowledged"
    assert_clean(cluster, engine)


async def test_connection_resets_are_503_never_500(
    kind: str, cluster: PgCluster, proxy: TcpProxy, fleet: Fleet
) -> None:
    engine, guard = build(
        fleet,
        kind,
        proxy.port,
        cluster,
        guard_options={
            "breaker": Breaker(consecutive_failures=0, failure_rate=1.0, window_size=200, minimum_calls=200)
        },
    )
    replies: list[Reply] = []
    async with serve(kind, guard, "unused") as call:
        for _ in range(40):
            replies.append(await call("GET", "/one"))
            proxy.reset_connections()
        replies.append(await call("GET", "/one"))
    assert_no_500(replies)
    assert replies[-1].status == 200
    assert_clean(cluster, engine)


async def test_added_latency_is_slow_but_served(kind: str, cluster: PgCluster, proxy: TcpProxy, fleet: Fleet) -> None:
    engine, guard = build(fleet, kind, proxy.port, cluster)
    proxy.latency = 0.05
    async with serve(kind, guard, "unused") as call:
        replies = [*await asyncio.gather(call("GET", "/one"), call("GET", "/one")), await call("GET", "/one")]
        assert [r.status for r in replies] == [200] * 3
        assert max(r.seconds for r in replies) < 5.0
        assert guard.breaker is not None
        assert guard.breaker.state is BreakerState.CLOSED
        assert (await call("GET", "/health/db")).status == 200
    assert_clean(cluster, engine)


async def test_slow_connect_is_bounded_by_the_connect_timeout(
    kind: str, cluster: PgCluster, proxy: TcpProxy, fleet: Fleet
) -> None:
    engine, guard = build(fleet, kind, proxy.port, cluster)  # poolguard's engine, connect_timeout=2
    async with serve(kind, guard, "unused") as call:
        proxy.connect_delay = 6.0
        reply = await call("GET", "/one")
        assert_503(reply, within=4.5)
        assert (await call("GET", "/nodb")).status == 200
        proxy.connect_delay = 0.5
        # Connects that hang past their timeout are an outage: served again once a probe gets through.
        recovered = time.monotonic()
        while (await call("GET", "/one")).status != 200:
            assert time.monotonic() - recovered < 2.5, "not served again after connects became quick"
            await asyncio.sleep(0.05)
    assert_clean(cluster, engine)


async def test_pool_exhaustion_sheds_with_pool_saturated(kind: str, cluster: PgCluster, fleet: Fleet) -> None:
    engine, guard = build(fleet, kind, cluster.port, cluster, pool_size=1, guard_options={"max_wait": 0.3})
    async with serve(kind, guard, "unused") as call:
        holder = asyncio.ensure_future(call("GET", "/sleep/1.5"))
        await wait_for_backend(cluster, "%pg_sleep%")
        shed = await asyncio.gather(*(call("GET", "/one") for _ in range(4)))
        free = await call("GET", "/nodb")
        assert (await holder).status == 200
        after = await call("GET", "/one")
    for reply in shed:
        assert_503(reply, "pool_saturated", within=1.2)
    assert free.status == 200
    assert after.status == 200
    assert guard.breaker is not None
    assert guard.breaker.state is BreakerState.CLOSED
    assert_clean(cluster, engine)


async def test_role_connection_limit_is_503(kind: str, cluster: PgCluster, fleet: Fleet) -> None:
    engine, guard = build(fleet, kind, cluster.port, cluster, pool_size=3)
    cluster.set_connection_limit(APP_USER, 1)
    async with serve(kind, guard, "unused") as call:
        holder = asyncio.ensure_future(call("GET", "/sleep/1.0"))
        await wait_for_backend(cluster, "%pg_sleep%")
        refused = await call("GET", "/one")
        assert (await holder).status == 200
        cluster.set_connection_limit(APP_USER, -1)
        after = await call("GET", "/one")
    assert_503(refused, "circuit_open")
    assert after.status == 200
    assert_clean(cluster, engine)


async def test_server_out_of_connection_slots_is_503(kind: str, cluster: PgCluster, fleet: Fleet) -> None:
    with cluster.started_with(max_connections=5, superuser_reserved_connections=3):
        engine, guard = build(fleet, kind, cluster.port, cluster)
        holders = [psycopg.connect(cluster.conninfo(user=APP_USER)) for _ in range(2)]  # every slot the app has
        try:
            async with serve(kind, guard, "unused") as call:
                refused = await call("GET", "/one")
                holders.pop().close()
                after = await call("GET", "/one")
        finally:
            for holder in holders:
                holder.close()
        assert_503(refused, "circuit_open")
        assert after.status == 200
        assert_clean(cluster, engine)


async def test_streamed_body_holds_no_connection(kind: str, cluster: PgCluster, fleet: Fleet, table: str) -> None:
    engine, guard = build(fleet, kind, cluster.port, cluster)
    seen: list[tuple[int, int, bool]] = []

    def probe() -> None:
        seen.append((checked_out(engine), len(cluster.idle_in_transaction()), "streamed" in names_in(cluster, table)))

    async with serve(kind, guard, table, probe) as call:
        reply = await call("GET", "/stream/streamed")
    assert reply.status == 200
    assert reply.body == b"first second"
    assert seen == [(0, 0, True)]
    assert_clean(cluster, engine)


@pytest.mark.parametrize("kind", ["starlette", "fastapi"])
async def test_background_task_killed_mid_transaction_leaks_nothing(
    kind: str, cluster: PgCluster, fleet: Fleet, table: str
) -> None:
    engine, guard = build(fleet, kind, cluster.port, cluster)

    def probe() -> None:  # inside the background task's transaction: its backend dies
        cluster.terminate(state="idle in transaction")

    async with serve(kind, guard, table, probe) as call:
        reply = await call("POST", "/background/job")
        after = await call("POST", "/write/after")
    assert reply.status == 200
    assert after.status == 200
    assert names_in(cluster, table) == {"job", "after"}  # the task's write died with its backend
    assert_clean(cluster, engine)


async def test_forgotten_connection_is_reclaimed(
    kind: str, cluster: PgCluster, fleet: Fleet, caplog: pytest.LogCaptureFixture
) -> None:
    engine, guard = build(fleet, kind, cluster.port, cluster)
    async with serve(kind, guard, "unused") as call:
        reply = await call("GET", "/leak")
        assert reply.status == 200
        assert (await call("GET", "/one")).status == 200
    assert guard.stats().checked_out == 0
    assert checked_out(engine) == 0
    assert any("still holding a connection" in r.getMessage() for r in caplog.records)
    assert_clean(cluster, engine)


async def test_wrong_password_is_503_and_never_shown(kind: str, cluster: PgCluster, fleet: Fleet) -> None:
    wrong = f"{SECRET}-wrong"
    engine, guard = build(fleet, kind, cluster.port, cluster, user=PASSWORD_ROLE, password=wrong)
    async with serve(kind, guard, "unused") as call:
        replies = [await call("GET", "/one") for _ in range(6)]
        health = await call("GET", "/health/db")
    assert_no_500(replies)
    for reply in replies:
        assert_503(reply)
    assert replies[-1].json()["reason"] == "circuit_open"
    assert health.status == 503
    assert_no_secret(health.body)
    assert_clean(cluster, engine)


@pytest.mark.parametrize("guarded", [True, False], ids=["poolguard-engine", "plain-engine"])
async def test_blackholed_database_is_shed_then_served_again(
    kind: str, guarded: bool, cluster: PgCluster, proxy: TcpProxy, fleet: Fleet
) -> None:
    """A database that stops answering, with a default Guard (the watchdog on): a request already
    waiting on it is aborted and answered 503 within about 2 s; then 503 at once, health 503, DB-free
    routes answer; once the network heals the app serves again within about a second."""
    engine, guard = build(fleet, kind, proxy.port, cluster, guarded=guarded)
    async with serve(kind, guard, "unused") as call:
        assert (await call("GET", "/one")).status == 200
        proxy.blackhole()
        hung = await call("GET", "/one")
        assert_503(hung, "circuit_open", within=3.5)
        assert_503(await call("GET", "/one"), "circuit_open", within=0.2)
        assert (await call("GET", "/nodb")).status == 200
        assert (await call("GET", "/health/db")).status == 503
        proxy.heal()
        healed = time.monotonic()
        while (reply := await call("GET", "/one")).status != 200:
            assert_503(reply, "circuit_open", within=0.5)
            assert time.monotonic() - healed < 2.5, "not served again after the network healed"
            await asyncio.sleep(0.05)
        assert (await call("GET", "/health/db")).status == 200
    breaker = guard.breaker
    assert breaker is not None
    for _ in range(300):  # half-open: trial calls or the watchdog's probes close it
        if breaker.state is BreakerState.CLOSED:
            break
        await asyncio.sleep(0.01)
    assert breaker.state is BreakerState.CLOSED
    assert_clean(cluster, engine)
