#!/usr/bin/env bash
# Starts the PostgreSQL and MariaDB servers the integration tests use, if they are not running,
# and waits until both accept connections; installs PgBouncer for the fault suite (tests/faults starts
# its own private PostgreSQL cluster and PgBouncer from these binaries). Safe to run again.
set -euo pipefail

if ! command -v pgbouncer >/dev/null 2>&1 && [ ! -x /usr/sbin/pgbouncer ]; then
  echo "installing PgBouncer (tests/faults runs its own; the package's service is kept from starting)"
  policy=/usr/sbin/policy-rc.d
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy"
    chmod +x "$policy"
    trap 'rm -f "$policy"' EXIT
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq pgbouncer >/dev/null
fi

pg_up() { pg_isready -q -h 127.0.0.1 -p 5432; }
maria_up() { mysqladmin --protocol=tcp -h 127.0.0.1 -P 3306 -u root ping >/dev/null 2>&1; }

if ! pg_up; then
  echo "starting PostgreSQL"
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n 1)" main start
fi
if ! maria_up; then
  echo "starting MariaDB"
  start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd
fi
for _ in $(seq 1 60); do
  if pg_up && maria_up; then
    exit 0
  fi
  sleep 0.5
done
pg_up || { echo "PostgreSQL did not start on 127.0.0.1:5432" >&2; exit 1; }
maria_up || { echo "MariaDB did not start on 127.0.0.1:3306" >&2; exit 1; }
