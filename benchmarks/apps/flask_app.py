"""The Flask benchmark app, one ``Flask`` per variant (see ``common.COMPARISONS``); psycopg, QueuePool 4 + 0.

``outage()`` is the outage and overload benchmarks' app (``benchmarks.outage``, ``benchmarks.overload``): each
variant built as its users build it.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from flask import Flask
from sqlalchemy.orm import sessionmaker

import poolguard
from benchmarks.apps import common
from poolguard.flask import PoolGuard, db


def _engine() -> sa.Engine:
    return sa.create_engine(common.SYNC_URL, pool_size=4, max_overflow=0)


def bare(*, instrumented: bool = False) -> Flask:
    engine = _engine()
    if instrumented:
        common.instrument_sqlalchemy(engine)
    session_factory = sessionmaker(engine, expire_on_commit=False)
    app = Flask("bare")

    @app.get("/select1")
    def select1() -> dict[str, int]:
        with session_factory.begin() as session:
            return {"one": session.execute(common.SELECT_1).scalar_one()}

    return app


def guarded(**guard_options: Any) -> Flask:
    app = Flask("guarded")
    PoolGuard(app, poolguard.Guard(_engine(), name="bench", **guard_options))

    @app.get("/select1")
    def select1() -> dict[str, int]:
        return {"one": db.execute(common.SELECT_1).scalar_one()}

    return app


def make(variant: str) -> Flask:
    if variant == "bare":
        return bare()
    if variant == "otel":
        return bare(instrumented=True)
    return guarded(**common.guard_options(variant))


def outage(variant: str, port: int, *, threads: int, pool: int | None = None) -> Flask:
    """``GET /db`` (a 10 ms query), ``GET /work`` (``common.HOLD``), ``GET /nodb`` (no database) and
    ``GET /health/db``, as users write them.

    - ``bare``: no poolguard, SQLAlchemy's own defaults (``create_engine(url)``: pool 5 + 10, no
      timeouts), and the health route such an app has: ``SELECT 1`` on the engine;
    - ``guarded``: as the README adopts poolguard: ``poolguard.create_engine(url, service_name=...,
      workers=<server threads>)``, ``PoolGuard(app, poolguard.Guard(engine))``, defaults throughout;
    - ``own-engine``: the bare app's engine under ``PoolGuard(app, poolguard.Guard(engine))``, as an
      app that builds its own engine (Flask-SQLAlchemy) adopts poolguard.

    ``pool`` (the overload benchmark): every variant's engine gets ``pool_size=pool, max_overflow=0``,
    passed as a user sizes a pool (to ``poolguard.create_engine`` too, where it wins over ``workers``),
    so bare and guarded have the same capacity whatever the server's thread count.
    """
    url = common.sync_url(port)
    sizing: dict[str, int] = {} if pool is None else {"pool_size": pool, "max_overflow": 0}
    overflow = None if pool is None else 0
    app = Flask(variant)
    if variant == "bare":
        engine = sa.create_engine(url, **sizing)
        session_factory = sessionmaker(engine)

        @app.get("/db")
        def work() -> dict[str, bool]:
            with session_factory.begin() as session:
                session.execute(common.WORK)
            return {"ok": True}

        @app.get("/work")
        def hold() -> dict[str, bool]:
            with session_factory.begin() as session:
                session.execute(common.HOLD)
            return {"ok": True}

        @app.get("/health/db")
        def health() -> dict[str, str]:
            with engine.connect() as connection:
                connection.execute(common.SELECT_1)
            return {"status": "ok"}

    else:
        if variant == "guarded":
            engine = poolguard.create_engine(
                url, service_name="outage-bench", workers=threads, pool_size=pool, max_overflow=overflow
            )
        else:
            engine = sa.create_engine(url, **sizing)
        PoolGuard(app, poolguard.Guard(engine))

        @app.get("/db")
        def guarded_work() -> dict[str, bool]:
            db.execute(common.WORK)
            return {"ok": True}

        @app.get("/work")
        def guarded_hold() -> dict[str, bool]:
            db.execute(common.HOLD)
            return {"ok": True}

    @app.get("/nodb")
    def nodb() -> dict[str, bool]:
        return {"ok": True}

    return app
