"""The doctor's world: a private PostgreSQL cluster and PgBouncer where trouble is seeded, and a silent server.

The cluster's ``max_connections`` is small, so filling it takes a handful of connections. Every
connection a test opens goes through :class:`Held`, which closes them all after the test (a
statement still running is cancelled first), so no trouble outlives the test that seeded it.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest

from tests.support.pgcluster import APP_USER, DATABASE, HOST, PgBouncer, PgCluster

MAX_CONNECTIONS = 20
SECRET = "Doctor-Pw-5b2d8"
"""In URLs the doctor is given (ignored under trust auth); must never appear in its output."""
ADMIN = "console_admin"


@pytest.fixture(scope="session")
def cluster() -> Iterator[PgCluster]:
    with PgCluster.bootstrapped(max_connections=MAX_CONNECTIONS) as server:
        yield server


@pytest.fixture(scope="session")
def bouncer(cluster: PgCluster) -> Iterator[PgBouncer]:
    pgbouncer = PgBouncer(cluster, pool_size=2, admin_users=[ADMIN])
    try:
        pgbouncer.start()
        yield pgbouncer
    finally:
        pgbouncer.destroy()


class Held:
    """Connections a test opens to seed trouble, and statements it runs in the background."""

    def __init__(self) -> None:
        self.connections: list[Any] = []
        self.threads: list[threading.Thread] = []
        self.errors: list[BaseException] = []

    def pg(
        self, port: int, *, user: str = APP_USER, password: str | None = None, **kwargs: Any
    ) -> psycopg.Connection[Any]:
        connection = psycopg.connect(
            host=HOST, port=port, dbname=DATABASE, user=user, password=password, connect_timeout=5, **kwargs
        )
        self.connections.append(connection)
        return connection

    def add(self, connection: Any) -> Any:
        self.connections.append(connection)
        return connection

    def background(self, work: Callable[[], object]) -> None:
        """Runs ``work`` in a thread (a statement that blocks); its error, if any, is kept, not raised."""

        def run() -> None:
            try:
                work()
            except Exception as error:  # a cancelled statement ends this way
                self.errors.append(error)

        thread = threading.Thread(target=run, daemon=True)
        self.threads.append(thread)
        thread.start()

    def close(self) -> None:
        for connection in self.connections:
            cancel = getattr(connection, "cancel_safe", None)
            with contextlib.suppress(Exception):
                if cancel is not None:
                    cancel(timeout=5)
        for connection in self.connections:
            with contextlib.suppress(Exception):
                connection.close()
        for thread in self.threads:
            thread.join(timeout=15)
        assert not any(thread.is_alive() for thread in self.threads), "a seeded statement outlived its test"


@pytest.fixture
def held() -> Iterator[Held]:
    holder = Held()
    try:
        yield holder
    finally:
        holder.close()


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port whose listener never accepts: the kernel completes the handshake, nothing ever answers."""
    with socket.socket() as listener:
        listener.bind((HOST, 0))
        listener.listen(64)
        yield int(listener.getsockname()[1])
