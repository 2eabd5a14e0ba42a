"""``POOLGUARD["TRUST_REQUEST_START"]``: the time a request queued before Django got it counts against MAX_WAIT."""

from __future__ import annotations

import uuid

import pytest
from django.test import AsyncClient, Client, override_settings
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import HistogramDataPoint, InMemoryMetricReader

from poolguard.django.conf import configure_settings
from poolguard.errors import ConfigError
from tests.django.conftest import row_exists
from tests.django.helpers import assert_503, state
from tests.support.clock import arrived

TRUSTED = {"DATABASES": ["default"], "TRUST_REQUEST_START": True}


def _name() -> str:
    return f"item-{uuid.uuid4().hex[:12]}"


@override_settings(POOLGUARD=TRUSTED)
def test_a_request_that_queued_past_max_wait_gets_the_503_and_db_free_views_answer() -> None:
    client = Client(raise_request_exception=False)
    name = _name()
    assert_503(client.get("/write/", {"name": name}, headers={"X-Request-Start": arrived(2.0)}), "pool_saturated")
    assert not row_exists(name)
    free = client.get("/nodb/", headers={"X-Request-Start": arrived(2.0)})
    assert (free.status_code, free.content) == (200, b"no database here")
    gate = state().guards["default"].gate
    assert (gate.checkouts, gate.connections_created, gate.shed["pool_saturated"]) == (0, 0, 1)

    recent = _name()
    assert client.get("/write/", {"name": recent}, headers={"X-Request-Start": arrived(0.05)}).status_code == 200
    assert row_exists(recent)


@override_settings(POOLGUARD=TRUSTED)
async def test_the_same_under_asgi() -> None:
    client = AsyncClient(raise_request_exception=False)
    assert_503(
        await client.get("/async/write/", {"name": _name()}, headers={"X-Request-Start": arrived(2.0)}),
        "pool_saturated",
    )
    assert (await client.get("/async/nodb/", headers={"X-Request-Start": arrived(2.0)})).status_code == 200
    assert state().guards["default"].gate.checkouts == 0


def test_the_header_is_ignored_unless_trusted() -> None:
    client = Client(raise_request_exception=False)
    name = _name()
    assert client.get("/write/", {"name": name}, headers={"X-Request-Start": arrived(2.0)}).status_code == 200
    assert row_exists(name)
    assert state().guards["default"].gate.shed["pool_saturated"] == 0


@override_settings(POOLGUARD=TRUSTED)
@pytest.mark.parametrize("header", ["soon", "t=", "t=1.7e15", "t=100", "t=" + "9" * 30])
def test_a_header_django_cannot_read_is_ignored(header: str) -> None:
    client = Client(raise_request_exception=False)
    assert client.get("/write/", {"name": _name()}, headers={"X-Request-Start": header}).status_code == 200
    assert state().guards["default"].gate.shed["pool_saturated"] == 0


def test_the_queue_time_is_recorded_once_per_request_not_once_per_alias() -> None:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    settings = {**TRUSTED, "DATABASES": ["default", "pooled"], "METER_PROVIDER": provider}
    try:
        with override_settings(POOLGUARD=settings):
            client = Client()
            assert client.get("/nodb/", headers={"X-Request-Start": arrived(0.25)}).status_code == 200
            assert client.get("/nodb/").status_code == 200  # no header: nothing recorded
            data = reader.get_metrics_data()
    finally:
        provider.shutdown()
    assert data is not None
    [point] = [
        p
        for rm in data.resource_metrics
        for sm in rm.scope_metrics
        for m in sm.metrics
        if m.name == "poolguard.request.queue_time"
        for p in m.data.data_points
    ]
    assert isinstance(point, HistogramDataPoint)
    assert dict(point.attributes) == {"db.client.connection.pool.name": "default"}
    assert point.count == 1
    assert 0.2 < point.sum < 5.0


def test_the_option_comes_from_the_settings_or_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert configure_settings({"DATABASES": ["default"]}, environ={}).config.http.trust_request_start is False
    assert configure_settings(TRUSTED, environ={}).config.http.trust_request_start is True
    monkeypatch.setenv("POOLGUARD_TRUST_REQUEST_START", "yes")
    assert configure_settings({"DATABASES": ["default"]}).config.http.trust_request_start is True
    with pytest.raises(ConfigError, match="POOLGUARD_TRUST_REQUEST_START"):
        configure_settings({"DATABASES": ["default"], "TRUST_REQUEST_START": False})
    with pytest.raises(ConfigError, match="trust_request_start"):
        configure_settings({"DATABASES": ["default"], "TRUST_REQUEST_START": "yes"}, environ={})
