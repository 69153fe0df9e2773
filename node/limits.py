"""Every size, count and duration the node package enforces, with its unit in its name."""

# /llorch/infer/2 frames.
REQUEST_FRAME_BYTES_MAX = 256 * 1024      # ticket + salt + prompt
FRAME_BYTES_MAX = 64 * 1024               # every other frame
RECEIVE_BUFFER_BYTES_MAX = REQUEST_FRAME_BYTES_MAX + 16
STREAM_READ_BYTES = 64 * 1024             # one read() from a libp2p stream
TOKEN_TEXT_CHARS_MAX = 4096
TOKENS_PER_FRAME_MAX = 256                # texts in one tokens frame
TOKEN_FRAMES_AHEAD_MAX = 16               # tokens frames a provider may send beyond the gateway's last more.taken
TOKEN_FRAMES_PER_MORE = 8                 # the gateway says more.taken after taking this many tokens frames
TOKENS_PENDING_MAX = 4096                 # tokens a provider holds for the gateway before its engine waits
ERROR_MESSAGE_CHARS_MAX = 1024
SALT_BYTES = 16

# Timeouts on the provider side.
REQUEST_READ_TIMEOUT_S = 10.0             # from stream open to a complete request frame
FRAME_WRITE_TIMEOUT_S = 10.0              # one frame to the gateway
GENERATION_TIMEOUT_S = 600.0              # whole generation
TOKENS_DRAIN_TIMEOUT_S = 60.0             # after the generation: for the gateway to take the last tokens frames

# Tickets.
TICKET_CLOCK_SKEW_MS = 30_000
TICKET_LIFETIME_MS_MAX = 10 * 60_000

# Attestations (gossip).
ATTESTATION_BYTES_MAX = 8 * 1024
ATTESTATION_INTERVAL_MS_DEFAULT = 30_000  # the heartbeat: a change of slots or models attests at once; a gateway
                                          # takes a provider whose connection closed out of placement at once
ATTESTATION_LIFETIME_INTERVALS = 3        # expires_at = issued_at + 3 intervals
ATTESTATION_SPACING_MS_MIN = 250          # no two attestations closer than this (capacity changes trigger one)
ATTESTATION_CLOCK_SKEW_MS = 30_000
GOSSIP_VALIDATIONS_AT_ONCE_MAX = 64       # messages a host validates at once (py-libp2p: 10), so a gateway's checks batch
ATTESTATION_ADDRS_MAX = 8
ADDRS_PARSED_KEPT = 32_768                # multiaddr strings whose parse is kept (a gateway sees each provider's every few s)
ATTESTATION_INTERVAL_MS_MAX = 60_000      # node.attestation_interval_ms may not be longer
ATTESTATION_VALIDITY_MS_MAX = ATTESTATION_LIFETIME_INTERVALS * ATTESTATION_INTERVAL_MS_MAX
ATTESTATION_MODELS_MAX = 16

# Host.
DIAL_TIMEOUT_S = 10.0
BOOTSTRAP_CHECK_S = 0.25                 # how soon a lost gateway connection is noticed
REDIAL_S_MIN, REDIAL_S_MAX = 0.25, 2.0   # a lost gateway is redialled at once, then at most this far apart (±25%)
REDIAL_SUMMARY_S = 60.0                  # while a gateway is away: one log line per this
ANNOUNCE_AFTER_CONNECT_S = (0.0, 0.5, 1.0)   # attestations nudged out at a (re)connection, these pauses apart
SHUTDOWN_GRACE_S = 3.0
LIBP2P_WRITE_TIMEOUT_S = 30.0            # one Yamux frame onto a connection (a dead peer's: closed then)

# /llorch/ledger/1.
LEDGER_REQUEST_FRAME_BYTES_MAX = 32 * 1024      # requests are small (a cosigned note is the largest)
LEDGER_RESPONSE_FRAME_BYTES_MAX = 1024 * 1024   # a page of entries
LEDGER_RECEIVE_BUFFER_BYTES_MAX = LEDGER_RESPONSE_FRAME_BYTES_MAX + 16
LEDGER_READ_TIMEOUT_S = 10.0

