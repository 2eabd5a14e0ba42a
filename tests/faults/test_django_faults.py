"""poolguard.django (ORM connections, ATOMIC_REQUESTS) while the private server fails; the app runs in
a child process (tests/faults/django_child.py) that the test drives one request at a time."""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.faults.helpers import SECRET, Reply, assert_503, assert_no_secret, names_in
from tests.support.child import PROJECT_ROOT
from tests.support.pgcluster import PgCluster
from tests.support.tcpproxy import TcpProxy

pytestmark = pytest.mark.postgres


class DjangoChild:
    """The child's app: ``request(method, path)`` sends one request and waits (bounded) for its answer."""

    def __init__(self, port: int, table: str, mode: str = "per-request", **environ: str) -> None:
        self.log = Path(tempfile.mkstemp(prefix="poolguard-django-", suffix=".log")[1])
        env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT), **environ}
        with self.log.open("w") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-W", "error", "-m", "tests.faults.django_child", str(port), table, mode],
                cwd=PROJECT_ROOT,
                env=env,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
            )

    def request(self, method: str, target: str, *, timeout: float = 20.0) -> Reply:
        assert self.process.stdin is not None
        assert self.process.stdout is not None
        self.process.stdin.write(f"{method} {target}\n")
        self.process.stdin.flush()
        ready, _, _ = select.select([self.process.stdout], [], [], timeout)
        assert ready, f"{method} {target}: no answer within {timeout}s; log: {self.log.read_text()[-2000:]}"
        line = self.process.stdout.readline()
        assert line, f"the child exited: {self.log.read_text()[-2000:]}"
        answer = json.loads(line)
        return Reply(
            answer["status"],
            {k.lower(): v for k, v in answer["headers"].items()},
            answer["body"].encode(),
            answer["seconds"],
        )

    def close(self) -> str:
        """Ends the child; its log."""
        assert self.process.stdin is not None
        self.process.stdin.close()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=5)
        finally:
            assert self.process.stdout is not None
            self.process.stdout.close()
        text = self.log.read_text()
        self.log.unlink()
        return text


@pytest.fixture
def django_app(proxy: TcpProxy, table: str) -> Iterator[DjangoChild]:
    child = DjangoChild(proxy.port, table)
    try:
        yield child
    finally:
        log = child.close()
        assert SECRET not in log, "the password was logged"
        assert "Traceback" not in log


def test_django_stopped_server_killed_query_and_auth_failure(
    django_app: DjangoChild, proxy: TcpProxy, cluster: PgCluster, table: str
) -> None:
    assert django_app.request("GET", "/one").status == 200
    assert django_app.request("POST", "/write/before").status == 200

    proxy.stop()  # the server is gone: refused
    down = django_app.request("POST", "/write/down")
    assert_503(down, "circuit_open")
    assert django_app.request("GET", "/nodb").status == 200
    proxy.restart()
    assert django_app.request("GET", "/one").status == 200

    # A backend killed in the middle of a write: 503, and the write is not committed.
    replies: list[Reply] = []

    def kill_soon() -> None:
        for _ in range(500):
            if cluster.terminate(query_like="%pg_sleep%"):
                return
            select.select([], [], [], 0.01)

    killer = threading.Thread(target=kill_soon)
    killer.start()
    replies.append(django_app.request("POST", "/write/killed?sleep=20"))
    killer.join()
    assert_503(replies[0], "circuit_open", within=5.0)
    assert django_app.request("POST", "/write/after").status == 200

    # Idle persistent-less connections terminated: the next request is served or shed, never a 500.
    cluster.terminate(state="idle")
    reply = django_app.request("GET", "/one")
    assert reply.status in (200, 503), reply.body[:300]

    # A wrong password on another alias: 503, and the password is never shown.
    for _ in range(2):
        wrong = django_app.request("GET", "/auth")
        assert_503(wrong, within=4.0)
        assert_no_secret(wrong.body)
    assert names_in(cluster, table) == {"before", "after"}
    assert cluster.idle_in_transaction() == []


DETECTION_WINDOW = 2.5


