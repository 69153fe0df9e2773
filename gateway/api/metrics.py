"""Counters for GET /metrics, in the Prometheus text format. Plain integers; latency in a fixed histogram."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

LATENCY_BUCKETS_MS = (5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000)


def label_value(text: str) -> str:
    """A Prometheus label value, escaped (backslash, double quote, newline) as the text format requires."""
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


@dataclass
class Metrics:
    requests: Counter = field(default_factory=Counter)            # (endpoint, status) -> count
    latency_buckets: Counter = field(default_factory=Counter)     # bucket upper bound -> count
    latency_sum_ms: int = 0
    latency_count: int = 0
    tokens: Counter = field(default_factory=Counter)              # "prompt" | "completion" -> count
    placement_failures: Counter = field(default_factory=Counter)  # reason -> count
    failovers: int = 0
    loop_restarts: dict = field(default_factory=dict)              # background loop name -> restarts

    def observe_request(self, endpoint: str, status: int, latency_ms: int) -> None:
        self.requests[(endpoint, status)] += 1
        self.latency_sum_ms += latency_ms
        self.latency_count += 1
        for bound in LATENCY_BUCKETS_MS:
            if latency_ms <= bound:
                self.latency_buckets[bound] += 1

    def render(self, providers_fresh: int, providers_approved: int) -> str:
        lines = ["# HELP llorch_requests_total Requests by endpoint and HTTP status.",
                 "# TYPE llorch_requests_total counter"]
        lines += [f'llorch_requests_total{{endpoint="{label_value(e)}",status="{s}"}} {n}'
                  for (e, s), n in sorted(self.requests.items())]
        lines += ["# HELP llorch_request_latency_ms Request latency in milliseconds.",
                  "# TYPE llorch_request_latency_ms histogram"]
        lines += [f'llorch_request_latency_ms_bucket{{le="{b}"}} {self.latency_buckets[b]}' for b in LATENCY_BUCKETS_MS]
        lines += [f'llorch_request_latency_ms_bucket{{le="+Inf"}} {self.latency_count}',
                  f"llorch_request_latency_ms_sum {self.latency_sum_ms}",
                  f"llorch_request_latency_ms_count {self.latency_count}",
                  "# HELP llorch_tokens_total Tokens served, from verified receipts.",
                  "# TYPE llorch_tokens_total counter"]
        lines += [f'llorch_tokens_total{{kind="{k}"}} {self.tokens[k]}' for k in ("prompt", "completion")]
        lines += ["# HELP llorch_providers Providers with a fresh attestation, and approved ones among them.",
                  "# TYPE llorch_providers gauge",
                  f'llorch_providers{{state="fresh"}} {providers_fresh}',
                  f'llorch_providers{{state="approved"}} {providers_approved}',
                  "# HELP llorch_placement_failures_total Requests no provider could take, by reason.",
                  "# TYPE llorch_placement_failures_total counter"]
        lines += [f'llorch_placement_failures_total{{reason="{r}"}} {n}'
                  for r, n in sorted(self.placement_failures.items())]
        lines += ["# HELP llorch_failovers_total Streams resumed on another provider after a mid-stream failure.",
                  "# TYPE llorch_failovers_total counter", f"llorch_failovers_total {self.failovers}",
                  "# HELP llorch_loop_restarts_total Background loops restarted by their supervisor after a fault.",
                  "# TYPE llorch_loop_restarts_total counter"]
        lines += [f'llorch_loop_restarts_total{{loop="{label_value(name)}"}} {n}'
                  for name, n in sorted(self.loop_restarts.items())]
        return "\n".join(lines) + "\n"
