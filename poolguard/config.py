"""Options: validated, frozen objects, and one loader for every place they come from.

Three objects, one per concern, each validated when it is built so a bad value fails at startup:

- :class:`BreakerOptions`: the circuit breaker's settings (a :class:`~poolguard.Breaker` is built from them);
- :class:`GuardOptions`: what a :class:`~poolguard.Guard` decides (wait budget, leaks, ping, breaker, providers);
- :class:`HttpOptions`: what an adapter does on the HTTP side (the health route and who sees its detail, the
  503's body, whether ``X-Request-Start`` is trusted).

:class:`PoolGuardConfig` holds one of each plus the settings only some adapters read (Django's
``databases``, an engine to build from ``sqlalchemy``). :meth:`PoolGuardConfig.load` reads the same
options from keyword arguments, a framework's settings (Flask's ``POOLGUARD_*`` keys, Django's
``POOLGUARD`` dict) and ``POOLGUARD_*`` environment variables, in that order of precedence, through
one path: an unknown or invalid option raises ConfigError naming it.

This is the bottom layer: it imports nothing of poolguard but the errors and the validators.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from poolguard import _validate
from poolguard.errors import ConfigError, Unavailable

ENV_PREFIX = "POOLGUARD_"

HEALTH_DETAIL_MODES = ("never", "when-authorized", "always")

HealthToken = str | Callable[[Any], bool] | None
"""A bearer token compared in constant time, or a callable deciding from the framework's request."""

UnavailableBody = Callable[[Unavailable], tuple[bytes | str | Mapping[str, Any] | list[Any], str]]
"""Renders the 503's body the app's way: takes the ``Unavailable`` error, returns ``(body, content type)``;
bytes and str are sent as they are, a dict or a list as JSON. Status and headers stay poolguard's."""

ENGINE_OPTIONS = (
    "url",
    "service_name",
    "workers",
    "pool_size",
    "max_overflow",
    "pool_timeout",
    "pool_recycle",
    "pool_pre_ping",
    "connect_timeout",
    "statement_timeout",
    "hide_parameters",
    "pgbouncer",
)
"""The keys of the ``sqlalchemy`` option: the URL and :func:`poolguard.create_engine`'s own keywords."""


@dataclass(frozen=True, kw_only=True)
class BreakerOptions:
    """The circuit breaker's settings; see :class:`poolguard.Breaker` for what each one does.

    Not slotted, so the class attributes are the defaults :class:`~poolguard.Breaker`'s signature shows.
    """

    failure_rate: float = 0.5
    consecutive_failures: int = 5
    slow_call_rate: float = 1.0
    slow_call_duration: float = 5.0
    window_size: int = 20
    minimum_calls: int = 10
    open_for: float = 30.0
    max_open_for: float = 300.0
    open_for_multiplier: float = 2.0
    half_open_calls: int = 3

    def __post_init__(self) -> None:
        checks: dict[str, Callable[[str, object], float]] = {
            "failure_rate": _validate.fraction,
            "consecutive_failures": _validate.non_negative_int,
            "slow_call_rate": _validate.fraction,
            "slow_call_duration": _validate.positive_float,
            "window_size": _validate.positive_int,
            "minimum_calls": _validate.positive_int,
            "open_for": _validate.positive_float,
            "max_open_for": _validate.positive_float,
            "open_for_multiplier": _validate.positive_float,
            "half_open_calls": _validate.positive_int,
        }
        for name, check in checks.items():
            object.__setattr__(self, name, check(f"Breaker.{name}", getattr(self, name)))
        if self.open_for_multiplier < 1:
            raise ConfigError("Breaker.open_for_multiplier", self.open_for_multiplier, "a number of at least 1")
        if self.max_open_for < self.open_for:
            raise ConfigError(
                "Breaker.max_open_for",
                self.max_open_for,
                f"a number of seconds of at least open_for ({self.open_for!r})",
            )
        if self.minimum_calls > self.window_size:
            raise ConfigError(
                "Breaker.minimum_calls",
                self.minimum_calls,
                f"a whole number from 1 to window_size ({self.window_size!r})",
            )

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))


