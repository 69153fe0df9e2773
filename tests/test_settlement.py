"""The settlement state machine and ``settle``, pure (gateway/books/settlement.py), and the books they write.

A hypothesis state machine plays random requests: accept, frames, a customer who hangs up, provider failures and
time-outs with resumption on other providers, and receipts with random (often inflated) claims. After every step:
charges = payouts + fees, no customer above its ceiling or reservation, no provider below its attested price,
nothing billed beyond what the gateway measured, and the delivered answer paid exactly once.
"""

from __future__ import annotations

import pytest
import trio
from hypothesis import given, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from llorch.gateway.books.postings import PLATFORM_ACCOUNT, Books, provider_account, tenant_account
from llorch.gateway.books.pricing import DEMAND_TABLE, customer_price, ticket_price
from llorch.gateway.books.settlement import (TRANSITIONS, Event, Leg, Meter, Metered, Payer, PostedLeg,
                                             SettlementError, State, Terms, correction, credit, credit_of_settlement,
                                             settle)
from llorch.gateway.books.tickets import TicketBook
from llorch.gateway.db import open_gateway_db
from llorch.gateway.market.quota import worst_case_minor
from llorch.ledger.objects import VERSION, Receipt, amount_minor, ledger_origin
from llorch.ledger.signing import SigningKey
from tests.helpers import make_ticket, receipt_fields

GATEWAY, PROVIDER = SigningKey.generate(), SigningKey.generate()


def receipt(ticket, tokens_in: int, tokens_out: int, finish_reason: str = "stop") -> Receipt:
    fields = receipt_fields(PROVIDER, ticket.request_id, tokens_in, tokens_out, price_in=ticket.price_in,
                            price_out=ticket.price_out, finish_reason=finish_reason)
    fields["amount"] = amount_minor(tokens_in, tokens_out, ticket.price_in, ticket.price_out)
    return Receipt(v=VERSION, origin=ledger_origin(PROVIDER.public_key), index=0, prev_hash=bytes(32), **fields)


def ticket_and_terms(attested=(100_000, 200_000), multiplier_bp=10_000, margin_bp=4_000, max_tokens=16,
                     prompt_tokens_max=50, request_id=None):
    sampling = {"seed": 1, "temperature_ppm": 0, "top_p_ppm": 1_000_000, "max_tokens": max_tokens, "stop": []}
    ticket, ticket_bytes = make_ticket(GATEWAY, PROVIDER.public_key, 1_000, request_id=request_id, sampling=sampling,
                                       price_in=ticket_price(attested[0], multiplier_bp),
                                       price_out=ticket_price(attested[1], multiplier_bp))
    prices = (customer_price(attested[0], multiplier_bp, margin_bp), customer_price(attested[1], multiplier_bp,
                                                                                      margin_bp))
    terms = Terms("acme", margin_bp, *prices, worst_case_minor(prompt_tokens_max, max_tokens, *prices),
                  prompt_tokens_max)
    return ticket, ticket_bytes, terms


def relayed(frames: int, outcome: str = "final") -> Metered:
    meter = Meter(0)
    meter.handle(Event.ACCEPTED, 10)
    for n in range(frames):
        meter.handle(Event.TOKEN, 20 + n, ["x"])
    meter.handle(Event(outcome), 100)
    return meter.metered()


def test_every_transition_in_the_table_and_nothing_else():
    events = {event for _, event in TRANSITIONS}
    for state in State:
        for event in events:
            meter = Meter(0, state=state)
            if (state, event) in TRANSITIONS:
                assert meter.handle(event, 1, ["x"]) is TRANSITIONS[(state, event)]
            else:
                with pytest.raises(SettlementError, match=event.value):
                    meter.handle(event, 1, ["x"])


def test_the_meter_keeps_the_gateways_clock():
    meter = Meter(0)
    meter.handle(Event.ACCEPTED, 1_000)
    meter.handle(Event.TOKEN, 1_250, ["héllo"])
    meter.handle(Event.TOKEN, 1_300, [""])
    meter.handle(Event.FINAL, 1_400)
    metered = meter.metered()
    assert (metered.frames, metered.text_bytes, metered.ttft_ms, metered.ended_ms) == (2, 6, 250, 1_400)
    with pytest.raises(SettlementError):
        Meter(0).metered()                               # not ended: nothing to settle


def test_an_honest_receipt_is_billed_as_claimed():
    ticket, _, terms = ticket_and_terms()
    settled = settle(ticket, terms, receipt(ticket, 12, 7), relayed(7))
    assert (settled.tokens_in, settled.tokens_out, settled.findings) == (12, 7, ())
    assert settled.payout == amount_minor(12, 7, 100_000, 200_000) and settled.charge == settled.payout + settled.fee


