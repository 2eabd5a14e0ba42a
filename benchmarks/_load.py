"""What the load benchmarks (``benchmarks.outage``, ``benchmarks.overload``) share: the client and the servers.

The client is asyncio, one new TCP connection per request (``Connection: close``), each request with
its own deadline: a request is never queued behind another on a kept-alive connection, so open-loop
arrivals reach the server when they are due and a slow answer delays no one else's. The servers are
the rows' apps (``benchmarks/apps/outage_app.py``) under gunicorn (gthread, one worker) or uvicorn
(one worker), each in a process group of its own so it is stopped with its workers, and stopped on
the way out whatever happens (``atexit``).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import math
import os
import signal
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from benchmarks.server import HOST, ROOT, free_port

NO_ANSWER = -1
"""The status of a request with no answer within its deadline."""
BROKEN = 0
"""The status of a request whose connection failed or closed without a status line."""


@dataclass(slots=True)
class Sample:
    route: str
    sent: float
    status: int
    latency: float
    """Seconds to the whole answer; ``math.inf`` with no answer within the deadline."""

    @property
    def done(self) -> float:
        return self.sent + self.latency


def p99(latencies: list[float]) -> float:
    """Nearest rank; an unanswered request is ``math.inf``."""
    return percentile(latencies, 0.99)


def percentile(latencies: list[float], share: float) -> float:
    """Nearest rank (``share`` 0.5: the median, 0.99: the p99); ``math.nan`` for no latencies."""
    if not latencies:
        return math.nan
    ordered = sorted(latencies)
    return ordered[max(0, math.ceil(share * len(ordered)) - 1)]


def counts(samples: list[Sample]) -> str:
    """Statuses and how many of each, ``none`` for no answer and ``broken`` for a failed connection."""
    names = {NO_ANSWER: "none", BROKEN: "broken"}
    tally = Counter(names.get(s.status, str(s.status)) for s in samples)
    return " ".join(f"{status}:{n}" for status, n in sorted(tally.items()))


def cell(values: list[float], show: Callable[[float], str], cap: str | None = None) -> str:
    """The median over runs, and the range when the runs differ (``cap`` shows an infinite value)."""

    def shown(value: float) -> str:
        return cap if cap is not None and math.isinf(value) else show(value)

    middle = statistics.median_low(values) if any(math.isinf(v) for v in values) else statistics.median(values)
    low, high = min(values), max(values)
    if len(values) == 1 or low == high:
        return shown(middle)
    return f"{shown(middle)} ({shown(low)} to {shown(high)})"


# -- the client ----------------------------------------------------------------------------------------


async def fetch(port: int, route: str, path: str, samples: list[Sample], deadline: float) -> None:
    """One request on a connection of its own; its sample is added when it is answered or given up on."""
    sent = time.monotonic()
    status = BROKEN
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(deadline):
            reader, writer = await asyncio.open_connection(HOST, port)
            writer.write(f"GET {path} HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n".encode())
            line = await reader.readline()
            parts = line.split()
            if len(parts) >= 2 and parts[1].isdigit():
                status = int(parts[1])
            await reader.read()  # to the end: the server closes after the answer
        latency = time.monotonic() - sent
    except TimeoutError:
        status, latency = NO_ANSWER, math.inf
    except OSError:
        status, latency = BROKEN, time.monotonic() - sent
    finally:
        if writer is not None:
            writer.transport.abort()
    samples.append(Sample(route, sent, status, latency))


# -- servers ----------------------------------------------------------------------------------------


_servers: set[subprocess.Popen[bytes]] = set()


def stop_server(server: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the server's process group (its workers too), SIGKILL after 3 s."""
    if server.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=3)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=10)
    _servers.discard(server)


@atexit.register
def _stop_all() -> None:
    for server in list(_servers):
        stop_server(server)


def server_command(row: str, port: int, threads: int) -> list[str]:
    """uvicorn (one worker) for the FastAPI rows, gunicorn (gthread, 1 worker x ``threads``) for the others."""
    if row.startswith("fastapi"):
        return [sys.executable, "-m", "uvicorn", "benchmarks.apps.outage_app:app", "--host", HOST,
                "--port", str(port), "--workers", "1", "--no-access-log", "--log-level", "warning",
                "--timeout-graceful-shutdown", "2"]  # fmt: skip
    return [sys.executable, "-m", "gunicorn", "--worker-class", "gthread", "--workers", "1",
            "--threads", str(threads), "--bind", f"{HOST}:{port}", "--log-level", "warning",
            "--graceful-timeout", "2", "benchmarks.apps.outage_app:app"]  # fmt: skip


@contextlib.contextmanager
def serving(
    row: str, variant: str, db_port: int, log: Path, *, threads: int, env: Mapping[str, str] | None = None
) -> Iterator[int]:
    """A fresh server for one variant of one row, its database on ``db_port``; yields its port once it serves."""
    with serve(row, variant, db_port, log, threads=threads, env=env) as (port, _):
        yield port


@contextlib.contextmanager
def serve(
    row: str, variant: str, db_port: int, log: Path, *, threads: int, env: Mapping[str, str] | None = None
) -> Iterator[tuple[int, subprocess.Popen[bytes]]]:
    """As :func:`serving`, and the server's process too (its process group's id is its pid).

    The server's environment is the caller's without any ``POOLGUARD_*`` or ``BENCH_*`` variable (an
    option left in the shell would silently tune the guarded variant), plus the row's ``BENCH_*``
    settings and ``env``; ``PYTHONPATH`` starts with the repository root, so the server imports the
    checked-out ``poolguard`` and ``benchmarks``.
    """
    port = free_port()
    server_env = {key: value for key, value in os.environ.items() if not key.startswith(("POOLGUARD_", "BENCH_"))}
    server_env.pop("DJANGO_SETTINGS_MODULE", None)
    server_env.update(
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), server_env.get("PYTHONPATH")])),
        BENCH_ROW=row,
        BENCH_VARIANT=variant,
        BENCH_DB_PORT=str(db_port),
        BENCH_THREADS=str(threads),
    )
    server_env.update(env or {})
    with log.open("wb") as out:
        server = subprocess.Popen(
            server_command(row, port, threads),
            cwd=ROOT,
            env=server_env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    _servers.add(server)
    try:
        asyncio.run(ready(port, server, log))
        yield port, server
    finally:
        stop_server(server)


async def ready(port: int, server: subprocess.Popen[bytes], log: Path) -> None:
    """Up (``/nodb`` 200) within 60 s, then ten ``/db`` requests in a row answered 200 (the pool warm)."""
    samples: list[Sample] = []
    deadline = time.monotonic() + 60
    while True:
        await fetch(port, "nodb", "/nodb", samples, 5.0)
        if samples[-1].status == 200:
            break
        if server.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the server did not start:\n{log.read_text()[-3000:]}")
        await asyncio.sleep(0.2)
    for _ in range(10):
        await fetch(port, "db", "/db", samples, 5.0)
        if samples[-1].status != 200:
            raise RuntimeError(
                f"/db answered {samples[-1].status} while the server warmed up:\n{log.read_text()[-3000:]}"
            )
