"""The DRF project of ``tests/apps/drf_project`` under a real gunicorn (gthread) against the real PostgreSQL.

The project is written the way DRF users write one (ModelViewSets on a DefaultRouter, ModelSerializers,
``ATOMIC_REQUESTS``, settings from the environment) and adopted as docs/adopting.md's "Django with DRF"
says: settings only, plus ``warehouse/errors.py`` for the 503 in DRF's shape. The module migrates a
schema of its own (``DB_SEARCH_PATH``), and each server gets an ``application_name`` of its own, so
runs sharing the database never see each other's tables or sessions.

The last test black-holes the database (tests/support/tcpproxy.py): with persistent connections the hung
request is answered 503 within seconds, also with Django's psycopg pool and ``CONN_HEALTH_CHECKS = True`` (the
project's setting), whose ping inside ``getconn`` poolguard aborts.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import django
import httpx
import psycopg
import pytest

from tests.support.databases import DATABASE, DEAD_PORT, HOST, PG_CONNINFO, PG_PORT, USER
from tests.support.servers import ServerProcess, serving
from tests.support.tcpproxy import TcpProxy

pytestmark = pytest.mark.postgres

ROOT = Path(__file__).resolve().parents[2]
PROJECT = Path(__file__).resolve().parent / "drf_project"
PASSWORD = "warehouse-secret-pw"
THREADS = 4
POOL_MAX_SIZE = 2
UNAVAILABLE = {"detail": "The database is unavailable; retry later.", "code": "database_unavailable"}
CHECK_ID = re.compile(r"\((poolguard\.[EW]\d{3})\)")


def _env(schema: str, **extra: str) -> dict[str, str]:
    """The server's environment: the parent's, minus anything that would configure the project behind our back."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("PG", "POOLGUARD_", "DB_", "DJANGO_", "DATABASE_URL", "GUNICORN_", "WEB_CONCURRENCY"))
    }
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.update(
        PGHOST=HOST,
        PGPORT=str(PG_PORT),
        PGUSER=USER,
        PGDATABASE=DATABASE,
        PGPASSWORD=PASSWORD,  # trust auth ignores it; no answer or log line may show it
        DB_SEARCH_PATH=schema,
        DB_APPLICATION_NAME=f"warehouse-{uuid.uuid4().hex[:10]}",
    )
    env.update(extra)
    return env


GUNICORN = [
    sys.executable, "-m", "gunicorn", "warehouse.wsgi:application", "--chdir", str(PROJECT),
    "--bind", "127.0.0.1:{port}", "--workers", "1", "--worker-class", "gthread",
    "--threads", str(THREADS), "--log-level", "warning",
]  # fmt: skip
"""gunicorn, one worker of THREADS threads."""


@contextlib.contextmanager
def _serving(env: dict[str, str], log: Path) -> Iterator[ServerProcess]:
    with serving(GUNICORN, cwd=PROJECT, env=env, log=log, ready="/api/ping/") as server:
        yield server


def _manage(*arguments: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "manage.py", *arguments],
        cwd=PROJECT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture(scope="module")
