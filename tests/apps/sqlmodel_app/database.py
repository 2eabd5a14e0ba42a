"""The engine and the session dependency: the tutorial's ``get_session`` becomes poolguard's."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.orm import sessionmaker
from sqlmodel import Session, create_engine

import poolguard
from poolguard.fastapi import SyncDbSession

SessionDep = SyncDbSession[Session]
"""Was ``Annotated[Session, Depends(get_session)]``: the request's ``sqlmodel.Session``."""


@dataclass
class Settings:
    database_url: str = field(default_factory=lambda: os.environ.get("DATABASE_URL", "sqlite:///database.db"))
    pool_size: int = 5
    max_overflow: int = 0
    connect_args: dict[str, Any] = field(default_factory=dict)
    max_wait: float = 1.0
    breaker: poolguard.Breaker | None = None


def create_db_engine(settings: Settings) -> Engine:
    return create_engine(
        settings.database_url,
        pool_size=settings.pool_size,
        max_overflow=settings.max_overflow,
        connect_args=settings.connect_args,
    )


def create_guard(engine: Engine, settings: Settings) -> poolguard.Guard:
    return poolguard.Guard(
        engine,
        max_wait=settings.max_wait,
        breaker=settings.breaker,
        session_factory=sessionmaker(engine, class_=Session, expire_on_commit=False),
    )