def test_claims_beyond_the_gateways_measurements_are_billed_at_the_measurement_and_found():
    ticket, _, terms = ticket_and_terms(prompt_tokens_max=50)
    settled = settle(ticket, terms, receipt(ticket, 10**9, 9), relayed(7))
    assert (settled.tokens_in, settled.tokens_out) == (50, 7)
    assert [f.kind for f in settled.findings] == ["tokens_in_over_bound", "tokens_out_over_frames"]


def test_a_hang_up_bills_what_was_relayed_and_is_no_finding_against_the_provider():
    ticket, _, terms = ticket_and_terms()
    settled = settle(ticket, terms, receipt(ticket, 12, 9, "cancelled"), relayed(4, "customer_gone"))
    assert (settled.outcome, settled.tokens_out, settled.findings) == (State.CUSTOMER_GONE, 4, ())
    assert settled.charge > 0
    assert settle(ticket, terms, None, relayed(4, "customer_gone")).charge == 0   # no receipt, no cent


@pytest.mark.parametrize("outcome", ["provider_failed", "timed_out"])
def test_a_failed_provider_is_paid_nothing_whatever_its_receipt_says(outcome):
    ticket, _, terms = ticket_and_terms()
    settled = settle(ticket, terms, receipt(ticket, 12, 5), relayed(5, outcome))
    assert (settled.payout, settled.fee, settled.charge) == (0, 0, 0)


def test_a_ticket_the_gateway_lost_is_paid_by_the_platform_not_the_customer():
    ticket, _, terms = ticket_and_terms(max_tokens=16)
    settled = settle(ticket, terms, receipt(ticket, 12, 999), Metered(State.GATEWAY_LOST))
    assert settled.charge == 0 and settled.payout == amount_minor(12, 16, ticket.price_in, ticket.price_out)
    assert (settled.fee, settled.platform_cost) == (0, settled.payout)
    assert settled.legs == (Leg("payout", PLATFORM_ACCOUNT, provider_account(PROVIDER.peer_id), settled.payout),)


