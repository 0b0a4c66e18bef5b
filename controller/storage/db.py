"""Controller storage: one schema with versioned migrations on SQLite (default) or PostgreSQL."""

from __future__ import annotations

import json
import os
import re
import sqlite3
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

# Ordered migrations; the index + 1 is the schema version. Never edit one that has shipped.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE devices (
        id TEXT PRIMARY KEY,
        profile TEXT,
        profile_reason TEXT NOT NULL DEFAULT '',
        declared_profile TEXT,
        facts TEXT NOT NULL DEFAULT '{}',
        agent_version TEXT,
        runtime TEXT,
        runtime_version TEXT,
        online INTEGER NOT NULL DEFAULT 0,
        state TEXT NOT NULL DEFAULT 'unknown',
        status_detail TEXT NOT NULL DEFAULT '',
        model_sha256 TEXT,
        previous_sha256 TEXT,
        reported_generation INTEGER NOT NULL DEFAULT 0,
        desired_generation INTEGER NOT NULL DEFAULT 0,
        desired_sha256 TEXT,
        desired_deployment_id TEXT,
        published_generation INTEGER NOT NULL DEFAULT 0,
        registered_by TEXT NOT NULL,
        registered_at REAL NOT NULL,
        last_seen REAL
    );
    CREATE TABLE models (
        id INTEGER PRIMARY KEY,
        name TEXT NOT NULL,
        version TEXT NOT NULL,
        source TEXT NOT NULL DEFAULT '',
        created REAL NOT NULL,
        UNIQUE (name, version)
    );
    CREATE TABLE artifacts (
        sha256 TEXT PRIMARY KEY,
        model_id INTEGER NOT NULL REFERENCES models(id),
        recipe TEXT NOT NULL,
        profile TEXT,
        size INTEGER NOT NULL,
        chunk_size INTEGER NOT NULL,
        manifest TEXT NOT NULL,
        created REAL NOT NULL
    );
    CREATE TABLE deployments (
        id TEXT PRIMARY KEY,
        model_id INTEGER NOT NULL REFERENCES models(id),
        target TEXT NOT NULL,
        created REAL NOT NULL
    );
    CREATE TABLE deployment_devices (
        deployment_id TEXT NOT NULL REFERENCES deployments(id),
        device_id TEXT NOT NULL,
        artifact_sha256 TEXT NOT NULL REFERENCES artifacts(sha256),
        generation INTEGER NOT NULL,
        state TEXT NOT NULL DEFAULT 'pending',
        detail TEXT NOT NULL DEFAULT '',
        updated REAL NOT NULL,
        PRIMARY KEY (deployment_id, device_id)
    );
    CREATE TABLE benchmarks (
        id INTEGER PRIMARY KEY,
        event_id TEXT NOT NULL,
        device_id TEXT NOT NULL,
        model_sha256 TEXT NOT NULL,
        deployment_id TEXT,
        p50_ms REAL NOT NULL,
        p90_ms REAL NOT NULL,
        p99_ms REAL NOT NULL,
        peak_rss_mb REAL NOT NULL,
        power_w REAL NOT NULL,
        energy_mj_per_inference REAL NOT NULL,
        power_source TEXT NOT NULL,
        report TEXT NOT NULL,
        ts REAL NOT NULL,
        UNIQUE (device_id, event_id)
    );
    CREATE INDEX benchmarks_device ON benchmarks (device_id, ts);
    CREATE TABLE events (
        device_id TEXT NOT NULL,
        event_id TEXT NOT NULL,
        kind TEXT NOT NULL,
        deployment_id TEXT,
        generation INTEGER,
        state TEXT,
        message TEXT NOT NULL,
        ts REAL NOT NULL,
        received REAL NOT NULL,
        PRIMARY KEY (device_id, event_id)
    );
    CREATE INDEX events_deployment ON events (deployment_id);
    """,
    """
    CREATE TABLE commands (
        id TEXT PRIMARY KEY,
        device_id TEXT NOT NULL,
        action TEXT NOT NULL,
        runs INTEGER NOT NULL DEFAULT 50,
        warmup INTEGER NOT NULL DEFAULT 5,
        created REAL NOT NULL,
        published REAL,
        completed REAL,
        result TEXT NOT NULL DEFAULT ''
    );
    CREATE INDEX commands_unpublished ON commands (published) WHERE published IS NULL;
    """,
    # Rollouts are deployments with a policy: waves, failure threshold, gates, timeout, retries.
    # A plain `deploy` is a rollout of one wave with no gates and no retries.
    """
    ALTER TABLE deployments ADD COLUMN kind TEXT NOT NULL DEFAULT 'deploy';
    ALTER TABLE deployments ADD COLUMN policy TEXT NOT NULL DEFAULT '{}';
    ALTER TABLE deployments ADD COLUMN state TEXT NOT NULL DEFAULT 'running';
    ALTER TABLE deployments ADD COLUMN wave INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE deployments ADD COLUMN reason TEXT NOT NULL DEFAULT '';
    ALTER TABLE deployments ADD COLUMN updated REAL;
    CREATE TABLE deployment_devices_v3 (
        deployment_id TEXT NOT NULL REFERENCES deployments(id),
        device_id TEXT NOT NULL,
        artifact_sha256 TEXT REFERENCES artifacts(sha256),
        generation INTEGER NOT NULL,
        state TEXT NOT NULL DEFAULT 'pending',
        detail TEXT NOT NULL DEFAULT '',
        updated REAL NOT NULL,
        position INTEGER NOT NULL DEFAULT 0,
        wave INTEGER NOT NULL DEFAULT 0,
        attempts INTEGER NOT NULL DEFAULT 0,
        deadline REAL,
        previous_sha256 TEXT,
        baseline TEXT,
        result TEXT,
        stage TEXT,
        PRIMARY KEY (deployment_id, device_id)
    );
    INSERT INTO deployment_devices_v3 (deployment_id, device_id, artifact_sha256, generation,
        state, detail, updated)
        SELECT deployment_id, device_id, artifact_sha256, generation, state, detail, updated
        FROM deployment_devices;
    DROP TABLE deployment_devices;
    ALTER TABLE deployment_devices_v3 RENAME TO deployment_devices;
    CREATE INDEX deployment_devices_device ON deployment_devices (device_id, generation);
    CREATE INDEX deployments_active ON deployments (state) WHERE state IN ('running', 'paused');
    ALTER TABLE artifacts ADD COLUMN kind TEXT NOT NULL DEFAULT 'model';
    ALTER TABLE artifacts ADD COLUMN golden_sha256 TEXT;
    ALTER TABLE artifacts ADD COLUMN chunks_retained INTEGER NOT NULL DEFAULT 0;
    CREATE TABLE model_artifacts (
        model_id INTEGER NOT NULL REFERENCES models(id),
        sha256 TEXT NOT NULL REFERENCES artifacts(sha256),
        profile TEXT,
        recipe TEXT NOT NULL,
        created REAL NOT NULL
    );
    CREATE UNIQUE INDEX model_artifacts_profile
        ON model_artifacts (model_id, COALESCE(profile, ''));
    INSERT OR IGNORE INTO model_artifacts (model_id, sha256, profile, recipe, created)
        SELECT model_id, sha256, profile, recipe, created FROM artifacts WHERE kind = 'model';
    UPDATE deployments SET state = 'completed', reason = 'deployed before rollouts existed'
    """,
    # Telemetry (controller/fleet/telemetry/store.py, docs/telemetry.md). Plain types PostgreSQL
    # takes as they are: DOUBLE PRECISION (not REAL, which is 4 bytes there) for times and
    # measurements, BIGINT counters, 0/1 INTEGER flags, TEXT. Histograms are one column per
    # LATENCY_BUCKETS_MS bucket (30 bounds + +Inf, b0..b30), so SUM() merges them in SQL.
    # `minute` is floor(ts / 60) * 60 computed at ingest: no database-specific date functions.
    """
    CREATE TABLE telemetry (
        device_id TEXT NOT NULL,
        seq BIGINT NOT NULL,
        ts DOUBLE PRECISION NOT NULL,
        minute BIGINT NOT NULL,
        received DOUBLE PRECISION NOT NULL,
        model_sha256 TEXT,
        interval_s DOUBLE PRECISION NOT NULL,
        served BIGINT NOT NULL DEFAULT 0,
        p50_ms DOUBLE PRECISION,
        p90_ms DOUBLE PRECISION,
        p99_ms DOUBLE PRECISION,
        mean_ms DOUBLE PRECISION,
        max_ms DOUBLE PRECISION,
        b0 BIGINT NOT NULL DEFAULT 0, b1 BIGINT NOT NULL DEFAULT 0, b2 BIGINT NOT NULL DEFAULT 0,
        b3 BIGINT NOT NULL DEFAULT 0, b4 BIGINT NOT NULL DEFAULT 0, b5 BIGINT NOT NULL DEFAULT 0,
        b6 BIGINT NOT NULL DEFAULT 0, b7 BIGINT NOT NULL DEFAULT 0, b8 BIGINT NOT NULL DEFAULT 0,
        b9 BIGINT NOT NULL DEFAULT 0, b10 BIGINT NOT NULL DEFAULT 0, b11 BIGINT NOT NULL DEFAULT 0,
        b12 BIGINT NOT NULL DEFAULT 0, b13 BIGINT NOT NULL DEFAULT 0, b14 BIGINT NOT NULL DEFAULT 0,
        b15 BIGINT NOT NULL DEFAULT 0, b16 BIGINT NOT NULL DEFAULT 0, b17 BIGINT NOT NULL DEFAULT 0,
        b18 BIGINT NOT NULL DEFAULT 0, b19 BIGINT NOT NULL DEFAULT 0, b20 BIGINT NOT NULL DEFAULT 0,
        b21 BIGINT NOT NULL DEFAULT 0, b22 BIGINT NOT NULL DEFAULT 0, b23 BIGINT NOT NULL DEFAULT 0,
        b24 BIGINT NOT NULL DEFAULT 0, b25 BIGINT NOT NULL DEFAULT 0, b26 BIGINT NOT NULL DEFAULT 0,
        b27 BIGINT NOT NULL DEFAULT 0, b28 BIGINT NOT NULL DEFAULT 0, b29 BIGINT NOT NULL DEFAULT 0,
        b30 BIGINT NOT NULL DEFAULT 0,
        invocations BIGINT NOT NULL DEFAULT 0,
        throughput_ips DOUBLE PRECISION NOT NULL DEFAULT 0,
        rss_mb DOUBLE PRECISION NOT NULL DEFAULT 0,
        peak_rss_mb DOUBLE PRECISION NOT NULL DEFAULT 0,
        cpu_percent DOUBLE PRECISION NOT NULL DEFAULT 0,
        temperature_c DOUBLE PRECISION,
        power_w DOUBLE PRECISION,
        energy_mj_per_inference DOUBLE PRECISION,
        power_source TEXT NOT NULL DEFAULT '',
        power_estimated INTEGER NOT NULL DEFAULT 0,
        cache_hits BIGINT NOT NULL DEFAULT 0,
        errors BIGINT NOT NULL DEFAULT 0,
        dropped_total BIGINT NOT NULL DEFAULT 0,
        PRIMARY KEY (device_id, seq)
    );
    CREATE INDEX telemetry_device_ts ON telemetry (device_id, ts);
    CREATE INDEX telemetry_ts ON telemetry (ts);
    CREATE TABLE telemetry_minute (
        device_id TEXT NOT NULL,
        minute BIGINT NOT NULL,
        model_sha256 TEXT NOT NULL DEFAULT '',
        records BIGINT NOT NULL,
        seq_first BIGINT NOT NULL,
        seq_last BIGINT NOT NULL,
        ts_first DOUBLE PRECISION NOT NULL,
        ts_last DOUBLE PRECISION NOT NULL,
        interval_s DOUBLE PRECISION NOT NULL DEFAULT 0,
        served BIGINT NOT NULL DEFAULT 0,
        latency_sum_ms DOUBLE PRECISION NOT NULL DEFAULT 0,
        max_ms DOUBLE PRECISION,
        b0 BIGINT NOT NULL DEFAULT 0, b1 BIGINT NOT NULL DEFAULT 0, b2 BIGINT NOT NULL DEFAULT 0,
        b3 BIGINT NOT NULL DEFAULT 0, b4 BIGINT NOT NULL DEFAULT 0, b5 BIGINT NOT NULL DEFAULT 0,
        b6 BIGINT NOT NULL DEFAULT 0, b7 BIGINT NOT NULL DEFAULT 0, b8 BIGINT NOT NULL DEFAULT 0,
        b9 BIGINT NOT NULL DEFAULT 0, b10 BIGINT NOT NULL DEFAULT 0, b11 BIGINT NOT NULL DEFAULT 0,
        b12 BIGINT NOT NULL DEFAULT 0, b13 BIGINT NOT NULL DEFAULT 0, b14 BIGINT NOT NULL DEFAULT 0,
        b15 BIGINT NOT NULL DEFAULT 0, b16 BIGINT NOT NULL DEFAULT 0, b17 BIGINT NOT NULL DEFAULT 0,
        b18 BIGINT NOT NULL DEFAULT 0, b19 BIGINT NOT NULL DEFAULT 0, b20 BIGINT NOT NULL DEFAULT 0,
        b21 BIGINT NOT NULL DEFAULT 0, b22 BIGINT NOT NULL DEFAULT 0, b23 BIGINT NOT NULL DEFAULT 0,
        b24 BIGINT NOT NULL DEFAULT 0, b25 BIGINT NOT NULL DEFAULT 0, b26 BIGINT NOT NULL DEFAULT 0,
        b27 BIGINT NOT NULL DEFAULT 0, b28 BIGINT NOT NULL DEFAULT 0, b29 BIGINT NOT NULL DEFAULT 0,
        b30 BIGINT NOT NULL DEFAULT 0,
        invocations BIGINT NOT NULL DEFAULT 0,
        throughput_sum DOUBLE PRECISION NOT NULL DEFAULT 0,
        rss_sum DOUBLE PRECISION NOT NULL DEFAULT 0,
        peak_rss_mb DOUBLE PRECISION NOT NULL DEFAULT 0,
        cpu_sum DOUBLE PRECISION NOT NULL DEFAULT 0,
        temperature_sum DOUBLE PRECISION NOT NULL DEFAULT 0,
        temperature_n BIGINT NOT NULL DEFAULT 0,
        temperature_max DOUBLE PRECISION,
        power_sum DOUBLE PRECISION NOT NULL DEFAULT 0,
        power_interval_s DOUBLE PRECISION NOT NULL DEFAULT 0,
        energy_sum DOUBLE PRECISION NOT NULL DEFAULT 0,
        energy_served BIGINT NOT NULL DEFAULT 0,
        power_source TEXT NOT NULL DEFAULT '',
        power_estimated INTEGER NOT NULL DEFAULT 0,
        cache_hits BIGINT NOT NULL DEFAULT 0,
        errors BIGINT NOT NULL DEFAULT 0,
        dropped_total BIGINT NOT NULL DEFAULT 0,
        PRIMARY KEY (device_id, minute, model_sha256)
    );
    CREATE INDEX telemetry_minute_minute ON telemetry_minute (minute);
    CREATE TABLE telemetry_cursor (
        device_id TEXT PRIMARY KEY,
        highest BIGINT NOT NULL DEFAULT 0,
        contiguous BIGINT NOT NULL DEFAULT 0,
        stored BIGINT NOT NULL DEFAULT 0,
        duplicates BIGINT NOT NULL DEFAULT 0,
        lost BIGINT NOT NULL DEFAULT 0,
        dropped_total BIGINT NOT NULL DEFAULT 0,
        last_ts DOUBLE PRECISION,
        updated DOUBLE PRECISION NOT NULL
    );
    CREATE TABLE telemetry_gaps (
        device_id TEXT NOT NULL,
        seq_first BIGINT NOT NULL,
        seq_last BIGINT NOT NULL,
        state TEXT NOT NULL DEFAULT 'missing',
        first_seen DOUBLE PRECISION NOT NULL,
        last_requested DOUBLE PRECISION,
        requests INTEGER NOT NULL DEFAULT 0,
        reason TEXT NOT NULL DEFAULT '',
        PRIMARY KEY (device_id, seq_first)
    );
    CREATE INDEX telemetry_gaps_state ON telemetry_gaps (state, first_seen);
    CREATE TABLE telemetry_latency_totals (
        profile TEXT NOT NULL,
        model_sha256 TEXT NOT NULL,
        served BIGINT NOT NULL DEFAULT 0,
        latency_sum_ms DOUBLE PRECISION NOT NULL DEFAULT 0,
        b0 BIGINT NOT NULL DEFAULT 0, b1 BIGINT NOT NULL DEFAULT 0, b2 BIGINT NOT NULL DEFAULT 0,
        b3 BIGINT NOT NULL DEFAULT 0, b4 BIGINT NOT NULL DEFAULT 0, b5 BIGINT NOT NULL DEFAULT 0,
        b6 BIGINT NOT NULL DEFAULT 0, b7 BIGINT NOT NULL DEFAULT 0, b8 BIGINT NOT NULL DEFAULT 0,
        b9 BIGINT NOT NULL DEFAULT 0, b10 BIGINT NOT NULL DEFAULT 0, b11 BIGINT NOT NULL DEFAULT 0,
        b12 BIGINT NOT NULL DEFAULT 0, b13 BIGINT NOT NULL DEFAULT 0, b14 BIGINT NOT NULL DEFAULT 0,
        b15 BIGINT NOT NULL DEFAULT 0, b16 BIGINT NOT NULL DEFAULT 0, b17 BIGINT NOT NULL DEFAULT 0,
        b18 BIGINT NOT NULL DEFAULT 0, b19 BIGINT NOT NULL DEFAULT 0, b20 BIGINT NOT NULL DEFAULT 0,
        b21 BIGINT NOT NULL DEFAULT 0, b22 BIGINT NOT NULL DEFAULT 0, b23 BIGINT NOT NULL DEFAULT 0,
        b24 BIGINT NOT NULL DEFAULT 0, b25 BIGINT NOT NULL DEFAULT 0, b26 BIGINT NOT NULL DEFAULT 0,
        b27 BIGINT NOT NULL DEFAULT 0, b28 BIGINT NOT NULL DEFAULT 0, b29 BIGINT NOT NULL DEFAULT 0,
        b30 BIGINT NOT NULL DEFAULT 0,
        PRIMARY KEY (profile, model_sha256)
    )
    """,
    # Closed loop (docs/closed-loop.md): ranked candidates per model and profile, their trials on
    # canary devices, the stored decision, per-device runtime options, fallbacks and outliers.
    """
    CREATE TABLE model_candidates (
        model_id INTEGER NOT NULL REFERENCES models(id),
        profile TEXT NOT NULL,
        rank INTEGER NOT NULL,
        sha256 TEXT NOT NULL REFERENCES artifacts(sha256),
        recipe TEXT NOT NULL,
        threads INTEGER,
        host TEXT NOT NULL DEFAULT '{}',
        PRIMARY KEY (model_id, profile, rank)
    );
    CREATE TABLE candidate_trials (
        rollout_id TEXT NOT NULL REFERENCES deployments(id),
        profile TEXT NOT NULL,
        device_id TEXT NOT NULL,
        rank INTEGER NOT NULL,
        sha256 TEXT NOT NULL,
        threads INTEGER,
        state TEXT NOT NULL DEFAULT 'waiting',
        attempts INTEGER NOT NULL DEFAULT 0,
        generation BIGINT NOT NULL DEFAULT 0,
        deadline DOUBLE PRECISION,
        result TEXT,
        outlier TEXT,
        detail TEXT NOT NULL DEFAULT '',
        updated DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (rollout_id, device_id, rank)
    );
    CREATE TABLE candidate_decisions (
        rollout_id TEXT NOT NULL REFERENCES deployments(id),
        profile TEXT NOT NULL,
        winner_rank INTEGER,
        sha256 TEXT,
        threads INTEGER,
        fallback_rank INTEGER,
        explanation TEXT NOT NULL,
        decided DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (rollout_id, profile)
    );
    ALTER TABLE deployments ADD COLUMN phase TEXT NOT NULL DEFAULT 'waves';
    ALTER TABLE deployment_devices ADD COLUMN threads INTEGER;
    ALTER TABLE deployment_devices ADD COLUMN fallback TEXT;
    ALTER TABLE deployment_devices ADD COLUMN outlier TEXT;
    ALTER TABLE deployment_devices ADD COLUMN fell_back TEXT;
    ALTER TABLE devices ADD COLUMN desired_threads INTEGER;
    ALTER TABLE devices ADD COLUMN desired_fallback TEXT
    """,
    # HTTP API bearer tokens (controller/http/auth.py): only the token's sha256 is stored.
    """
    CREATE TABLE api_tokens (
        name TEXT PRIMARY KEY,
        sha256 TEXT NOT NULL UNIQUE,
        role TEXT NOT NULL CHECK (role IN ('read', 'admin')),
        created DOUBLE PRECISION NOT NULL,
        last_used DOUBLE PRECISION
    )
    """,
    # Replicas (docs/storage.md): the leader lease, each wave's start (once: the primary key is
    # the fence against a wave starting twice), the replicas' heartbeats, and an index for the
    # dashboard's change detection (MAX(received) instead of SQLite's rowid).
    """
    CREATE TABLE leases (
        name TEXT PRIMARY KEY,
        holder TEXT NOT NULL,
        epoch BIGINT NOT NULL,
        acquired DOUBLE PRECISION NOT NULL,
        renewed DOUBLE PRECISION NOT NULL,
        expires DOUBLE PRECISION NOT NULL
    );
    CREATE TABLE rollout_waves (
        rollout_id TEXT NOT NULL REFERENCES deployments(id),
        wave INTEGER NOT NULL,
        started DOUBLE PRECISION NOT NULL,
        driver TEXT NOT NULL DEFAULT '',
        devices INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (rollout_id, wave)
    );
    CREATE TABLE replicas (
        name TEXT PRIMARY KEY,
        host TEXT NOT NULL DEFAULT '',
        pid INTEGER NOT NULL DEFAULT 0,
        started DOUBLE PRECISION NOT NULL,
        last_seen DOUBLE PRECISION NOT NULL,
        leader INTEGER NOT NULL DEFAULT 0,
        stats TEXT NOT NULL DEFAULT '{}',
        client_id TEXT NOT NULL DEFAULT '',
        shared INTEGER NOT NULL DEFAULT 0,
        adopted DOUBLE PRECISION,
        adopted_by TEXT
    );
    CREATE INDEX events_received ON events (received)
    """,
)


# How long a connection waits for another one's lock (busy timeout, and opening a new file).
OPEN_TIMEOUT_S = 30.0
# URL schemes that select the PostgreSQL backend (controller/storage/postgres.py).
POSTGRES_SCHEMES = ("postgresql://", "postgres://")


class Cursor(Protocol):
    """What callers use of a DB-API cursor: rows, one row, affected row count."""

    rowcount: int

    def fetchone(self) -> Any:
        """The next row (indexable by position and by column name), or None."""

    def fetchall(self) -> list[Any]:
        """The remaining rows."""

    def __iter__(self) -> Iterator[Any]:
        """Iterate over the remaining rows."""


class Connection(Protocol):
    """The connection surface the controller writes SQL against (SQLite's, which the
    PostgreSQL backend mirrors): `?` placeholders, rows indexable by name and position."""

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Cursor:
        """Run one statement."""

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> Cursor:
        """Run one statement for each parameter row."""


class Database:
    """One connection (use one per thread) with migrations applied on open.

    Two backends share this interface and the SQL written against it: SQLite (the embedded
    default) and PostgreSQL (replicas). SQL uses `?` placeholders and the subset both run:
    ON CONFLICT upserts, CASE instead of two-argument MAX, no JSON functions (docs/storage.md).
    """

    dialect = "sqlite"
    conn: Connection

    @contextmanager
    def transaction(
        self, *, exclusive: bool = True, repeatable: bool = False
    ) -> Iterator[Connection]:
        """One transaction (a SAVEPOINT inside an open one), rolled back on error.

        `repeatable`: every statement sees one snapshot (PostgreSQL REPEATABLE READ), for
        read-then-delete code that must not touch rows other replicas commit meanwhile.

        `exclusive` transactions are serialized against every other exclusive one, in every
        process: read-decide-write code (rollouts, registry) relies on it. Telemetry ingest
        passes False and locks only the devices it writes (`lock_devices`), so replicas ingest
        in parallel. SQLite serializes all writers anyway.
        """
        raise NotImplementedError
        yield self.conn  # pragma: no cover

    def migrate(self, upto: int | None = None) -> int:
        """Apply the migrations the database lacks (up to `upto`); return its schema version."""
        raise NotImplementedError

    def schema_version(self) -> int:
        """The number of migrations applied to this database."""
        raise NotImplementedError

    def lock_devices(self, device_ids: Iterable[str]) -> None:
        """Hold per-device write locks until the transaction ends (no-op where writers are
        serialized anyway, as in SQLite)."""

    def healthy(self) -> bool:
        """False once the connection is lost for good (the service then stops: a supervisor
        restarts it; messages it did not acknowledge are delivered again)."""
        return True

    def clock(self) -> float:
        """The time every replica agrees on (the database server's; here this host's)."""
        return time.time()

    def changed_elsewhere(self) -> bool:
        """True when another connection committed since the last call (cheap; may say False
        where the backend cannot tell: the caller then relies on its periodic tick)."""
        return False

    @contextmanager
    def snapshot(self) -> Iterator[Connection]:
        """A read-only transaction: every query inside sees the same committed state."""
        raise NotImplementedError
        yield self.conn  # pragma: no cover

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        """Rows as dicts."""
        return [dict(row) for row in self.conn.execute(sql, params).fetchall()]

    def query_one(self, sql: str, params: Sequence[Any] = ()) -> dict[str, Any] | None:
        """First row as a dict, or None."""
        row = self.conn.execute(sql, params).fetchone()
        return dict(row) if row else None

    def close(self) -> None:
        """Close the connection."""
        raise NotImplementedError


class SqliteDatabase(Database):
    """One SQLite connection in WAL mode; schema version in PRAGMA user_version."""

    dialect = "sqlite"

    def __init__(self, path: Path, *, migrate: bool = True) -> None:
        """Open (creating if needed) the database and bring its schema up to date."""
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        # isolation_level=None: we issue BEGIN/COMMIT ourselves so batches are one transaction.
        self.sqlite = sqlite3.connect(path, isolation_level=None, timeout=OPEN_TIMEOUT_S)
        self.sqlite.row_factory = sqlite3.Row
        self.conn = self.sqlite
        self._wal_mode()
        # NORMAL is durable across application crashes in WAL mode, and much faster than FULL.
        self.sqlite.execute("PRAGMA synchronous=NORMAL")
        self.sqlite.execute("PRAGMA foreign_keys=ON")
        self._savepoints = 0
        self._data_version = -1
        if migrate:
            self.migrate()

    def _wal_mode(self) -> None:
        """Switch to WAL, waiting out another connection that is creating the same file.

        SQLite does not apply the busy timeout to this pragma: two processes (or threads)
        opening a new database at once got "database is locked" at once, which killed the
        controller service's thread when a CLI command opened the fleet beside it.
        """
        deadline = time.monotonic() + OPEN_TIMEOUT_S
        while True:
            try:
                self.sqlite.execute("PRAGMA journal_mode=WAL")
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def migrate(self, upto: int | None = None) -> int:
        """Apply every migration newer than the stored user_version (up to `upto`, for upgrade
        tests); return the version."""
        target = len(MIGRATIONS) if upto is None else upto
        with self.transaction():
            current = self.sqlite.execute("PRAGMA user_version").fetchone()[0]
            check_schema_version(current)
            for version, script in enumerate(MIGRATIONS[current:target], start=current + 1):
                for statement in split_statements(script):
                    self.sqlite.execute(statement)
                self.sqlite.execute(f"PRAGMA user_version={version}")
        return max(current, target)

    def schema_version(self) -> int:
        """PRAGMA user_version: the number of migrations applied."""
        return int(self.sqlite.execute("PRAGMA user_version").fetchone()[0])

    @contextmanager
    def transaction(
        self, *, exclusive: bool = True, repeatable: bool = False
    ) -> Iterator[Connection]:
        """BEGIN IMMEDIATE … COMMIT, rolled back on error (IMMEDIATE avoids upgrade deadlocks).

        Inside an open transaction it is a SAVEPOINT instead: the service wraps a batch of
        messages in one transaction, and one bad message rolls back only its own changes.
        """
        if self.sqlite.in_transaction:
            self._savepoints += 1
            name = f"sp{self._savepoints}"
            self.sqlite.execute(f"SAVEPOINT {name}")
            try:
                yield self.sqlite
            except BaseException:
                self.sqlite.execute(f"ROLLBACK TO {name}")
                self.sqlite.execute(f"RELEASE {name}")
                raise
            self.sqlite.execute(f"RELEASE {name}")
            return
        self.sqlite.execute("BEGIN IMMEDIATE")
        try:
            yield self.sqlite
        except BaseException:
            self.sqlite.execute("ROLLBACK")
            raise
        self.sqlite.execute("COMMIT")

    @contextmanager
    def snapshot(self) -> Iterator[Connection]:
        """BEGIN (deferred: takes no write lock) … COMMIT: WAL readers see one snapshot."""
        self.sqlite.execute("BEGIN")
        try:
            yield self.sqlite
        finally:
            self.sqlite.execute("COMMIT")

    def changed_elsewhere(self) -> bool:
        """PRAGMA data_version moves when another connection commits (a CLI command)."""
        version = self.sqlite.execute("PRAGMA data_version").fetchone()[0]
        changed = version != self._data_version
        self._data_version = version
        return changed

    def close(self) -> None:
        """Close the connection."""
        self.sqlite.close()


def check_schema_version(current: int) -> None:
    """Refuse a database a newer edgefleet migrated: this one may misread its schema."""
    if current > len(MIGRATIONS):
        raise RuntimeError(
            f"the database schema is version {current}, newer than this edgefleet's "
            f"({len(MIGRATIONS)}): upgrade edgefleet before running it against this database"
        )


def split_statements(script: str) -> list[str]:
    """The statements of a migration script (no migration has a `;` inside a literal)."""
    return [s.strip() for s in script.split(";") if s.strip()]


def database_target(home: Path, db: str | None = None) -> str:
    """Where the fleet's database is: `db`, else $EDGEFLEET_DB, else HOME/edgefleet.db."""
    return db or os.environ.get("EDGEFLEET_DB") or str(home / "edgefleet.db")


