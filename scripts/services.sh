#!/usr/bin/env bash
# Starts the PostgreSQL and MariaDB servers the integration tests use, if they are not running,
# and waits until both accept connections. Safe to run again.
set -euo pipefail

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
