"""The app's models, Flask-SQLAlchemy style (``db.Model``, ``Mapped`` columns)."""

from __future__ import annotations

from sqlalchemy import String
from sqlalchemy.orm import Mapped, mapped_column

from tests.apps.flask_sqlalchemy_app import db


class Author(db.Model):  # type: ignore[name-defined,misc]
    __tablename__ = "poolguard_fsa_authors"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(80), unique=True)
