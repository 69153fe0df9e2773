"""GET /metrics: the gateway's counters in the Prometheus text format, kept by prometheus_client.

Every label has a bounded set of values, so no request, tenant or peer can grow the number of series: HTTP requests
are labelled by the route's template (never the raw path) and status; reasons and loop names come from fixed sets
in this module, and anything else is counted under "other".
"""

from __future__ import annotations

import enum

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

prometheus_client.disable_created_metrics()      # no *_created series: half the output, nothing a scraper needs

CONTENT_TYPE = prometheus_client.CONTENT_TYPE_PLAIN_0_0_4
LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
UNMATCHED_ROUTE = "(unmatched)"

# Why a gossiped attestation was dropped (docs/protocol.md §5 has the rule behind each).
DROP_REASONS = ("oversized", "malformed", "bad_address", "too_long_valid", "bad_signature", "not_signer",
                "from_future", "expired", "replay")
PLACEMENT_FAILURES = ("eu_only", "determinism", "none_eligible", "busy", "failed", "resume")
SPOT_CHECK_OUTCOMES = ("drawn", "clean", "caught", "undecided", "dropped", "expired")   # spot_checks.CheckOutcome
LOOPS = ("attestations", "catalog", "placement", "probes", "replica", "sla", "spot-checks", "streams", "witness")


def _bounded(value: str, allowed: tuple[str, ...]) -> str:
    return value if value in allowed else "other"


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        registry = self.registry
        self._requests = Counter("llorch_requests", "Requests by route template and HTTP status.",
                                 ["endpoint", "status"], registry=registry)
        self._latency = Histogram("llorch_request_latency_seconds", "Request latency (whole response) in seconds.",
                                  buckets=LATENCY_BUCKETS_S, registry=registry)
        self._tokens = Counter("llorch_tokens", "Tokens served, from verified receipts.", ["kind"],
                               registry=registry)
        self._providers = Gauge("llorch_providers", "Providers with a fresh attestation, and approved ones among them.",
                                ["state"], registry=registry)
        self._placement_failures = Counter("llorch_placement_failures", "Requests no provider could take, by reason.",
                                           ["reason"], registry=registry)
        self._failovers = Counter("llorch_failovers",
                                  "Streams resumed on another provider after a mid-stream failure.", registry=registry)
        self._loop_restarts = Counter("llorch_loop_restarts",
                                      "Background loops restarted by their supervisor after a fault.", ["loop"],
                                      registry=registry)
        self._pending = Gauge("llorch_attestations_pending",
                              "Attestations kept from keys nobody approved (never placed on, never dialled).",
                              registry=registry)
        self._queue_depth = Gauge("llorch_queue_depth", "Requests waiting in the admission queue for a slot.",
                                  registry=registry)
        self._queue_wait = Histogram("llorch_queue_wait_seconds",
                                     "Time requests spent in the admission queue (placed, or refused with 429).",
                                     buckets=LATENCY_BUCKETS_S, registry=registry)
        self._dropped = Counter("llorch_attestations_dropped", "Gossiped attestations dropped, by reason.",
                                ["reason"], registry=registry)
        self._spot_checks = Counter("llorch_spot_checks", "Spot-check draws (drawn) and what became of each.",
                                    ["outcome"], registry=registry)
        for outcome in SPOT_CHECK_OUTCOMES:
            self._spot_checks.labels(outcome)
        for reason in DROP_REASONS:                 # every reason shows from the start, at 0
            self._dropped.labels(reason)
        for kind in ("prompt", "completion"):
            self._tokens.labels(kind)

    def observe_request(self, route: str, status: int, latency_s: float) -> None:
        """``route`` is the matched route's template or UNMATCHED_ROUTE: the app's routes bound the label set."""
        self._requests.labels(route, str(status)).inc()
        self._latency.observe(latency_s)

    def tokens(self, prompt: int, completion: int) -> None:
        self._tokens.labels("prompt").inc(prompt)
        self._tokens.labels("completion").inc(completion)

    def placement_failure(self, reason: str) -> None:
        self._placement_failures.labels(_bounded(reason, PLACEMENT_FAILURES)).inc()

    def failover(self) -> None:
        self._failovers.inc()

    def loop_restarted(self, loop: str) -> None:
        self._loop_restarts.labels(_bounded(loop, LOOPS)).inc()

    def queue_depth(self, depth: int) -> None:
        self._queue_depth.set(depth)

    def queue_waited(self, seconds: float) -> None:
        self._queue_wait.observe(seconds)

    def spot_check(self, outcome: enum.Enum) -> None:
        """A spot-check draw (``drawn``) or its outcome (gateway/spot_checks.py ``CheckOutcome``)."""
        self._spot_checks.labels(_bounded(str(outcome.value), SPOT_CHECK_OUTCOMES)).inc()

    def attestation_dropped(self, reason: str) -> None:
        self._dropped.labels(_bounded(reason, DROP_REASONS)).inc()

    def render(self, providers_fresh: int, providers_approved: int, pending: int) -> bytes:
        self._providers.labels("fresh").set(providers_fresh)
        self._pending.set(pending)
        self._providers.labels("approved").set(providers_approved)
        return prometheus_client.generate_latest(self.registry)
