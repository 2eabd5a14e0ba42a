"""Where the test databases are: the one place that knows.

PostgreSQL on 127.0.0.1:5432 and MariaDB on 127.0.0.1:3306, both with user ``root``, database ``test``
and trust authentication (a password in a URL is sent and ignored, which lets tests check it never
leaks). Nothing listens on ``DEAD_PORT``: connecting there is refused at once.

Plain constants and string builders, importable from anywhere (test modules, conftests, Django settings,
child processes started from the project root): no pytest, no SQLAlchemy.
"""

from __future__ import annotations

HOST = "127.0.0.1"
PG_PORT = 5432
MARIADB_PORT = 3306
DEAD_PORT = 1
USER = "root"
DATABASE = "test"


def _url(scheme: str, password: str | None, port: int) -> str:
    credentials = USER if password is None else f"{USER}:{password}"
    return f"{scheme}://{credentials}@{HOST}:{port}/{DATABASE}"


def pg_url(driver: str = "psycopg", *, password: str | None = None, port: int = PG_PORT) -> str:
    """``postgresql+<driver>://root[:<password>]@127.0.0.1:<port>/test`` (the password is not escaped)."""
    return _url(f"postgresql+{driver}", password, port)


def mariadb_url(*, password: str | None = None, port: int = MARIADB_PORT) -> str:
    """``mysql+pymysql://root[:<password>]@127.0.0.1:<port>/test`` (the password is not escaped)."""
    return _url("mysql+pymysql", password, port)


PG_URL = pg_url()
PG_ASYNC_URL = pg_url("asyncpg")
MARIADB_URL = mariadb_url()
PG_CONNINFO = f"host={HOST} port={PG_PORT} dbname={DATABASE} user={USER}"
"""The same PostgreSQL server as a libpq connection string, for ``psycopg.connect``."""
