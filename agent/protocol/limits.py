"""Protocol limits shared by both sides, each with the reason for its value."""

from __future__ import annotations

# Schema version carried as `v` in every JSON message; bump on an incompatible change.
SCHEMA_VERSION = 1

# Size cap checked before json.loads: a manifest for a 100 MiB model in 64 KiB chunks
# lists 1,600 chunk hashes (~110 KB), so 256 KiB leaves headroom while bounding parser work.
MAX_JSON_BYTES = 256 * 1024

# Largest chunk accepted: 128 KiB fits AWS IoT Core's payload limit and every broker's default.
MAX_CHUNK_SIZE = 128 * 1024

# Chunk size the controller uses: 64 KiB moved 8 MiB to 100 paho subscribers in ~1–1.5 s
# through mosquitto on this class of machine, and keeps a repair request cheap.
DEFAULT_CHUNK_SIZE = 64 * 1024

# Largest artifact accepted: a generous upper bound for edge models (MobileNetV2 fp32 is 14 MB).
MAX_ARTIFACT_SIZE = 512 * 1024 * 1024

# Longest free-text field (error messages from runtimes can be long, but not unbounded).
MAX_TEXT_LENGTH = 8192

# Upper bounds (ms) of the latency histogram buckets every agent reports, plus an implicit
# +Inf bucket. Fixed and shared, so histograms from any number of devices add up exactly and map
# one-to-one onto Prometheus buckets: 1-1.5-2-3-5-7.5 per decade keeps a percentile read from
# the buckets within ~25 % between 0.1 ms (a tiny int8 model on x86) and 7.5 s (a large model
# on a Cortex-A7).
LATENCY_BUCKETS_MS: tuple[float, ...] = tuple(
    round(mantissa * 10.0**exponent, 6)
    for exponent in range(-1, 4)
    for mantissa in (1.0, 1.5, 2.0, 3.0, 5.0, 7.5)
)

# Most records in one telemetry message: a record with full latency stats is ~0.7 KB of JSON
# (measured 680 B), so 150 stay near 105 KB: under MAX_JSON_BYTES and under AWS IoT Core's
# 128 KiB payload limit (200 measured 137 KB, over it).
MAX_TELEMETRY_RECORDS = 150
# Byte cap of one telemetry message: AWS IoT Core's payload limit, the strictest broker we target.
MAX_TELEMETRY_BYTES = 128 * 1024

# Most timed runs one benchmark may ask for (desired state or command). TFLite's benchmark_model
# defaults to 50; 10,000 runs of a 1 ms model take 10 s and keep 80 KB of samples, while an
# unbounded value (100,000,000 was tried) froze the agent for minutes and grew it past 1.6 GB.
MAX_BENCHMARK_RUNS = 10_000
# Most untimed warm-up runs: a warm-up only has to fill caches; 1,000 is far past that.
MAX_BENCHMARK_WARMUP = 1_000
# Largest latency budget (ms) or memory budget (MB) a desired state may carry: an hour per
# inference / a terabyte of RAM are past any edge device, so anything above is a forged value.
MAX_BUDGET_MS = 3_600_000.0
MAX_BUDGET_MB = 1_048_576.0
# How long a signed command stays valid: commands are not retained, only queued in the device's
# persistent session, so one that waited an hour for its device is no longer what the operator
# meant (a benchmark or rollback asked for then), and a captured one cannot be held back longer.
COMMAND_VALIDITY_S = 3600.0
# Chunk distribution (docs/rollouts.md, "Distribution"). The controller publishes each chunk
# once, retained; a device that misses some re-subscribes to those chunks' own topics, and the
# broker re-sends its retained copies to that device alone. Only when that brings nothing (the
# broker lost its retained copies) does the device send a `need`.
# Chunk topics re-subscribed in one repair round: 256 × 64 KiB = 16 MiB asked at once, so one
# SUBSCRIBE stays small (~30 KB of filters) and a large gap is taken in bounded bites.
MAX_REPAIR_TOPICS = 256
# Repair rounds without progress back off ×2 up to this, with ±REPAIR_JITTER, so devices that
# lost the same chunks (one broker hiccup) do not all ask again in the same instant.
REPAIR_BACKOFF_MAX_S = 30.0
REPAIR_JITTER = 0.2
# After a reconnect a download waits a random 0..RECONNECT_SPREAD_S before re-subscribing its
# missing chunks: a broker restart with 10,000 devices downloading becomes ~2,000 re-subscribes
# a second instead of 10,000 at once (each one a burst of retained chunks from the broker).
RECONNECT_SPREAD_S = 5.0
# The controller republishes a chunk asked for by `need` at most once per this many seconds,
# whoever and however many ask: a republish (retained) reaches every device subscribed to that
# chunk, i.e. exactly the ones missing it, so one per round serves them all. It is the devices'
# REPAIR_BACKOFF_MAX_S, so a device that backed off fully still finds a fresh copy each round.
REPUBLISH_ROUND_S = 30.0
