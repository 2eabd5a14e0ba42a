"""The Flask benchmark app, one ``Flask`` per variant (see ``common.COMPARISONS``); psycopg, QueuePool 4 + 0."""

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
