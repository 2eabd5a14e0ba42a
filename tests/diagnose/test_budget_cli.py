"""``poolguard budget`` on the command line: both forms of the fleet, the limits given or read live,
bad input (exit 2), a dead server (bounded, exit 3), and a password that never shows."""

from __future__ import annotations

import json
import time
from pathlib import Path

import psycopg
import pymysql
import pytest

from poolguard.cli import main
from tests.support.databases import HOST, MARIADB_PORT, PG_CONNINFO, mariadb_url, pg_url

SECRET = "budget-s3cret-pw"
ISSUE = [
    "--service",
    "orders:replicas=10,pool_size=20",
    "--service",
    "billing:replicas=5,pool_size=20",
    "--service",
    "search:replicas=8,pool_size=20",
]
FLEET_TOML = """\
max_connections = 200
reserved = 3
margin = "10%"
max_surge = "25%"

[services.orders]
replicas = 10
processes = 2
workers = 8

[services.billing]
replicas = 5
pool_size = 20
max_overflow = 0

[services.search]
replicas = 8
pool_size = 6
max_overflow = 2
other = 1
max_surge = 2
"""
SAME_ON_THE_COMMAND_LINE = [
    "--max-connections",
    "200",
    "--reserved",
    "3",
    "--margin",
    "10%",
    "--max-surge",
    "25%",
    "--service",
    "orders:replicas=10,processes=2,workers=8",
    "--service",
    "billing:replicas=5,pool_size=20,max_overflow=0",
    "--service",
    "search:replicas=8,pool_size=6,max_overflow=2,other=1,max_surge=2",
]


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["budget", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_the_issue_fleet_is_over_budget(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "--max-connections", "200", "--max-surge", "0", *ISSUE)
    assert code == 1
    assert err == ""
    assert out.startswith("poolguard budget: OVER")
    assert "max_connections 200 - reserved 3 = 197 usable" in out
    assert "demand     460 connections at full load" in out
    assert "pool sizes that fit" in out
    assert "max_db_connections = 177" in out


def test_json_and_the_exit_code_for_a_fleet_that_fits(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--max-connections", "600", "--json", *ISSUE)
    report = json.loads(out)
    assert code == 0
    assert report["verdict"] == "fits"
    # the peak: 460 plus orders' rollout, ceil(25 % of 10) = 3 pods x 20
    assert (report["demand"], report["peak"], report["surging"], report["headroom"]) == (460, 520, "orders", 77)
    assert report["server"] == {"source": "given", "max_connections": 600, "reserved": 3, "usable": 597, "margin": 60}
    assert report["suggestions"] == {"pool_sizes": None, "pgbouncer": None}


def test_the_file_and_the_command_line_agree(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    fleet = tmp_path / "fleet.toml"
    fleet.write_text(FLEET_TOML)
    from_file = run(capsys, "--file", str(fleet), "--json")
    from_flags = run(capsys, *SAME_ON_THE_COMMAND_LINE, "--json")
    assert from_file == from_flags
    report = json.loads(from_file[1])
    orders = report["services"][0]
    assert (orders["pool_size"], orders["max_overflow"], orders["connections"]) == (8, 4, 10 * 2 * 12)
    assert report["services"][2]["surge_pods"] == 2
    # A suggestion is a fleet that fits when it is run again.
    assert report["verdict"] == "over"
    sized = {s["name"]: s for s in report["suggestions"]["pool_sizes"]}
    again = [
        "--max-connections",
        "200",
        "--service",
        "orders:replicas=10,processes=2,pool_size={pool_size},max_overflow={max_overflow}".format(**sized["orders"]),
        "--service",
        "billing:replicas=5,pool_size={pool_size},max_overflow={max_overflow}".format(**sized["billing"]),
        "--service",
        "search:replicas=8,pool_size={pool_size},max_overflow={max_overflow},other=1,max_surge=2".format(
            **sized["search"]
        ),
    ]
    code, out, _ = run(capsys, *again)
    assert code == 0
    assert out.startswith("poolguard budget: FITS"), out


def test_command_line_options_override_the_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    fleet = tmp_path / "fleet.toml"
    fleet.write_text(FLEET_TOML)
    code, out, _ = run(capsys, "--file", str(fleet), "--max-connections", "2000", "--margin", "5", "--json")
    assert code == 0
    assert json.loads(out)["server"]["margin"] == 5


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--max-connections", "100", "--service", "orders:replicas=2,pool_sise=5"],
            "invalid value for service 'orders': pool_sise: '(unknown key)'; accepted: one of replicas, processes,"
            " workers, pool_size, max_overflow, pgbouncer, other, max_surge",
        ),
        (
            ["--max-connections", "100", "--service", "orders:replicas=2,pool_size=-5"],
            "invalid value for service 'orders': pool_size: -5; accepted: a whole number of at least 0",
        ),
        (
            ["--max-connections", "100", "--service", "orders:pool_size=5"],
            "invalid value for service 'orders': replicas: '(missing)'; accepted: a whole number of pods, required",
        ),
        (
            ["--max-connections", "100", "--service", "orders:replicas=two"],
            "invalid value for service 'orders': replicas: 'two'; accepted: a whole number",
        ),
        (
            ["--max-connections", "100", "--service", "orders"],
            "invalid value for --service: 'orders'; accepted: NAME:replicas=N",
        ),
        (
            ["--max-connections", "100", "--service", "a:replicas=1", "--margin", "lots"],
            "invalid value for --margin: 'lots'; accepted: a whole number, or a percentage such as '10%'",
        ),
        (
            ["--max-connections", "100", "--service", "a:replicas=1", "--pgbouncer", "pool_size=3"],
            "invalid value for pgbouncer: pool_size: '(unknown key)'; accepted: one of instances, default_pool_size",
        ),
        (["--service", "a:replicas=1"], "invalid value for --max-connections: '(missing)'"),
        (
            ["--max-connections", "-5", "--service", "a:replicas=1"],
            "invalid value for --max-connections: -5; accepted: a whole number of at least 1",
        ),
        (
            ["--max-connections", "100", "--reserved", "100", "--service", "a:replicas=1"],
            "invalid value for --reserved: 100; accepted: a whole number from 0 to max_connections - 1 (99)",
        ),
        (["--max-connections", "100"], "invalid value for --service: '(none)'"),
        (
            ["--url", pg_url(), "--reserved", "3", "--service", "a:replicas=1"],
            "invalid value for --reserved: 3; accepted: nothing with --url",
        ),
    ],
)
def test_bad_input_exits_2_naming_the_key(capsys: pytest.CaptureFixture[str], argv: list[str], message: str) -> None:
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert out == ""
    assert err.startswith(f"poolguard budget: {message}"), err


