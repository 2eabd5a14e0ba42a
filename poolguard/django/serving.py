"""How the project is served, as far as a system check can tell: ASGI or not, processes and threads.

Checks run in ``manage.py`` (``check``, ``runserver``, ``migrate``), rarely in the server process,
so each answer comes from what a deployment leaves where ``manage.py`` sees it too, in this order:

- ASGI: ``POOLGUARD["ASGI"]`` (or ``POOLGUARD_ASGI``) when set; else ``settings.ASGI_APPLICATION``
  (Channels, Daphne); ``"daphne"`` in ``INSTALLED_APPS`` (its ``runserver`` serves ASGI); an ASGI
  worker class in gunicorn's ``GUNICORN_CMD_ARGS`` (``-k uvicorn.workers.UvicornWorker``); an ASGI
  server in ``SERVER_SOFTWARE`` or as this process (uvicorn, daphne, hypercorn, granian); and a
  project whose ``asgi.py`` calls ``get_asgi_application`` while ``WSGI_APPLICATION`` names no module
  that exists. An ``asgi.py`` alone is no signal: ``startproject`` writes one next to ``wsgi.py``
  in every project, including the ones served by WSGI.
- Processes and threads: ``POOLGUARD["PROCESSES"]`` / ``["THREADS"]`` (or ``POOLGUARD_<KEY>``);
  else what :mod:`poolguard._serving` reads from the server (gunicorn's options, ``WEB_CONCURRENCY``).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from poolguard._serving import gunicorn_option, processes, threads

__all__ = ["ASGI_SERVERS", "asgi_signal", "gunicorn_option", "processes", "threads"]

ASGI_SERVERS = ("uvicorn", "daphne", "hypercorn", "granian")


def asgi_signal(
    declared: bool | None,
    settings: Any,
    *,
    environ: Mapping[str, str] | None = None,
    argv: Sequence[str] | None = None,
) -> str | None:
    """What says the project runs under ASGI (for the warning's text), or None when nothing does."""
    environ = os.environ if environ is None else environ
    argv = sys.argv if argv is None else argv
    if declared is not None:
        return "POOLGUARD['ASGI']" if declared else None
    if getattr(settings, "ASGI_APPLICATION", None):
        return "settings.ASGI_APPLICATION"
    if "daphne" in getattr(settings, "INSTALLED_APPS", ()):
        return "'daphne' in INSTALLED_APPS"
    worker_class = gunicorn_option(environ, ("-k", "--worker-class"))
    if worker_class is not None and any(word in worker_class.lower() for word in (*ASGI_SERVERS, "asgi")):
        return f"GUNICORN_CMD_ARGS (worker class {worker_class})"
    software = environ.get("SERVER_SOFTWARE", "").lower()
    for server in ASGI_SERVERS:
        if server in software:
            return f"SERVER_SOFTWARE ({server})"
    program = os.path.basename(argv[0]) if argv else ""
    for server in ASGI_SERVERS:
        if program.startswith(server):
            return f"the process ({server})"
    if _asgi_only_project(settings, environ):
        return "the project's asgi.py (and no WSGI application)"
    return None


def _asgi_only_project(settings: Any, environ: Mapping[str, str]) -> bool:
    """The settings' package has an ``asgi.py`` calling ``get_asgi_application``, and no WSGI module."""
    settings_module = getattr(settings, "SETTINGS_MODULE", None) or environ.get("DJANGO_SETTINGS_MODULE")
    if not settings_module or "." not in settings_module:
        return False
    asgi_source = _module_source(settings_module.rpartition(".")[0] + ".asgi")
    if asgi_source is None or "get_asgi_application" not in asgi_source:
        return False
    wsgi = getattr(settings, "WSGI_APPLICATION", None)
    return not wsgi or _module_source(str(wsgi).rpartition(".")[0]) is None


def _module_source(name: str) -> str | None:
    """A module's source, found without importing it (importing asgi.py would build an application)."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return None
    try:
        with open(spec.origin, encoding="utf-8") as source:
            return source.read()
    except OSError:
        return None
