"""The breaker against real network faults: PostgreSQL behind a TCP proxy that dies, hangs and comes back.

Breaker intervals run on an injected fake clock (``Guard(clock=...)`` hands it to the breaker), so
nothing here waits for ``open_for``; the only real waits are connect timeouts against a blackhole.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy
from sqlalchemy import exc, text
from sqlalchemy.ext.asyncio import AsyncEngine

from poolguard import Breaker, BreakerState, CircuitOpen, Guard
from poolguard.guard import HEALTH_MAX_AGE
from tests.support.databases import DEAD_PORT, HOST, PG_PORT, pg_url
from tests.support.tcpproxy import TcpProxy

pytestmark = pytest.mark.postgres

EngineFactory = Callable[..., sqlalchemy.Engine]
GuardFactory = Callable[..., Guard]

FAILURES = 3
OPEN_FOR = 1.0


@pytest.fixture
def proxy() -> Iterator[TcpProxy]:
    with TcpProxy((HOST, PG_PORT)) as proxy:
        yield proxy


def proxied_url(proxy: TcpProxy, driver: str = "psycopg") -> str:
    return pg_url(driver, port=proxy.port)


def breaker() -> Breaker:
    return Breaker(consecutive_failures=FAILURES, open_for=OPEN_FOR, half_open_calls=2)


def query(guard: Guard) -> Any:
    with guard.session() as session:
        return session.execute(text("SELECT 1")).scalar()


def assert_opens_after_failures(guard: Guard) -> CircuitOpen:
    """FAILURES connection errors, then CircuitOpen at once; returns that CircuitOpen."""
    assert guard.breaker is not None
    for attempt in range(FAILURES):
        assert guard.breaker.state is BreakerState.CLOSED, f"opened early, after {attempt} failures"
        with pytest.raises(exc.OperationalError):
            query(guard)
    assert guard.breaker.state is BreakerState.OPEN
    started = time.monotonic()
    with pytest.raises(CircuitOpen) as raised:
        query(guard)
    assert time.monotonic() - started < 0.05
    assert 0 < raised.value.retry_after <= OPEN_FOR
    return raised.value


@pytest.fixture
def engine(proxy: TcpProxy, make_sync_engine: EngineFactory) -> sqlalchemy.Engine:
    return make_sync_engine(
        proxied_url(proxy),
        pool_size=2,
        max_overflow=0,
        pool_timeout=30,
        pool_pre_ping=True,
        connect_args={"connect_timeout": 1},
    )


def test_dead_server_opens_the_breaker_and_a_healed_one_closes_it(
    make_guard: GuardFactory, engine: sqlalchemy.Engine, proxy: TcpProxy, fake_clock: Any
):
    guard = make_guard(engine, breaker=breaker(), clock=fake_clock)
    assert query(guard) == 1

    proxy.stop()
    assert_opens_after_failures(guard)
    report = guard.health()
    assert report.status == "unavailable"
    assert report.http_status == 503
    [pool] = report.to_dict()["pools"]
    assert pool["breaker"]["state"] == "open"
    assert pool["breaker"]["retry_after"] > 0

    proxy.restart()
    with pytest.raises(CircuitOpen):  # still open: the server is back, but open_for has not elapsed
        query(guard)
    fake_clock.advance(OPEN_FOR + 0.1)
    assert guard.breaker is not None
    assert guard.breaker.state is BreakerState.HALF_OPEN
    assert query(guard) == 1
    assert query(guard) == 1  # half_open_calls=2 probes succeeded
    assert guard.breaker.state is BreakerState.CLOSED
    assert guard.health().status == "ok"


def test_blackholed_server_fails_within_the_connect_timeout_and_counts(
    make_guard: GuardFactory, engine: sqlalchemy.Engine, proxy: TcpProxy
):
    guard = make_guard(engine, breaker=Breaker(consecutive_failures=1, open_for=60.0))
    proxy.blackhole()
    started = time.monotonic()
    with pytest.raises(exc.OperationalError):
        query(guard)
    elapsed = time.monotonic() - started
    assert elapsed < 3.5, f"hung for {elapsed:.1f}s behind a blackhole"  # libpq/psycopg round 1 s up to 2 s
    assert guard.breaker is not None
    assert guard.breaker.state is BreakerState.OPEN
    started = time.monotonic()
    with pytest.raises(CircuitOpen):
        query(guard)
    assert time.monotonic() - started < 0.05
    proxy.heal()


def test_connection_killed_mid_use_counts_as_a_failure(
    make_guard: GuardFactory, engine: sqlalchemy.Engine, proxy: TcpProxy
):
    guard = make_guard(engine, breaker=Breaker(consecutive_failures=1, open_for=60.0))
    assert guard.breaker is not None

    def server_dies_mid_unit() -> None:
        with guard.session() as session:
            assert session.execute(text("SELECT 1")).scalar() == 1
            proxy.stop()
            session.execute(text("SELECT 2"))

    with pytest.raises(exc.OperationalError) as raised:
        server_dies_mid_unit()
    assert raised.value.connection_invalidated
    assert guard.breaker.state is BreakerState.OPEN
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    assert guard.stats().checked_out == 0


def test_unreachable_port_opens_the_breaker(make_guard: GuardFactory, make_sync_engine: EngineFactory, fake_clock: Any):
    engine = make_sync_engine(pg_url(port=DEAD_PORT), pool_size=2, max_overflow=0)
    guard = make_guard(engine, breaker=breaker(), clock=fake_clock)
    error = assert_opens_after_failures(guard)
    assert error.reason == "circuit_open"
    assert guard.health().status == "unavailable"


async def test_async_engine_breaker_opens_and_closes(
    make_async_guard: GuardFactory,
    make_async_engine_sa: Callable[..., AsyncEngine],
    proxy: TcpProxy,
    fake_clock: Any,
):
    engine = make_async_engine_sa(
        proxied_url(proxy, "asyncpg"),
        pool_size=2,
        max_overflow=0,
        pool_pre_ping=True,
        connect_args={"timeout": 2},
    )
    guard = make_async_guard(engine, breaker=breaker(), clock=fake_clock)
    assert guard.breaker is not None

    async def aquery() -> Any:
        async with guard.session() as session:
            return (await session.execute(text("SELECT 1"))).scalar()

    assert await aquery() == 1
    proxy.stop()
    for attempt in range(FAILURES):
        assert guard.breaker.state is BreakerState.CLOSED, f"opened early, after {attempt} failures"
        with pytest.raises((exc.DBAPIError, OSError)):
            await aquery()
    assert guard.breaker.state is BreakerState.OPEN
    started = time.monotonic()
    with pytest.raises(CircuitOpen) as raised:
        await aquery()
    assert time.monotonic() - started < 0.05
    assert raised.value.retry_after > 0
    assert (await guard.ahealth()).status == "unavailable"

    proxy.restart()
    fake_clock.advance(OPEN_FOR + 0.1)
    assert await aquery() == 1
    assert await aquery() == 1
    assert guard.breaker.state is BreakerState.CLOSED
    assert (await guard.ahealth()).status == "ok"


# --- a database that stops answering, with default settings -------------------------------------------------
# Real time here: the watchdog's thread, the probes and the network are what is under test. The bounds
# are the targets (2 s to detect, 1 s to recover) with room for a noisy two-core machine.

DETECT_WITHIN = 3.5
RECOVER_WITHIN = 2.0
FAST = 0.2


class Load:
    """Threads running one short query per unit of work in a loop, recording (start, seconds, outcome)."""

    def __init__(self, guard: Guard, threads: int = 3, pause: float = 0.0) -> None:
        self.guard = guard
        self.pause = pause
        self.outcomes: list[tuple[float, float, str]] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(10)
        assert not any(thread.is_alive() for thread in self._threads), "a unit of work never ended"

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                with self.guard.session() as session:
                    session.execute(text("SELECT pg_sleep(0.01)"))
                outcome = "ok"
            except Exception as error:  # what an adapter would answer
                unavailable = self.guard.unavailable_for(error)
                outcome = unavailable.reason if unavailable is not None else f"500 {type(error).__name__}"
            self.outcomes.append((started, time.monotonic() - started, outcome))
            self._stop.wait(self.pause if outcome == "ok" else 0.005)

    def since(self, moment: float) -> list[tuple[float, float, str]]:
        return [entry for entry in list(self.outcomes) if entry[0] >= moment]


def wait_for(condition: Callable[[], bool], within: float) -> float:
    """Seconds until ``condition()`` held; fails the test after ``within`` seconds."""
    started = time.monotonic()
    while not condition():
        elapsed = time.monotonic() - started
        assert elapsed < within, f"not within {within} s"
        time.sleep(0.01)
    return time.monotonic() - started


@pytest.mark.parametrize("pre_ping", [False, True], ids=["plain", "pre-ping"])
def test_blackholed_database_is_detected_shed_and_recovered_with_defaults(
    make_guard: GuardFactory, make_sync_engine: EngineFactory, proxy: TcpProxy, pre_ping: bool
):
    """A plain engine (no timeouts, as most apps build one) and a default Guard: nothing hangs.

    With a pre-ping, the hang is inside the checkout (the ping's read), before any holder exists;
    after the watchdog aborts it, SQLAlchemy's reconnect is refused by the open breaker at once.
    """
    engine = make_sync_engine(proxied_url(proxy), pool_pre_ping=pre_ping)
    guard = make_guard(engine)
    assert guard.breaker is not None
    # With pauses, idle connections are checked out (and pinged) while the database is already silent.
    with Load(guard, threads=4, pause=0.1 if pre_ping else 0.0) as load:
        wait_for(lambda: len(load.outcomes) > 10, 5)
        proxy.blackhole()
        outage = time.monotonic()
        detected = wait_for(lambda: guard.breaker is not None and guard.breaker.state is BreakerState.OPEN, 10)
        assert detected < DETECT_WITHIN
        detected_at = time.monotonic()
        assert guard.watchdog.confirmed == 1
        time.sleep(0.5)
        health_started = time.monotonic()
        assert guard.health().http_status == 503
        assert time.monotonic() - health_started < guard.ping_timeout + 0.5
        proxy.heal()
        healed = time.monotonic()
        recovered = wait_for(lambda: any(outcome == "ok" for _, _, outcome in load.since(healed)), 10)
        assert recovered < RECOVER_WITHIN
    during = [entry for entry in load.outcomes if outage - 0.1 <= entry[0] < healed]
    assert all(not outcome.startswith("500") for _, _, outcome in during), during
    assert max(seconds for _, seconds, _ in during) < DETECT_WITHIN + 0.5  # the hung calls were aborted
    shed = [seconds for started, seconds, outcome in during if started > detected_at]
    assert shed, "no request was shed after detection"
    shed.sort()
    assert shed[int(len(shed) * 0.95)] < FAST  # a noisy machine may stall one thread now and then
    assert shed[-1] < 1.0
    assert guard.breaker.state is BreakerState.CLOSED
    assert guard.health().status == "ok"


async def test_blackholed_database_behind_an_async_engine_is_detected_and_recovered(
    make_async_guard: GuardFactory, make_async_engine_sa: Callable[..., AsyncEngine], proxy: TcpProxy
):
    engine = make_async_engine_sa(proxied_url(proxy, "asyncpg"))
    guard = make_async_guard(engine)
    assert guard.breaker is not None
    outcomes: list[tuple[float, float, str]] = []
    stop = asyncio.Event()

    async def worker() -> None:
        while not stop.is_set():
            started = time.monotonic()
            try:
                async with guard.session() as session:
                    await session.execute(text("SELECT pg_sleep(0.01)"))
                outcome = "ok"
            except Exception as error:
                unavailable = guard.unavailable_for(error)
                outcome = unavailable.reason if unavailable is not None else f"500 {type(error).__name__}"
            outcomes.append((started, time.monotonic() - started, outcome))
            if outcome != "ok":
                await asyncio.sleep(0.005)

    async def until(condition: Callable[[], bool], within: float) -> float:
        started = time.monotonic()
        while not condition():
            assert time.monotonic() - started < within, f"not within {within} s"
            await asyncio.sleep(0.01)
        return time.monotonic() - started

    tasks = [asyncio.create_task(worker()) for _ in range(3)]
    try:
        await until(lambda: len(outcomes) > 10, 5)
        proxy.blackhole()
        outage = time.monotonic()
        assert await until(lambda: guard.breaker is not None and guard.breaker.state is BreakerState.OPEN, 10) < (
            DETECT_WITHIN
        )
        assert (await guard.ahealth()).http_status == 503
        proxy.heal()
        healed = time.monotonic()
        assert await until(lambda: any(o == "ok" for s, _, o in outcomes if s >= healed), 10) < RECOVER_WITHIN
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 10)
    during = [entry for entry in outcomes if outage - 0.1 <= entry[0] < healed]
    assert all(not outcome.startswith("500") for _, _, outcome in during), during
    assert max(seconds for _, seconds, _ in during) < DETECT_WITHIN + 0.5


def test_health_tells_the_truth_on_a_full_pool_and_concurrent_callers_share_one_probe(
    make_guard: GuardFactory, make_sync_engine: EngineFactory, proxy: TcpProxy
):
    engine = make_sync_engine(proxied_url(proxy), pool_size=1, max_overflow=0)
    guard = make_guard(engine)
    connects = proxy.connections
    with guard.connection():  # the pool's only connection is in use
        results: list[dict[str, Any]] = []
        callers = [threading.Thread(target=lambda: results.append(guard.health().to_dict())) for _ in range(5)]
        for caller in callers:
            caller.start()
        for caller in callers:
            caller.join(5)
        assert [report["status"] for report in results] == ["degraded"] * 5  # full, and the database answers
        assert all(report["pools"][0]["ping_seconds"] is not None for report in results)  # pinged, never skipped
        assert proxy.connections <= connects + 2  # the pool's connection, and one probe for all five
        proxy.blackhole()
        time.sleep(HEALTH_MAX_AGE)  # the result before the black hole answers for that long
        started = time.monotonic()
        assert guard.health().http_status == 503  # hung: 503 within the ping timeout, though the pool is full
        assert time.monotonic() - started < guard.ping_timeout + 0.5
        proxy.heal()