@dataclass(frozen=True, slots=True, kw_only=True)
class GuardOptions:
    """What a Guard built from settings is given; ``breaker`` None means no breaker."""

    max_wait: float = 1.0
    leak_threshold: float = 30.0
    capture_stacks: bool = False
    ping_timeout: float = 1.0
    probe_interval: float | None = 0.5
    breaker: BreakerOptions | None = field(default_factory=BreakerOptions)
    tracer_provider: Any = None
    meter_provider: Any = None

    def __post_init__(self) -> None:
        _validate.non_negative_float("max_wait", self.max_wait)
        _validate.positive_float("leak_threshold", self.leak_threshold)
        _validate.positive_float("ping_timeout", self.ping_timeout)
        _validate.optional_positive_float("probe_interval", self.probe_interval)
        if not isinstance(self.capture_stacks, bool):
            raise ConfigError("capture_stacks", self.capture_stacks, "True or False")
        for name, provider, method in (
            ("tracer_provider", self.tracer_provider, "get_tracer"),
            ("meter_provider", self.meter_provider, "get_meter"),
        ):
            if provider is not None and not callable(getattr(provider, method, None)):
                raise ConfigError(name, type(provider).__name__, f"an OpenTelemetry {name} (with {method}()) or None")


@dataclass(frozen=True, slots=True, kw_only=True)
class HttpOptions:
    """What an adapter does on the HTTP side: the health route and who may see its detail, the 503's body,
    and whether the request's arrival time (``X-Request-Start``) counts against the wait budget.

    ``trust_request_start`` is off by default: a client can send the header too, so only a proxy the
    user controls (nginx, Heroku's or Render's router) may be believed.
    """

    health_path: str | None = "/health/db"
    health_detail: str = "never"
    health_token: HealthToken = None
    unavailable_body: UnavailableBody | None = None
    trust_request_start: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.trust_request_start, bool):
            raise ConfigError("trust_request_start", self.trust_request_start, "True or False")
        if self.unavailable_body is not None and not callable(self.unavailable_body):
            raise ConfigError(
                "unavailable_body",
                self.unavailable_body,
                "None, or a callable taking the Unavailable error and returning (body, content type)",
            )
        if self.health_path is not None and (
            not isinstance(self.health_path, str) or not self.health_path.startswith("/")
        ):
            raise ConfigError("health_path", self.health_path, "a URL path starting with '/', or None to turn it off")
        if self.health_detail not in HEALTH_DETAIL_MODES:
            raise ConfigError.choice("health_detail", self.health_detail, HEALTH_DETAIL_MODES)
        token = self.health_token
        if token is not None and not (isinstance(token, str) or callable(token)):
            raise ConfigError(
                "health_token", "<hidden>", "a string bearer token, a callable taking the request, or None"
            )
        if isinstance(token, str) and not token:
            raise ConfigError("health_token", "<empty>", "a non-empty string bearer token, a callable, or None")
        if self.health_detail == "when-authorized" and token is None:
            raise ConfigError("health_token", None, "a token or a callable when health_detail is 'when-authorized'")


GUARD_OPTION_NAMES = tuple(f.name for f in fields(GuardOptions))
HTTP_OPTION_NAMES = tuple(f.name for f in fields(HttpOptions))
OPTION_NAMES = (*HTTP_OPTION_NAMES, *GUARD_OPTION_NAMES, "databases", "sqlalchemy")
"""Every option an adapter takes, in the order the docs list them."""


