"""Routes as Flask-SQLAlchemy users write them: ``db.session``, ``Model.query``, ``db.session.execute(select())``."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, abort, request
from sqlalchemy import select, text

from tests.apps.flask_sqlalchemy_app import db
from tests.apps.flask_sqlalchemy_app.models import Author

bp = Blueprint("authors", __name__)


@bp.get("/authors")
def list_authors() -> dict[str, Any]:
    names = db.session.execute(select(Author.name).order_by(Author.name)).scalars().all()
    return {"authors": list(names)}


@bp.get("/authors/<int:author_id>")
def get_author(author_id: int) -> dict[str, Any]:
    author = db.get_or_404(Author, author_id)
    return {"id": author.id, "name": author.name}


@bp.get("/count")
def count() -> dict[str, Any]:
    return {"count": Author.query.count()}


@bp.post("/authors")
def create_author() -> tuple[dict[str, Any], int]:
    author = Author(name=request.get_json()["name"])
    db.session.add(author)
    db.session.commit()
    return {"id": author.id}, 201


@bp.post("/authors/uncommitted")
def create_then_conflict() -> dict[str, Any]:
    db.session.add(Author(name=request.get_json()["name"]))
    db.session.flush()
    abort(409)


@bp.get("/backend")
def backend() -> dict[str, Any]:
    return {"pid": db.session.execute(text("SELECT pg_backend_pid()")).scalar()}


@bp.get("/forgets")
def forgets_a_connection() -> dict[str, Any]:
    connection = db.engine.connect()  # never closed: the leak poolguard reclaims
    return {"one": connection.execute(text("SELECT 1")).scalar()}


@bp.get("/nodb")
def nodb() -> dict[str, Any]:
    return {"ok": True}
