"""The one options path: validated option objects, and one loader for keyword arguments, settings and environment."""

from __future__ import annotations

import inspect

import pytest

import poolguard
from poolguard.config import (
    ENGINE_OPTIONS,
    GUARD_OPTION_NAMES,
    HTTP_OPTION_NAMES,
    BreakerOptions,
    GuardOptions,
    HttpOptions,
    PoolGuardConfig,
)
from poolguard.errors import ConfigError


def test_the_options_are_grouped_by_who_reads_them() -> None:
    config = PoolGuardConfig.load({"health_path": "/-/db", "max_wait": 0.5}, environ={})
    assert config.http == HttpOptions(health_path="/-/db")
    assert config.guard == GuardOptions(max_wait=0.5)
    assert set(HTTP_OPTION_NAMES) == {
        "health_path",
        "health_detail",
        "health_token",
        "unavailable_body",
        "trust_request_start",
    }
    assert "breaker" in GUARD_OPTION_NAMES
    assert "health_path" not in GUARD_OPTION_NAMES


def test_keywords_win_over_settings_and_settings_over_the_environment() -> None:
    config = PoolGuardConfig.load(
        {"max_wait": 0.1},
        settings={"MAX_WAIT": 0.2, "LEAK_THRESHOLD": 5},
        environ={"POOLGUARD_MAX_WAIT": "0.3", "POOLGUARD_LEAK_THRESHOLD": "6", "POOLGUARD_PING_TIMEOUT": "2"},
    )
    assert (config.guard.max_wait, config.guard.leak_threshold, config.guard.ping_timeout) == (0.1, 5, 2.0)


@pytest.mark.parametrize(
    ("settings", "environ", "prefix"),
    [
        ({"BREAKER_OPEN_FOR": 7, "BREAKER": {"FAILURE_RATE": 0.2}}, {}, ""),
        ({"POOLGUARD_BREAKER_OPEN_FOR": 7, "POOLGUARD_BREAKER": {"FAILURE_RATE": 0.2}}, {}, "POOLGUARD_"),
        ({}, {"POOLGUARD_BREAKER_OPEN_FOR": "7", "POOLGUARD_BREAKER_FAILURE_RATE": "0.2"}, ""),
    ],
    ids=["django", "flask", "environment"],
)
def test_breaker_options_one_by_one_join_the_breaker_dict_everywhere(
    settings: dict[str, object], environ: dict[str, str], prefix: str
) -> None:
    config = PoolGuardConfig.load(settings=settings, environ=environ, prefix=prefix)
    assert config.guard.breaker == BreakerOptions(open_for=7, failure_rate=0.2)


@pytest.mark.parametrize(
    ("settings", "environ"),
    [
        ({"BREAKER": False, "BREAKER_OPEN_FOR": 7}, {}),
        ({}, {"POOLGUARD_BREAKER": "off", "POOLGUARD_BREAKER_OPEN_FOR": "7"}),
    ],
    ids=["settings", "environment"],
)
def test_breaker_options_with_the_breaker_off_are_an_error_not_ignored(
    settings: dict[str, object], environ: dict[str, str]
) -> None:
    with pytest.raises(ConfigError, match="BREAKER"):
        PoolGuardConfig.load(settings=settings, environ=environ)


def test_breaker_values_are_validated_when_the_settings_are_read() -> None:
    with pytest.raises(ConfigError, match=r"Breaker\.failure_rate"):
        PoolGuardConfig.load(settings={"BREAKER": {"FAILURE_RATE": 2}}, environ={})
    with pytest.raises(ConfigError, match="breaker options"):
        PoolGuardConfig.load(settings={"BREAKER": {"FAILURE": 0.2}}, environ={})


def test_an_unknown_setting_is_named_as_the_user_wrote_it() -> None:
    with pytest.raises(ConfigError, match="Flask config: POOLGUARD_MAX_WAITS"):
        PoolGuardConfig.load(
            settings={"POOLGUARD_MAX_WAITS": 1}, environ={}, source="Flask config", prefix="POOLGUARD_"
        )
    # Other keys of a framework's config are not poolguard's business.
    assert PoolGuardConfig.load(settings={"SECRET_KEY": "x"}, environ={}, prefix="POOLGUARD_").guard == GuardOptions()
    # Nor are other POOLGUARD_* variables of the environment (a deployment may have its own).
    assert PoolGuardConfig.load(environ={"POOLGUARD_SOMETHING_ELSE": "1"}).guard == GuardOptions()


def test_the_engine_options_are_create_engines_own_keywords() -> None:
    parameters = inspect.signature(poolguard.create_engine).parameters
    keywords = {name for name, p in parameters.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}
    # hide_parameters is SQLAlchemy's own, which create_engine documents and defaults to True.
    assert set(ENGINE_OPTIONS) == {"url", "hide_parameters"} | keywords


