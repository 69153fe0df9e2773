"""Every size, count and duration the ledger package enforces, with its unit in its name."""

# A signed envelope (payload + signature) of any type must fit in this many bytes.
SIGNED_OBJECT_BYTES_MAX = 64 * 1024
# Canonical decoding refuses containers or strings beyond these sizes before allocating.
CANONICAL_STR_BYTES_MAX = 256 * 1024
CANONICAL_BIN_BYTES_MAX = 256 * 1024
CANONICAL_ARRAY_LEN_MAX = 4096
CANONICAL_MAP_LEN_MAX = 256
CANONICAL_DEPTH_MAX = 8

# Key files are tiny; anything bigger is not a key file.
KEY_FILE_BYTES_MAX = 4096

# SQLite waits this long for a lock held by another connection before failing.
SQLITE_BUSY_TIMEOUT_MS = 5_000

# Money: prices are per this many tokens.
PRICE_UNIT_TOKENS = 1_000_000

# Group commit: appends waiting for the writer, and appends committed in one transaction.
APPEND_QUEUE_MAX = 1024
APPEND_BATCH_MAX = 256

# Checkpoints: a node signs one every this many entries or this many seconds (if the ledger grew).
CHECKPOINT_EVERY_ENTRIES_DEFAULT = 64
CHECKPOINT_EVERY_MS_DEFAULT = 10_000
CHECKPOINT_POLL_S = 0.25

# /llorch/ledger/1 pages.
ENTRIES_PAGE_MAX = 256
ENTRIES_PAGE_BYTES_MAX = 512 * 1024

# Bundles (docs/ledger.md §7): a record's payload is one entry or one signed note, so no valid record is larger than a
# signed object; the exporter reads the ledger this many entries at a time.
BUNDLE_RECORD_BYTES_MAX = SIGNED_OBJECT_BYTES_MAX
BUNDLE_HEADER_TRAILER_BYTES_MAX = 1024
EXPORT_PAGE_ENTRIES = 1024

# Spot-check evidence documents (docs/verification.md §5): the file, and the runs of one request it holds.
EVIDENCE_FILE_BYTES_MAX = 4 * 1024 * 1024
EVIDENCE_RUNS_MIN = 2
EVIDENCE_RUNS_MAX = 8
