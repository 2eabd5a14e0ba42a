"""The pooler signs, on the text and numbers drivers give (the servers' side: tests/faults/test_pooler.py)."""

from __future__ import annotations

import logging

import pytest

from poolguard import _pooler


@pytest.mark.parametrize(
    ("message", "parameter"),
    [
        # psycopg through PgBouncer 1.18 (the whole libpq message)
        (
            'connection failed: connection to server at "127.0.0.1", port 6432 failed: '
            "FATAL:  unsupported startup parameter: options",
            "options",
        ),
        ("unsupported startup parameter: statement_timeout", "statement_timeout"),  # asyncpg
        ("FATAL:  unsupported startup parameter in options: statement_timeout", "statement_timeout"),  # 1.20+
        ("Unsupported startup parameter:", "?"),
    ],
)
def test_a_refused_startup_parameter_is_named(message: str, parameter: str) -> None:
    assert _pooler.refused_startup_parameter(RuntimeError(message)) == parameter


@pytest.mark.parametrize(
    "message",
    ['unrecognized configuration parameter "statement_timeot"', "password authentication failed", "timeout"],
)
def test_other_errors_name_none(message: str) -> None:
    assert _pooler.refused_startup_parameter(RuntimeError(message)) is None


def test_pooled_params_change_only_where_direct_and_pooled_differ() -> None:
    direct = {"options": "-c statement_timeout=30000", "connect_timeout": 2, "application_name": "orders"}
    pooled = {"connect_timeout": 2, "application_name": "orders", "prepare_threshold": None}
    params = {**direct, "host": "db", "connect_timeout": 1}  # a probe bounded it; the URL gave the host
    assert _pooler.pooled_params(params, direct, pooled) == {
        "connect_timeout": 1,
        "application_name": "orders",
        "host": "db",
        "prepare_threshold": None,
    }
    assert _pooler.pooled_params(params, direct, direct) == params


def test_a_decision_is_made_and_said_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "poolguard")
    pooler = _pooler.Pooler(_pooler.target("db.internal", None, "orders"))
    assert not pooler.decided
    pooler.decide(_pooler.PGBOUNCER, "it refused the startup parameter 'options'")
    pooler.decide(None, "a later connection found otherwise")
    assert (pooler.decided, pooler.kind) == (True, _pooler.PGBOUNCER)
    (record,) = [r for r in caplog.records if r.levelno >= logging.INFO]
    assert "db.internal:5432/orders" in record.getMessage()


def test_no_pooler_is_not_logged_at_info(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "poolguard")
    _pooler.Pooler("db:5432/orders").decide(None, "its cancel key is the server's pid")
    assert not caplog.records


class _Psycopg2Before28:
    """psycopg2 before 2.8 had no ``info``; its ``get_backend_pid()`` is libpq's PQbackendPID, the startup pid."""

    def get_backend_pid(self) -> int:
        return 4242


def test_client_pid_reads_every_drivers_spelling() -> None:
    assert _pooler.client_pid(_Psycopg2Before28()) == 4242
    assert _pooler.client_pid(object()) is None
