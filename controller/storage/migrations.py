"""The legacy migrations (before Alembic), frozen: the index + 1 is the legacy version.

storage/legacy.py applies them to a database of an older edgefleet before Alembic takes it
over at the baseline revision; a new schema change is an Alembic revision in
storage/alembic/versions/, never an entry here (docs/storage.md).
"""

from __future__ import annotations

# Ordered migrations; the index + 1 is the legacy version. Frozen: never edit or append.
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
