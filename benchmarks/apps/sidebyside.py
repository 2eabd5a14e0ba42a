"""The WSGI app of one server of ``benchmarks.sidebyside``, chosen by ``BENCH_APP`` and ``BENCH_VARIANT``.

- ``fsa``: the Flask-SQLAlchemy factory app of ``tests/apps`` (Flask-SQLAlchemy's defaults: pool
  5 + 10); ``guarded`` is the app as written (``PoolGuard(app)``, the one line the guide adds),
  ``bare`` the same app with that line taken out. Route ``GET /authors/1``: ``db.get_or_404``.
- ``select1``: ``benchmarks.apps.flask_app`` (QueuePool 4 + 0), ``GET /select1``.
"""

from __future__ import annotations

import os
from typing import Any

from flask import Flask


def _fsa(variant: str) -> Flask:
    import tests.apps.flask_sqlalchemy_app as fsa  # noqa: PLC0415

    if variant == "bare":
        setattr(fsa, "PoolGuard", lambda app: None)  # noqa: B010 (the adoption line, taken out)
    url = os.environ.get("BENCH_URL", "postgresql+psycopg://root@127.0.0.1:5432/test")
    return fsa.create_app({"SQLALCHEMY_DATABASE_URI": url})


def _select1(variant: str) -> Flask:
    from benchmarks.apps import flask_app  # noqa: PLC0415

    return flask_app.make(variant)


def make() -> Any:
    variant = os.environ["BENCH_VARIANT"]
    if os.environ["BENCH_APP"] == "fsa":
        return _fsa(variant)
    return _select1(variant)


wsgi = make()
