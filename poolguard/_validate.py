"""Validation of numeric settings, shared by every constructor that takes them.

Each helper returns the value converted to its type or raises ConfigError naming the setting and
what it accepts, so a bad value fails at startup with a message that says the fix.
"""

from __future__ import annotations

import math

from poolguard.errors import ConfigError


def _number(setting: str, value: object, accepted: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(setting, value, accepted)
    number = float(value)
    if math.isnan(number):
        raise ConfigError(setting, value, accepted)
    return number


def positive_float(setting: str, value: object) -> float:
    """A number of seconds (or a ratio) that must be greater than zero; infinity is refused."""
    accepted = "a finite number greater than 0"
    number = _number(setting, value, accepted)
    if number <= 0 or math.isinf(number):
        raise ConfigError(setting, value, accepted)
    return number


def optional_positive_float(setting: str, value: object) -> float | None:
    """None (the feature is off), or a finite number greater than zero."""
    if value is None:
        return None
    accepted = "None, or a finite number greater than 0"
    number = _number(setting, value, accepted)
    if number <= 0 or math.isinf(number):
        raise ConfigError(setting, value, accepted)
    return number


def non_negative_float(setting: str, value: object) -> float:
    """A number that may be zero but not negative or infinite."""
    accepted = "a finite number of at least 0"
    number = _number(setting, value, accepted)
    if number < 0 or math.isinf(number):
        raise ConfigError(setting, value, accepted)
    return number


def fraction(setting: str, value: object) -> float:
    """A rate in (0, 1]: 0 would trip on every call, more than 1 could never be reached."""
    accepted = "a number greater than 0 and at most 1"
    number = _number(setting, value, accepted)
    if not 0 < number <= 1:
        raise ConfigError(setting, value, accepted)
    return number


def positive_int(setting: str, value: object) -> int:
    """A count that must be at least 1."""
    accepted = "a whole number of at least 1"
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(setting, value, accepted)
    return value


def non_negative_int(setting: str, value: object) -> int:
    """A count that may be zero."""
    accepted = "a whole number of at least 0"
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(setting, value, accepted)
    return value
