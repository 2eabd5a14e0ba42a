"""The house rules of ARCHITECTURE.md, checked on the source: the import graph and module sizes.

Every import statement counts: at module level, under ``TYPE_CHECKING`` and inside functions, so
a type-only or lazy edge can no more close a cycle than a plain one. (A package's ``__init__`` that
imports its own submodules, to re-export them, is what Python's packages are for, and not a cycle.)
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

import poolguard

ROOT = Path(poolguard.__file__).parent
MAX_LINES = 500

LAYERS: dict[str, int] = {
    # the bottom: errors, time and validation helpers, the options
    "poolguard._version": 0,
    "poolguard._types": 0,
    "poolguard.errors": 0,
    "poolguard._validate": 1,
    "poolguard._classify": 1,
    "poolguard._pooler": 1,
    "poolguard._context": 1,
    "poolguard._fork": 1,
    "poolguard._serving": 1,
    "poolguard.config": 2,
    # the parts the gate and the guard are made of, each usable alone
    "poolguard.breaker": 3,
    "poolguard.admission": 3,
    "poolguard.leaks": 3,
    "poolguard.stats": 3,
    "poolguard.health": 3,
    "poolguard.retry": 3,
    "poolguard.engine": 3,
    "poolguard.pools": 3,
    "poolguard.pools.sqlalchemy": 3,
    "poolguard.pools.django": 3,
    "poolguard.pools.django_settings": 3,
    "poolguard.pools.asyncpg": 3,
    "poolguard.asyncpg_pool": 3,
    "poolguard.metrics": 4,
    "poolguard.telemetry": 5,
    "poolguard.http": 4,
    "poolguard.probe": 4,
    # the checkout path, the units of work, the composition root
    "poolguard.gate": 6,
    "poolguard.work": 7,
    "poolguard.acquire": 7,
    "poolguard.watchdog": 7,
    "poolguard.guard": 8,
    # what the server sees: the connection budget (its arithmetic is shared with Django's checks), and the
    # doctor's bounded connections, which budget --url reads the server's limits with
    "poolguard.diagnose": 0,
    "poolguard.diagnose.findings": 0,
    "poolguard.diagnose.target": 3,
    "poolguard.diagnose.postgres": 4,
    "poolguard.diagnose.mysql": 4,
    "poolguard.diagnose.budget": 4,
    "poolguard.diagnose.budget_input": 5,
    "poolguard.diagnose.budget_report": 5,
}
"""Each core module's layer: a module imports only from its own layer or below. The rest are adapters."""

BOTTOM = 2
POOL_MODULES = ("poolguard.pools.sqlalchemy", "poolguard.pools.django", "poolguard.pools.asyncpg")
POOLS_MAY_IMPORT = frozenset(
    {"poolguard.pools", "poolguard.errors", "poolguard._classify", "poolguard._pooler", "poolguard._types"}
)
POOL_HELPERS = {"poolguard.pools.django": frozenset({"poolguard.pools.django_settings"})}
"""A pool module's own helper modules, split off to keep it under the size limit."""

FRAMEWORKS: dict[str, tuple[str, ...]] = {
    "flask": ("poolguard.flask",),
    "werkzeug": ("poolguard.flask",),
    "starlette": ("poolguard.starlette", "poolguard._starlette_handlers", "poolguard.fastapi"),
    "fastapi": ("poolguard.fastapi",),
    "django": ("poolguard.django", "poolguard.pools.django"),
    "asgiref": ("poolguard.django",),
    "prometheus_client": ("poolguard.prometheus",),
    "asyncpg": ("poolguard.pools.asyncpg", "poolguard.asyncpg_pool", "poolguard.fastapi"),  # fastapi: type-only
    "psycopg": ("poolguard.diagnose.postgres", "poolguard.diagnose.pgbouncer"),
    "psycopg_pool": (),
    "pymysql": ("poolguard.diagnose.mysql",),
}
"""A framework or driver package, and the only modules allowed to import it (and their submodules)."""


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(ROOT.rglob("*.py"))}


