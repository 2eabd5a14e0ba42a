"""integrations/kubernetes: the manifests parse, agree with each other and with poolguard, and fit the budget.

- Probes: the startup probe is poolguard's health route, readiness and liveness a database-free
  route, all on the container's port; an app built as README.md says, with the manifest's
  environment, shows why: with the database down the health route answers 503 (a rollout stops)
  while the probe route answers 200 (no pod is restarted or taken out); with it up both answer 200.
- Every ``POOLGUARD_*`` variable is one poolguard reads, and the set loads through its config.
- The PgBouncer ConfigMap carries integrations/pgbouncer/pgbouncer.ini unchanged; the app's
  DATABASE_URL points at the PgBouncer Service and a database the ini serves.
- The fleet (replicas x gunicorn workers x create_engine(workers=DB_WORKERS, pgbouncer=True)) passes
  ``poolguard budget`` against the ConfigMap's PgBouncer settings on a default server (max_connections 100).
"""

from __future__ import annotations

import configparser
import json
import logging
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
import yaml
from flask import Flask
from sqlalchemy.engine import make_url

import poolguard
from poolguard._serving import processes, queue_hidden, threads
from poolguard.cli import main
from poolguard.config import PoolGuardConfig, environment_options
from poolguard.diagnose.budget import engine_pool
from poolguard.flask import PoolGuard
from tests.support.databases import DEAD_PORT, pg_url

ROOT = Path(__file__).resolve().parents[2]
KUBERNETES = ROOT / "integrations" / "kubernetes"
INI = ROOT / "integrations" / "pgbouncer" / "pgbouncer.ini"
SERVER_MAX_CONNECTIONS = 100
"""PostgreSQL's default, the server the README assumes."""
TOKEN = "t" * 32


def documents(name: str) -> dict[tuple[str, str], dict[str, Any]]:
    with (KUBERNETES / name).open() as stream:
        loaded = [document for document in yaml.safe_load_all(stream) if document]
    return {(document["kind"], document["metadata"]["name"]): document for document in loaded}


APP = documents("app.yaml")
PGBOUNCER = documents("pgbouncer.yaml")
DEPLOYMENT = APP["Deployment", "orders"]
CONTAINER = DEPLOYMENT["spec"]["template"]["spec"]["containers"][0]


def environment(container: dict[str, Any]) -> dict[str, str]:
    """The container's variables; secrets (valueFrom) get a stand-in, ``$(VAR)`` is expanded as the kubelet does."""
    env: dict[str, str] = {}
    for variable in container["env"]:
        value = variable["value"] if "value" in variable else (TOKEN if "TOKEN" in variable["name"] else "secret")
        for name, earlier in env.items():
            value = value.replace(f"$({name})", earlier)
        env[variable["name"]] = value
    return env


ENV = environment(CONTAINER)


def ini_settings() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(comment_prefixes=(";", "#"), interpolation=None)
    parser.read_string(PGBOUNCER["ConfigMap", "pgbouncer-config"]["data"]["pgbouncer.ini"])
    return parser


def ports(container: dict[str, Any]) -> set[str | int]:
    return {value for port in container["ports"] for value in (port["name"], port["containerPort"])}


def test_every_manifest_parses_and_names_what_it_should() -> None:
    assert set(APP) == {("Deployment", "orders"), ("Service", "orders")}
    assert set(PGBOUNCER) == {("ConfigMap", "pgbouncer-config"), ("Deployment", "pgbouncer"), ("Service", "pgbouncer")}
    for manifests in (APP, PGBOUNCER):
        for (kind, _name), document in manifests.items():
            if kind in ("Deployment", "Service"):
                selector = document["spec"]["selector"]
                labels = selector.get("matchLabels", selector)
                assert labels.items() <= document["metadata"]["labels"].items()


