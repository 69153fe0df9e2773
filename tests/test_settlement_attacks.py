"""Attacks on the money path, each played against a real in-process market (real libp2p, real SQLite; the providers
run the test-only echo engine, and ``CheatingProvider`` signs receipts with inflated claims).

Each test is the attack of one defect: it succeeded before settlement was one state machine bounded by the
gateway's own measurements (the free tokens of a hang-up, a provider billing 10^9 input tokens, backdated periods,
claimed TTFT 0, budgets overrun by inflated receipts, a price ceiling paid 1.5× over, an under-priced ticket served).
"""

from __future__ import annotations

import time

import pytest
import trio

from llorch.gateway import limits as gateway_limits
from llorch.gateway.books.postings import PLATFORM_ACCOUNT, provider_account, tenant_account
from llorch.gateway.errors import BadRequest, NoProvider, PaymentRequired
from llorch.gateway.market.node_client import AttemptFailed, request_inference
from llorch.ledger.objects import amount_minor
from llorch.node.stream_io import now_ms
from llorch.node.wire.frames import Request
from tests.helpers import make_ticket
from tests.inprocess import CheatingProvider, cancel_after, market

PROMPT = [{"role": "user", "content": "one two three"}]
BODY = {"messages": PROMPT, "max_tokens": 8, "seed": 1}
JAN_2001_MS = 978_307_200_000


async def total(m, column: str, account: str) -> int:
    row = await m.database.fetchone(f"SELECT COALESCE(SUM(amount), 0) FROM postings WHERE {column} = ?", (account,))
    return row[0]


async def assert_books_balance(m) -> None:
    """Every account's credits minus debits sums to zero, and per request charge = payout + fee."""
    rows = await m.rows("SELECT debit, credit, amount FROM postings")
    balances: dict[str, int] = {}
    for debit, credit, amount in rows:
        balances[debit] = balances.get(debit, 0) - amount
        balances[credit] = balances.get(credit, 0) + amount
    assert sum(balances.values()) == 0
    for request_id, charge, payout, fee in await m.rows(
            "SELECT request_id, SUM(CASE WHEN debit LIKE 'tenant:%' THEN amount ELSE 0 END), "
            "SUM(CASE WHEN leg = 'payout' THEN amount ELSE 0 END), SUM(CASE WHEN leg = 'fee' THEN amount ELSE 0 END) "
            "FROM postings GROUP BY request_id"):
        assert charge == payout + fee, request_id


async def test_a_receipt_inflating_input_tokens_is_billed_at_the_gateways_own_bound(tmp_path):
    async with market(tmp_path, {"greedy": {"cls": CheatingProvider, "claims": {"tokens_in": 10**9}}}) as m:
        completion = await m.complete("acme", BODY)
        greedy = m.providers["greedy"]
        paid = await total(m, "credit", provider_account(greedy.key.peer_id))
        # the prompt is 13 bytes: whatever the tokenizer, it has at most a few dozen tokens
        assert 0 < paid <= amount_minor(100, 8, 100_000, 200_000), f"paid {paid}: the inflated claim was billed"
        assert completion.charge.charge == await total(m, "debit", tenant_account("acme"))
        findings = await m.rows("SELECT kind FROM findings WHERE provider_key = ?", (greedy.key.public_key,))
        assert ("tokens_in_over_bound",) in findings
        assert m.gateway.market.standings[greedy.key.public_key].success_ppm < 1_000_000
        await assert_books_balance(m)


async def test_a_receipt_claiming_more_output_tokens_than_frames_relayed_is_billed_at_the_frames(tmp_path):
    claims = {"tokens_out": lambda fields: fields["tokens_out"] + 4}
    async with market(tmp_path, {"greedy": {"cls": CheatingProvider, "claims": claims, "tokens": 7}}) as m:
        await m.complete("acme", {**BODY, "max_tokens": 12})
        greedy = m.providers["greedy"]
        billed = await m.rows("SELECT tokens_out FROM postings WHERE leg = 'payout'")
        assert billed == [(7,)], f"billed {billed}: 7 token frames were relayed"
        findings = await m.rows("SELECT kind FROM findings WHERE provider_key = ?", (greedy.key.public_key,))
        assert ("tokens_out_over_frames",) in findings


