"""Tuning constants of the controller service loop, each with the reason for its value."""

# How often desired state is reconciled into retained MQTT messages when nothing happens...
RECONCILE_INTERVAL_S = 0.5
# ...and the shortest gap between reconciles when something did: a CLI commit (seen through
# the database's changed_elsewhere) or an ingested batch that may finish a wave.
RECONCILE_MIN_GAP_S = 0.05
# The MQTT shared-subscription group of controller replicas: each device message reaches one.
SHARE_GROUP = "edgefleet"
# Requests for chunks are gathered this long before publishing, so devices that start together
# share one publication of each chunk (egress ≈ one artifact size per wave, not per device).
NEED_COALESCE_S = 0.25
# (sha, chunk) publish times remembered before old ones are forgotten: bounds the map on a
# controller that runs for months; entries older than REPUBLISH_ROUND_S are useless anyway.
REPUBLISHED_MEMORY = 10_000
# Desired states read per reconcile beyond the pacer's budget: devices whose new desired state
# needs no download slot (no artifact) are published even while the window is full.
PACING_SLACK = 64
# Most messages handled per database transaction: batching keeps SQLite fast under fan-in.
MAX_BATCH = 500
# Most telemetry messages per transaction of the telemetry thread: under a backlog (measured:
# ~960 a batch at 10,000 devices on a starved CPU) larger batches cost fewer commits and cursor
# reads per record; the bound keeps one transaction's write lock short for the service loop.
MAX_TELEMETRY_BATCH = 1000
# After the first message of a telemetry batch, the ingest thread waits this long for more: a
# transaction costs ~170 µs of CPU whatever its size (BEGIN/COMMIT, cursor reads, rollups), and
# at 1,000 one-record messages/s without the wait most batches held one message, which doubled
# the CPU per record (bench/RESULTS.md, "Telemetry ingest"). 20 ms is nothing beside a 10 s
# reporting interval; a backlog (a full batch queued) does not wait.
TELEMETRY_LINGER_S = 0.02
# Most telemetry messages the controller holds unacknowledged (received, not yet committed):
# two batches, so the next one arrives while one is stored; the rest of a backlog stays in the
# broker. Without it mosquitto < 2.0.13 pushed whole backlogs into the controller's memory
# (docs/telemetry.md, "Inbox bound").
TELEMETRY_MAX_UNACKED = 2 * MAX_TELEMETRY_BATCH
# Ask an unknown device to announce itself at most this often.
ANNOUNCE_RETRY_S = 10.0
# QoS1 publishes in flight: high enough to stream a wave of chunks without stalling on PUBACKs.
CONTROLLER_INFLIGHT = 200
# After a (re)connect, device events queued by the broker arrive first: rollouts do not judge
# timeouts until this long after connecting, or a long outage would fail healthy devices.
TICK_GRACE_S = 3.0
# How often retained chunks of artifacts nobody needs any more are cleared from the broker.
RETAINED_SWEEP_S = 30.0
# Telemetry gaps are asked for again only once they are this old: after an outage a device's
# drain interleaves with its live records, so a young gap usually fills by itself.
RESEND_GRACE_S = 30.0
# The telemetry ingest's own lag (pipeline_lag_s) is added to RESEND_GRACE_S, so a gap that is
# only our backlog is not asked for; capped, so devices with skewed clocks still get resends.
RESEND_LAG_CAP_S = 600.0
# An unanswered resend request is repeated after this long (10 times, then the gap is lost).
RESEND_RETRY_S = 60.0
# How often the gap table is checked for resend requests (cheap: one indexed query).
RESEND_CHECK_S = 5.0
# Ranges per resend command: the protocol's cap on Command.seq_ranges.
MAX_RESEND_RANGES = 200
# Raw telemetry is kept this many days, then folded into per-minute aggregates...
TELEMETRY_RAW_DAYS = 7.0
# ...by a compaction pass this often. Each compact() call folds at most 5,000 rows in its own
# transaction (0.1-0.2 s of write lock) and a pass stops after COMPACT_BUDGET_S, so ingest never
# waits long. At 15-40 µs a row, 1 s a minute keeps up with 25k-65k rows a minute: ~4,000-10,000
# devices reporting every 10 s. Larger fleets belong on PostgreSQL with replicas (issue 9).
COMPACT_INTERVAL_S = 60.0
COMPACT_BUDGET_S = 1.0
