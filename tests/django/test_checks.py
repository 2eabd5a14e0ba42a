"""System checks: called directly under override_settings, the returned lists compared."""

from __future__ import annotations

import importlib
import socket
import time
from pathlib import Path
from types import SimpleNamespace

import psycopg
import pytest
from django.core import checks as django_checks
from django.db import connections
from django.test import override_settings

from poolguard.django import checks, serving
from tests.django.helpers import state
from tests.support.databases import PG_CONNINFO, PG_URL


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


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("GUNICORN_CMD_ARGS", "--bind 0.0.0.0:8000 -k uvicorn.workers.UvicornWorker"),
        ("GUNICORN_CMD_ARGS", "--worker-class=uvicorn_worker.UvicornWorker -w 4"),
        ("SERVER_SOFTWARE", "Daphne"),
        ("POOLGUARD_ASGI", "yes"),
    ],
)
@override_settings(POOLGUARD={"DATABASES": ["persistent"]})
def test_w001_from_the_servers_environment(monkeypatch: pytest.MonkeyPatch, variable: str, value: str) -> None:
    monkeypatch.setenv(variable, value)
    assert checks.check_asgi_persistent_connections() == [checks.W001]


@override_settings(ASGI_APPLICATION="project.asgi.application", POOLGUARD={"DATABASES": ["persistent"], "ASGI": False})
def test_w001_the_projects_own_word_wins() -> None:
    assert checks.check_asgi_persistent_connections() == []


def test_asgi_signals_at_check_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bare = SimpleNamespace(INSTALLED_APPS=[], WSGI_APPLICATION="site.wsgi.application", SETTINGS_MODULE=None)
    assert serving.asgi_signal(None, bare, environ={}, argv=["manage.py"]) is None
    assert serving.asgi_signal(None, bare, environ={}, argv=["/venv/bin/uvicorn"]) == "the process (uvicorn)"
    daphne = SimpleNamespace(INSTALLED_APPS=["daphne"])
    assert serving.asgi_signal(None, daphne, environ={}, argv=[]) == "'daphne' in INSTALLED_APPS"
    # startproject writes asgi.py and wsgi.py: asgi.py alone is no signal, asgi.py without a WSGI module is one
    package = tmp_path / "asgisite"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "asgi.py").write_text(
        "from django.core.asgi import get_asgi_application\napplication = get_asgi_application()\n"
    )
    (package / "wsgi.py").write_text(
        "from django.core.wsgi import get_wsgi_application\napplication = get_wsgi_application()\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    both = SimpleNamespace(SETTINGS_MODULE="asgisite.settings", WSGI_APPLICATION="asgisite.wsgi.application")
    assert serving.asgi_signal(None, both, environ={}, argv=[]) is None
    (package / "wsgi.py").unlink()
    importlib.invalidate_caches()
    assert serving.asgi_signal(None, both, environ={}, argv=[]) == "the project's asgi.py (and no WSGI application)"


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


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, 1),
        ({"WEB_CONCURRENCY": "3"}, 3),
        ({"GUNICORN_CMD_ARGS": "--workers=4 --threads 8"}, 32),
        ({"GUNICORN_CMD_ARGS": "-w4 --threads=2", "WEB_CONCURRENCY": "9"}, 8),  # gunicorn's flag wins, as in gunicorn
        ({"POOLGUARD_PROCESSES": "2", "POOLGUARD_THREADS": "5", "WEB_CONCURRENCY": "9"}, 10),
    ],
)
def test_budget_from_the_servers_own_variables(
    monkeypatch: pytest.MonkeyPatch, environ: dict[str, str], expected: int
) -> None:
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    assert checks.connection_budget(checks.configure_settings(), "default") == expected


@override_settings(POOLGUARD={"DATABASES": ["default"], "PROCESSES": 2, "THREADS": 3})
def test_budget_settings_win_over_the_servers_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WEB_CONCURRENCY", "9")
    monkeypatch.setenv("GUNICORN_CMD_ARGS", "--threads 16")
    assert checks.connection_budget(checks.configure_settings(), "default") == 6


