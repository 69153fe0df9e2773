"""One ticket's money, as a sans-IO state machine: events in, state out; no I/O and no clocks (callers pass
``now_ms`` from the gateway's own clock). The gateway (gateway/service.py) feeds one ``Meter`` per ticket with what
it observes, and ``settle`` turns the meter, the ticket's terms and the provider's receipt (if any) into the money.
The same pure ``settle`` serves the live path and ``llorch billing reconcile``.

    state        event            next state        recorded
    ISSUED       accepted         ACCEPTED          accepted_ms (the ticket was written durably before it was sent)
    ISSUED       refused          PROVIDER_FAILED   ended_ms    (busy, refused ticket, unreachable: nothing served)
    ACCEPTED     tokens           RELAYING          first_token_ms, frames + its texts, text bytes
    RELAYING     tokens           RELAYING          frames + its texts, text bytes
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

What each outcome bills (``settle``), for the ticket's payer (``Payer``: the customer, or the platform for a
spot-check re-run or a probe):
  FINISHED        the receipt, bounded by the gateway's own measurements: input tokens ≤ the gateway's count of the
                  prompt (an upper bound), output tokens ≤ token texts relayed (one per token). A claim beyond a bound is billed
                  at the bound and recorded as a finding against the provider.
  CUSTOMER_GONE   the same, so the customer pays for what was relayed before the disconnect and the provider is
                  paid for it; output the provider generated after the disconnect is not billed (no finding).
                  Without a receipt, nothing is billed: no cent without a signed receipt.
  PROVIDER_FAILED nothing: the customer got no complete answer from this provider (a resumed stream bills the
  TIMED_OUT       provider that completed it, once, for the whole answer).
  GATEWAY_LOST    (reconciliation only: the gateway stopped before it settled the ticket live) the customer is not
                  charged, since the gateway cannot show what it delivered; the platform pays the provider its
                  receipt bounded by the ticket (prompt bound, max_tokens).

Who pays, and the legs (``Settlement.legs``; the books store them and compute nothing):
  customer        charge = payout + fee: legs "payout" tenant → provider and "fee" tenant → platform
  spot_check,     the platform pays the payout: one leg named after the payer, platform → provider; charge 0,
  probe           fee 0 (no customer pays for a run it did not ask for)
  GATEWAY_LOST    the platform pays the payout: one leg ("payout" for a customer's ticket), platform → provider
For every settlement ``charge + platform_cost = payout + fee``, each ≥ 0, and the legs move exactly those amounts:
``settle`` asserts it. A credit (``credit``: a cheater's customers repaid) reverses the legs a customer paid, never
more than it was charged.

Prices: the ticket carries the provider's prices (never below its attested price); the terms carry the customer's
prices per 1M tokens (after demand multiplier and margin, never above the customer's ceiling). payout = tokens ×
ticket prices, charge = tokens × customer prices (each rounded up once, to minor units), fee = charge − payout ≥ 0,
and the charge never exceeds the ticket's reservation.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Iterable, Sequence

from llorch.ledger.objects import Receipt, Ticket, amount_minor
from llorch.ledger.signing import peer_id_of

PLATFORM_ACCOUNT = "platform:fees"
CREDIT_LEG_PREFIX = "correction:spot-check-"       # a credit reverses leg X of a request as leg CREDIT_LEG_PREFIX + X


def tenant_account(name: str) -> str:
    return f"tenant:{name}"


def provider_account(peer_id: str) -> str:
    return f"provider:{peer_id}"


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


class Event(enum.Enum):
    """What the gateway observes of one ticket (the rows of the table above)."""

    ACCEPTED = "accepted"
    REFUSED = "refused"
    TOKEN = "token"
    FINAL = "final"
    CUSTOMER_GONE = "customer_gone"
    PROVIDER_FAILED = "provider_failed"
    TIMED_OUT = "timed_out"
    SETTLED = "settled"


class Payer(enum.Enum):
    """Who pays for a ticket: the customer whose request it serves, or the platform (a spot-check re-run, a probe).
    The value of a platform payer is the name of its leg in the books."""

    CUSTOMER = "customer"
    SPOT_CHECK = "spot_check"
    PROBE = "probe"

    @property
    def platform(self) -> bool:
        return self is not Payer.CUSTOMER


ENDED = frozenset({State.FINISHED, State.PROVIDER_FAILED, State.CUSTOMER_GONE, State.TIMED_OUT, State.GATEWAY_LOST})
LIVE = (State.ACCEPTED, State.RELAYING)

TRANSITIONS: dict[tuple[State, Event], State] = {
    (State.ISSUED, Event.ACCEPTED): State.ACCEPTED,
    (State.ISSUED, Event.REFUSED): State.PROVIDER_FAILED,
    (State.ACCEPTED, Event.TOKEN): State.RELAYING,
    (State.RELAYING, Event.TOKEN): State.RELAYING,
    **{(state, Event.FINAL): State.FINISHED for state in LIVE},
    **{(state, Event.CUSTOMER_GONE): State.CUSTOMER_GONE for state in (State.ISSUED, *LIVE)},
    **{(state, Event.PROVIDER_FAILED): State.PROVIDER_FAILED for state in LIVE},
    **{(state, Event.TIMED_OUT): State.TIMED_OUT for state in LIVE},
    **{(state, Event.SETTLED): State.SETTLED for state in ENDED},
}


class SettlementError(Exception):
    """An event the state machine does not allow in its state, or money that does not add up: a bug in the caller,
    never a remote fault."""


@dataclass(frozen=True)
class Terms:
    """What the gateway decided when it issued the ticket, kept beside it (never sent to the provider)."""

    tenant: str                      # the customer; for a platform payer, the tenant whose pseudonym the ticket carries
    margin_bp: int
    customer_price_in: int           # per 1M tokens, minor units, after demand multiplier and margin (0: platform)
    customer_price_out: int
    reserved_minor: int              # the most this ticket may charge the customer
    prompt_tokens_max: int           # the gateway's own upper bound on the prompt's tokens
    payer: Payer = Payer.CUSTOMER

    def __post_init__(self) -> None:
        if self.payer.platform and (self.customer_price_in or self.customer_price_out or self.reserved_minor):
            raise SettlementError(f"a ticket the platform pays ({self.payer.value}) has no customer prices")


@dataclass(frozen=True)
class Metered:
    """What the gateway itself observed of one ticket, on its own clock."""

    outcome: State
    frames: int = 0                  # token texts relayed to the customer (before any disconnect): one per token
    text_bytes: int = 0
    accepted_ms: int | None = None
    first_token_ms: int | None = None
    ended_ms: int = 0

    @property
    def ttft_ms(self) -> int | None:
        if self.accepted_ms is None or self.first_token_ms is None:
            return None
        return self.first_token_ms - self.accepted_ms

    @property
    def tokens_per_s(self) -> int:
        """Tokens per second after the first, on the gateway's clock (0 when it cannot be told)."""
        if self.first_token_ms is None or self.frames < 2 or self.ended_ms <= self.first_token_ms:
            return 0
        return (self.frames - 1) * 1000 // (self.ended_ms - self.first_token_ms)


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

    def handle(self, event: Event, now_ms: int, texts: list[str] | None = None) -> State:
        """``texts``: with a tokens event, the frame's texts, one per token."""
        after = TRANSITIONS.get((self.state, event))
        if after is None:
            raise SettlementError(f"event {event.value!r} is not allowed in state {self.state.value}")
        if event is Event.ACCEPTED:
            self.accepted_ms = now_ms
        elif event is Event.TOKEN:
            assert isinstance(texts, list), "a tokens event carries the frame's list of texts"
            self.frames += len(texts)
            self.text_bytes += sum(len(text.encode("utf-8")) for text in texts)
            if self.first_token_ms is None:
                self.first_token_ms = now_ms
        elif event is Event.SETTLED:
            pass
        else:
            self.ended_ms, self.outcome = now_ms, after
        self.state = after
        return after

    def end(self, event: Event, now_ms: int) -> None:
        """``event`` unless the ticket has ended already (the first ending is the one that counts)."""
        if self.state not in ENDED and self.state is not State.SETTLED:
            self.handle(event, now_ms)

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
class Leg:
    """One posting: ``amount`` minor units from ``debit`` to ``credit``, named ``name`` (unique per request)."""

    name: str
    debit: str
    credit: str
    amount: int


