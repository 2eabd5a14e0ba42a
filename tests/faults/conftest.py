"""The fault suite's world: a private PostgreSQL cluster (and PgBouncer), a TCP proxy, tracked engines.

Every test here may stop, crash, restart or starve the private cluster; the shared server on 5432 is
never touched. After each test: the cluster is up again with its default settings, no backend of the
app is idle in a transaction, no engine has a connection checked out, and no log record (INFO and
above) holds the password that every app URL carries.
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest

from tests.faults.helpers import PASSWORD_ROLE, SECRET, Fleet
from tests.support.clock import wait_until
from tests.support.pgcluster import APP_USER, HOST, PgBouncer, PgCluster
from tests.support.tcpproxy import TcpProxy

MAX_CONNECTIONS = 40


@pytest.fixture(scope="session")
def cluster() -> Iterator[PgCluster]:
    with PgCluster.bootstrapped(max_connections=MAX_CONNECTIONS) as server:
        server.make_role(PASSWORD_ROLE, SECRET)
        yield server


@pytest.fixture(scope="session")
def bouncer(cluster: PgCluster) -> Iterator[PgBouncer]:
    pgbouncer = PgBouncer(cluster)
    try:
        pgbouncer.start()
        yield pgbouncer
    finally:
        pgbouncer.destroy()


@pytest.fixture(scope="session")
def default_bouncer(cluster: PgCluster) -> Iterator[PgBouncer]:
    """A PgBouncer as installed: it refuses startup parameters it does not know (nothing ignored)."""
    pgbouncer = PgBouncer(cluster, ignore_startup_parameters=None)
    try:
        pgbouncer.start()
        yield pgbouncer
    finally:
        pgbouncer.destroy()


def _quiet_backends(cluster: PgCluster) -> list[tuple[int, str, str]]:
    """The app's backends idle in a transaction, after giving closing connections a moment to go."""
    with contextlib.suppress(AssertionError):
        wait_until(lambda: not cluster.idle_in_transaction(), steps=500)
    return cluster.idle_in_transaction()


@pytest.fixture(autouse=True)
def _clean_cluster(cluster: PgCluster, caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Up with default settings before; after: nothing idle in transaction, no secret logged, clean slate."""
    caplog.set_level(logging.INFO)
    if not cluster.running or cluster.settings:
        cluster.restart()
    yield
    if not cluster.running or cluster.settings:
        cluster.restart()
    stuck = _quiet_backends(cluster)
    cluster.set_connection_limit(APP_USER, -1)
    cluster.terminate()
    leaked = [record.getMessage() for record in caplog.records if SECRET in record.getMessage()]
    assert not stuck, f"backends left idle in transaction: {stuck}"
    assert not leaked, f"the password was logged: {leaked}"


@pytest.fixture
def proxy(cluster: PgCluster) -> Iterator[TcpProxy]:
    with TcpProxy((HOST, cluster.port)) as tcp_proxy:
        yield tcp_proxy


@pytest.fixture
def table(cluster: PgCluster) -> Iterator[str]:
    """A fresh ``(id serial, name text unique)`` table owned by the app's role."""
    name = f"items_{uuid.uuid4().hex[:12]}"
    cluster.sql(f"CREATE TABLE {name} (id serial PRIMARY KEY, name text NOT NULL UNIQUE)")
    cluster.sql(f"ALTER TABLE {name} OWNER TO {APP_USER}")
    yield name
    cluster.sql(f"DROP TABLE IF EXISTS {name}")


@pytest.fixture
async def fleet() -> AsyncIterator[Fleet]:
    built = Fleet()
    yield built
    await built.release()
