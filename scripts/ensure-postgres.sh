#!/usr/bin/env bash
# Make the PostgreSQL the storage tests use reachable: server on 127.0.0.1:5432 (installed from the
# distribution and started when missing), role edgefleet/edgefleet and database edgefleet_test.
# Idempotent; every test then works in a schema of its own (tests/conftest.py).
set -euo pipefail
HOST=127.0.0.1
PORT="${EDGEFLEET_PG_PORT:-5432}"
ROLE=edgefleet
DB=edgefleet_test
SUDO=""
if [ "$(id -u)" != "0" ]; then SUDO="sudo"; fi

listening() {
  if command -v pg_isready >/dev/null 2>&1; then
    pg_isready -q -h "$HOST" -p "$PORT"
  else
    (exec 3<>"/dev/tcp/$HOST/$PORT") 2>/dev/null
  fi
}

if ! listening; then
  if ! command -v pg_ctlcluster >/dev/null 2>&1; then
    if ! command -v apt-get >/dev/null 2>&1; then
      echo "PostgreSQL is not listening on $HOST:$PORT and apt-get is missing; start one and retry" >&2
      exit 1
    fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq postgresql
  fi
  # Debian's package creates a cluster; start every one that is down (no systemd in containers).
  pg_lsclusters --no-header | while read -r version cluster _port status _rest; do
    if [ "$status" != "online" ]; then $SUDO pg_ctlcluster "$version" "$cluster" start; fi
  done
  for _ in $(seq 1 30); do listening && break; sleep 1; done
  if ! listening; then
    echo "PostgreSQL did not come up on $HOST:$PORT (pg_lsclusters says:)" >&2
    pg_lsclusters >&2 || true
    exit 1
  fi
fi

if ! command -v psql >/dev/null 2>&1; then
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq postgresql-client
fi

# Talk to the server as its superuser: over TCP when it trusts loopback (CI images), else through
# the local socket as the postgres OS user (Debian's default peer auth).
as_postgres() {
  if psql -h "$HOST" -p "$PORT" -U postgres -d postgres -Atqc "select 1" >/dev/null 2>&1 </dev/null; then
    psql -h "$HOST" -p "$PORT" -U postgres -d postgres -v ON_ERROR_STOP=1 -Atq "$@"
  elif [ "$(id -u)" = "0" ]; then
    runuser -u postgres -- psql -p "$PORT" -d postgres -v ON_ERROR_STOP=1 -Atq "$@"
  else
    sudo -u postgres psql -p "$PORT" -d postgres -v ON_ERROR_STOP=1 -Atq "$@"
  fi
}

if [ "$(as_postgres -c "select 1 from pg_roles where rolname = '$ROLE'")" != "1" ]; then
  as_postgres -c "create role $ROLE login createdb password '$ROLE'"
fi
if [ "$(as_postgres -c "select 1 from pg_database where datname = '$DB'")" != "1" ]; then
  as_postgres -c "create database $DB owner $ROLE"
fi

# Verify with the credentials the tests use (password auth over TCP, as in pg_hba's defaults).
if ! PGPASSWORD="$ROLE" psql -h "$HOST" -p "$PORT" -U "$ROLE" -d "$DB" -Atqc "select 1" >/dev/null </dev/null; then
  echo "cannot connect as $ROLE to $DB on $HOST:$PORT; check pg_hba.conf allows md5/scram on loopback" >&2
  exit 1
fi