async def test_the_billing_period_and_ttft_come_from_the_gateways_clock(tmp_path):
    claims = {"accepted_ms": JAN_2001_MS, "first_token_ms": JAN_2001_MS, "finished_ms": JAN_2001_MS}
    async with market(tmp_path, {"greedy": {"cls": CheatingProvider, "claims": claims, "delay_s": 0.3}}) as m:
        await m.complete("acme", {**BODY, "max_tokens": 2})
        periods = await m.rows("SELECT DISTINCT period FROM postings")
        assert periods == [(time.strftime("%Y-%m", time.gmtime()),)], f"the provider chose the period: {periods}"
        standing = m.gateway.market.standings[m.providers["greedy"].key.public_key]
        assert standing.ttft_ms >= 250, f"TTFT {standing.ttft_ms} ms: the provider's claim ranked it"


@pytest.mark.parametrize("relayed", [1, 10, 19])
async def test_a_customer_who_hangs_up_pays_for_what_was_relayed(tmp_path, relayed):
    async with market(tmp_path, {"alpha": {"delay_s": 0.02}}) as m:
        on_text, scope, seen = cancel_after(relayed)
        with scope:
            await m.complete("acme", {**BODY, "max_tokens": 20}, on_text)
        assert len(seen) == relayed
        alpha = m.providers["alpha"]
        rows = await m.rows("SELECT tokens_in, tokens_out, amount FROM postings WHERE leg = 'payout'")
        assert len(rows) == 1, "the relayed tokens were never billed"
        tokens_in, tokens_out, payout = rows[0]
        assert tokens_out == relayed
        assert payout == amount_minor(tokens_in, relayed, 100_000, 200_000)
        assert await total(m, "credit", provider_account(alpha.key.peer_id)) == payout
        assert await total(m, "debit", tenant_account("acme")) >= payout
        await assert_books_balance(m)
        assert await m.rows("SELECT outcome FROM tickets") == [("customer_gone",)]


async def test_inflated_receipts_under_concurrency_never_spend_past_the_budget(tmp_path):
    budget = 200
    greedy = {"cls": CheatingProvider, "claims": {"tokens_in": 5_000}, "slots": 50, "delay_s": 0.01}
    async with market(tmp_path, {"greedy": greedy}, tenants={"acme": {"budget_minor": budget}}) as m:
        outcomes = []

        async def one(seed: int) -> None:
            try:
                await m.complete("acme", {**BODY, "seed": seed})
                outcomes.append("served")
            except PaymentRequired:
                outcomes.append("402")

        async with trio.open_nursery() as nursery:
            for seed in range(50):
                nursery.start_soon(one, seed)
        spent = await total(m, "debit", tenant_account("acme"))
        assert "served" in outcomes and "402" in outcomes
        assert spent <= budget, f"spent {spent} of a budget of {budget} (read from the postings)"
        await assert_books_balance(m)


@pytest.mark.parametrize("margin_bp", [2_000, 4_000, 6_000])
async def test_the_price_ceiling_caps_what_the_customer_pays(tmp_path, margin_bp):
    options = {f"margin_bp_{tier}": margin_bp for tier in ("hobby", "startup", "enterprise")}
    async with market(tmp_path, {"alpha": {}}, gateway_options=options) as m:
        at_provider_price = {"max_price_in_per_1m": 100_000, "max_price_out_per_1m": 200_000}
        with pytest.raises(NoProvider):   # after the platform's margin, nobody can serve at the provider's price
            await m.complete("acme", {**BODY, "llorch": at_provider_price})
        cap_in, cap_out = 180_000, 360_000
        completion = await m.complete("acme", {**BODY, "llorch": {"max_price_in_per_1m": cap_in,
                                                                  "max_price_out_per_1m": cap_out}}) \
            if margin_bp <= 4_000 else None
        if completion is not None:
            usage = completion.receipt
            rows = await m.rows("SELECT tokens_in, tokens_out FROM postings WHERE leg = 'payout'")
            tokens_in, tokens_out = rows[0]
            assert completion.charge.charge <= amount_minor(tokens_in, tokens_out, cap_in, cap_out), usage