def schema() -> Iterator[str]:
    """A schema of this module's own, migrated by the project's own ``manage.py migrate``, dropped after."""
    name = f"drf_project_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_CONNINFO, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {name}")
    try:
        migrated = _manage("migrate", "--no-input", env=_env(name))
        assert migrated.returncode == 0, migrated.stdout + migrated.stderr
        yield name
    finally:
        with psycopg.connect(PG_CONNINFO, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {name} CASCADE")


@pytest.fixture(scope="module")
def server(schema: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """Persistent connections (``DB_CONN_MAX_AGE=60``), as the settings default to."""
    log = tmp_path_factory.mktemp("drf") / "gunicorn.log"
    with _serving(_env(schema, DB_CONN_MAX_AGE="60"), log) as running:
        yield running


def _query(schema: str, sql: str, params: list[Any] | None = None) -> list[tuple[Any, ...]]:
    """On a connection of its own, outside any request's transaction."""
    with psycopg.connect(PG_CONNINFO, options=f"-c search_path={schema}") as conn:
        return conn.execute(sql, params).fetchall()


def _sessions(app_name: str) -> set[int]:
    with psycopg.connect(PG_CONNINFO) as conn:
        rows = conn.execute("SELECT pid FROM pg_stat_activity WHERE application_name = %s", [app_name]).fetchall()
    return {row[0] for row in rows}


def _sku() -> str:
    return f"SKU-{uuid.uuid4().hex[:12]}"


def _load(server: ServerProcess, clients: int, requests: int, product_id: int) -> tuple[list[int | str], int]:
    """``clients`` concurrent keep-alive clients, ``requests`` reads and writes in all: the statuses (or the
    client's error), and the most PostgreSQL sessions of the server's application_name seen after any request."""
    statuses: list[int | str] = []
    most = [0]
    lock = threading.Lock()

    def client_loop() -> None:
        try:
            run()
        except Exception as exc:  # reported in the statuses, not lost with the thread
            with lock:
                statuses.append(type(exc).__name__)

    def run() -> None:
        with (
            httpx.Client(base_url=server.url, timeout=15) as client,
            psycopg.connect(PG_CONNINFO, autocommit=True) as observer,
        ):
            for index in range(requests // clients):
                if index % 5 == 0:
                    response = client.patch(f"/api/products/{product_id}/", json={"name": f"Screw {index}"})
                else:
                    response = client.get(f"/api/products/{product_id}/" if index % 2 else "/api/products/")
                row = observer.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s",
                    [server.env["DB_APPLICATION_NAME"]],
                ).fetchone()
                with lock:
                    statuses.append(response.status_code)
                    most[0] = max(most[0], row[0] if row else 0)

    threads = [threading.Thread(target=client_loop) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return statuses, most[0]


def _product(server: ServerProcess) -> int:
    created = httpx.post(server.url + "/api/products/", json={"sku": _sku(), "name": "Screw", "price": "0.02"})
    assert created.status_code == 201, created.text
    return int(created.json()["id"])


def test_crud_validation_404_and_health(server: ServerProcess, schema: str) -> None:
    with httpx.Client(base_url=server.url, timeout=10) as client:
        sku = _sku()
        created = client.post("/api/products/", json={"sku": sku, "name": "Bolt", "price": "0.25", "quantity": 10})
        assert created.status_code == 201, created.text
        product = created.json()
        assert {key: product[key] for key in ("sku", "name", "price", "quantity")} == {
            "sku": sku,
            "name": "Bolt",
            "price": "0.25",
            "quantity": 10,
        }
        url = f"/api/products/{product['id']}/"
        assert _query(schema, "SELECT name FROM inventory_product WHERE sku = %s", [sku]) == [("Bolt",)]

        listed = client.get("/api/products/")
        assert listed.status_code == 200
        assert sku in [item["sku"] for item in listed.json()["results"]]
        assert client.get(url).json()["name"] == "Bolt"

        replaced = client.put(url, json={"sku": sku, "name": "Hex bolt", "price": "0.30", "quantity": 12})
        assert replaced.status_code == 200, replaced.text
        patched = client.patch(url, json={"quantity": 7})
        assert patched.status_code == 200, patched.text
        assert (patched.json()["name"], patched.json()["price"], patched.json()["quantity"]) == ("Hex bolt", "0.30", 7)
        assert _query(schema, "SELECT name, quantity FROM inventory_product WHERE sku = %s", [sku]) == [("Hex bolt", 7)]

        invalid = client.post("/api/products/", json={"sku": sku, "price": "cheap"})
        assert invalid.status_code == 400
        assert invalid.json() == {
            "sku": ["product with this sku already exists."],
            "name": ["This field is required."],
            "price": ["A valid number is required."],
        }

        assert client.delete(url).status_code == 204
        assert _query(schema, "SELECT count(*) FROM inventory_product WHERE sku = %s", [sku]) == [(0,)]
        missing = client.get(url)
        assert missing.status_code == 404
        assert missing.json() == {"detail": "No Product matches the given query."}
        assert "retry-after" not in missing.headers  # DRF's own error, untouched by poolguard

        health = client.get("/health/db")
        assert health.status_code == 200
        assert health.content == b'{"status":"ok"}'


def test_a_restock_that_saves_then_raises_leaves_nothing_written(server: ServerProcess, schema: str) -> None:
    with httpx.Client(base_url=server.url, timeout=10) as client:
        created = client.post("/api/products/", json={"sku": _sku(), "name": "Nut", "price": "0.10", "capacity": 100})
        assert created.status_code == 201, created.text
        product_id = created.json()["id"]
        restock = f"/api/products/{product_id}/restock/"

        accepted = client.post(restock, json={"quantity": 60})
        assert accepted.status_code == 200, accepted.text
        assert accepted.json()["quantity"] == 60

        refused = client.post(restock, json={"quantity": 50})  # saves 110 units and a movement, then raises
        assert refused.status_code == 409
        assert refused.json() == {"detail": "The shelf cannot hold that many units."}

    assert _query(schema, "SELECT quantity FROM inventory_product WHERE id = %s", [product_id]) == [(60,)]
    assert _query(schema, "SELECT change FROM inventory_stockmovement WHERE product_id = %s", [product_id]) == [(60,)]


def test_persistent_connections_stay_one_per_thread(server: ServerProcess) -> None:
    product_id = _product(server)
    statuses, most = _load(server, clients=THREADS, requests=200, product_id=product_id)
    assert statuses == [200] * 200
    assert 1 <= most <= THREADS
    kept = _sessions(server.env["DB_APPLICATION_NAME"])
    assert 1 <= len(kept) <= THREADS  # CONN_MAX_AGE=60: the sessions outlive the requests...
    statuses, _ = _load(server, clients=THREADS, requests=40, product_id=product_id)
    assert statuses == [200] * 40
    again = _sessions(server.env["DB_APPLICATION_NAME"])
    assert kept <= again  # ...and serve the next ones: none was closed and replaced
    assert len(again) <= THREADS


@pytest.mark.skipif(django.VERSION < (5, 1), reason="Django's psycopg pool needs Django 5.1")
def test_djangos_psycopg_pool_bounds_the_sessions(schema: str, tmp_path: Path) -> None:
    env = _env(schema, DB_CONN_MAX_AGE="0", DB_POOL_MAX_SIZE=str(POOL_MAX_SIZE))
    with _serving(env, tmp_path / "gunicorn.log") as pooled:
        product_id = _product(pooled)
        statuses, most = _load(pooled, clients=THREADS, requests=200, product_id=product_id)
        assert statuses == [200] * 200
        assert 1 <= most <= POOL_MAX_SIZE  # fewer than the THREADS a per-thread connection would need
        kept = _sessions(pooled.env["DB_APPLICATION_NAME"])
        assert 1 <= len(kept) <= POOL_MAX_SIZE  # the pool keeps its connections open


def test_an_unreachable_database_answers_503_in_drfs_shape(schema: str, tmp_path: Path) -> None:
    env = _env(schema, PGPORT=str(DEAD_PORT))
    with _serving(env, tmp_path / "gunicorn.log") as down, httpx.Client(base_url=down.url, timeout=10) as client:
        answers = [
            client.get("/api/products/"),
            client.post("/api/products/", json={"sku": _sku(), "name": "Washer", "price": "0.05"}),
            client.get("/api/products/1/"),
            client.post("/api/products/1/restock/", json={"quantity": 1}),
            client.get("/api/movements/"),
            client.get("/api/"),  # DRF's API root reads nothing, but ATOMIC_REQUESTS opens a transaction for it
        ]
        for response in answers:
            assert response.status_code == 503, (response.request.url, response.text)
            assert int(response.headers["retry-after"]) >= 1
            assert response.headers["cache-control"] == "no-store"
            assert response.headers["content-type"] == "application/json"
            assert response.json() == UNAVAILABLE
        ping = client.get("/api/ping/")
        assert ping.status_code == 200
        assert ping.json() == {"service": "warehouse", "status": "up"}
        health = client.get("/health/db")
        assert health.status_code == 503
        assert health.content == b'{"status":"unavailable"}'
        for response in [*answers, ping, health]:
            assert PASSWORD not in response.text
            assert PASSWORD not in str(response.headers)
    log = down.output()
    assert "poolguard: circuit breaker" in log  # poolguard's INFO+ lines are in the output checked
    assert PASSWORD not in log


def _check_ids(env: dict[str, str]) -> tuple[set[str], str]:
    checked = _manage("check", "--deploy", env=env)
    output = checked.stdout + checked.stderr
    assert checked.returncode == 0, output
    assert "security.W" in output  # the deploy checks ran (DEBUG-free dev settings have some to say)
    return set(CHECK_ID.findall(output)), output


def test_check_deploy_reports_no_poolguard_issue_until_the_middleware_is_misplaced(tmp_path: Path) -> None:
    # CONN_MAX_AGE is 60 and asgi.py exists (as startproject writes it), but the project is served by WSGI: no W001
    ids, output = _check_ids(_env("public"))
    assert ids == set(), output
    assert PASSWORD not in output

    (tmp_path / "misplaced_settings.py").write_text(
        "from warehouse.settings import *  # noqa: F403\n\n"
        "MIDDLEWARE = [\n"
        '    "django.middleware.security.SecurityMiddleware",\n'
        '    "poolguard.django.PoolGuardMiddleware",\n'
        '    "django.middleware.common.CommonMiddleware",\n'
        "]\n"
    )
    env = _env("public", DJANGO_SETTINGS_MODULE="misplaced_settings")
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env["PYTHONPATH"]])
    ids, output = _check_ids(env)
    assert ids == {"poolguard.W004"}, output
    assert "django.middleware.security.SecurityMiddleware run before it" in output


HUNG_LIMIT = 8.0
"""Seconds a client waits for an answer while the database hangs; poolguard's answer must come well before."""


def _get(client: httpx.Client, url: str) -> tuple[httpx.Response | None, float]:
    """The answer (None when the client gave up after HUNG_LIMIT) and the seconds it took."""
    started = time.monotonic()
    try:
        return client.get(url), time.monotonic() - started
    except httpx.ReadTimeout:
        return None, time.monotonic() - started


@pytest.mark.parametrize(
    "mode",
    [
        "persistent",
        pytest.param(
            "pool",
            marks=pytest.mark.skipif(django.VERSION < (5, 1), reason="Django's psycopg pool needs Django 5.1"),
        ),
    ],
)
def test_a_hung_database_is_shed_within_seconds_and_served_again(mode: str, schema: str, tmp_path: Path) -> None:
    """A black hole: connects are accepted and nothing is answered (a stalled server, a frozen VM)."""
    extra = {"DB_CONN_MAX_AGE": "60"} if mode == "persistent" else {"DB_CONN_MAX_AGE": "0", "DB_POOL_MAX_SIZE": "2"}
    with TcpProxy((HOST, PG_PORT)) as proxy:
        env = _env(schema, PGPORT=str(proxy.port), **extra)
        with (
            _serving(env, tmp_path / "gunicorn.log") as hung,
            httpx.Client(base_url=hung.url, timeout=HUNG_LIMIT) as client,
        ):
            url = f"/api/products/{_product(hung)}/"
            for _ in range(5):
                assert client.get(url).status_code == 200
            proxy.blackhole()
            try:
                first, seconds = _get(client, url)  # its connection hangs until the watchdog aborts it
                assert first is not None, f"no answer within {HUNG_LIMIT}s"
                assert first.status_code == 503, first.text
                assert first.json() == UNAVAILABLE
                assert seconds < 5.0
                for _ in range(5):
                    shed, seconds = _get(client, url)
                    assert shed is not None
                    assert shed.status_code == 503
                    assert seconds < 1.0
                assert client.get("/api/ping/").status_code == 200
                assert client.get("/health/db").status_code == 503
            finally:
                proxy.heal()  # a request still hung gets its answer, so gunicorn can stop
            started = time.monotonic()
            while (answer := client.get(url)).status_code != 200:
                assert answer.status_code == 503, answer.text
                assert time.monotonic() - started < 5.0, "not served again within 5 s of the database's return"
                time.sleep(0.05)