def is_postgres(target: str) -> bool:
    """Whether a database target is a PostgreSQL URL."""
    return target.startswith(POSTGRES_SCHEMES)


def open_database(target: str | Path, *, migrate: bool = True) -> Database:
    """Open a database: a postgresql:// URL, or the path of an SQLite file; `migrate=False`
    only for readers of a schema someone already brought up to date (metrics scrapes)."""
    text = str(target)
    if is_postgres(text):
        from controller.storage.postgres import PostgresDatabase

        return PostgresDatabase(text, migrate=migrate)
    if "://" in text:
        raise ValueError(
            f"database {redact_url(text)!r}: expected a postgresql:// URL or an SQLite file path"
        )
    return SqliteDatabase(Path(text), migrate=migrate)


def with_search_path(url: str, schema: str) -> str:
    """A postgresql:// URL whose tables live in `schema` (libpq's options parameter): several
    fleets, or tests, in one database."""
    return f"{url}{'&' if '?' in url else '?'}options=-csearch_path%3D{schema}"


def redact_url(url: str) -> str:
    """A database URL fit for logs and errors: the password replaced by ***."""
    return re.sub(r"(://[^/:@]*:)[^@/]*@", r"\1***@", url)


def now() -> float:
    """Wall-clock timestamp stored in the database."""
    return time.time()


def to_json(value: Any) -> str:
    """Compact JSON for TEXT columns."""
    return json.dumps(value, separators=(",", ":"), sort_keys=True)