@override_settings(POOLGUARD={"DATABASES": ["pooled"]})
def test_w002_names_where_the_processes_come_from(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WEB_CONCURRENCY", "500")
    (message,) = checks.check_connection_budget(databases=["pooled"])
    assert "'pooled' may get 500 connections from this project (500 processes, from WEB_CONCURRENCY)" in message.msg


@override_settings(
    POOLGUARD={"DATABASES": ["default"], "SQLALCHEMY": {"URL": PG_URL, "POOL_SIZE": 4, "MAX_OVERFLOW": 0}}
)
def test_max_overflow_zero_is_accepted_and_counted_as_zero() -> None:
    assert checks.check_settings() == []
    engine = state().guard.engine
    assert (engine.pool.size(), engine.pool._max_overflow) == (4, 0)
    assert checks.connection_budget(checks.configure_settings(), "default") == 1 + 4 + 0


@override_settings(POOLGUARD={"DATABASES": ["default"], "SQLALCHEMY": {"URL": PG_URL, "WORKERS": 6}})
def test_budget_counts_the_sqlalchemy_pool_as_create_engine_sizes_it() -> None:
    assert checks.connection_budget(checks.configure_settings(), "default") == 1 + 6 + 3


@pytest.mark.parametrize(
    ("poolguard", "expected"),
    [
        (
            {"BREAKER": "yes"},
            "invalid value for settings.POOLGUARD['BREAKER']: 'yes'; accepted: True, False, or a dict",
        ),
        (
            {"DATABASES": "default"},
            "invalid value for settings.POOLGUARD['DATABASES']: 'default'; accepted: a non-empty list",
        ),
        ({"DATABASES": {"default": {}}}, "settings.POOLGUARD['DATABASES']"),
        ({"SQLALCHEMY": "postgresql+psycopg://h/db"}, "settings.POOLGUARD['SQLALCHEMY']"),
    ],
)
def test_a_string_where_a_dict_or_list_belongs_is_one_error_naming_the_setting(
    poolguard: dict[str, object], expected: str
) -> None:
    with override_settings(POOLGUARD=poolguard):
        (message,) = checks.check_settings()
    assert message.id == "poolguard.E001"
    assert expected in message.msg


def test_e001_invalid_environment_variable_hint_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POOLGUARD_MAX_WAIT", "soon")
    (message,) = checks.check_settings()
    assert message.id == "poolguard.E001"
    assert "POOLGUARD_MAX_WAIT" in message.msg
    assert message.hint == checks.E001_ENV_HINT.format(variable="POOLGUARD_MAX_WAIT")
    assert "settings.POOLGUARD" not in message.hint


@override_settings(POOLGUARD={"HEALTH_DETAIL": "when-authorized"})
def test_when_authorized_without_a_token_is_an_error_everywhere() -> None:
    (message,) = checks.check_settings()
    assert message.id == "poolguard.E001"
    assert "health_token" in message.msg


# -- app and middleware --------------------------------------------------------------------------------


def test_e003_middleware_without_the_app() -> None:
    with override_settings(INSTALLED_APPS=[]):
        assert checks.check_app_installed() == [checks.E003]
    assert checks.check_app_installed() == []
    with override_settings(INSTALLED_APPS=[], MIDDLEWARE=[]):
        assert checks.check_app_installed() == []


@override_settings(MIDDLEWARE=["django.middleware.common.CommonMiddleware"])
def test_w003_settings_without_the_middleware() -> None:
    assert checks.check_middleware() == [checks.W003]
    with override_settings(POOLGUARD=None):
        del_poolguard = checks.check_middleware()
    assert del_poolguard == []


@override_settings(
    MIDDLEWARE=[
        "django.middleware.security.SecurityMiddleware",
        "django.contrib.sessions.middleware.SessionMiddleware",
        checks.MIDDLEWARE_PATH,
    ]
)
def test_w004_middleware_not_first() -> None:
    assert checks.check_middleware() == [
        django_checks.Warning(
            "poolguard: poolguard.django.PoolGuardMiddleware is not first in MIDDLEWARE "
            "(django.middleware.security.SecurityMiddleware, django.contrib.sessions.middleware.SessionMiddleware "
            "run before it).",
            hint=checks.W004_HINT,
            id="poolguard.W004",
        )
    ]


def test_middleware_first_is_quiet() -> None:
    assert checks.check_middleware() == []


# -- --deploy ------------------------------------------------------------------------------------------


def test_deploy_defaults_are_quiet() -> None:
    assert checks.check_deploy() == []


@pytest.mark.parametrize(
    ("poolguard", "expected"),
    [
        ({"HEALTH_DETAIL": "always"}, ["W005"]),
        ({"HEALTH_DETAIL": "always", "HEALTH_PATH": None}, []),
        ({"HEALTH_DETAIL": "when-authorized", "HEALTH_TOKEN": "short"}, ["W006"]),
        ({"HEALTH_DETAIL": "when-authorized", "HEALTH_TOKEN": "x" * 32}, []),
        ({"HEALTH_DETAIL": "when-authorized", "HEALTH_TOKEN": lambda request: False}, []),
        ({"BREAKER": False}, ["W007"]),
        ({"BREAKER": False, "HEALTH_DETAIL": "always"}, ["W005", "W007"]),
    ],
)
def test_deploy_checks(poolguard: dict[str, object], expected: list[str]) -> None:
    with override_settings(POOLGUARD=poolguard):
        assert [message.id for message in checks.check_deploy()] == [f"poolguard.{code}" for code in expected]


def test_deploy_checks_run_only_with_deploy() -> None:
    with override_settings(POOLGUARD={"BREAKER": False}):
        plain = django_checks.run_checks(tags=["poolguard"])
        deploy = django_checks.run_checks(tags=["poolguard"], include_deployment_checks=True)
    assert [m.id for m in plain] == []
    assert [m.id for m in deploy] == ["poolguard.W007"]


def test_checks_are_registered_under_the_poolguard_tag() -> None:
    registered = django_checks.registry.registry.get_checks(include_deployment_checks=False)
    tagged = {check.__name__ for check in registered if "poolguard" in check.tags}
    assert tagged == {
        "check_settings",
        "check_asgi_persistent_connections",
        "check_connection_budget",
        "check_app_installed",
        "check_middleware",
        "check_threads_exceed_capacity",
    }
    assert "database" in checks.check_connection_budget.tags
    deploy = django_checks.registry.registry.get_checks(include_deployment_checks=True)
    assert {check.__name__ for check in deploy if "poolguard" in check.tags} - tagged == {"check_deploy"}


@pytest.mark.parametrize(
    ("poolguard", "expected"),
    [
        ({"DATABASES": ["pooled"], "THREADS": 1}, ["poolguard.W008"]),  # 1 thread, a pool of 1
        ({"DATABASES": ["pooled"], "THREADS": 2}, []),
        ({"DATABASES": ["persistent"], "THREADS": 8}, ["poolguard.W008"]),  # one connection per thread
        ({"DATABASES": ["persistent"], "THREADS": 8, "CAPACITY": 4}, []),
        ({"DATABASES": ["persistent"]}, []),  # the threads unknown: nothing to say
    ],
)
def test_w008_threads_must_outnumber_the_connections(
    poolguard: dict[str, object], expected: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("GUNICORN_CMD_ARGS", raising=False)
    with override_settings(POOLGUARD=poolguard):
        messages = checks.check_threads_exceed_capacity()
    assert [m.id for m in messages] == expected
    for message in messages:
        assert "poolguard cannot refuse them" in message.msg
        assert "--threads" in message.hint


def test_w008_reads_gunicorn_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GUNICORN_CMD_ARGS", "--workers 2 --threads 4")
    with override_settings(POOLGUARD={"DATABASES": ["persistent"], "CAPACITY": 4}):
        (message,) = checks.check_threads_exceed_capacity()
    assert "4 threads per process (gunicorn --threads)" in message.msg
    assert "set POOLGUARD['CAPACITY'] below 4" in message.hint


def test_the_server_limits_are_read_with_the_budgets_query() -> None:
    """W002 and ``poolguard budget --url`` read the same numbers: max_connections minus the reserved slots."""
    with psycopg.connect(PG_CONNINFO) as connection:
        maximum, reserved = (
            int(connection.execute(f"SHOW {name}").fetchone()[0])  # type: ignore[index]
            for name in ("max_connections", "superuser_reserved_connections")
        )
    assert checks._server_allows("default") == maximum - reserved


def test_the_server_limits_read_gives_up_on_a_silent_server(monkeypatch: pytest.MonkeyPatch) -> None:
    """``check --database`` on a server that accepts and never answers: no warning, and no hang."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        monkeypatch.setitem(connections["default"].settings_dict, "PORT", str(listener.getsockname()[1]))
        monkeypatch.setattr(checks, "LIMITS_TIMEOUT", 1.0)
        started = time.monotonic()
        assert checks._server_allows("default") is None
        assert time.monotonic() - started < 1.5
