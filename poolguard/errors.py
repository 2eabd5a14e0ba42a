"""The exceptions poolguard raises.

The hierarchy::

    PoolGuardError
    ├── Unavailable            the database cannot serve this request now; answer 503 + Retry-After
    │   ├── CircuitOpen        the breaker is open: the database is failing, do not add load
    │   └── PoolSaturated      no connection slot within the wait budget: shed instead of queueing
    └── ConfigError            a setting is invalid (also a ValueError); raised at startup, never per request

Adapters catch ``Unavailable`` and nothing else: application errors keep their usual path.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["CircuitOpen", "ConfigError", "PoolGuardError", "PoolSaturated", "Unavailable"]


class PoolGuardError(Exception):
    """Base class of every exception poolguard raises."""


class Unavailable(PoolGuardError):
    """The database cannot serve this request now.

    ``retry_after`` is the number of seconds after which a retry has a fair chance; adapters send it
    as ``Retry-After`` (rounded up, at least 1). ``reason`` is the machine-readable cause used in the
    503 body and the ``poolguard.reason`` metric attribute.
    """

    reason: str = "unavailable"

    def __init__(self, message: str, *, retry_after: float, pool: str | None = None) -> None:
        super().__init__(message)
        self.retry_after = float(retry_after)
        self.pool = pool


class CircuitOpen(Unavailable):
    """The circuit breaker is open: recent connection failures say the database is down."""

    reason = "circuit_open"


class PoolSaturated(Unavailable):
    """No connection could be had within the wait budget (``max_wait``)."""

    reason = "pool_saturated"


class ConfigError(PoolGuardError, ValueError):
    """A setting has an invalid value; the message names the setting and what is accepted."""

    def __init__(self, setting: str, value: object, accepted: str) -> None:
        super().__init__(f"invalid value for {setting}: {value!r}; accepted: {accepted}")
        self.setting = setting
        self.value = value
        self.accepted = accepted

    @classmethod
    def choice(cls, setting: str, value: object, choices: Iterable[str]) -> ConfigError:
        """An error for a setting that takes one of a fixed set of values."""
        return cls(setting, value, "one of " + ", ".join(repr(c) for c in choices))
