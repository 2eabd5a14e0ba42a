"""The public core API: pinned, so adding or dropping a name is a deliberate change."""

from __future__ import annotations

import importlib

import pytest

import poolguard

EXPECTED = [
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


def test_all_is_pinned_and_sorted() -> None:
    assert poolguard.__all__ == EXPECTED
    assert sorted(poolguard.__all__) == poolguard.__all__


@pytest.mark.parametrize("name", EXPECTED)
def test_every_exported_name_is_importable(name: str) -> None:
    module = importlib.import_module("poolguard")
    assert getattr(module, name) is not None
    namespace: dict[str, object] = {}
    exec(f"from poolguard import {name}", namespace)
    assert namespace[name] is getattr(poolguard, name)


def test_star_import_gives_exactly_all() -> None:
    namespace: dict[str, object] = {}
    exec("from poolguard import *", namespace)
    assert sorted(k for k in namespace if k != "__builtins__") == EXPECTED


def test_error_hierarchy_is_exported_as_documented() -> None:
    assert issubclass(poolguard.Unavailable, poolguard.PoolGuardError)
    assert issubclass(poolguard.CircuitOpen, poolguard.Unavailable)
    assert issubclass(poolguard.PoolSaturated, poolguard.Unavailable)
    assert issubclass(poolguard.ConfigError, poolguard.PoolGuardError)
    assert issubclass(poolguard.ConfigError, ValueError)


def test_dir_lists_every_exported_name_including_the_lazily_loaded_ones() -> None:
    assert set(EXPECTED) <= set(dir(poolguard))
