"""poolguard: keeps a web service's database connection pool healthy from inside the app.

The core is framework-free; adapters live in ``poolguard.flask``, ``poolguard.starlette``,
``poolguard.fastapi`` and ``poolguard.django`` and are imported only when used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from poolguard._version import __version__ as __version__
from poolguard.breaker import Breaker as Breaker
from poolguard.breaker import BreakerState as BreakerState
from poolguard.config import PoolGuardConfig as PoolGuardConfig
from poolguard.errors import CircuitOpen as CircuitOpen
from poolguard.errors import ConfigError as ConfigError
from poolguard.errors import PoolGuardError as PoolGuardError
from poolguard.errors import PoolSaturated as PoolSaturated
from poolguard.errors import Unavailable as Unavailable
from poolguard.guard import Guard as Guard
from poolguard.health import HealthReport as HealthReport
from poolguard.health import PoolHealth as PoolHealth
from poolguard.retry import RetryBudget as RetryBudget
from poolguard.retry import retry as retry
from poolguard.stats import PoolStats as PoolStats
from poolguard.work import RequestScope as RequestScope

if TYPE_CHECKING:
    from poolguard.asyncpg_pool import create_asyncpg_pool as create_asyncpg_pool
    from poolguard.engine import create_async_engine as create_async_engine
    from poolguard.engine import create_engine as create_engine


def __getattr__(name: str) -> Any:
    """``create_engine`` / ``create_async_engine`` / ``create_asyncpg_pool`` load SQLAlchemy (asyncpg) on first
    use, not on ``import poolguard``.

    A Django app that guards only its own connections then never loads SQLAlchemy.
    """
    if name in ("create_engine", "create_async_engine"):
        from poolguard import engine  # noqa: PLC0415

        return getattr(engine, name)
    if name == "create_asyncpg_pool":
        from poolguard.asyncpg_pool import create_asyncpg_pool  # noqa: PLC0415

        return create_asyncpg_pool
    raise AttributeError(f"module 'poolguard' has no attribute {name!r}")


def __dir__() -> list[str]:
    """The lazily loaded names too, for ``dir()`` and completion."""
    return sorted({*globals(), *__all__})


__all__ = [
    "Breaker",
    "BreakerState",
    "CircuitOpen",
    "ConfigError",
    "Guard",
    "HealthReport",
    "PoolGuardConfig",
    "PoolGuardError",
    "PoolHealth",
    "PoolSaturated",
    "PoolStats",
    "RequestScope",
    "RetryBudget",
    "Unavailable",
    "create_async_engine",
    "create_asyncpg_pool",
    "create_engine",
    "retry",
]