def test_the_app_probes_use_the_container_port_and_the_startup_probe_is_the_health_route() -> None:
    health_path = PoolGuardConfig.load(environ=ENV).http.health_path
    assert health_path == "/health/db"
    probes = {kind: CONTAINER[kind] for kind in ("startupProbe", "readinessProbe", "livenessProbe")}
    for probe in probes.values():
        assert probe["httpGet"]["port"] in ports(CONTAINER)
    assert probes["startupProbe"]["httpGet"]["path"] == health_path
    # Readiness and liveness must never fail because the database is down: a database-free route.
    assert probes["readinessProbe"]["httpGet"]["path"] == probes["livenessProbe"]["httpGet"]["path"] != health_path
    # A rollout that cannot reach the database must not remove the pods that serve.
    assert DEPLOYMENT["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert APP["Service", "orders"]["spec"]["ports"][0]["targetPort"] in ports(CONTAINER)


def app_as_the_readme_says(database_url: str) -> Flask:
    """The app of integrations/kubernetes/README.md, built from the manifest's environment (sized for
    PgBouncer, which changes nothing for a plain server: the URL here is the server's)."""
    engine = poolguard.create_engine(
        database_url, service_name="orders", workers=int(ENV["DB_WORKERS"]), pgbouncer=True, connect_timeout=1
    )
    app = Flask("orders")
    PoolGuard(app, poolguard.Guard(engine, **PoolGuardConfig.load().guard_options()))

    @app.get("/livez")
    def livez() -> dict[str, bool]:
        return {"ok": True}

    return app


@pytest.fixture
def manifest_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in ENV.items():
        monkeypatch.setenv(name, value)


@pytest.mark.parametrize(("port", "health_status"), [(5432, 200), (DEAD_PORT, 503)])
@pytest.mark.usefixtures("manifest_env")
def test_the_probes_answer_as_the_readme_says(port: int, health_status: int, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="poolguard")
    app = app_as_the_readme_says(pg_url(port=port))
    assert not [record for record in caplog.records if "threads" in record.getMessage()]  # no startup warning
    client = app.test_client()
    startup = CONTAINER["startupProbe"]["httpGet"]["path"]
    probe = CONTAINER["livenessProbe"]["httpGet"]["path"]
    assert client.get(startup).status_code == health_status
    assert client.get(probe).status_code == 200  # database down or not: no restart, no removal


def test_every_poolguard_variable_is_one_poolguard_reads() -> None:
    variables = {name: value for name, value in ENV.items() if name.startswith("POOLGUARD_")}
    assert variables
    for name, value in variables.items():
        assert environment_options({name: value}), f"{name} is not a variable poolguard reads"
    config = PoolGuardConfig.load(environ=variables)
    assert config.guard.max_wait == float(ENV["POOLGUARD_MAX_WAIT"])
    assert config.http.health_detail == "when-authorized"
    assert config.guard.breaker is not None
    assert config.guard.breaker.open_for == float(ENV["POOLGUARD_BREAKER_OPEN_FOR"])


def test_the_configmap_carries_the_pgbouncer_ini_unchanged() -> None:
    assert PGBOUNCER["ConfigMap", "pgbouncer-config"]["data"]["pgbouncer.ini"] == INI.read_text()


def test_pgbouncer_deployment_service_and_app_url_agree() -> None:
    pod = PGBOUNCER["Deployment", "pgbouncer"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    listen_port = int(ini_settings()["pgbouncer"]["listen_port"])
    assert listen_port in ports(container)
    for kind in ("readinessProbe", "livenessProbe"):
        assert container[kind]["tcpSocket"]["port"] in ports(container)
    mounts = {mount["mountPath"] for mount in container["volumeMounts"]}
    assert ini_settings()["pgbouncer"]["auth_file"] in mounts
    assert any(path.endswith("pgbouncer.ini") and path in container["command"] for path in mounts)
    assert pod["securityContext"]["runAsNonRoot"] is True  # PgBouncer refuses to run as root
    service = PGBOUNCER["Service", "pgbouncer"]["spec"]["ports"][0]
    assert service["targetPort"] in ports(container)
    url = make_url(ENV["DATABASE_URL"])
    assert (url.host, url.port) == ("pgbouncer", service["port"])
    assert url.database in ini_settings()["databases"]


def test_the_threads_outnumber_the_pool_so_overload_reaches_poolguard() -> None:
    server_threads, source = threads(None, environ=ENV, argv=[])
    assert source == "gunicorn --threads"
    size, overflow = engine_pool(int(ENV["DB_WORKERS"]), pgbouncer=True)
    assert not queue_hidden(server_threads, size + overflow)
    assert server_threads >= 2 * (size + overflow)  # docs/adopting.md: about twice the pool


def test_the_fleet_in_the_manifests_fits_the_budget_with_the_pgbouncer_settings(
    capsys: pytest.CaptureFixture[str],
) -> None:
    bouncer = ini_settings()["pgbouncer"]
    instances = PGBOUNCER["Deployment", "pgbouncer"]["spec"]["replicas"]
    pgbouncer_spec = ",".join(
        [f"instances={instances}"]
        + [
            f"{key}={bouncer[key]}"
            for key in ("default_pool_size", "reserve_pool_size", "max_db_connections", "max_client_conn")
        ]
    )
    spec = DEPLOYMENT["spec"]
    service = (
        f"orders:replicas={spec['replicas']},processes={processes(None, environ=ENV, argv=[])[0]},"
        f"workers={ENV['DB_WORKERS']},pgbouncer=true,max_surge={spec['strategy']['rollingUpdate']['maxSurge']}"
    )
    code = main(
        [
            "budget",
            "--max-connections",
            str(SERVER_MAX_CONNECTIONS),
            "--pgbouncer",
            pgbouncer_spec,
            "--service",
            service,
            "--json",
        ]
    )
    report = json.loads(capsys.readouterr().out)
    assert code == 0
    assert report["verdict"] == "fits", report["reasons"]
    # 6 pods x 2 processes x (2 + 2) clients, 2 more pods while rolling; 2 instances x one app role's
    # default_pool_size 20 server connections (max_db_connections 40 caps more roles at 80).
    assert (report["demand"], report["peak"], report["server_peak"]) == (48, 64, 40)
    engine = poolguard.create_engine(pg_url(), workers=int(ENV["DB_WORKERS"]), pgbouncer=True)
    try:
        assert isinstance(engine.pool, sa.pool.QueuePool)
        assert engine.pool.size() + engine.pool._max_overflow == report["services"][0]["per_process"]
    finally:
        engine.dispose()