def imported(name: str, path: Path) -> Iterator[str]:
    """Every module ``name`` imports, wherever the import statement is."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            # ``from poolguard import errors`` imports the submodule; ``from poolguard import Guard`` the package.
            submodules = [f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in MODULES]
            yield from submodules
            if len(submodules) < len(node.names):
                yield base


def within(module: str, owners: tuple[str, ...]) -> bool:
    return any(module == owner or module.startswith(owner + ".") for owner in owners)


def graph() -> dict[str, set[str]]:
    """poolguard module -> the poolguard modules it imports."""
    return {
        name: {target for target in imported(name, path) if target in MODULES and target != name}
        for name, path in MODULES.items()
    }


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(edges.get(node, ())):
            if state.get(target) == 1:
                return [*path[path.index(target) :], target]
            if target not in state:
                cycle = visit(target)
                if cycle is not None:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state:
            cycle = visit(node)
            if cycle is not None:
                return cycle
    return None


def test_the_checks_see_the_whole_package() -> None:
    assert {"poolguard.gate", "poolguard.work", "poolguard.guard", "poolguard.django.conf"} <= set(MODULES)
    assert "poolguard.guard" in graph()["poolguard.django.conf"]
    assert "poolguard.sqlalchemy" not in MODULES  # not a stray name the lookups below could confuse


def test_no_import_cycle() -> None:
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_cycle_finder_finds_one() -> None:
    """The check above must be able to fail: a type-only back edge from the gate would close a cycle."""
    edges = graph()
    edges["poolguard.gate"] = {*edges["poolguard.gate"], "poolguard.guard"}
    assert find_cycle(edges) is not None


def test_every_core_module_has_a_layer() -> None:
    adapters = {name for name in MODULES if name not in LAYERS}
    assert all(
        within(
            name,
            (
                "poolguard.flask",
                "poolguard.starlette",
                "poolguard._starlette_handlers",
                "poolguard.fastapi",
                "poolguard.django",
                "poolguard.diagnose",
            ),
        )
        or name
        in (
            "poolguard",
            "poolguard.__main__",
            "poolguard.cli",
            "poolguard.demo",
            "poolguard.demo_report",
            "poolguard.prometheus",
        )
        for name in adapters
    ), sorted(adapters)


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_core_modules_import_only_their_layer_or_below(name: str) -> None:
    upward = {target: LAYERS[target] for target in graph()[name] if LAYERS.get(target, 99) > LAYERS[name]}
    assert not upward, f"{name} (layer {LAYERS[name]}) imports from above: {upward}"


@pytest.mark.parametrize("name", sorted(name for name, layer in LAYERS.items() if layer <= BOTTOM))
def test_the_bottom_layer_imports_nothing_above_it(name: str) -> None:
    assert all(LAYERS.get(target, 99) <= BOTTOM for target in graph()[name]), graph()[name]


@pytest.mark.parametrize("name", POOL_MODULES)
def test_pool_modules_know_only_their_driver_and_the_pool_protocol(name: str) -> None:
    allowed = POOLS_MAY_IMPORT | POOL_HELPERS.get(name, frozenset())
    assert graph()[name] <= allowed, graph()[name] - allowed


@pytest.mark.parametrize("name", sorted(MODULES))
def test_frameworks_and_drivers_are_imported_only_by_the_module_that_adapts_them(name: str) -> None:
    wrong = {
        target
        for target in imported(name, MODULES[name])
        if (owners := FRAMEWORKS.get(target.partition(".")[0])) is not None and not within(name, owners)
    }
    assert not wrong, f"{name} imports {sorted(wrong)}"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_module_is_over_the_size_limit(name: str) -> None:
    lines = len(MODULES[name].read_text().splitlines())
    assert lines <= MAX_LINES, f"{name} has {lines} lines (limit {MAX_LINES}): split it by concept"
