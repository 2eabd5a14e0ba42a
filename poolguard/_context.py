"""Per-request and per-transaction context, carried in contextvars.

Contextvars follow the request into threads' own contexts, asyncio tasks and SQLAlchemy's greenlets,
so ``retry`` can tell whether it would re-run only part of a transaction: inside a
``guard.session()`` / ``guard.connection()`` block, or in a request whose session has begun one.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar, Token
from typing import Protocol


class UnitOfWork(Protocol):
    def in_transaction(self) -> bool: ...


_transaction_depth: ContextVar[int] = ContextVar("poolguard_transaction_depth", default=0)
current_unit: ContextVar[UnitOfWork | None] = ContextVar("poolguard_current_unit", default=None)


def in_transaction() -> bool:
    """True inside a session/connection block of a guard, or in a request whose session is in a transaction."""
    if _transaction_depth.get() > 0:
        return True
    unit = current_unit.get()
    return unit is not None and unit.in_transaction()


def enter_transaction() -> Token[int]:
    """Marks the code from here on as running inside an open unit of work; pass the token to leave it."""
    return _transaction_depth.set(_transaction_depth.get() + 1)


def leave_transaction(token: Token[int]) -> None:
    """Undoes :func:`enter_transaction` (also from a copy of the context, where ``reset`` cannot)."""
    try:
        _transaction_depth.reset(token)
    except ValueError:
        _transaction_depth.set(max(0, _transaction_depth.get() - 1))


@contextmanager
def transaction_open() -> Iterator[None]:
    """Marks the enclosed code as running inside an open unit of work."""
    token = enter_transaction()
    try:
        yield
    finally:
        leave_transaction(token)
