"""Every size, count and duration the gateway enforces, with its unit in its name."""

HTTP_BODY_BYTES_MAX = 1024 * 1024         # a chat request body
HTTP_BODY_DRAIN_BYTES_MAX = 32 * 1024 * 1024  # an oversized body is read and dropped up to this, to answer cleanly
HTTP_BODY_DRAIN_TIMEOUT_S = 5.0
REQUEST_FRAME_OVERHEAD_BYTES_MAX = 8 * 1024   # ticket, salt and framing around the prompt in a request frame
TICKET_LIFETIME_MS = 60_000               # a ticket must be used within this long
PLACEMENT_ATTEMPTS_MAX = 4                # providers tried per request before giving up
ADMISSION_QUEUE_MAX = 1_024               # requests waiting for a slot (every provider busy), all tenants
STREAM_OPEN_TIMEOUT_S = 10.0              # dial + new stream to a provider
POOLED_STREAMS_PER_PROVIDER_MAX = 4       # streams opened ahead of need and waiting for a request, per provider
POOLED_STREAM_AGE_S_MAX = 4.0             # ... each closed unused after this (the node waits 10 s for a request)
ADMISSION_TIMEOUT_S = 30.0                # request sent → accepted/busy (the node tokenizes the prompt first)
TOKEN_TIMEOUT_S = 60.0                    # gap between two frames while streaming
PROVIDER_QUIET_S = 2.0                    # nothing on a request's stream this long: ping the provider
PROVIDER_PING_TIMEOUT_S = 5.0             # ... no pong this long: it is hung, its connections are closed
CANCEL_DRAIN_TIMEOUT_S = 5.0              # customer gone → cancel sent → the provider's final frame (its receipt)
RELAY_TOKENS_MAX = 8_192                  # tokens one provider may send for one ticket (max_tokens + slack)
ATTESTATIONS_KEPT_MAX = 20_000            # approved providers remembered by the directory (2.7 KiB each, indexed)
CHECKED_ATTESTATIONS_MAX = 4_096          # attestations checked by the gossip validator, awaiting its reader
GOSSIP_APPROVALS_RECHECK_S = 0.25         # the gossip path's view of who is approved may be this old
ATTESTATION_WORKER_RATE_MIN = 200         # attestations a second that start the checking worker process
ATTESTATION_BATCH_MAX = 64                # attestations checked in one trip to the worker process
ATTESTATION_BATCH_WAIT_S = 0.002          # with the worker running: how long a batch waits for more to join it
ATTESTATION_WORKER_TIMEOUT_S = 10.0       # a worker that has not answered a batch by then is replaced
PENDING_ATTESTATIONS_MAX = 256            # attestations of keys nobody approved (never placed on, never dialled)
REGISTRATIONS_PENDING_MAX = 1_000        # registrations awaiting the operator's review, from everyone
REGISTRATIONS_PENDING_PER_SOURCE_MAX = 4  # ... from one client IP address

# Circuit Relay v2 (the gateway relays for approved providers behind NAT; gateway/relay.py).
RELAY_RESERVATIONS_MAX = 512              # providers holding a reservation at once
RELAY_RESERVATION_S = 600                 # one reservation lasts this long unless renewed (the node renews early)
RELAY_CIRCUITS_PER_PEER_MAX = 4           # circuits open at once to one reserved provider (auditors, replicas)
RELAY_CIRCUIT_DURATION_S = 300            # one circuit is closed after this long
RELAY_CIRCUIT_BYTES_MAX = 64 * 1024 * 1024  # both directions of one circuit together (a paged ledger fetch)
DIALBACK_CONNECT_TIMEOUT_S = 3.0          # one TCP connect of a dial-back probe
DIALBACK_PROBES_MAX = 16                  # dial-back probes running at once, all peers (one per peer)

# The dashboards (gateway/api/pages.py)
DASHBOARD_SESSION_LIFETIME_MS = 8 * 3_600_000     # a signed-in customer or operator signs in again after this
DASHBOARD_SESSIONS_MAX = 10_000                   # sessions kept in memory; the oldest is dropped beyond
DASHBOARD_FORM_BYTES_MAX = 4 * 1024               # a sign-in or action form
DASHBOARD_RECEIPTS_SHOWN_MAX = 50                 # latest receipts listed on the customer page
DASHBOARD_DAYS = 14                               # days in the per-day charts
DASHBOARD_REFRESH_S = 30                          # pages reload themselves this often

# /llorch/listing/1 (a provider asks for its listing; gateway/listing.py)
LISTING_ANSWERS_CONCURRENT_MAX = 32       # listing questions answered at once; more are refused as busy
LISTING_READ_TIMEOUT_S = 5.0              # stream open → a whole question
LISTING_WRITE_TIMEOUT_S = 5.0             # the answer
CATALOG_ANSWERS_CONCURRENT_MAX = 64       # /llorch/catalog/1 questions answered at once; more are refused as busy
CATALOG_READ_TIMEOUT_S = 5.0              # stream open → a whole question
CATALOG_WRITE_TIMEOUT_S = 30.0            # the answer (the signed catalog, up to 1 MiB)
CATALOG_REFRESH_S = 1.0                   # how often the running gateway looks for a new catalog version

# Spot-checks (gateway/spot_checks.py, docs/verification.md)
SPOT_CHECK_QUEUE_MAX = 256                # sampled requests waiting for their re-run; more are dropped (and counted)
SPOT_CHECK_CANDIDATES_MAX = 4             # providers tried for one re-run before it is given up
SPOT_CHECK_TIMEOUT_S = 600.0              # one re-run, from ticket to receipt
CHECK_DEADLINE_S = 600.0                  # a drawn check waits this long for checkers' slots (re-run, tie-breaker)
CHECK_RETRY_S_MAX = 1.0                   # a waiting check looks at the market again at least this often

# Unmarked probes (gateway/probes.py, docs/verification.md §6)
PROBE_RUNS_PER_INPUT_MAX = 6              # providers one probe input is sent to (each at most once)
EVIDENCE_RUNS_MAX = 8                     # runs in one evidence file (docs/verification.md §5)
SLA_REFRESH_S = 300.0                     # how often placement's view of who misses its SLA is recomputed