@dataclass(frozen=True)
class Settlement:
    outcome: State
    tokens_in: int
    tokens_out: int
    payout: int                       # to the provider
    fee: int                          # to the platform, from the customer's charge
    charge: int                       # from the customer; payout + fee unless the platform pays
    receipt_used: bool                # whether a receipt backs this settlement
    margin_bp: int = 0
    findings: tuple[Finding, ...] = field(default=())
    platform_cost: int = 0            # what the platform pays the provider (a platform payer, GATEWAY_LOST)
    legs: tuple[Leg, ...] = field(default=())
    payer: Payer = Payer.CUSTOMER


def settle(ticket: Ticket, terms: Terms, receipt: Receipt | None, metered: Metered) -> Settlement:
    """The money of one ended ticket, legs included. Pure; the receipt must already have been checked against the
    ticket. Raises SettlementError if the ticket has not ended (or, a bug, if the money would not add up)."""
    outcome = metered.outcome
    if outcome not in ENDED:
        raise SettlementError(f"cannot settle a ticket in state {outcome.value}")
    if outcome in (State.PROVIDER_FAILED, State.TIMED_OUT) or receipt is None:
        return _checked(ticket, terms, Settlement(outcome, 0, 0, 0, 0, 0, False, terms.margin_bp, payer=terms.payer))
    findings = []
    tokens_in = min(receipt.tokens_in, terms.prompt_tokens_max)
    if receipt.tokens_in > terms.prompt_tokens_max:
        findings.append(Finding("tokens_in_over_bound", f"receipt claims {receipt.tokens_in} input tokens; the "
                                                        f"prompt has at most {terms.prompt_tokens_max}"))
    if outcome is State.GATEWAY_LOST:
        tokens_out = min(receipt.tokens_out, ticket.sampling["max_tokens"])
    else:
        tokens_out = min(receipt.tokens_out, metered.frames)
        if receipt.tokens_out > metered.frames and outcome is State.FINISHED:
            findings.append(Finding("tokens_out_over_frames", f"receipt claims {receipt.tokens_out} output tokens; "
                                                              f"the gateway relayed {metered.frames} tokens"))
    payout = amount_minor(tokens_in, tokens_out, ticket.price_in, ticket.price_out)
    if outcome is State.GATEWAY_LOST or terms.payer.platform:
        settlement = Settlement(outcome, tokens_in, tokens_out, payout, 0, 0, True, terms.margin_bp,
                                tuple(findings), platform_cost=payout, payer=terms.payer)
        return _checked(ticket, terms, settlement)
    charge = amount_minor(tokens_in, tokens_out, terms.customer_price_in, terms.customer_price_out)
    if charge > terms.reserved_minor:      # cannot happen when placement honoured the reservation; never overspend
        findings.append(Finding("charge_over_reservation", f"charge {charge} above the reservation "
                                                           f"{terms.reserved_minor}; charged the reservation"))
        charge = terms.reserved_minor
    payout = min(payout, charge)
    return _checked(ticket, terms, Settlement(outcome, tokens_in, tokens_out, payout, charge - payout, charge, True,
                                              terms.margin_bp, tuple(findings), payer=terms.payer))


