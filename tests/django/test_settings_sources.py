"""Item 3 for Django: an option set in settings.POOLGUARD or a POOLGUARD_* variable applies or fails at startup."""

from __future__ import annotations

import pytest
from django.test import override_settings

from poolguard.config import BreakerOptions
from poolguard.django import checks
from poolguard.django.conf import configure_settings
from poolguard.errors import ConfigError


def test_a_variable_fills_what_the_dict_leaves_out(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POOLGUARD_LEAK_THRESHOLD", "12")
    assert configure_settings().config.guard.leak_threshold == 12.0


@override_settings(POOLGUARD={"DATABASES": ["default"], "MAX_WAIT": 0.5})
def test_a_variable_the_dict_overrides_with_another_value_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POOLGUARD_MAX_WAIT", "2")
    with pytest.raises(ConfigError, match=r"POOLGUARD_MAX_WAIT: '2'.*settings.POOLGUARD\['MAX_WAIT'\] has \(0.5\)"):
        configure_settings()
    (message,) = checks.check_settings()
    assert message.id == "poolguard.E001"
    assert "POOLGUARD_MAX_WAIT" in message.hint


@override_settings(POOLGUARD={"DATABASES": ["default"], "MAX_WAIT": 0.5})
def test_the_same_value_in_both_places_is_fine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POOLGUARD_MAX_WAIT", "0.5")
    monkeypatch.setenv("POOLGUARD_DATABASES", "default")
    assert configure_settings().config.guard.max_wait == 0.5


@override_settings(POOLGUARD={"DATABASES": ["default"], "HEALTH_DETAIL": "when-authorized", "HEALTH_TOKEN": "a" * 40})
def test_a_conflicting_token_is_named_but_never_shown(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POOLGUARD_HEALTH_TOKEN", "b" * 40)
    with pytest.raises(ConfigError, match="POOLGUARD_HEALTH_TOKEN") as caught:
        configure_settings()
    assert "a" * 40 not in str(caught.value)
    assert "b" * 40 not in str(caught.value)


@override_settings(POOLGUARD={"DATABASES": ["default"], "BREAKER": {"FAILURE_RATE": 0.3}})
def test_breaker_variables_join_the_dicts_breaker_options(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POOLGUARD_BREAKER_OPEN_FOR", "7")
    assert configure_settings().config.guard.breaker == BreakerOptions(failure_rate=0.3, open_for=7)


@override_settings(POOLGUARD={"DATABASES": ["default"], "BREAKER_FAILURE_RATE": 0.3})
def test_breaker_variables_join_flat_breaker_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POOLGUARD_BREAKER_OPEN_FOR", "7")
    assert configure_settings().config.guard.breaker == BreakerOptions(failure_rate=0.3, open_for=7)


@pytest.mark.parametrize(
    ("poolguard", "environ", "variable"),
    [
        ({"BREAKER": {"OPEN_FOR": 10}}, {"POOLGUARD_BREAKER_OPEN_FOR": "7"}, "POOLGUARD_BREAKER_OPEN_FOR"),
        ({"BREAKER": False}, {"POOLGUARD_BREAKER_OPEN_FOR": "7"}, "POOLGUARD_BREAKER"),
        ({"BREAKER": False}, {"POOLGUARD_BREAKER": "on"}, "POOLGUARD_BREAKER"),
        ({"BREAKER": {"OPEN_FOR": 10}}, {"POOLGUARD_BREAKER": "off"}, "POOLGUARD_BREAKER"),
        ({"PROCESSES": 4}, {"POOLGUARD_PROCESSES": "8"}, "POOLGUARD_PROCESSES"),
        ({"ASGI": False}, {"POOLGUARD_ASGI": "true"}, "POOLGUARD_ASGI"),
    ],
)
def test_breaker_and_django_only_conflicts_are_errors(
    monkeypatch: pytest.MonkeyPatch, poolguard: dict[str, object], environ: dict[str, str], variable: str
) -> None:
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    with override_settings(POOLGUARD={"DATABASES": ["default"], **poolguard}), pytest.raises(ConfigError) as caught:
        configure_settings()
    assert caught.value.setting == variable


@pytest.mark.parametrize(
    ("variable", "value"),
    [("POOLGUARD_PROCESSES", "0"), ("POOLGUARD_THREADS", "many"), ("POOLGUARD_ASGI", "perhaps")],
)
def test_django_only_variables_are_validated_and_named(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError) as caught:
        configure_settings()
    assert caught.value.setting == variable


def test_django_only_variables_apply(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POOLGUARD_PROCESSES", "3")
    monkeypatch.setenv("POOLGUARD_THREADS", "4")
    monkeypatch.setenv("POOLGUARD_ASGI", "no")
    loaded = configure_settings()
    assert (loaded.processes, loaded.threads, loaded.asgi) == (3, 4, False)


@pytest.mark.parametrize("value", ["tests.django.drf.nope", "no_such_module.render"])
def test_unavailable_body_path_that_does_not_import_is_an_error(value: str) -> None:
    with override_settings(POOLGUARD={"DATABASES": ["default"], "UNAVAILABLE_BODY": value}):
        (message,) = checks.check_settings()
    assert message.id == "poolguard.E001"
    assert "settings.POOLGUARD['UNAVAILABLE_BODY']" in message.msg


def test_unavailable_body_cannot_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POOLGUARD_UNAVAILABLE_BODY", "tests.django.drf.problem_json")
    with pytest.raises(ConfigError, match="cannot be set from the environment"):
        configure_settings()
