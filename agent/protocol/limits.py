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