def _checked(ticket: Ticket, terms: Terms, settlement: Settlement) -> Settlement:
    """``settlement`` with its legs, after checking that the money adds up for its payer."""
    tenant, provider = tenant_account(terms.tenant), provider_account(peer_id_of(ticket.provider_key))
    s = settlement
    legs: list[Leg] = []
    if s.charge > 0:
        legs = [Leg("payout", tenant, provider, s.payout), Leg("fee", tenant, PLATFORM_ACCOUNT, s.fee)]
    elif s.platform_cost > 0:
        name = terms.payer.value if terms.payer.platform else "payout"
        legs = [Leg(name, PLATFORM_ACCOUNT, provider, s.platform_cost)]
    checked = Settlement(s.outcome, s.tokens_in, s.tokens_out, s.payout, s.fee, s.charge, s.receipt_used,
                         s.margin_bp, s.findings, s.platform_cost, tuple(legs), s.payer)
    _check_money(checked, tenant, provider)
    return checked


def _check_money(s: Settlement, tenant: str, provider: str) -> None:
    """Our own invariants (a failure is a bug here, never a remote fault)."""
    def moved(debit: str | None = None, credit: str | None = None) -> int:
        return sum(leg.amount for leg in s.legs if debit in (None, leg.debit) and credit in (None, leg.credit))

    problems = []
    if min(s.payout, s.fee, s.charge, s.platform_cost) < 0:
        problems.append("a negative amount")
    if s.charge + s.platform_cost != s.payout + s.fee:
        problems.append("charge + platform cost != payout + fee")
    if s.payer.platform and (s.charge or s.fee):
        problems.append("a platform-paid run charges a customer")
    if s.outcome is not State.GATEWAY_LOST and not s.payer.platform and s.platform_cost:
        problems.append("the platform pays for a customer's settled request")
    if (moved(debit=tenant), moved(debit=PLATFORM_ACCOUNT), moved(credit=provider)) != (s.charge, s.platform_cost,
                                                                                        s.payout):
        problems.append("the legs do not move the settled amounts")
    if len({leg.name for leg in s.legs}) != len(s.legs):
        problems.append("two legs of one name")
    if problems:
        raise SettlementError(f"settlement {s} is wrong: {'; '.join(problems)}")