# Reachability (node/reachability.py, node/relay.py).
DIALBACK_FRAME_BYTES_MAX = 1024           # a dial-back probe's request or reply
DIALBACK_PORTS_MAX = 4                    # ports one dial-back probe may ask about (node/wire/dialback.py)
OBSERVATION_AGE_MS_MAX = 900_000          # a gateway's signed observation of a peer's IP is used this long
OBSERVATION_REFRESH_MS = 480_000          # a node asks its gateway for a new one when its own is this old
PUNCH_TIMEOUT_S = 10.0                    # a hole punch's exchange over the relayed connection, then its dials
PUNCH_DIAL_TIMEOUT_S = 2.0                # one simultaneous-open dial
PUNCH_ROUNDS = 3                          # dial rounds in one hole punch (the timing is a race; retry it)
PUNCH_ATTEMPTS = 2                        # exchanges (each with its rounds) before a punch gives up and stays relayed
PUNCHES_AT_ONCE_MAX = 4                   # hole punches a node answers at the same time (one per peer)
DIALBACK_TIMEOUT_S = 15.0                 # open, ask and hear the answer (the gateway tries each port for 3 s)
REACHABILITY_RECHECK_S = 300.0            # how often a node asks again whether it is directly reachable
RELAY_RESERVE_TIMEOUT_S = 10.0            # open a hop stream, reserve, read the answer
RELAY_RENEW_BEFORE_S = 120                # renew a reservation this long before it expires
RELAY_RETRY_S = 5.0                       # after a failed reservation (no connection yet, refused), try again
RELAY_DIAL_TIMEOUT_S = 15.0               # an auditor's dial through a relay: reach the relay, circuit, handshakes

# /llorch/listing/1 (node/wire/listing.py, node/listing.py).
LISTING_REQUEST_FRAME_BYTES_MAX = 128    # {"t": "ask", "provider_id": ...} is about 70 bytes
LISTING_ANSWER_FRAME_BYTES_MAX = 4096    # the listing map (with a fork reason and 12 payout statements) or a refusal
LISTING_FORK_REASON_CHARS_MAX = 256      # the witness's reason, cut to this by the gateway
LISTING_TIMEOUT_S = 10.0                 # open a stream on the existing connection, ask, hear the answer
LISTING_RECHECK_S = 60.0                 # how often a node asks each connected gateway again, once settled
LISTING_UNSETTLED_RECHECK_S = 10.0       # ... while not approved, not geo certified or excluded
LISTING_RETRY_S = 5.0                    # after a gateway did not answer (or was not connected yet)

# The provider's warnings (node/warnings.py: the dashboard and `llorch node status`).
COSIGNATURE_STALE_MS = 10 * 60_000        # connected, with receipts, and no cosignature for this long: warn
CLOCK_SKEW_MS_MAX = 5_000                 # the node's clock this far from a gateway's (beyond the round trip): warn
DISK_FREE_BYTES_MIN = 1 << 30             # warn below 1 GiB free beside the ledger ...
DISK_FREE_PPM_MIN = 50_000                # ... or below 5% free

# The signed catalog (node/wire/catalog.py) and /llorch/catalog/1.
CATALOG_DOCUMENT_ENTRIES_MAX = 256             # models one catalog may hold, retired ones included
CATALOG_DOCUMENT_BYTES_MAX = 1024 * 1024       # the signed catalog's envelope
CATALOG_REQUEST_FRAME_BYTES_MAX = 64           # {"t": "ask", "have_version": n} is about 30 bytes
CATALOG_ANSWER_FRAME_BYTES_MAX = CATALOG_DOCUMENT_BYTES_MAX + 64
CATALOG_TIMEOUT_S = 20.0                       # open a stream on the existing connection, ask, hear the answer
CATALOG_POLL_MS_DEFAULT = 30_000               # how often a node asks each connected trusted gateway again
CATALOG_RETRY_S = 5.0                          # after a gateway did not answer (or was not connected yet)