@dataclass(frozen=True, slots=True)
class PoolGuardConfig:
    """Every option, grouped: the guard's, the HTTP side's, and the ones only some adapters read.

    ``databases``: the Django aliases to guard. ``sqlalchemy``: an engine to build (``url`` and
    :func:`poolguard.create_engine` keywords, lower-cased) when the adapter builds its guard.
    """

    guard: GuardOptions = field(default_factory=GuardOptions)
    http: HttpOptions = field(default_factory=HttpOptions)
    databases: tuple[str, ...] = ("default",)
    sqlalchemy: Mapping[str, Any] | None = None
    source: str = field(default="settings", compare=False)
    """Where the settings came from, for error messages (``Flask config``, ``settings.POOLGUARD``)."""
    prefix: str = field(default="", compare=False)
    """The prefix of the settings' keys (Flask's ``POOLGUARD_``), for error messages."""
    explicit: frozenset[str] = field(default=frozenset(), compare=False)
    """The options the user set (keyword, settings or environment), as opposed to defaults: the
    guard options among them must match a Guard the user passes
    (:func:`poolguard.guard.check_passed_guard`), and an adapter refuses one it has no use for."""

    def __post_init__(self) -> None:
        databases = self.databases
        if isinstance(databases, list):
            object.__setattr__(self, "databases", databases := tuple(databases))
        if (
            not isinstance(databases, tuple)
            or not databases
            or not all(isinstance(alias, str) and alias for alias in databases)
        ):
            raise ConfigError(self.setting("databases"), databases, "a non-empty list of database aliases: ['default']")
        if self.sqlalchemy is not None:
            _check_engine_options(self.sqlalchemy, self.setting("sqlalchemy"))

    def setting(self, name: str) -> str:
        """How the user spelled option ``name`` where it came from, for error messages."""
        return _spelling(name, self.source, self.prefix)

    def guard_options(self) -> dict[str, Any]:
        """The keyword arguments for ``Guard(...)`` that this configuration decides (``breaker``:
        its options, or False for none)."""
        guard = self.guard
        return {
            "max_wait": guard.max_wait,
            "leak_threshold": guard.leak_threshold,
            "capture_stacks": guard.capture_stacks,
            "ping_timeout": guard.ping_timeout,
            "probe_interval": guard.probe_interval,
            "breaker": guard.breaker if guard.breaker is not None else False,
            "tracer_provider": guard.tracer_provider,
            "meter_provider": guard.meter_provider,
        }

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        return OPTION_NAMES

    @classmethod
    def load(
        cls,
        kwargs: Mapping[str, Any] | None = None,
        *,
        settings: Mapping[str, Any] | None = None,
        environ: Mapping[str, str] | None = None,
        source: str = "settings",
        prefix: str = "",
    ) -> PoolGuardConfig:
        """Merges keyword arguments over ``settings`` over ``POOLGUARD_*`` environment variables.

        ``settings`` has UPPER_CASE keys (Django's ``POOLGUARD`` dict); with ``prefix`` only the keys
        that start with it are read, and every one of them must be an option (Flask's config, prefix
        ``POOLGUARD_``). In both, and in the environment, flat ``BREAKER_<OPTION>`` keys join the
        ``BREAKER`` dict. ``environ`` defaults to ``os.environ``; pass ``{}`` to ignore it.
        """
        values = _from_environment(os.environ if environ is None else environ)
        values.update(_from_settings(settings or {}, source, prefix))
        for key, value in (kwargs or {}).items():
            if key not in OPTION_NAMES:
                raise ConfigError(key, value, "one of the options " + ", ".join(OPTION_NAMES))
            values[key] = value
        guard = {name: values[name] for name in GUARD_OPTION_NAMES if name in values}
        if "breaker" in guard:
            guard["breaker"] = _breaker_options(guard["breaker"], _spelling("breaker", source, prefix))
        rest: dict[str, Any] = {}
        if "databases" in values:
            databases = values["databases"]
            rest["databases"] = tuple(databases) if isinstance(databases, list | tuple) else databases
        if values.get("sqlalchemy") is not None:
            engine = values["sqlalchemy"]
            rest["sqlalchemy"] = _lower_keys(engine) if isinstance(engine, Mapping) else engine
        return cls(
            explicit=frozenset(values),
            guard=GuardOptions(**guard),
            http=HttpOptions(**{name: values[name] for name in HTTP_OPTION_NAMES if name in values}),
            source=source,
            prefix=prefix,
            **rest,
        )


def _spelling(name: str, source: str, prefix: str) -> str:
    """How the user spelled option ``name`` where it came from (``settings.POOLGUARD['BREAKER']``)."""
    if prefix:
        return prefix + name.upper()
    if source == "settings":
        return name
    return f"{source}['{name.upper()}']"


def _lower_keys(mapping: Mapping[Any, Any]) -> dict[str, Any]:
    return {str(key).lower(): value for key, value in mapping.items()}


def _breaker_options(value: object, setting: str = "breaker") -> BreakerOptions | None:
    if value is True:
        return BreakerOptions()
    if value is False or value is None:
        return None
    if not isinstance(value, Mapping):
        raise ConfigError(setting, value, "True, False, or a dict of breaker options such as {'OPEN_FOR': 10}")
    options = _lower_keys(value)
    unknown = sorted(set(options) - set(BreakerOptions.names()))
    if unknown:
        raise ConfigError(setting, unknown[0], "breaker options: " + ", ".join(BreakerOptions.names()))
    return BreakerOptions(**options)


