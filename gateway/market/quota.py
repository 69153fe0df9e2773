"""Admission arithmetic, pure: token buckets, concurrency slots and budget reservations. No I/O, no clocks: callers
pass ``now_ms``. The shell (gateway/service.py) keeps one ``TenantQuota`` per tenant in memory.

Money is integer minor units. A request reserves its worst case before it is placed; at the end the reservation is
settled to the actual amount (never more than reserved), so concurrent requests can never spend past the budget.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from llorch.ledger.money import readable

PRICE_UNIT_TOKENS = 1_000_000


class QuotaExceeded(Exception):
    """Raised when admission refuses a request; ``kind`` is "rate", "concurrency" or "budget"."""

    def __init__(self, kind: str, message: str, retry_after_ms: int | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.retry_after_ms = retry_after_ms


@dataclass
class TokenBucket:
    """``rate_per_s`` requests per second on average, bursts up to ``capacity``. Levels in milli-requests."""

    rate_per_s: int
    capacity: int
    level_milli: int = -1
    updated_ms: int = 0

    def take(self, now_ms: int) -> None:
        if self.level_milli < 0:
            self.level_milli, self.updated_ms = self.capacity * 1000, now_ms
        elapsed = max(0, now_ms - self.updated_ms)
        self.level_milli = min(self.capacity * 1000, self.level_milli + elapsed * self.rate_per_s)
        self.updated_ms = now_ms
        if self.level_milli < 1000:
            wait_ms = -(-(1000 - self.level_milli) // max(self.rate_per_s, 1))
            raise QuotaExceeded("rate", f"rate limit of {self.rate_per_s} requests/s exceeded", wait_ms)
        self.level_milli -= 1000


@dataclass
class TenantQuota:
    """One tenant's live admission state: its bucket, requests in flight, and budget reservations."""

    max_concurrent: int | None
    budget_minor: int | None            # None: no budget limit
    spent_minor: int = 0                # settled, persisted by the caller
    bucket: TokenBucket | None = None
    in_flight: int = 0
    reserved: dict[str, int] = field(default_factory=dict)

    def admit(self, request_id: str, worst_case_minor: int, now_ms: int) -> None:
        """Take a rate token, a concurrency slot and reserve the worst case, all or nothing."""
        if self.max_concurrent is not None and self.in_flight >= self.max_concurrent:
            raise QuotaExceeded("concurrency", f"{self.in_flight} requests already in flight; the limit is "
                                               f"{self.max_concurrent}")
        if self.budget_minor is not None:
            available = self.budget_minor - self.spent_minor - sum(self.reserved.values())
            if worst_case_minor > available:
                raise QuotaExceeded("budget", f"this request may cost up to {readable(worst_case_minor)}; "
                                              f"{readable(max(available, 0))} of the budget of "
                                              f"{readable(self.budget_minor)} remain")
        if self.bucket is not None:
            self.bucket.take(now_ms)
        self.in_flight += 1
        self.reserved[request_id] = worst_case_minor

    def settle(self, request_id: str, actual_minor: int | None) -> int:
        """Release the request's slot and reservation; charge ``actual_minor`` (None: nothing was served).

        Returns the amount charged, which never exceeds the reservation.
        """
        reserved = self.reserved.pop(request_id)
        self.in_flight -= 1
        charged = 0 if actual_minor is None else min(actual_minor, reserved)
        self.spent_minor += charged
        return charged


def worst_case_minor(prompt_tokens_max: int, max_tokens: int, price_in: int, price_out: int) -> int:
    """The most a request can cost: every prompt token and max_tokens output tokens at these prices."""
    return -(-(prompt_tokens_max * price_in + max_tokens * price_out) // PRICE_UNIT_TOKENS)


def prompt_tokens_upper_bound(prompt_utf8_bytes: int, messages: int) -> int:
    """No tokenizer produces more tokens than bytes; chat templates add a few special tokens per message."""
    return prompt_utf8_bytes + 16 * messages + 16
