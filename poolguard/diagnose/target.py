"""Which server the doctor (and ``poolguard budget --url``) reads, from a URL or Django's settings,
the one live session it holds, and the deadline it is read within.

A target keeps its password out of ``repr`` and renders itself redacted; :meth:`Target.redact`
scrubs the password from any text (a driver's error message can echo the DSN), so nothing the
doctor prints can hold it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar
from urllib.parse import parse_qsl, quote, unquote, urlsplit

from poolguard.pools import shutdown_socket

Kind = Literal["postgresql", "mysql", "pgbouncer"]
T = TypeVar("T")

_SCHEMES: dict[str, Kind] = {"postgresql": "postgresql", "postgres": "postgresql", "mysql": "mysql", "mariadb": "mysql"}
_PORTS: dict[Kind, int] = {"postgresql": 5432, "pgbouncer": 6432, "mysql": 3306}
PGBOUNCER_DATABASE = "pgbouncer"
"""The database name of PgBouncer's admin console: a URL naming it is examined as a PgBouncer."""

_DJANGO_ONLY_OPTIONS = frozenset({"pool", "isolation_level", "server_side_binding", "assume_role", "init_command"})
"""Django OPTIONS keys that are Django's own, not the driver's."""

URL_HELP = (
    "expected postgresql://user[:password]@host[:port]/dbname (PgBouncer's admin console: dbname pgbouncer) "
    "or mysql://user[:password]@host[:port]/dbname; SQLAlchemy forms such as postgresql+psycopg:// "
    "and mysql+pymysql:// are accepted"
)


class TargetError(ValueError):
    """The URL or settings do not name a server the doctor can examine; the message never holds the password."""


@dataclass(frozen=True, slots=True)
class Target:
    """A server to examine: where it is and how to log in. ``options`` are extra driver parameters.

    An empty ``host`` is libpq's default (the local Unix socket), as in Django's settings.
    """

    kind: Kind
    host: str
    port: int
    user: str | None
    password: str | None = field(repr=False)
    database: str | None
    options: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def shown(self) -> str:
        """The target as a URL with the password masked, for every message."""
        scheme = "mysql" if self.kind == "mysql" else "postgresql"
        credentials = quote(self.user or "", safe="")
        if self.password:
            credentials += ":***"
        at = f"{credentials}@" if credentials else ""
        host = f"[{self.host}]" if ":" in self.host else self.host or "localhost"
        return f"{scheme}://{at}{host}:{self.port}/{self.database or ''}"

    def redact(self, text: str) -> str:
        """``text`` with the password (as given and URL-encoded) replaced by ``***``."""
        if self.password:
            for form in {self.password, quote(self.password, safe=""), quote(self.password)}:
                text = text.replace(form, "***")
        return text

    def describe(self, error: BaseException) -> str:
        """The error's class and the first line of its message, with the password scrubbed."""
        lines = str(error).strip().splitlines()
        detail = self.redact(lines[0].strip() if lines else "")
        return f"{type(error).__name__}" + (f": {detail}" if detail else "")


def parse_url(url: str) -> Target:
    """A :class:`Target` from a URL; :class:`TargetError` (without the URL's text) when it names none."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError:
        raise TargetError(f"not a database URL; {URL_HELP}") from None
    kind = _SCHEMES.get(parts.scheme.partition("+")[0].lower())
    if kind is None or not parts.hostname:
        what = f"unsupported scheme {parts.scheme!r}" if kind is None else "no host in the URL"
        raise TargetError(f"{what}; {URL_HELP}")
    database = unquote(parts.path.lstrip("/")) or None
    if kind == "postgresql" and database == PGBOUNCER_DATABASE:
        kind = "pgbouncer"
    return Target(
        kind=kind,
        host=parts.hostname,
        port=port or _PORTS[kind],
        user=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password is not None else None,
        database=database,
        options=dict(parse_qsl(parts.query)) if kind != "mysql" else {},
    )


def target_from_django(settings: Mapping[str, Any]) -> Target | None:
    """A :class:`Target` from one ``settings.DATABASES`` entry; None for a backend the doctor does not know."""
    engine = str(settings.get("ENGINE", ""))
    kind: Kind
    if "postgresql" in engine or "postgis" in engine:
        kind = "postgresql"
    elif "mysql" in engine:
        kind = "mysql"
    else:
        return None
    database = str(settings.get("NAME") or "") or None
    if kind == "postgresql" and database == PGBOUNCER_DATABASE:
        kind = "pgbouncer"
    raw_options = settings.get("OPTIONS") or {}
    options = {
        key: value
        for key, value in raw_options.items()
        if key not in _DJANGO_ONLY_OPTIONS and isinstance(value, str | int | float) and not isinstance(value, bool)
    }
    if kind == "mysql":
        options = {key: value for key, value in options.items() if key == "charset"}
    return Target(
        kind=kind,
        host=str(settings.get("HOST") or ("" if kind != "mysql" else "localhost")),
        port=int(settings.get("PORT") or _PORTS[kind]),
        user=str(settings.get("USER") or "") or None,
        password=str(settings.get("PASSWORD") or "") or None,
        database=database,
        options=options,
    )


class Session:
    """The doctor's one live connection, seen from the thread that waits for it.

    When the diagnosis runs past its deadline, :meth:`abort` shuts the connection's socket down,
    so a read blocked on a silent server ends at once instead of lingering; a connection attached
    after that is refused.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._fileno: int | None = None
        self.connected = False
        self.aborted = False

    def attach(self, fileno: int | None) -> None:
        """The connection is up; raises TimeoutError when the deadline has already passed."""
        with self._lock:
            if self.aborted:
                raise TimeoutError("the doctor's deadline passed while it connected")
            self._fileno = fileno
            self.connected = True

    def abort(self) -> None:
        with self._lock:
            self.aborted = True
            shutdown_socket(self._fileno)


class NoAnswer(TimeoutError):
    """The work did not end by its deadline; its session was shut down."""


def within(seconds: float, session: Session, work: Callable[[], T], *, name: str) -> T:
    """``work()`` run in a daemon thread and waited on at most ``seconds``: its result, or its exception.

    Past the deadline the session is aborted (a read blocked on a silent server ends, so the thread
    does too) and :class:`NoAnswer` is raised; a connect still under way ends at its own timeout.
    """
    outcome: list[T] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            outcome.append(work())
        except BaseException as error:  # raised again in the caller's thread
            errors.append(error)

    worker = threading.Thread(target=run, name=name, daemon=True)
    worker.start()
    worker.join(max(0.0, seconds))
    if worker.is_alive():
        session.abort()
        raise NoAnswer(f"no answer within {seconds:.3g} s")
    if errors:
        raise errors[0]
    return outcome[0]
