"""The files in integrations/ speak about metrics poolguard really exports.

Every metric name in the Prometheus alert rules and the Grafana dashboard is checked against a LIVE
``/metrics`` endpoint (prometheus_client's HTTP server over ``poolguard.prometheus``, with a Guard
doing real PostgreSQL checkouts, a saturation and a tripped breaker). The collector config is
checked for a consistent structure: every component a pipeline names is defined, and used.
"""

from __future__ import annotations

import json
import re
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy
import yaml
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import exc, text

import poolguard.prometheus
from poolguard import Breaker, CircuitOpen, Guard, PoolSaturated
from poolguard.telemetry import HTTP_ROUTE
from tests.support.databases import DEAD_PORT, PG_URL, pg_url

ROOT = Path(__file__).resolve().parents[2]
ALERTS = ROOT / "integrations" / "prometheus" / "alerts.yaml"
DASHBOARD = ROOT / "integrations" / "grafana" / "poolguard-dashboard.json"
COLLECTOR = ROOT / "integrations" / "otel-collector" / "config.yaml"

PROMQL_WORDS = {
    # aggregation operators and keywords
    *[
        "sum",
        "min",
        "max",
        "avg",
        "group",
        "stddev",
        "stdvar",
        "count",
        "count_values",
        "bottomk",
        "topk",
        "quantile",
        "limitk",
        "limit_ratio",
    ],
    *[
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "bool",
        "and",
        "or",
        "unless",
        "offset",
        "atan2",
        "inf",
        "nan",
    ],
    # functions
    *[
        "abs",
        "absent",
        "absent_over_time",
        "ceil",
        "changes",
        "clamp",
        "clamp_max",
        "clamp_min",
        "day_of_month",
        "day_of_week",
    ],
    *[
        "day_of_year",
        "days_in_month",
        "delta",
        "deriv",
        "exp",
        "floor",
        "histogram_quantile",
        "histogram_count",
        "histogram_sum",
    ],
    *[
        "histogram_fraction",
        "histogram_avg",
        "holt_winters",
        "double_exponential_smoothing",
        "hour",
        "idelta",
        "increase",
        "irate",
    ],
    *[
        "label_join",
        "label_replace",
        "ln",
        "log2",
        "log10",
        "minute",
        "month",
        "predict_linear",
        "rate",
        "resets",
        "round",
        "scalar",
        "sgn",
        "sort",
    ],
    *[
        "sort_desc",
        "sqrt",
        "time",
        "timestamp",
        "vector",
        "year",
        "avg_over_time",
        "min_over_time",
        "max_over_time",
        "sum_over_time",
    ],
    *[
        "count_over_time",
        "quantile_over_time",
        "stddev_over_time",
        "stdvar_over_time",
        "last_over_time",
        "present_over_time",
    ],
}
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
SCRAPE_LABELS = {"job", "instance"}  # added by Prometheus when it scrapes