class MoneyMachine(RuleBasedStateMachine):
    """Random requests through the pure money path; the invariants are the product's promises."""

    @initialize()
    def start(self):
        self.settled = []          # (ticket, terms, metered, settlement, attested, caps)
        self.request = None

    @precondition(lambda self: self.request is None)
    @rule(attested_in=st.integers(0, 400_000), attested_out=st.integers(0, 800_000),
          multiplier=st.sampled_from([m for _, m in DEMAND_TABLE]), margin=st.integers(2_000, 6_000),
          max_tokens=st.integers(1, 40), prompt_bound=st.integers(1, 300))
    def new_request(self, attested_in, attested_out, multiplier, margin, max_tokens, prompt_bound):
        caps = (customer_price(attested_in, multiplier, margin), customer_price(attested_out, multiplier, margin))
        self.request = {"multiplier": multiplier, "margin": margin, "max_tokens": max_tokens, "caps": caps,
                        "prompt_bound": prompt_bound, "tickets": [], "delivered": 0,
                        "reserved": worst_case_minor(prompt_bound, max_tokens, *caps)}
        self._new_ticket((attested_in, attested_out))

    def _new_ticket(self, attested):
        r = self.request
        ticket, _, terms = ticket_and_terms(attested, r["multiplier"], r["margin"], r["max_tokens"],
                                            r["prompt_bound"])
        terms = Terms(terms.tenant, terms.margin_bp, terms.customer_price_in, terms.customer_price_out, r["reserved"],
                      terms.prompt_tokens_max)
        r["tickets"].append((ticket, terms, Meter(0), attested))

    @property
    def meter(self) -> Meter:
        return self.request["tickets"][-1][2]

    @precondition(lambda self: self.request is not None and self.meter.state is State.ISSUED)
    @rule()
    def accept(self):
        self.meter.handle(Event.ACCEPTED, 1)

    @precondition(lambda self: self.request is not None and self.meter.state in (State.ACCEPTED, State.RELAYING)
                  and self.meter.frames <= self.request["max_tokens"])
    @rule(count=st.integers(1, 10))
    def frames(self, count):
        for _ in range(min(count, self.request["max_tokens"] + 1 - self.meter.frames)):
            self.meter.handle(Event.TOKEN, 2, ["t"])
        self.request["delivered"] = max(self.request["delivered"], self.meter.frames)

    @precondition(lambda self: self.request is not None and self.meter.state in (State.ACCEPTED, State.RELAYING))
    @rule(claim_in=st.integers(0, 10**7), claim_out=st.integers(0, 60), outcome=st.sampled_from(
        ["final", "customer_gone"]), with_receipt=st.booleans())
    def end(self, claim_in, claim_out, outcome, with_receipt):
        self.meter.handle(Event(outcome), 3)
        self._settle(receipt(self.request["tickets"][-1][0], claim_in, min(claim_out, self.request["max_tokens"]))
                     if with_receipt or outcome == "final" else None)
        self.request = None

    @precondition(lambda self: self.request is not None and self.meter.state in (State.ACCEPTED, State.RELAYING,
                                                                                  State.ISSUED))
    @rule(how=st.sampled_from(["provider_failed", "timed_out", "refused"]), claim_out=st.integers(0, 40),
          cheaper_by=st.integers(0, 50_000))
    def provider_fails_then_resume(self, how, claim_out, cheaper_by):
        if self.meter.state is State.ISSUED:
            how = "refused"                     # before acceptance a provider can only refuse
        elif how == "refused":
            how = "provider_failed"
        self.meter.handle(Event(how), 3)
        self._settle(receipt(self.request["tickets"][-1][0], 5, min(claim_out, self.request["max_tokens"])))
        # resume on another provider whose customer price fits the reservation's prices
        attested = self.request["tickets"][-1][3]
        self._new_ticket((max(0, attested[0] - cheaper_by), max(0, attested[1] - cheaper_by)))

    def _settle(self, the_receipt):
        ticket, terms, meter, attested = self.request["tickets"][-1]
        metered = meter.metered()
        meter.handle(Event.SETTLED, 4)
        self.settled.append((ticket, terms, metered, settle(ticket, terms, the_receipt, metered), attested,
                             self.request))

    @invariant()
    def charges_are_payouts_plus_fees(self):
        assert sum(s.charge for *_, s, _, _ in self.settled) == \
            sum(s.payout for *_, s, _, _ in self.settled) + sum(s.fee for *_, s, _, _ in self.settled)

    @invariant()
    def nobody_is_billed_beyond_a_promise(self):
        for ticket, terms, metered, s, attested, request in self.settled:
            assert s.charge == s.payout + s.fee and s.fee >= 0 and s.charge <= terms.reserved_minor
            assert s.charge <= amount_minor(s.tokens_in, s.tokens_out, *request["caps"])
            assert s.tokens_in <= terms.prompt_tokens_max and s.tokens_out <= metered.frames
            assert ticket.price_in >= attested[0] and ticket.price_out >= attested[1]
            if s.payout:
                assert s.payout == amount_minor(s.tokens_in, s.tokens_out, ticket.price_in, ticket.price_out)

    @invariant()
    def each_request_pays_once_for_what_was_delivered(self):
        by_request: dict[int, list] = {}
        for *_, s, _, request in self.settled:
            by_request.setdefault(id(request), []).append(s)
        for settlements in by_request.values():
            assert sum(1 for s in settlements if s.charge > 0) <= 1
            assert sum(s.tokens_out for s in settlements if s.charge > 0) <= max(
                (s.tokens_out for s in settlements), default=0)


TestMoneyMachine = MoneyMachine.TestCase
TestMoneyMachine.settings = settings(max_examples=150, stateful_step_count=25, deadline=None)


@settings(max_examples=15, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 400), st.integers(0, 40), st.integers(0, 40), st.sampled_from(
    ["final", "customer_gone", "provider_failed"]), st.sampled_from(["acme", "bolt"]),
    st.integers(0, 2)), min_size=1, max_size=25))
def test_the_books_in_the_database_balance_and_the_running_balances_agree(tmp_path_factory, usage):
    """Settlements written by the real TicketBook into a real database: per currency, period and account the
    statements add up, and the trigger-kept balances equal the sums of the legs."""
    path = tmp_path_factory.mktemp("books") / "gateway.sqlite"

    async def scenario():
        async with open_gateway_db(path) as database:
            book, books = TicketBook(database), Books(database)
            for n, (claim_in, claim_out, frames, outcome, tenant, month) in enumerate(usage):
                ticket, ticket_bytes, terms = ticket_and_terms(request_id=f"request-{n:04d}")
                terms = Terms(tenant, *list(terms.__dict__.values())[1:])
                await book.issue(ticket, ticket_bytes, terms)
                metered = relayed(frames, outcome)
                the_receipt = receipt(ticket, claim_in, min(claim_out, 16))
                settled = settle(ticket, terms, the_receipt, metered)
                now = 1_790_000_000_000 + month * 32 * 86_400_000
                await book.settle(ticket, ticket_bytes, metered, settled, the_receipt, b"r%d" % n, tenant, now)
                with pytest.raises(Exception, match="already settled"):      # exactly once
                    await book.settle(ticket, ticket_bytes, metered, settled, the_receipt, b"r%d" % n, tenant, now)
            legs = await database.fetchall("SELECT debit, credit, amount, period FROM postings")
            for account in {a for debit, credit, *_ in legs for a in (debit, credit)}:
                derived = sum(amount for _, credit, amount, _ in legs if credit == account) - \
                    sum(amount for debit, _, amount, _ in legs if debit == account)
                assert await books.balance(account) == derived
            for period in {row[3] for row in legs}:
                tenants = 0
                for tenant in ("acme", "bolt"):
                    tenants += (await books.statement("tenant", tenant, period))["totals_minor"].get("EUR", 0)
                provider = (await books.statement("provider", PROVIDER.peer_id, period))["totals_minor"].get("EUR", 0)
                platform = (await books.statement("platform", None, period))["totals_minor"].get("EUR", 0)
                assert tenants == provider + platform

    trio.run(scenario)


