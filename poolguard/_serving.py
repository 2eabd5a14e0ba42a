"""How the process is served, as far as the app can tell: the server's processes and threads.

Shedding needs the queue to form where poolguard sees it: with no more server threads than the
pool has connections, excess requests wait in the server's own queue (gunicorn's), and poolguard
never gets to refuse them. The adapters compare the server's threads with the pool's capacity at
startup, and Django's checks do in ``manage.py``, from what a deployment leaves visible to both:

- Processes: a configured value; else gunicorn's ``--workers`` (``-w``) in ``GUNICORN_CMD_ARGS`` or
  on gunicorn's command line; else ``WEB_CONCURRENCY`` (read by gunicorn and uvicorn, set by Heroku
  and Render); else 1 (``"default"``).
- Threads: a configured value; else gunicorn's ``--threads`` in ``GUNICORN_CMD_ARGS`` or on its
  command line; else 1 (``"default"``: unknown, e.g. a gunicorn config file or another server).
"""

from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Mapping, Sequence

DEFAULT = "default"
"""The source of a count nothing configured: 1, and not to be trusted for a warning."""


def gunicorn_option(
    environ: Mapping[str, str], names: tuple[str, ...], argv: Sequence[str] | None = None
) -> str | None:
    """The value of one of gunicorn's options (the last one given), from ``GUNICORN_CMD_ARGS`` and,
    when ``argv`` is gunicorn's command line (a worker's ``sys.argv`` is its arbiter's), from there."""
    try:
        words = shlex.split(environ.get("GUNICORN_CMD_ARGS", ""))
    except ValueError:
        words = []
    if argv and _is_gunicorn(argv):
        words = [*words, *argv[1:]]
    found = None
    for index, word in enumerate(words):
        for name in names:
            if word == name and index + 1 < len(words):
                found = words[index + 1]
            elif name.startswith("--") and word.startswith(name + "="):
                found = word[len(name) + 1 :]
            elif not name.startswith("--") and word.startswith(name) and len(word) > len(name):
                found = word[len(name) :]
    return found


def _is_gunicorn(argv: Sequence[str]) -> bool:
    program = os.path.basename(argv[0]) if argv else ""
    return program.startswith("gunicorn") or (program.startswith("python") and "gunicorn" in argv[1:3])


def _count(value: str | None) -> int | None:
    try:
        number = int(value) if value is not None else None
    except ValueError:
        return None
    return number if number is not None and number > 0 else None


def processes(
    configured: int | None, environ: Mapping[str, str] | None = None, argv: Sequence[str] | None = None
) -> tuple[int, str]:
    """The server's processes, and where that number comes from."""
    environ = os.environ if environ is None else environ
    if configured is not None:
        return configured, "PROCESSES"
    workers = _count(gunicorn_option(environ, ("-w", "--workers"), sys.argv if argv is None else argv))
    if workers is not None:
        return workers, "gunicorn --workers"
    concurrency = _count(environ.get("WEB_CONCURRENCY"))
    if concurrency is not None:
        return concurrency, "WEB_CONCURRENCY"
    return 1, DEFAULT


def threads(
    configured: int | None, environ: Mapping[str, str] | None = None, argv: Sequence[str] | None = None
) -> tuple[int, str]:
    """Threads per process, and where that number comes from."""
    environ = os.environ if environ is None else environ
    if configured is not None:
        return configured, "THREADS"
    count = _count(gunicorn_option(environ, ("--threads",), sys.argv if argv is None else argv))
    if count is not None:
        return count, "gunicorn --threads"
    return 1, DEFAULT


def queue_hidden(server_threads: int, capacity: int | None) -> bool:
    """Whether requests beyond the pool's capacity wait in the server, out of poolguard's sight."""
    return capacity is not None and server_threads <= capacity


def threads_advice(server_threads: int, source: str, capacity: int) -> str:
    """The WARNING's text: what is wrong and what to set."""
    return (
        f"the server runs {server_threads} threads per process ({source}) and the pool has {capacity} connections: "
        "requests beyond the pool's capacity wait in the server's queue, where poolguard cannot refuse them, so "
        f"overload is answered late instead of with a fast 503; run at least {2 * capacity} threads "
        f"(gunicorn --threads {2 * capacity}), about twice the pool, so the excess reaches poolguard"
    )


def hidden_queue_warning(capacity: int | None, configured_threads: int | None = None) -> str | None:
    """The startup WARNING's text when the server's threads are known not to outnumber ``capacity``, else None."""
    count, source = threads(configured_threads)
    if source == DEFAULT or capacity is None or not queue_hidden(count, capacity):
        return None
    return threads_advice(count, source, capacity)
