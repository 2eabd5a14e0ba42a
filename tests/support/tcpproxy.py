"""A small threaded TCP forwarder on loopback, for injecting network faults into real connections.

::

    with TcpProxy((HOST, PG_PORT)) as proxy:   # from tests.support.databases
        url = pg_url(port=proxy.port)
        proxy.stop()       # the server "dies": live connections are reset, new connects are refused
        proxy.restart()    # it is back, on the same port
        proxy.blackhole()  # it hangs: connects are accepted, nothing is forwarded or answered
        proxy.heal()       # it answers again (held connections are forwarded from where they were)
        proxy.reset_connections()   # every live connection gets a RST; new ones are still accepted
        proxy.latency = 0.1         # each forwarded chunk waits 0.1 s first (both directions)
        proxy.connect_delay = 3.0   # a new connection is accepted, then waits 3 s before it is forwarded

``accepted`` counts the connections accepted since the proxy was made (connect attempts that got
through the listener), for tests that bound how often a client reconnects.

Each client connection gets one daemon thread that owns both its sockets (so a reset never races
a ``select`` in another thread); there are at most ``max_connections`` of them, and a connection
over the limit is reset at once. Nothing ever listens beyond 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import select
import socket
import struct
import threading
from types import TracebackType

_LOOPBACK = "127.0.0.1"
_POLL = 0.05
_CHUNK = 65536


def _abort(sock: socket.socket | None) -> None:
    """Closes with a TCP RST (SO_LINGER 0), the way a crashed server or a dropped route looks."""
    if sock is None:
        return
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


class _Link:
    """One client connection and, once forwarded, its upstream connection."""

    def __init__(self, proxy: TcpProxy, client: socket.socket) -> None:
        self.proxy = proxy
        self.client = client
        self.upstream: socket.socket | None = None
        self.killed = threading.Event()
        self.thread = threading.Thread(target=self._run, name=f"tcpproxy-link-{proxy.port}", daemon=True)

    def _run(self) -> None:
        graceful = False
        try:
            graceful = self._pump()
        except OSError:
            graceful = False
        finally:
            if graceful and not self.killed.is_set():
                self.client.close()
                if self.upstream is not None:
                    self.upstream.close()
            else:
                _abort(self.client)
                _abort(self.upstream)
            self.proxy._forget(self)

    def _pump(self) -> bool:
        """Forwards both ways until one side closes (True) or the link is killed (False)."""
        while not self.killed.is_set():
            if self.proxy.blackholed:
                # A hung server: read nothing, answer nothing, forward nothing.
                self.killed.wait(_POLL)
                continue
            if self.upstream is None:
                if self.proxy.connect_delay and self.killed.wait(self.proxy.connect_delay):
                    break  # reset while it waited
                self.upstream = socket.create_connection(self.proxy.target, timeout=self.proxy.connect_timeout)
                self.upstream.settimeout(self.proxy.io_timeout)
                self.client.settimeout(self.proxy.io_timeout)
            readable, _, _ = select.select([self.client, self.upstream], [], [], _POLL)
            for source in readable:
                sink = self.upstream if source is self.client else self.client
                data = source.recv(_CHUNK)
                if not data:
                    return True
                if self.proxy.latency and self.killed.wait(self.proxy.latency):
                    break
                sink.sendall(data)
        return False


class TcpProxy:
    """Forwards ``127.0.0.1:<port>`` to ``target``; see the module docstring for the fault controls."""

    def __init__(
        self,
        target: tuple[str, int],
        *,
        port: int = 0,
        max_connections: int = 64,
        connect_timeout: float = 2.0,
        io_timeout: float = 5.0,
    ) -> None:
        self.target = target
        self.port = port
        self.max_connections = max_connections
        self.connect_timeout = connect_timeout
        self.io_timeout = io_timeout
        self.blackholed = False
        self.latency = 0.0
        """Seconds each forwarded chunk waits before it is sent on (0: none)."""
        self.connect_delay = 0.0
        """Seconds a new connection waits, accepted, before the proxy connects it upstream (0: none)."""
        self.accepted = 0
        self._lock = threading.Lock()
        self._links: set[_Link] = set()
        self._listener: socket.socket | None = None
        self._accepting = threading.Event()
        self._acceptor: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        return (_LOOPBACK, self.port)

    @property
    def connections(self) -> int:
        """Live client connections (forwarded or held by a blackhole)."""
        with self._lock:
            return len(self._links)

    # -- control ---------------------------------------------------------------------------------

    def start(self) -> TcpProxy:
        """Listens (on a free port the first time, on the same port afterwards) and starts forwarding."""
        if self._listener is not None:
            return self
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            listener.bind((_LOOPBACK, self.port))
            listener.listen(self.max_connections)
        except OSError:
            listener.close()
            raise
        listener.settimeout(_POLL)
        self.port = listener.getsockname()[1]
        self._listener = listener
        self._accepting.set()
        self._acceptor = threading.Thread(
            target=self._accept_loop, args=(listener,), name="tcpproxy-accept", daemon=True
        )
        self._acceptor.start()
        return self

    def stop(self) -> None:
        """The server dies: the listener closes (connects are refused) and every live connection is reset."""
        self._accepting.clear()
        acceptor, self._acceptor = self._acceptor, None
        if acceptor is not None:
            acceptor.join(timeout=2.0)
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()
        self.reset_connections()

    def restart(self) -> TcpProxy:
        """Listens again on the same port (after :meth:`stop`)."""
        self.stop()
        return self.start()

    def reset_connections(self) -> None:
        """Resets every live connection (both sides see a RST) but keeps listening."""
        with self._lock:
            links = list(self._links)
        for link in links:
            link.killed.set()
        for link in links:
            link.thread.join(timeout=2.0)

    def blackhole(self) -> None:
        """The server hangs: connections are accepted (and held) but nothing is forwarded or answered."""
        self.blackholed = True

    def heal(self) -> None:
        """Forwarding resumes, for held connections too."""
        self.blackholed = False

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "stopped" if self._listener is None else "blackholed" if self.blackholed else "forwarding"
        return f"<TcpProxy 127.0.0.1:{self.port} -> {self.target[0]}:{self.target[1]} {state}>"

    # -- internals -------------------------------------------------------------------------------

    def _accept_loop(self, listener: socket.socket) -> None:
        while self._accepting.is_set():
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            link = _Link(self, client)
            with self._lock:
                self.accepted += 1
                admitted = len(self._links) < self.max_connections and self._accepting.is_set()
                if admitted:
                    self._links.add(link)
            if not admitted:
                _abort(client)
                continue
            link.thread.start()

    def _forget(self, link: _Link) -> None:
        with self._lock:
            self._links.discard(link)
