"""A Flask-SQLAlchemy app written the way its users write one: a factory, models, a blueprint.

Adopting poolguard is the one line marked below (docs/adopting.md): ``PoolGuard(app)`` after
``db.init_app(app)`` guards Flask-SQLAlchemy's engine; ``db.session`` and ``Model.query`` stay as
they are.
"""

from __future__ import annotations

from typing import Any

from flask import Flask
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy.orm import DeclarativeBase

from poolguard.flask import PoolGuard


class Base(DeclarativeBase):
    pass


db = SQLAlchemy(model_class=Base)


def create_app(config: dict[str, Any] | None = None) -> Flask:
    app = Flask(__name__)
    app.config.update(config or {})
    db.init_app(app)
    from tests.apps.flask_sqlalchemy_app import views  # noqa: PLC0415 (the usual circular-import dance)

    app.register_blueprint(views.bp)
    PoolGuard(app)  # the adoption: one line
    return app