def promql_metric_names(expr: str) -> set[str]:
    """Identifiers that name a series: followed by ``{``, ``[``, a space, ``)`` or the end, not functions."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    expr = re.sub(r"\{[^}]*\}", "{}", expr)
    expr = re.sub(r"\[[^\]]*\]", "[]", expr)
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", r"\1 ", expr)
    found = re.findall(r"(?<![\w$.:])([a-zA-Z_:][a-zA-Z0-9_:]*)(?=\s*[{\[]|\s|\)|,|$)", expr)
    return {name for name in found if name not in PROMQL_WORDS}


def promql_label_names(expr: str) -> set[str]:
    """Label names in matchers and in by/without/on/ignoring clauses."""
    labels: set[str] = set()
    for matchers in re.findall(r"\{([^}]*)\}", expr):
        labels.update(re.findall(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)", matchers))
    for grouping in re.findall(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)", expr):
        labels.update(label.strip() for label in grouping.split(",") if label.strip())
    return labels


def test_the_extractor_finds_series_and_skips_functions_labels_and_variables():
    expr = (
        "histogram_quantile(0.99, sum by (pool_name, le) "
        '(rate(a_seconds_bucket{pool_name=~"$pool"}[$__rate_interval])))'
        " / on (pool_name) group_left b_total > 0.5 and c unless max(d{x='y'})"
    )
    assert promql_metric_names(expr) == {"a_seconds_bucket", "b_total", "c", "d"}
    assert promql_label_names(expr) == {"pool_name", "le", "x"}
    assert promql_metric_names("db_client_connection_count") == {"db_client_connection_count"}


def alert_expressions() -> list[str]:
    rules = yaml.safe_load(ALERTS.read_text())
    return [rule["expr"] for group in rules["groups"] for rule in group["rules"]]


def dashboard_expressions() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
            match = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", query)
            assert match, query
            exprs.append(f"{match[1]}{{{match[2]}!=''}}")
    return exprs


# -- a live /metrics ------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def saturate(guard: Guard, clients: int) -> int:
    barrier = threading.Barrier(clients)
    saturated: list[int] = []

    def request() -> None:
        barrier.wait()
        try:
            with guard.request_scope(route="/reports/{id}") as scope:
                scope.session.execute(text("SELECT pg_sleep(0.3)"))
        except PoolSaturated:
            saturated.append(1)

    threads = [threading.Thread(target=request) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    return len(saturated)


class Live:
    def __init__(self, body: str) -> None:
        self.families = {f.name: f for f in text_string_to_metric_families(body)}
        self.histograms = {name for name, f in self.families.items() if f.type == "histogram"}
        self.samples = {s.name for f in self.families.values() for s in f.samples}
        self.labels = {label for f in self.families.values() for s in f.samples for label in s.labels}

    def exports(self, name: str) -> bool:
        for suffix in HISTOGRAM_SUFFIXES:
            base = name.removesuffix(suffix)
            if name.endswith(suffix) and base in self.histograms:
                return name in self.samples
        return name in self.samples or name in self.families


@pytest.fixture(scope="module")
def live() -> Iterator[Live]:
    registry = CollectorRegistry()
    engine = sqlalchemy.create_engine(PG_URL, pool_size=2, max_overflow=0)
    dead_engine = sqlalchemy.create_engine(pg_url(port=DEAD_PORT))
    guard = Guard(engine, name="primary", max_wait=0.1)
    dead = Guard(dead_engine, name="dead", breaker=Breaker(consecutive_failures=1, open_for=60.0))
    server, thread = start_http_server(free_port(), addr="127.0.0.1", registry=registry)
    try:
        poolguard.prometheus.register(guard, registry)
        poolguard.prometheus.register(dead, registry)
        for _ in range(5):
            with guard.request_scope(route="/orders/{id}") as scope:
                scope.session.execute(text("SELECT 1"))
        with guard.request_scope(route="/orders/{id}", queued=0.02) as scope:  # a trusted X-Request-Start
            scope.session.execute(text("SELECT 1"))
        assert saturate(guard, 8) >= 4
        with pytest.raises(exc.OperationalError), dead.connection():
            pass
        with pytest.raises(CircuitOpen), dead.connection():
            pass
        response = httpx.get(f"http://127.0.0.1:{server.server_address[1]}/metrics", timeout=5)
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/plain")
        yield Live(response.text)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
        guard.close()
        dead.close()
        engine.dispose()
        dead_engine.dispose()


@pytest.mark.postgres
def test_live_scrape_has_every_documented_series(live: Live):
    for name in (
        "db_client_connection_count",
        "db_client_connection_max",
        "db_client_connection_idle_max",
        "db_client_connection_idle_min",
        "db_client_connection_pending_requests",
        "db_client_connection_timeouts_total",
        "poolguard_breaker_state",
        "poolguard_requests_shed_total",
        "poolguard_connection_leaks_total",
        "db_client_connection_wait_time_seconds_bucket",
        "db_client_connection_use_time_seconds_bucket",
        "db_client_connection_create_time_seconds_bucket",
        "poolguard_request_queue_time_seconds_bucket",
    ):
        assert live.exports(name), name


@pytest.mark.postgres
@pytest.mark.parametrize(
    ("source", "expressions"), [("alerts", alert_expressions), ("dashboard", dashboard_expressions)]
)
def test_every_metric_and_label_used_is_exported(live: Live, source: str, expressions: Any):
    used: set[str] = set()
    for expr in expressions():
        names = promql_metric_names(expr)
        assert names, f"{source}: no metric found in {expr!r}"
        used |= names
        unknown_labels = promql_label_names(expr) - live.labels - SCRAPE_LABELS
        assert not unknown_labels, f"{source}: labels {unknown_labels} are not exported ({expr!r})"
    missing = sorted(name for name in used if not live.exports(name))
    assert not missing, f"{source} uses metrics poolguard does not export: {missing}"


def test_alert_rules_cover_what_the_issue_asks_for():
    rules = {rule["alert"]: rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]}
    by_metric = {name: alert for alert, rule in rules.items() for name in promql_metric_names(rule["expr"])}
    assert by_metric["db_client_connection_count"] == by_metric["db_client_connection_max"]
    assert "db_client_connection_wait_time_seconds_bucket" in by_metric
    assert "db_client_connection_timeouts_total" in by_metric
    assert "poolguard_breaker_state" in by_metric
    assert "poolguard_connection_leaks_total" in by_metric
    assert "poolguard_request_queue_time_seconds_bucket" in by_metric
    assert "> 0.9" in rules[by_metric["db_client_connection_count"]]["expr"]
    assert rules[by_metric["db_client_connection_count"]]["for"] == "5m"
    assert "histogram_quantile(0.99" in rules[by_metric["db_client_connection_wait_time_seconds_bucket"]]["expr"]
    assert "== 2" in rules[by_metric["poolguard_breaker_state"]]["expr"]
    for name, rule in rules.items():
        assert re.fullmatch(r"[A-Z][A-Za-z0-9]+", name)
        assert rule["labels"]["severity"] in {"warning", "critical"}
        assert rule["annotations"]["summary"]
        if "for" in rule:
            assert re.fullmatch(r"\d+[smh]", rule["for"])


def test_dashboard_structure():
    dashboard = json.loads(DASHBOARD.read_text())
    panels = dashboard["panels"]
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids))
    titles = " | ".join(panel["title"].lower() for panel in panels)
    for wanted in (
        "connections by state",
        "utilisation",
        "p50 / p99",
        "p99 by route",
        "timeouts",
        "shed",
        "breaker",
        "leaks",
        "queued before the app",
    ):
        assert wanted in titles, wanted
    variables = {variable["name"] for variable in dashboard["templating"]["list"]}
    assert {"datasource", "pool"} <= variables
    for panel in panels:
        assert panel["datasource"]["uid"] == "${datasource}"
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["expr"].count("(") == target["expr"].count(")"), target["expr"]
    occupied: set[tuple[int, int]] = set()
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24
        cells = {
            (x, y) for x in range(grid["x"], grid["x"] + grid["w"]) for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not occupied & cells, f"panel {panel['title']!r} overlaps another"
        occupied |= cells


# -- the collector config ------------------------------------------------------------------------------------


def test_collector_config_is_consistent():
    config = yaml.safe_load(COLLECTOR.read_text())
    protocols = config["receivers"]["otlp"]["protocols"]
    assert protocols["grpc"]["endpoint"].endswith(":4317")
    assert protocols["http"]["endpoint"].endswith(":4318")
    sections = {"receivers": "receivers", "processors": "processors", "exporters": "exporters"}
    pipelines = config["service"]["pipelines"]
    assert {"traces", "metrics"} <= set(pipelines)
    used: dict[str, set[str]] = {section: set() for section in sections}
    for name, pipeline in pipelines.items():
        assert pipeline["receivers"], name
        assert pipeline["exporters"], name
        for section in sections:
            for component in pipeline.get(section, []):
                assert component in (config.get(section) or {}), (
                    f"pipeline {name} names undefined {section}: {component}"
                )
                used[section].add(component)
    for section in sections:
        unused = set(config.get(section) or {}) - used[section]
        assert not unused, f"{section} defined but in no pipeline: {unused}"
    for extension in config["service"].get("extensions", []):
        assert extension in config["extensions"]
    for name in ("traces", "metrics"):
        processors = pipelines[name].get("processors", [])
        assert processors[0] == "memory_limiter", "memory_limiter goes first"
        assert processors[-1] == "batch", "batch goes last"

    exporters = config["exporters"]
    [trace_exporter] = pipelines["traces"]["exporters"]
    assert trace_exporter.split("/")[0] == "otlp"
    assert exporters[trace_exporter]["endpoint"] == "tempo:4317"
    assert exporters[trace_exporter]["tls"]["insecure"] is True
    assert pipelines["metrics"]["exporters"] == ["prometheus"]
    assert exporters["prometheus"]["endpoint"] == "0.0.0.0:8889"


def test_collector_renames_attributes_to_the_prometheus_labels_of_poolguard_prometheus():
    config = yaml.safe_load(COLLECTOR.read_text())
    transform = config["processors"]["transform/poolguard"]
    statements = [s for group in transform["metric_statements"] for s in group["statements"]]
    renames = {**poolguard.prometheus.LABELS, HTTP_ROUTE: "route"}
    for attribute, label in renames.items():
        assert any(s.startswith(f'set(attributes["{label}"], attributes["{attribute}"])') for s in statements), (
            f"{attribute} -> {label} missing"
        )
        assert any(s.startswith(f'delete_key(attributes, "{attribute}")') for s in statements), attribute
    # The breaker gauge's unit is "{state}" at the source, so the exporter adds no "_ratio" suffix.
    assert not any("poolguard.breaker.state" in s for s in statements)
