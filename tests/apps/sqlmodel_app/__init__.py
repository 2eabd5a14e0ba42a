"""A small SQLModel FastAPI app written the way SQLModel's tutorial writes it (sync engine, ``def``
routes, its own ``SessionDep``), adopted as README.md and docs/fastapi.md say: the only
poolguard lines are in ``database.py`` and ``main.py``. ``tests/apps/test_sqlmodel_app.py`` runs it."""