def served_again_within(app: DjangoChild, seconds: float) -> float:
    """Seconds until ``GET /one`` answers 200 again; every answer meanwhile is a 503, never a 500."""
    started = time.monotonic()
    while True:
        reply = app.request("GET", "/one")
        if reply.status == 200:
            return time.monotonic() - started
        assert reply.status == 503, reply.body[:300]
        assert time.monotonic() - started < seconds, f"not served again within {seconds}s"
        time.sleep(0.05)


@pytest.mark.parametrize("mode", ["persistent", "pool"])
@pytest.mark.parametrize("fault", ["refuse", "blackhole"])
def test_django_outage_is_shed_and_recovered_within_a_second_or_so(
    mode: str, fault: str, proxy: TcpProxy, table: str
) -> None:
    """Persistent connections (CONN_MAX_AGE) and Django's psycopg pool, with poolguard's defaults.

    Refused: the breaker opens on the failures. Black-holed: the request holding a connection hangs
    until the watchdog confirms the outage (about 2 s) and aborts it. Either way the next requests
    get a fast 503, and once the server is back the connections from before the outage are replaced
    (not tried and failed, which re-opened the breaker for longer): served again at once.
    """
    app = DjangoChild(proxy.port, table, mode)
    try:
        for _ in range(3):
            assert app.request("GET", "/one").status == 200
        if fault == "refuse":
            proxy.stop()
        else:
            proxy.blackhole()
        outage = time.monotonic()
        while time.monotonic() - outage < DETECTION_WINDOW:  # each bounded, a 503 (a hung one is aborted)
            assert_503(app.request("GET", "/one", timeout=10), within=4.0)
        fast = [app.request("GET", "/one") for _ in range(5)]
        for reply in fast:
            assert_503(reply, "circuit_open", within=0.2)
        assert app.request("GET", "/nodb").status == 200
        assert app.request("GET", "/health/db").status == 503
        if fault == "refuse":
            proxy.restart()
        else:
            proxy.heal()
        assert served_again_within(app, 3.0) < 2.0
        assert app.request("GET", "/health/db").status == 200
    finally:
        log = app.close()
    assert SECRET not in log
    assert "Traceback" not in log


def test_a_connection_set_up_on_a_server_gone_silent_is_aborted(proxy: TcpProxy, table: str, tmp_path: Path) -> None:
    """The server goes silent while a request's new connection is being set up (the app's own
    ``connection_created`` receiver runs a ``SET``): once the watchdog has confirmed the outage it aborts
    that connection, a 503 within seconds. (The proxy's kernel acknowledges every packet, so no TCP
    timeout would end the wait here.)"""
    app = DjangoChild(proxy.port, table, POOLGUARD_FAULTS_SILENCE_DIR=str(tmp_path))
    try:
        # The first request makes the thread's connection (the test client keeps it between requests).

        def silence_when_ready() -> None:
            deadline = time.monotonic() + 10.0
            while not (tmp_path / "ready").exists() and time.monotonic() < deadline:
                time.sleep(0.01)
            proxy.blackhole()
            (tmp_path / "silenced").touch()

        (tmp_path / "armed").touch()
        silencer = threading.Thread(target=silence_when_ready)
        silencer.start()
        hung = app.request("GET", "/one", timeout=15)
        silencer.join()
        assert (tmp_path / "silenced").exists()
        assert_503(hung, within=4.0)
        proxy.heal()
        assert served_again_within(app, 3.0) < 2.0  # a new connection, set up by the receiver as usual
    finally:
        log = app.close()
    assert SECRET not in log
    assert "Traceback" not in log


def test_doctor_answers_and_the_process_exits_with_a_blackholed_database(proxy: TcpProxy, table: str) -> None:
    """``manage.py poolguard doctor`` used to join its ping thread forever behind a black hole."""
    app = DjangoChild(proxy.port, table, "persistent")
    try:
        healthy = app.request("MANAGE", "poolguard")
        assert healthy.status == 200, healthy.body
        assert "status: ok" in healthy.body.decode()
        proxy.blackhole()
        hung = app.request("MANAGE", "poolguard", timeout=10)
        assert hung.status == 503, hung.body
        assert hung.seconds < 3.0
        assert "ping failed (PingTimeout)" in hung.body.decode()
        started = time.monotonic()
    finally:
        log = app.close()
    assert app.process.returncode == 0, log[-2000:]
    assert time.monotonic() - started < 5.0, "the process did not exit behind the black hole"
    assert SECRET not in log