def _check_engine_options(options: object, setting: str) -> None:
    if not isinstance(options, Mapping):
        raise ConfigError(setting, options, "a dict with 'URL' and poolguard.create_engine options")
    unknown = sorted(str(key).upper() for key in options if key not in ENGINE_OPTIONS)
    if unknown:
        accepted = ", ".join(name.upper() for name in ENGINE_OPTIONS)
        raise ConfigError(f"{setting}['{unknown[0]}']", "(unknown option)", "one of " + accepted)
    url = options.get("url")
    if not isinstance(url, str) or "://" not in url:
        raise ConfigError(
            f"{setting}['URL']", "<hidden>" if url else url, "a SQLAlchemy URL such as postgresql+psycopg://..."
        )
    if options.get("pool_size") is not None:
        _validate.positive_int(f"{setting}['POOL_SIZE']", options["pool_size"])
    if options.get("max_overflow") is not None:
        _validate.non_negative_int(f"{setting}['MAX_OVERFLOW']", options["max_overflow"])


def _breaker_option(name: str) -> str | None:
    """``open_for`` for the flat key ``breaker_open_for``; None for any other name."""
    option = name.removeprefix("breaker_")
    return option if option != name and option in BreakerOptions.names() else None


def _nest_breaker(flat: dict[str, Any], breaker: dict[str, Any], setting: str) -> None:
    """Merges flat ``BREAKER_<OPTION>`` values into the ``breaker`` option (a dict, or True)."""
    if not breaker:
        return
    nested = flat.get("breaker", True)
    if nested is False:
        raise ConfigError(setting, False, "True or a dict of options when breaker options are set one by one")
    flat["breaker"] = {**(_lower_keys(nested) if isinstance(nested, Mapping) else {}), **breaker}


def _from_settings(settings: Mapping[str, Any], source: str, prefix: str) -> dict[str, Any]:
    """A framework's settings by option name; an unknown key raises (the user wrote it for poolguard)."""
    values: dict[str, Any] = {}
    breaker: dict[str, Any] = {}
    for key, value in settings.items():
        if prefix and not str(key).startswith(prefix):
            continue
        name = str(key)[len(prefix) :].lower()
        option = _breaker_option(name)
        if option is not None:
            breaker[option] = value
        elif name in OPTION_NAMES:
            values[name] = value
        else:
            accepted = ", ".join(prefix + option.upper() for option in OPTION_NAMES)
            raise ConfigError(f"{source}: {key}", "(unknown option)", "one of " + accepted)
    _nest_breaker(values, breaker, f"{source}: {prefix}BREAKER")
    return values


_BREAKER_INTEGERS = frozenset(f.name for f in fields(BreakerOptions) if f.type == "int")


def _from_environment(environ: Mapping[str, str]) -> dict[str, Any]:
    """``POOLGUARD_<OPTION>`` variables, parsed; unknown ``POOLGUARD_*`` names are someone else's."""
    values: dict[str, Any] = {}
    breaker: dict[str, Any] = {}
    for key, raw in environ.items():
        if not key.startswith(ENV_PREFIX):
            continue
        name = key[len(ENV_PREFIX) :].lower()
        option = _breaker_option(name)
        if option is not None:
            breaker[option] = _parse_number(key, raw, integer=option in _BREAKER_INTEGERS)
        elif name in ("breaker", "capture_stacks", "trust_request_start"):
            values[name] = _parse_bool(key, raw)
        elif name in ("health_path", "health_token"):
            values[name] = raw or None
        elif name == "health_detail":
            values[name] = raw
        elif name in ("max_wait", "leak_threshold", "ping_timeout"):
            values[name] = _parse_number(key, raw, integer=False)
        elif name == "probe_interval":
            values[name] = (
                None if raw.strip().lower() in ("", "none", "off") else _parse_number(key, raw, integer=False)
            )
        elif name == "databases":
            values[name] = tuple(alias.strip() for alias in raw.split(",") if alias.strip())
        elif name in OPTION_NAMES:
            raise ConfigError(key, raw, "this option cannot be set from the environment")
    _nest_breaker(values, breaker, ENV_PREFIX + "BREAKER")
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


def environment_options(environ: Mapping[str, str]) -> dict[str, Any]:
    """The options the ``POOLGUARD_*`` variables set, parsed (the breaker's as one ``breaker`` value);
    an adapter compares them with its settings so that neither is ignored without a word."""
    return _from_environment(environ)


def settings_options(settings: Mapping[str, Any], source: str, prefix: str = "") -> dict[str, Any]:
    """The options a framework's settings set, by option name, as :meth:`PoolGuardConfig.load` reads them."""
    return _from_settings(settings, source, prefix)


parse_number = _parse_number
parse_bool = _parse_bool