def test_account_names_used_by_the_legs():
    assert tenant_account("acme") == "tenant:acme" and provider_account("p").startswith("provider:")


ENDINGS = ["final", "customer_gone", "provider_failed", "timed_out", "gateway_lost"]


@settings(max_examples=400, deadline=None)
@given(payer=st.sampled_from(list(Payer)), ending=st.sampled_from(ENDINGS), with_receipt=st.booleans(),
       claim_in=st.integers(0, 10**6), claim_out=st.integers(0, 40), frames=st.integers(0, 41),
       attested_in=st.integers(0, 400_000), attested_out=st.integers(0, 800_000),
       margin=st.integers(2_000, 6_000), prompt_bound=st.integers(1, 300))
def test_every_payer_and_outcome_settles_to_legs_that_add_up_and_credits_repay_no_more_than_was_charged(
        payer, ending, with_receipt, claim_in, claim_out, frames, attested_in, attested_out, margin, prompt_bound):
    ticket, _, terms = ticket_and_terms((attested_in, attested_out), margin_bp=margin, max_tokens=40,
                                        prompt_tokens_max=prompt_bound)
    if payer.platform:
        terms = Terms(terms.tenant, 0, 0, 0, 0, prompt_bound, payer)
    metered = Metered(State.GATEWAY_LOST) if ending == "gateway_lost" else relayed(frames, ending)
    s = settle(ticket, terms, receipt(ticket, claim_in, claim_out) if with_receipt else None, metered)
    tenant, provider = tenant_account("acme"), provider_account(PROVIDER.peer_id)

    def moved(debit=None, credit=None) -> int:
        return sum(leg.amount for leg in s.legs if debit in (None, leg.debit) and credit in (None, leg.credit))

    assert min(s.charge, s.payout, s.fee, s.platform_cost) >= 0
    assert s.charge + s.platform_cost == s.payout + s.fee
    assert (moved(debit=tenant), moved(debit=PLATFORM_ACCOUNT)) == (s.charge, s.platform_cost)
    assert (moved(credit=provider), moved(credit=PLATFORM_ACCOUNT)) == (s.payout, s.fee)
    if payer.platform or ending == "gateway_lost":
        assert s.charge == 0 and s.fee == 0 and moved(debit=tenant) == 0     # no customer pays
    else:
        assert s.platform_cost == 0 and s.charge <= terms.reserved_minor
    if not with_receipt or ending in ("provider_failed", "timed_out"):
        assert s.legs == () and s.payout == 0
    repaid = credit_of_settlement(ticket.request_id, s)
    if s.charge == 0:
        assert repaid is None                                  # nothing to repay: a customer never gains
    else:
        assert repaid is not None and repaid.amount == s.charge
        assert all(leg.credit == tenant for leg in repaid.legs)
        posted = [PostedLeg(ticket.request_id, leg.name, leg.debit, leg.credit, leg.amount)
                  for leg in s.legs + repaid.legs]
        assert credit(ticket.request_id, posted) is None       # never credited twice


def test_a_platform_ticket_with_customer_prices_is_refused():
    with pytest.raises(SettlementError, match="no customer prices"):
        Terms("acme", 0, 1, 0, 0, 10, Payer.PROBE)


def test_a_correction_moves_money_only_between_the_requests_own_accounts():
    posted = [PostedLeg("r1", "payout", "tenant:acme", "provider:p", 10),
              PostedLeg("r1", "fee", "tenant:acme", PLATFORM_ACCOUNT, 4)]
    assert correction("r1", posted, PLATFORM_ACCOUNT, "tenant:acme", 4) == \
        Leg("correction:1", PLATFORM_ACCOUNT, "tenant:acme", 4)
    with pytest.raises(ValueError, match="moves money between"):
        correction("r1", posted, PLATFORM_ACCOUNT, "tenant:other", 4)
    with pytest.raises(ValueError, match="positive"):
        correction("r1", posted, PLATFORM_ACCOUNT, "tenant:acme", 0)
    with pytest.raises(ValueError, match="never posted"):
        correction("r2", [], PLATFORM_ACCOUNT, "tenant:acme", 1)
