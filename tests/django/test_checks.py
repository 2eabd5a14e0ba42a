"""System checks: called directly under override_settings, the returned lists compared."""

from __future__ import annotations

from django.core import checks as django_checks
from django.test import override_settings

from poolguard.django import checks


def test_valid_settings_give_no_messages() -> None:
    assert checks.check_settings() == []
    assert checks.check_asgi_persistent_connections() == []
    assert checks.check_connection_budget(databases=["default"]) == []


@override_settings(POOLGUARD={"MAX_WAIT": -1})
def test_e001_invalid_option() -> None:
    (message,) = checks.check_settings()
    assert message.id == "poolguard.E001"
    assert message.level == django_checks.ERROR
    assert "max_wait" in message.msg
    assert message.hint == checks.E001_HINT


@override_settings(POOLGUARD={"UNKNOWN_OPTION": 1})
def test_e001_unknown_option_names_it() -> None:
    (message,) = checks.check_settings()
    assert message.id == "poolguard.E001"
    assert "UNKNOWN_OPTION" in message.msg


@override_settings(POOLGUARD={"SQLALCHEMY": {"URL": "postgresql+psycopg://u:secret-pw@h/db", "POOLSIZE": 5}})
def test_e001_bad_sqlalchemy_option_hides_the_url() -> None:
    (message,) = checks.check_settings()
    assert message.id == "poolguard.E001"
    assert "POOLSIZE" in message.msg
    assert "secret-pw" not in message.msg


@override_settings(POOLGUARD={"DATABASES": ["default", "nope"]})
def test_e002_unknown_alias() -> None:
    assert checks.check_settings() == [
        django_checks.Error(
            "poolguard: POOLGUARD['DATABASES'] names 'nope', which is not in settings.DATABASES.",
            hint=checks.E002_HINT,
            id="poolguard.E002",
        )
    ]


@override_settings(ASGI_APPLICATION="project.asgi.application", POOLGUARD={"DATABASES": ["default", "persistent"]})
def test_w001_persistent_connections_under_asgi() -> None:
    assert checks.check_asgi_persistent_connections() == [checks.W001]


@override_settings(POOLGUARD={"DATABASES": ["persistent"]})
def test_w001_not_without_asgi() -> None:
    assert checks.check_asgi_persistent_connections() == []


@override_settings(ASGI_APPLICATION="project.asgi.application", POOLGUARD={"DATABASES": ["default", "pooled"]})
def test_w001_not_for_per_request_connections_or_the_pool() -> None:
    assert checks.check_asgi_persistent_connections() == []


@override_settings(POOLGUARD={"DATABASES": ["pooled"], "PROCESSES": 500})
def test_w002_budget_over_max_connections_only_with_database() -> None:
    assert checks.check_connection_budget() == []  # without --database the server is not asked
    (message,) = checks.check_connection_budget(databases=["pooled"])
    assert message.id == "poolguard.W002"
    assert message.level == django_checks.WARNING
    assert "'pooled' may get 500 connections" in message.msg


@override_settings(POOLGUARD={"DATABASES": ["default"], "THREADS": 8, "PROCESSES": 4})
def test_w002_within_budget() -> None:
    assert checks.connection_budget(checks.configure_settings(), "default") == 32
    assert checks.check_connection_budget(databases=["default"]) == []


def test_checks_are_registered_under_the_poolguard_tag() -> None:
    registered = django_checks.registry.registry.get_checks(include_deployment_checks=False)
    tagged = {check.__name__ for check in registered if "poolguard" in check.tags}
    assert tagged == {"check_settings", "check_asgi_persistent_connections", "check_connection_budget"}
    assert "database" in checks.check_connection_budget.tags
