"""One ticket's money, as a sans-IO state machine: events in, state out; no I/O and no clocks (callers pass
``now_ms`` from the gateway's own clock). The gateway (gateway/service.py) feeds one ``Meter`` per ticket with what
it observes, and ``settle`` turns the meter, the ticket's terms and the provider's receipt (if any) into the money.
The same pure ``settle`` serves the live path and ``llorch billing reconcile``.

    state        event            next state        recorded
    ISSUED       accepted         ACCEPTED          accepted_ms (the ticket was written durably before it was sent)
    ISSUED       refused          PROVIDER_FAILED   ended_ms    (busy, refused ticket, unreachable: nothing served)
    ACCEPTED     token            RELAYING          first_token_ms, frames + 1, text bytes
    RELAYING     token            RELAYING          frames + 1, text bytes
    ACCEPTED     final            FINISHED          ended_ms
    RELAYING     final            FINISHED          ended_ms
    ISSUED       customer_gone    CUSTOMER_GONE     ended_ms
    ACCEPTED     customer_gone    CUSTOMER_GONE     ended_ms    (frames after this are not counted)
    RELAYING     customer_gone    CUSTOMER_GONE     ended_ms
    ACCEPTED     provider_failed  PROVIDER_FAILED   ended_ms
    RELAYING     provider_failed  PROVIDER_FAILED   ended_ms
    ACCEPTED     timed_out        TIMED_OUT         ended_ms
    RELAYING     timed_out        TIMED_OUT         ended_ms
    FINISHED, PROVIDER_FAILED, CUSTOMER_GONE, TIMED_OUT   settled   SETTLED

What each outcome bills (``settle``):
  FINISHED        the receipt, bounded by the gateway's own measurements: input tokens ≤ the gateway's count of the
                  prompt (an upper bound), output tokens ≤ token frames relayed. A claim beyond a bound is billed
                  at the bound and recorded as a finding against the provider.
  CUSTOMER_GONE   the same, so the customer pays for what was relayed before the disconnect and the provider is
                  paid for it; output the provider generated after the disconnect is not billed (no finding).
                  Without a receipt, nothing is billed: no cent without a signed receipt.
  PROVIDER_FAILED nothing: the customer got no complete answer from this provider (a resumed stream bills the
  TIMED_OUT       provider that completed it, once, for the whole answer).
  GATEWAY_LOST    (reconciliation only: the gateway stopped before it settled the ticket live) the customer is not
                  charged, since the gateway cannot show what it delivered; the platform pays the provider its
                  receipt bounded by the ticket (prompt bound, max_tokens): charge 0 = payout + fee, fee = −payout.

Prices: the ticket carries the provider's prices (never below its attested price); the terms carry the customer's
prices per 1M tokens (after demand multiplier and margin, never above the customer's ceiling). payout = tokens ×
ticket prices, charge = tokens × customer prices (each rounded up once, to minor units), fee = charge − payout ≥ 0,
and the charge never exceeds the ticket's reservation.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from llorch.ledger.objects import Receipt, Ticket, amount_minor


class State(enum.Enum):
    ISSUED = "issued"
    ACCEPTED = "accepted"
    RELAYING = "relaying"
    FINISHED = "finished"
    PROVIDER_FAILED = "provider_failed"
    CUSTOMER_GONE = "customer_gone"
    TIMED_OUT = "timed_out"
    GATEWAY_LOST = "gateway_lost"
    SETTLED = "settled"


ENDED = frozenset({State.FINISHED, State.PROVIDER_FAILED, State.CUSTOMER_GONE, State.TIMED_OUT, State.GATEWAY_LOST})
LIVE = (State.ACCEPTED, State.RELAYING)

TRANSITIONS: dict[tuple[State, str], State] = {
    (State.ISSUED, "accepted"): State.ACCEPTED,
    (State.ISSUED, "refused"): State.PROVIDER_FAILED,
    (State.ACCEPTED, "token"): State.RELAYING,
    (State.RELAYING, "token"): State.RELAYING,
    **{(state, "final"): State.FINISHED for state in LIVE},
    **{(state, "customer_gone"): State.CUSTOMER_GONE for state in (State.ISSUED, *LIVE)},
    **{(state, "provider_failed"): State.PROVIDER_FAILED for state in LIVE},
    **{(state, "timed_out"): State.TIMED_OUT for state in LIVE},
    **{(state, "settled"): State.SETTLED for state in ENDED},
}


class SettlementError(Exception):
    """An event the state machine does not allow in its state: a bug in the caller, never a remote fault."""


@dataclass(frozen=True)
class Terms:
    """What the gateway decided when it issued the ticket, kept beside it (never sent to the provider)."""

    tenant: str
    margin_bp: int
    customer_price_in: int           # per 1M tokens, minor units, after demand multiplier and margin
    customer_price_out: int
    reserved_minor: int              # the most this ticket may charge the customer
    prompt_tokens_max: int           # the gateway's own upper bound on the prompt's tokens


@dataclass(frozen=True)
class Metered:
    """What the gateway itself observed of one ticket, on its own clock."""

    outcome: State
    frames: int = 0                  # token frames relayed to the customer (before any disconnect)
    text_bytes: int = 0
    accepted_ms: int | None = None
    first_token_ms: int | None = None
    ended_ms: int = 0

    @property
    def ttft_ms(self) -> int | None:
        if self.accepted_ms is None or self.first_token_ms is None:
            return None
        return self.first_token_ms - self.accepted_ms


@dataclass
class Meter:
    """The live state machine of one ticket. ``handle`` raises SettlementError on an event its state forbids."""

    issued_ms: int
    state: State = State.ISSUED
    frames: int = 0
    text_bytes: int = 0
    accepted_ms: int | None = None
    first_token_ms: int | None = None
    ended_ms: int | None = None
    outcome: State | None = None

    def handle(self, event: str, now_ms: int, text: str = "") -> State:
        after = TRANSITIONS.get((self.state, event))
        if after is None:
            raise SettlementError(f"event {event!r} is not allowed in state {self.state.value}")
        if event == "accepted":
            self.accepted_ms = now_ms
        elif event == "token":
            self.frames += 1
            self.text_bytes += len(text.encode("utf-8"))
            if self.first_token_ms is None:
                self.first_token_ms = now_ms
        elif event == "settled":
            pass
        else:
            self.ended_ms, self.outcome = now_ms, after
        self.state = after
        return after

    def metered(self) -> Metered:
        if self.outcome is None:
            raise SettlementError(f"the ticket has not ended (state {self.state.value})")
        return Metered(self.outcome, self.frames, self.text_bytes, self.accepted_ms, self.first_token_ms,
                       self.ended_ms if self.ended_ms is not None else self.issued_ms)


@dataclass(frozen=True)
class Finding:
    """A provider's claim beyond what the gateway measured: billed at the measurement, held against the provider."""

    kind: str
    detail: str