async def test_a_provider_refuses_a_ticket_that_pays_below_its_attested_price(tmp_path):
    async with market(tmp_path, {"alpha": {}}) as m:
        alpha = m.providers["alpha"]
        sampling = {"seed": 1, "temperature_ppm": 0, "top_p_ppm": 1_000_000, "max_tokens": 4, "stop": []}
        _, ticket_bytes = make_ticket(m.key, alpha.key.public_key, now_ms(), sampling=sampling,
                                      price_in=90_000, price_out=200_000)
        with pytest.raises(AttemptFailed) as refused:
            async with request_inference(m.gateway.p2p, alpha.attestation,
                                         Request(ticket_bytes, bytes(16), {"messages": PROMPT})):
                pass
        assert refused.value.code == "underpriced"
        assert "90000" in str(refused.value) and "100000" in str(refused.value)


async def test_the_platform_account_only_ever_receives_fees(tmp_path):
    async with market(tmp_path, {"alpha": {}}) as m:
        for seed in range(3):
            await m.complete("acme", {**BODY, "seed": seed})
        fees = await total(m, "credit", PLATFORM_ACCOUNT)
        charged = await total(m, "debit", tenant_account("acme"))
        paid = await total(m, "credit", provider_account(m.providers["alpha"].key.peer_id))
        assert charged == paid + fees and fees > 0


async def test_a_survivable_failover_reconciles_each_receipt_against_its_own_ticket(tmp_path, monkeypatch):
    """The first provider stalls past the gateway's token timeout, the stream resumes on the second, and the first
    wakes up and records its (cancelled) receipt after the second finished: two receipts under one request id, each
    reconciled against its own ticket, no false mismatch, only the completing provider paid."""
    monkeypatch.setattr(gateway_limits, "TOKEN_TIMEOUT_S", 0.4)
    providers = {"alpha": {"stall": (3, 1.2), "price_in": 90_000}, "beta": {}}
    async with market(tmp_path, providers) as m:
        alpha, beta = m.providers["alpha"], m.providers["beta"]
        completion = await m.complete("acme", {**BODY, "max_tokens": 8})
        assert completion.provider_peer_id == beta.key.peer_id and completion.settlement.tokens_out == 8
        with trio.fail_after(5):
            while not await alpha.ledger.contains(completion.request_id):
                await trio.sleep(0.05)              # alpha wakes, finds its stream gone, records what it made
        await m.witness_all()
        report = (await m.reconcile()).as_json()
        assert report["ok"], report
        assert [(f["kind"], f["provider_id"]) for f in report["findings"]] == [("unpaid", alpha.key.peer_id)]
        assert await m.rows("SELECT outcome FROM tickets ORDER BY issued_ms") == [("timed_out",), ("finished",)]
        paid = await m.rows("SELECT credit FROM postings WHERE leg = 'payout'")
        assert paid == [(provider_account(beta.key.peer_id),)]
        again = (await m.reconcile()).as_json()
        assert again == report                                  # incremental: nothing new, the same report


async def test_a_prompt_no_provider_would_accept_is_refused_before_placement(tmp_path):
    """The gateway takes 1 MiB bodies, providers refuse request frames over 256 KiB: a tenant must not be able to
    make four honest providers fail (and be backed off) with one oversized prompt."""
    async with market(tmp_path, {"alpha": {}, "beta": {}}) as m:
        big = [{"role": "user", "content": "x" * 150_000}, {"role": "user", "content": "y" * 150_000}]
        with pytest.raises(BadRequest, match="providers accept"):
            await m.complete("acme", {**BODY, "messages": big})
        assert await m.rows("SELECT COUNT(*) FROM tickets") == [(0,)]
        assert m.gateway.market.standings == {}                   # nobody's standing was touched