@dataclass(frozen=True)
class PostedLeg:
    """A leg the books hold for a request (what a credit reverses)."""

    request_id: str
    name: str
    debit: str
    credit: str
    amount: int


@dataclass(frozen=True)
class Credit:
    """One request's credit to its customer: the legs the customer paid, reversed (payout back from the provider,
    fee back from the platform). ``amount`` is what the customer gets back."""

    request_id: str
    legs: tuple[Leg, ...]

    @property
    def amount(self) -> int:
        return sum(leg.amount for leg in self.legs)


def credit(request_id: str, posted: Iterable[PostedLeg]) -> Credit | None:
    """The credit of one request from its posted legs, or None when its customer paid nothing (a platform-paid run)
    or it was credited already. Pure; never returns more than the customer was charged for the request."""
    posted = [leg for leg in posted if leg.request_id == request_id]
    if any(leg.name.startswith(CREDIT_LEG_PREFIX) for leg in posted):
        return None
    paid = [leg for leg in posted if leg.name in ("payout", "fee") and leg.debit.startswith("tenant:")
            and leg.amount > 0]
    if not paid:
        return None
    legs = tuple(Leg(CREDIT_LEG_PREFIX + leg.name, leg.credit, leg.debit, leg.amount) for leg in paid)
    result = Credit(request_id, legs)
    charged = sum(leg.amount for leg in paid)
    if result.amount > charged or any(leg.credit != paid[0].debit for leg in legs):
        raise SettlementError(f"the credit of {request_id} would repay {result.amount} of a charge of {charged}")
    return result


def credit_of_settlement(request_id: str, settlement: Settlement) -> Credit | None:
    """The credit of a request settled just now (``settlement``'s own legs, not yet in the books)."""
    return credit(request_id, [PostedLeg(request_id, leg.name, leg.debit, leg.credit, leg.amount)
                               for leg in settlement.legs])


def correction(request_id: str, posted: Sequence[PostedLeg], debit: str, credit_account: str, amount: int) -> Leg:
    """An operator's correction of a posted request (e.g. a refund provider → tenant): a new leg, never an edit,
    between the accounts the request's legs moved money between. Raises ValueError naming what is wrong."""
    if not posted:
        raise ValueError(f"request {request_id} was never posted")
    if amount <= 0:
        raise ValueError("a correction moves a positive amount (swap the accounts to reverse it)")
    accounts = {leg.debit for leg in posted} | {leg.credit for leg in posted}
    if debit not in accounts or credit_account not in accounts or debit == credit_account:
        raise ValueError(f"a correction of {request_id} moves money between {sorted(accounts)}")
    count = sum(leg.name.startswith("correction:") for leg in posted)
    return Leg(f"correction:{count + 1}", debit, credit_account, amount)


# --- payouts: what a payout run moves out of a provider's balance (gateway/books/payouts.py records it) ---------------
PAYOUTS_ACCOUNT = "platform:payouts-outgoing"   # paid to providers' bank accounts, until the bank confirms
PAYOUT_LEG, PAYOUT_RETURNED_LEG = "payout-run", "payout-returned"
CENTS_MINOR = 10_000                            # a bank moves whole cents: 10^4 minor units (micro-EUR)


def payable(balance: int, minimum: int, has_account: bool) -> int:
    """What a payout run pays a provider whose unpaid balance is ``balance``: the whole cents of it when they reach
    ``minimum`` and the provider has a payout account; nothing otherwise. The rest (a fraction of a cent, or all of
    it) is carried to the next run."""
    if not has_account or balance <= 0:
        return 0
    cents = balance - balance % CENTS_MINOR
    return cents if cents >= max(minimum, CENTS_MINOR) else 0


def payout_leg(provider_id: str, amount: int) -> Leg:
    """The leg a run posts: the provider's balance moves to the platform's outgoing payouts."""
    if amount <= 0 or amount % CENTS_MINOR:
        raise SettlementError(f"a payout is a positive whole number of cents, not {amount} minor units")
    return Leg(PAYOUT_LEG, provider_account(provider_id), PAYOUTS_ACCOUNT, amount)


def payout_returned_leg(provider_id: str, amount: int) -> Leg:
    """The leg of a transfer the bank returned (``mark-failed``): the amount goes back to the provider's balance."""
    return Leg(PAYOUT_RETURNED_LEG, PAYOUTS_ACCOUNT, provider_account(provider_id), amount)
