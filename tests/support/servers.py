"""A web server in a subprocess, as the end-to-end tests run one: its output in a file, never a pipe.

(A pipe nobody reads fills up and stalls the server; a file is read when a test fails or asks.)
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import httpx

from tests.support.pgcluster import free_port

__all__ = ["ServerProcess", "free_port", "serving"]


class ServerProcess:
    """``command`` (with ``{port}`` in it: a free one is given) run in ``cwd`` with ``env``."""

    def __init__(self, command: Sequence[str], *, cwd: Path, env: Mapping[str, str], log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.env = dict(env)
        with log.open("wb") as output:
            self.process = subprocess.Popen(
                [word.format(port=self.port) for word in command],
                cwd=cwd,
                env=self.env,
                stdout=output,
                stderr=subprocess.STDOUT,
            )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_ready(self, path: str = "/", timeout: float = 20.0) -> None:
        """Until ``path`` answers anything; fails the test with the server's output if it exits or never does."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"the server exited with {self.process.returncode}:\n{self.output()}")
            try:
                httpx.get(self.url + path, timeout=0.5)
                return
            except httpx.TransportError:
                time.sleep(0.1)
        raise AssertionError(f"the server at {self.url} was not ready after {timeout}s:\n{self.output()}")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@contextmanager
def serving(
    command: Sequence[str], *, cwd: Path, env: Mapping[str, str], log: Path, ready: str = "/"
) -> Iterator[ServerProcess]:
    """A started server, ready at ``ready``, stopped at the end."""
    server = ServerProcess(command, cwd=cwd, env=env, log=log)
    try:
        server.wait_ready(ready)
        yield server
    finally:
        server.stop()
