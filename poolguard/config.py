"""One validated, frozen configuration shared by every adapter.

The same options arrive four ways: keyword arguments, Flask config (``POOLGUARD_*`` keys), Django's
``POOLGUARD`` dict, and ``POOLGUARD_*`` environment variables. :meth:`PoolGuardConfig.load` reads
them in that order of precedence (keyword arguments win, the environment fills gaps) and validates
everything at startup: an unknown or invalid option raises ConfigError naming it, never a surprise
on the first request.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from poolguard import _validate
from poolguard.breaker import Breaker
from poolguard.errors import ConfigError
from poolguard.http import HEALTH_DETAIL_MODES, HealthToken

ENV_PREFIX = "POOLGUARD_"

_BREAKER_OPTIONS = (
    "failure_rate",
    "consecutive_failures",
    "slow_call_rate",
    "slow_call_duration",
    "window_size",
    "minimum_calls",
    "open_for",
    "max_open_for",
    "open_for_multiplier",
    "half_open_calls",
)
_BREAKER_INTEGERS = frozenset({"consecutive_failures", "window_size", "minimum_calls", "half_open_calls"})


@dataclass(frozen=True, slots=True)
class PoolGuardConfig:
    """Adapter and guard options; see docs/configuration.md for each one."""

    health_path: str | None = "/health/db"
    health_detail: str = "never"
    health_token: HealthToken = None
    max_wait: float = 1.0
    leak_threshold: float = 30.0
    capture_stacks: bool = False
    ping_timeout: float = 1.0
    breaker: Mapping[str, Any] | bool = True
    databases: tuple[str, ...] = ("default",)
    sqlalchemy: Mapping[str, Any] | None = None
    tracer_provider: Any = None
    meter_provider: Any = None
    _sources: tuple[str, ...] = field(default=(), repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.health_path is not None and (
            not isinstance(self.health_path, str) or not self.health_path.startswith("/")
        ):
            raise ConfigError("health_path", self.health_path, "a URL path starting with '/', or None to turn it off")
        if self.health_detail not in HEALTH_DETAIL_MODES:
            raise ConfigError.choice("health_detail", self.health_detail, HEALTH_DETAIL_MODES)
        if self.health_token is not None and not (isinstance(self.health_token, str) or callable(self.health_token)):
            raise ConfigError(
                "health_token", "<hidden>", "a string bearer token, a callable taking the request, or None"
            )
        if isinstance(self.health_token, str) and not self.health_token:
            raise ConfigError("health_token", "<empty>", "a non-empty string bearer token, a callable, or None")
        if self.health_detail == "when-authorized" and self.health_token is None:
            raise ConfigError("health_token", None, "a token or a callable when health_detail is 'when-authorized'")
        _validate.non_negative_float("max_wait", self.max_wait)
        _validate.positive_float("leak_threshold", self.leak_threshold)
        _validate.positive_float("ping_timeout", self.ping_timeout)
        if not isinstance(self.capture_stacks, bool):
            raise ConfigError("capture_stacks", self.capture_stacks, "True or False")
        if not isinstance(self.breaker, bool):
            unknown = sorted(set(self.breaker) - set(_BREAKER_OPTIONS))
            if unknown:
                raise ConfigError("breaker", unknown[0], "breaker options: " + ", ".join(_BREAKER_OPTIONS))
            self.make_breaker()
        for name, provider, method in (
            ("tracer_provider", self.tracer_provider, "get_tracer"),
            ("meter_provider", self.meter_provider, "get_meter"),
        ):
            if provider is not None and not callable(getattr(provider, method, None)):
                raise ConfigError(name, type(provider).__name__, f"an OpenTelemetry {name} (with {method}()) or None")
        if not self.databases or not all(isinstance(alias, str) and alias for alias in self.databases):
            raise ConfigError("databases", self.databases, "a non-empty list of database aliases")

    def make_breaker(self, clock: Callable[[], float] | None = None) -> Breaker | bool:
        """A new Breaker from the options (False when turned off)."""
        if self.breaker is False:
            return False
        options = {} if self.breaker is True else dict(self.breaker)
        return Breaker(clock=clock, **options)

    def guard_options(self) -> dict[str, Any]:
        """The keyword arguments for ``Guard(...)`` that this configuration decides."""
        return {
            "max_wait": self.max_wait,
            "leak_threshold": self.leak_threshold,
            "capture_stacks": self.capture_stacks,
            "ping_timeout": self.ping_timeout,
            "breaker": self.make_breaker(),
            "tracer_provider": self.tracer_provider,
            "meter_provider": self.meter_provider,
        }

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls) if not f.name.startswith("_"))

    @classmethod
    def load(
        cls,
        kwargs: Mapping[str, Any] | None = None,
        *,
        settings: Mapping[str, Any] | None = None,
        environ: Mapping[str, str] | None = None,
        source: str = "settings",
    ) -> PoolGuardConfig:
        """Merges keyword arguments over ``settings`` (UPPER_CASE keys) over ``POOLGUARD_*`` variables.

        ``environ`` defaults to ``os.environ``; pass ``{}`` to ignore the environment.
        """
        names = cls.option_names()
        values: dict[str, Any] = {}
        env = os.environ if environ is None else environ
        values.update(_from_environment(env, names))
        for key, value in (settings or {}).items():
            name = _option_name(key, names, source)
            values[name] = _normalise(name, value)
        for key, value in (kwargs or {}).items():
            if key not in names:
                raise ConfigError(key, value, "one of the options " + ", ".join(names))
            values[key] = _normalise(key, value)
        return cls(**values)


def _option_name(key: str, names: tuple[str, ...], source: str) -> str:
    name = key.lower()
    if name not in names:
        raise ConfigError(f"{source}: {key}", "(unknown option)", "one of " + ", ".join(n.upper() for n in names))
    return name


def _normalise(name: str, value: Any) -> Any:
    if name == "breaker" and isinstance(value, Mapping):
        return {str(k).lower(): v for k, v in value.items()}
    if name == "databases" and isinstance(value, list | tuple):
        return tuple(value)
    if name == "sqlalchemy" and isinstance(value, Mapping):
        return {str(k).lower(): v for k, v in value.items()}
    return value


def _from_environment(environ: Mapping[str, str], names: tuple[str, ...]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    breaker: dict[str, Any] = {}
    for key, raw in environ.items():
        if not key.startswith(ENV_PREFIX):
            continue
        name = key[len(ENV_PREFIX) :].lower()
        if name.startswith("breaker_") and name[len("breaker_") :] in _BREAKER_OPTIONS:
            option = name[len("breaker_") :]
            breaker[option] = _parse_number(key, raw, integer=option in _BREAKER_INTEGERS)
        elif name == "breaker":
            values["breaker"] = _parse_bool(key, raw)
        elif name in ("health_path", "health_token"):
            values[name] = raw or None
        elif name == "health_detail":
            values[name] = raw
        elif name in ("max_wait", "leak_threshold", "ping_timeout"):
            values[name] = _parse_number(key, raw, integer=False)
        elif name == "capture_stacks":
            values[name] = _parse_bool(key, raw)
        elif name == "databases":
            values[name] = tuple(alias.strip() for alias in raw.split(",") if alias.strip())
        elif name in names:
            raise ConfigError(key, raw, "this option cannot be set from the environment")
    if breaker and values.get("breaker", True) is not False:
        values["breaker"] = breaker
    return values


def _parse_number(key: str, raw: str, *, integer: bool) -> float | int:
    try:
        number = int(raw) if integer else float(raw)
    except ValueError:
        raise ConfigError(key, raw, "a whole number" if integer else "a number") from None
    if not integer and not math.isfinite(number):
        raise ConfigError(key, raw, "a finite number")
    return number


def _parse_bool(key: str, raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ConfigError(key, raw, "true or false (1/0, yes/no, on/off)")
