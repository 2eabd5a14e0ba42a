"""Nothing secret reaches telemetry: no password, no DSN, no statement text, no bound parameter."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from sqlalchemy import exc, text

from poolguard import Breaker, CircuitOpen, Guard
from tests.support.databases import DEAD_PORT, HOST, pg_url
from tests.telemetry.conftest import Otel

pytestmark = pytest.mark.postgres

GuardFactory = Callable[..., Guard]
PASSWORD = "Pw-4f9c1e-never-export"
PARAMETER = "param-7d2a90-never-export"
URL = pg_url(password=PASSWORD)  # trust auth: the password is ignored
DEAD_URL = pg_url(password=PASSWORD, port=DEAD_PORT)
FORBIDDEN = (PASSWORD, PARAMETER, "postgresql+psycopg://", HOST, "SELECT", "pg_sleep")


def exported_text(otel: Otel) -> str:
    spans = "\n".join(span.to_json() for span in otel.spans())
    data = otel.reader.get_metrics_data()
    return spans + "\n" + (data.to_json() if data is not None else "")


def test_password_parameters_and_statements_reach_no_span_event_or_metric(otel: Otel, guard_on: GuardFactory):
    guard = guard_on(URL, leak_threshold=30.0)
    dead = guard_on(DEAD_URL, name="dead", breaker=Breaker(consecutive_failures=1, open_for=60.0))
    with otel.tracer.start_as_current_span("POST /login"):
        with guard.request_scope(route="/login") as scope:
            assert scope.session.execute(text("SELECT :secret"), {"secret": PARAMETER}).scalar() == PARAMETER
        with pytest.raises(exc.DataError), guard.request_scope(route="/login") as scope:
            scope.session.execute(text("SELECT CAST(:secret AS integer)"), {"secret": PARAMETER})
        with pytest.raises(exc.OperationalError), dead.connection():
            pass
        with pytest.raises(CircuitOpen), dead.connection():
            pass
        with guard.request_scope(route="/login"):
            forgotten = guard.engine.connect()  # left open: a leak event
            forgotten.execute(text("SELECT :secret"), {"secret": PARAMETER})
    forgotten.close()

    names = {span.name for span in otel.spans()}
    assert {"POST /login", "checkout primary", "checkout dead"} <= names
    exported = exported_text(otel)
    assert "poolguard.leak_suspected" in exported
    assert "poolguard.breaker_transition" in exported
    assert "db.client.connection.wait_time" in exported
    for forbidden in FORBIDDEN:
        assert forbidden not in exported, f"{forbidden!r} was exported"


def test_checkout_span_carries_only_the_documented_attributes(otel: Otel, guard_on: GuardFactory):
    guard = guard_on(URL)
    with otel.tracer.start_as_current_span("GET /"), guard.connection() as connection:
        connection.execute(text("SELECT :secret"), {"secret": PARAMETER})
    [span] = otel.spans("checkout primary")
    assert set(span.attributes or {}) == {"db.client.connection.pool.name", "db.system.name", "poolguard.outcome"}
    assert span.events == ()
