"""The application: the tutorial's hero routes, plain ``def`` functions taking ``SessionDep``."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated

from fastapi import APIRouter, FastAPI, HTTPException, Query
from sqlmodel import SQLModel, func, select

from poolguard.fastapi import PoolGuardMiddleware, poolguard_lifespan
from tests.apps.sqlmodel_app.database import SessionDep, Settings, create_db_engine, create_guard
from tests.apps.sqlmodel_app.models import Hero, HeroCreate, HeroPublic, HeroUpdate

router = APIRouter()


@router.post("/heroes/", response_model=HeroPublic)
def create_hero(hero: HeroCreate, session: SessionDep) -> Hero:
    db_hero = Hero.model_validate(hero)
    session.add(db_hero)
    session.commit()
    session.refresh(db_hero)
    return db_hero


@router.post("/heroes/unique/", response_model=HeroPublic)
def create_unique_hero(hero: HeroCreate, session: SessionDep) -> Hero:
    """Adds the hero, then refuses a name that was taken (the write must not stay)."""
    db_hero = Hero.model_validate(hero)
    session.add(db_hero)
    session.flush()
    taken = session.exec(select(func.count()).select_from(Hero).where(Hero.name == hero.name)).one()
    if taken > 1:
        raise HTTPException(status_code=409, detail="Hero name already taken")
    return db_hero


@router.get("/heroes/", response_model=list[HeroPublic])
def read_heroes(
    session: SessionDep,
    offset: int = 0,
    limit: Annotated[int, Query(le=100)] = 100,
) -> list[Hero]:
    return list(session.exec(select(Hero).offset(offset).limit(limit)).all())


@router.get("/heroes/{hero_id}", response_model=HeroPublic)
def read_hero(hero_id: int, session: SessionDep) -> Hero:
    hero = session.get(Hero, hero_id)
    if not hero:
        raise HTTPException(status_code=404, detail="Hero not found")
    return hero


@router.patch("/heroes/{hero_id}", response_model=HeroPublic)
def update_hero(hero_id: int, hero: HeroUpdate, session: SessionDep) -> Hero:
    hero_db = session.get(Hero, hero_id)
    if not hero_db:
        raise HTTPException(status_code=404, detail="Hero not found")
    hero_data = hero.model_dump(exclude_unset=True)
    hero_db.sqlmodel_update(hero_data)
    session.add(hero_db)
    return hero_db


@router.delete("/heroes/{hero_id}")
def delete_hero(hero_id: int, session: SessionDep) -> dict[str, bool]:
    hero = session.get(Hero, hero_id)
    if not hero:
        raise HTTPException(status_code=404, detail="Hero not found")
    session.delete(hero)
    return {"ok": True}


@router.get("/version")
def version() -> dict[str, str]:
    return {"version": "1.0"}


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    engine = create_db_engine(settings)
    guard = create_guard(engine, settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        SQLModel.metadata.create_all(engine)
        yield

    app = FastAPI(lifespan=poolguard_lifespan(guard, lifespan=lifespan))
    app.add_middleware(PoolGuardMiddleware, guard=guard)
    app.include_router(router)
    app.state.guard = guard
    return app
