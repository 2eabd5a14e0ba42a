"""What pooler detection costs: the first connection of a fresh engine, with and without it (issue 15).

    python -m benchmarks.first_connect [--engines 40]

(from the repository root, as root or the postgres OS user: it starts a private PostgreSQL cluster
and two private PgBouncers in transaction mode, ``tests/support/pgcluster.py``.) Detection runs once
per engine, at its first connection, so that is all it can cost: per row, the median over
``--engines`` fresh ``poolguard.create_engine`` engines (psycopg) of the first ``engine.connect()``
(SQLAlchemy's own first-connect queries included), ``pgbouncer=None`` (detect) against the value
that probes nothing. Later connections cost the same either way (one dict copy).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time

import poolguard
from tests.support.pgcluster import PgBouncer, PgCluster


def first_connect_ms(url: str, engines: int, pgbouncer: bool | None) -> float:
    times: list[float] = []
    for _ in range(engines):
        engine = poolguard.create_engine(url, pgbouncer=pgbouncer)
        started = time.perf_counter()
        with engine.connect():
            pass
        times.append((time.perf_counter() - started) * 1000)
        engine.dispose()
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engines", type=int, default=40)
    engines = parser.parse_args().engines
    logging.disable(logging.INFO)  # one detection line per engine
    cluster = PgCluster.create()
    refusing: PgBouncer | None = None
    ignoring: PgBouncer | None = None
    try:
        cluster.start()
        cluster.bootstrap()
        refusing = PgBouncer(cluster, ignore_startup_parameters=None)
        ignoring = PgBouncer(cluster)
        refusing.start()
        ignoring.start()
        rows = [
            ("direct", cluster.url("psycopg"), False),
            ("PgBouncer, default settings", refusing.url("psycopg"), True),
            ("PgBouncer, ignoring options", ignoring.url("psycopg"), True),
        ]
        print(f"first connection of a fresh engine, median of {engines} (ms)")
        print(f"{'server':30s} {'detect':>8s} {'told':>8s}")
        for label, url, told in rows:
            detect = first_connect_ms(url, engines, None)
            print(f"{label:30s} {detect:8.2f} {first_connect_ms(url, engines, told):8.2f}")
    finally:
        for bouncer in (refusing, ignoring):
            if bouncer is not None:
                bouncer.destroy()
        cluster.destroy()


if __name__ == "__main__":
    main()