@dataclass(frozen=True)
class Settlement:
    outcome: State
    tokens_in: int
    tokens_out: int
    payout: int                       # to the provider
    fee: int                          # to the platform (negative only for GATEWAY_LOST: the platform pays)
    charge: int                       # from the customer; always payout + fee
    receipt_used: bool                # whether a receipt backs this settlement
    margin_bp: int = 0
    findings: tuple[Finding, ...] = field(default=())

    def legs(self, tenant_account: str, provider_account: str, platform_account: str) -> list[tuple[str, str, str, int]]:
        """The postings, as (leg, debit, credit, amount): none when nothing is billed."""
        if self.charge > 0:
            return [("payout", tenant_account, provider_account, self.payout),
                    ("fee", tenant_account, platform_account, self.fee)]
        if self.payout > 0:
            return [("payout", platform_account, provider_account, self.payout)]
        return []


NOTHING = dict(tokens_in=0, tokens_out=0, payout=0, fee=0, charge=0)


def settle(ticket: Ticket, terms: Terms, receipt: Receipt | None, metered: Metered) -> Settlement:
    """The money of one ended ticket. Pure; the receipt must already have been checked against the ticket."""
    outcome = metered.outcome
    if outcome not in ENDED:
        raise SettlementError(f"cannot settle a ticket in state {outcome.value}")
    if outcome in (State.PROVIDER_FAILED, State.TIMED_OUT) or receipt is None:
        return Settlement(outcome, receipt_used=False, margin_bp=terms.margin_bp, **NOTHING)
    findings = []
    tokens_in = min(receipt.tokens_in, terms.prompt_tokens_max)
    if receipt.tokens_in > terms.prompt_tokens_max:
        findings.append(Finding("tokens_in_over_bound", f"receipt claims {receipt.tokens_in} input tokens; the "
                                                        f"prompt has at most {terms.prompt_tokens_max}"))
    if outcome is State.GATEWAY_LOST:
        tokens_out = min(receipt.tokens_out, ticket.sampling["max_tokens"])
        payout = amount_minor(tokens_in, tokens_out, ticket.price_in, ticket.price_out)
        return Settlement(outcome, tokens_in, tokens_out, payout, -payout, 0, True, terms.margin_bp,
                          tuple(findings))
    tokens_out = min(receipt.tokens_out, metered.frames)
    if receipt.tokens_out > metered.frames and outcome is State.FINISHED:
        findings.append(Finding("tokens_out_over_frames", f"receipt claims {receipt.tokens_out} output tokens; "
                                                          f"the gateway relayed {metered.frames} token frames"))
    payout = amount_minor(tokens_in, tokens_out, ticket.price_in, ticket.price_out)
    charge = amount_minor(tokens_in, tokens_out, terms.customer_price_in, terms.customer_price_out)
    if charge > terms.reserved_minor:      # cannot happen when placement honoured the reservation; never overspend
        findings.append(Finding("charge_over_reservation", f"charge {charge} above the reservation "
                                                           f"{terms.reserved_minor}; charged the reservation"))
        charge = terms.reserved_minor
        payout = min(payout, charge)
    return Settlement(outcome, tokens_in, tokens_out, payout, charge - payout, charge, True, terms.margin_bp,
                      tuple(findings))