def test_bad_file_keys_are_named(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    fleet = tmp_path / "fleet.toml"
    fleet.write_text("max_connections = 100\n[services.web]\nreplicas = 2\nthreads = 4\n")
    code, _, err = run(capsys, "--file", str(fleet))
    assert code == 2
    assert "service 'web': threads: '(unknown key)'; accepted: one of replicas" in err
    fleet.write_text("max_conections = 100\n")
    code, _, err = run(capsys, "--file", str(fleet))
    assert code == 2
    assert "invalid value for fleet.toml: max_conections: '(unknown key)'; accepted: one of max_connections" in err
    fleet.write_text("max_connections = [\n")
    code, _, err = run(capsys, "--file", str(fleet))
    assert code == 2
    assert "accepted: valid TOML" in err


def test_help_documents_the_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--help")
    assert code == 0
    assert "exit codes: 0 fits (or tight), 1 over budget, 2 bad usage or input, 3 the server could not be read" in out


def test_url_reads_postgresql_limits_live(capsys: pytest.CaptureFixture[str]) -> None:
    with psycopg.connect(PG_CONNINFO) as connection:
        expected = [
            int(connection.execute(f"SHOW {name}").fetchone()[0])  # type: ignore[index]
            for name in ("max_connections", "superuser_reserved_connections")
        ]
    code, out, err = run(capsys, "--url", pg_url(password=SECRET), "--service", "a:replicas=1,pool_size=1", "--json")
    report = json.loads(out)
    assert code == 0
    assert report["server"]["source"] == f"postgresql at {HOST}:5432"
    assert report["server"]["max_connections"] == expected[0]
    assert report["server"]["superuser_reserved_connections"] == expected[1]
    assert report["server"]["usable"] == expected[0] - report["server"]["reserved"]
    assert SECRET not in out + err


def test_url_reads_mariadb_limits_live(capsys: pytest.CaptureFixture[str]) -> None:
    connection = pymysql.connect(host=HOST, port=MARIADB_PORT, user="root", database="test")
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT @@max_connections")
            (expected,) = cursor.fetchone()  # type: ignore[misc]
    finally:
        connection.close()
    code, out, _ = run(capsys, "--url", mariadb_url(), "--service", "a:replicas=1,pool_size=1", "--json")
    assert code == 0
    server = json.loads(out)["server"]
    assert (server["max_connections"], server["reserved"], server["source"]) == (
        expected,
        0,
        f"mysql at {HOST}:{MARIADB_PORT}",
    )


def test_an_async_driver_url_is_read_with_its_sync_driver(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--url", pg_url("asyncpg"), "--service", "a:replicas=1,pool_size=1", "--json")
    assert code == 0
    assert json.loads(out)["server"]["max_connections"] > 0


@pytest.mark.parametrize("scheme", ["postgresql+psycopg", "mysql+pymysql"])
def test_a_silent_server_is_given_up_on_within_the_timeout(
    capsys: pytest.CaptureFixture[str], silent_port: int, scheme: str
) -> None:
    url = f"{scheme}://root:{SECRET}@{HOST}:{silent_port}/test"
    started = time.monotonic()
    code, out, err = run(capsys, "--url", url, "--timeout", "1", "--service", "a:replicas=1")
    elapsed = time.monotonic() - started
    assert code == 3
    assert out == ""
    assert err.startswith("poolguard budget: ")
    assert f"at {HOST}:{silent_port}" in err
    assert elapsed < 1.5  # the whole read ends at --timeout
    assert SECRET not in err


@pytest.mark.parametrize(
    ("url", "message"),
    [
        (f"sqlite:///{SECRET}.db", "argument --url: unsupported scheme 'sqlite'; expected postgresql://"),
        (f"postgresql://root:{SECRET}@:5432/test", "argument --url: no host in the URL; expected postgresql://"),
        (
            f"postgresql://admin:{SECRET}@{HOST}:6432/pgbouncer",
            f"invalid value for --url: 'postgresql://admin:***@{HOST}:6432/pgbouncer'; accepted: the URL of the "
            "PostgreSQL or MySQL/MariaDB server",
        ),
    ],
)
def test_a_url_budget_cannot_read_is_a_usage_error_naming_the_option(
    capsys: pytest.CaptureFixture[str], url: str, message: str
) -> None:
    code, out, err = run(capsys, "--url", url, "--service", "a:replicas=1")
    assert code == 2
    assert out == ""
    assert message in err
    assert SECRET not in err


def test_a_refused_url_exits_3_without_the_password(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "--url", pg_url(password=SECRET, port=1), "--service", "a:replicas=1")
    assert code == 3
    assert "cannot read the limits of postgresql at 127.0.0.1:1: OperationalError" in err
    assert SECRET not in out + err


DOCS = Path(__file__).resolve().parents[2] / "docs" / "fleet.md"


def test_the_docs_show_what_the_command_prints(capsys: pytest.CaptureFixture[str]) -> None:
    text = DOCS.read_text()
    shown = text.split("```text\npoolguard budget: OVER\n", 1)[1].split("```", 1)[0]
    code, out, _ = run(capsys, "--max-connections", "200", *ISSUE)
    assert code == 1
    assert out == "poolguard budget: OVER\n" + shown


def test_the_docs_fleet_file_is_read_as_documented(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    example = DOCS.read_text().split("```toml\n", 1)[1].split("```", 1)[0]
    fleet = tmp_path / "fleet.toml"
    fleet.write_text(example)
    code, out, _ = run(capsys, "--file", str(fleet), "--json")
    report = json.loads(out)
    assert code == 0
    assert [(s["name"], s["pool_size"], s["max_overflow"]) for s in report["services"]] == [
        ("orders", 8, 4),
        ("billing", 20, 0),
    ]
    assert report["pgbouncer"]["instances"] == 2
    assert report["server"]["usable"] == 197


def test_huge_numbers_are_answered_at_once(capsys: pytest.CaptureFixture[str]) -> None:
    started = time.monotonic()
    code, out, _ = run(
        capsys,
        "--max-connections",
        "1000000000",
        "--service",
        "a:replicas=7,pool_size=999999999,other=3",
        "--service",
        "b:replicas=1000,processes=16,pool_size=5000000",
        "--json",
    )
    assert time.monotonic() - started < 2.0
    assert code == 1
    sized = json.loads(out)["suggestions"]["pool_sizes"]
    again = run(
        capsys,
        "--max-connections",
        "1000000000",
        "--service",
        f"a:replicas=7,pool_size={sized[0]['pool_size']},other=3",
        "--service",
        f"b:replicas=1000,processes=16,pool_size={sized[1]['pool_size']}",
    )
    assert again[0] == 0