def test_engine_settings_are_checked_once_for_every_adapter() -> None:
    url = "postgresql+psycopg://u:secret-pw@h/db"
    for source, prefix, named in (
        ("settings.POOLGUARD", "", "settings.POOLGUARD['SQLALCHEMY']"),
        ("Flask config", "POOLGUARD_", "POOLGUARD_"),
    ):
        settings = {f"{prefix}SQLALCHEMY": {"URL": url, "POOLSIZE": 5}}
        with pytest.raises(ConfigError, match="POOLSIZE") as caught:
            PoolGuardConfig.load(settings=settings, environ={}, source=source, prefix=prefix)
        assert named in str(caught.value)
        assert "secret-pw" not in str(caught.value)
    with pytest.raises(ConfigError, match="URL"):
        PoolGuardConfig.load(settings={"SQLALCHEMY": {"POOL_SIZE": 5}}, environ={})
    loaded = PoolGuardConfig.load(settings={"SQLALCHEMY": {"URL": url, "MAX_OVERFLOW": 0}}, environ={})
    assert loaded.sqlalchemy == {"url": url, "max_overflow": 0}


def test_guard_kwargs_build_the_guard_the_settings_describe() -> None:
    kwargs = PoolGuardConfig.load(settings={"BREAKER": {"OPEN_FOR": 9}}, environ={}).guard_options()
    assert kwargs["breaker"] == BreakerOptions(open_for=9)
    assert PoolGuardConfig.load(settings={"BREAKER": False}, environ={}).guard_options()["breaker"] is False


@pytest.mark.parametrize(
    ("options", "setting"),
    [
        ({"health_path": "db"}, "health_path"),
        ({"health_detail": "sometimes"}, "health_detail"),
        ({"health_detail": "when-authorized"}, "health_token"),
        ({"max_wait": -1}, "max_wait"),
        ({"capture_stacks": "yes"}, "capture_stacks"),
        ({"trust_request_start": "yes"}, "trust_request_start"),
        ({"trust_request_start": 1}, "trust_request_start"),
        ({"tracer_provider": "otel"}, "tracer_provider"),
        ({"databases": []}, "databases"),
    ],
)
def test_each_invalid_option_is_named(options: dict[str, object], setting: str) -> None:
    with pytest.raises(ConfigError, match=setting):
        PoolGuardConfig.load(options, environ={})


def test_unavailable_body_must_be_callable() -> None:
    with pytest.raises(ConfigError, match="unavailable_body"):
        HttpOptions(unavailable_body="not callable")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("settings", "setting"),
    [
        ({"BREAKER": "yes"}, "settings.POOLGUARD['BREAKER']"),
        ({"DATABASES": "default"}, "settings.POOLGUARD['DATABASES']"),
        ({"DATABASES": {"default": {}}}, "settings.POOLGUARD['DATABASES']"),
    ],
)
def test_a_string_where_a_dict_or_list_belongs_names_the_setting(settings: dict[str, object], setting: str) -> None:
    with pytest.raises(ConfigError) as caught:
        PoolGuardConfig.load(settings=settings, environ={}, source="settings.POOLGUARD")
    assert caught.value.setting == setting


@pytest.mark.parametrize(
    ("kwargs", "settings", "environ", "prefix"),
    [
        ({"trust_request_start": True}, {}, {}, ""),
        ({}, {"POOLGUARD_TRUST_REQUEST_START": True}, {}, "POOLGUARD_"),
        ({}, {"TRUST_REQUEST_START": True}, {}, ""),
        ({}, {}, {"POOLGUARD_TRUST_REQUEST_START": "1"}, ""),
        ({}, {}, {"POOLGUARD_TRUST_REQUEST_START": "on"}, ""),
    ],
    ids=["keyword", "flask", "django", "environment", "environment-on"],
)
def test_trust_request_start_is_read_from_every_source(
    kwargs: dict[str, object], settings: dict[str, object], environ: dict[str, str], prefix: str
) -> None:
    assert PoolGuardConfig.load(environ={}).http.trust_request_start is False
    config = PoolGuardConfig.load(kwargs, settings=settings, environ=environ, prefix=prefix)
    assert config.http.trust_request_start is True
    assert "trust_request_start" in config.explicit


def test_trust_request_start_from_the_environment_is_parsed_like_the_other_flags() -> None:
    environ = {"POOLGUARD_TRUST_REQUEST_START": "off"}
    assert PoolGuardConfig.load(environ=environ).http.trust_request_start is False
    assert PoolGuardConfig.load({"trust_request_start": True}, environ=environ).http.trust_request_start is True
    with pytest.raises(ConfigError, match="POOLGUARD_TRUST_REQUEST_START") as caught:
        PoolGuardConfig.load(environ={"POOLGUARD_TRUST_REQUEST_START": "perhaps"})
    assert caught.value.setting == "POOLGUARD_TRUST_REQUEST_START"
