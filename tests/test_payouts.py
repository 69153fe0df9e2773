"""Payout runs over the books (gateway/books/payouts.py, the money decided by settlement.payable), on a real SQLite
gateway database: random months of earnings, spot-check corrections and returned transfers, run after run.

Invariants: over all runs, what was paid never exceeds what providers earned minus what they were charged; every
run's total equals its payout legs (and its SEPA file's control sum, tests/test_payout_rails.py checks the file);
running a month again pays nothing; each statement's sums hold (ledger/payout.py check_sums) and its carried balance
is the provider's balance in the books after the run."""

from __future__ import annotations

import hashlib
from decimal import Decimal

import trio
from hypothesis import HealthCheck, given, settings, strategies as st

from llorch.gateway.books import payouts
from llorch.gateway.books.payouts import Account
from llorch.gateway.books.postings import Books
from llorch.gateway.books.settlement import (CREDIT_LEG_PREFIX, PAYOUTS_ACCOUNT, Leg, provider_account,
                                             tenant_account)
from llorch.gateway.db import open_gateway_db
from llorch.ledger.payout import check_sums, month_bounds_ms
from llorch.ledger.signing import SigningKey

GATEWAY = SigningKey(bytes(range(32, 64)))
PROVIDERS = [SigningKey(bytes([n]) * 32) for n in range(1, 4)]
MONTHS = ["2026-10", "2026-11", "2026-12"]
ACCOUNT = Account("Home Lab", "DE89370400440532013000", None, "DE89 •••• •••• •••• •••• 3000")

month_events = st.lists(st.tuples(
    st.sampled_from(["earn", "earn", "earn", "correct", "return"]),
    st.integers(0, len(PROVIDERS) - 1),
    st.integers(1, 40_000_000)), max_size=25)


class Market:
    """Postings and witnessed ledger entries written as the gateway writes them, without a network."""

    def __init__(self, database) -> None:
        self.database = database
        self.requests = 0
        self.sizes = {key.peer_id: 0 for key in PROVIDERS}
        self.earned = {key.peer_id: 0 for key in PROVIDERS}
        self.charged = {key.peer_id: 0 for key in PROVIDERS}
        self.last_request: dict[str, str] = {}

    async def earn(self, provider: SigningKey, amount: int, posted_ms: int) -> None:
        self.requests += 1
        request_id = f"chatcmpl-{self.requests:024x}"
        peer = provider.peer_id
        statements = Books.leg_statements(
            request_id, bytes(32), [Leg("payout", tenant_account("acme"), provider_account(peer), amount),
                                    Leg("fee", tenant_account("acme"), "platform:fees", amount // 3)],
            "EUR", time_period(posted_ms), "acme", peer, "m", (10, 10), 4000, posted_ms)
        index = self.sizes[peer]
        self.sizes[peer] += 1
        statements.append(("INSERT INTO provider_entries (provider_key, idx, request_id, entry) VALUES (?, ?, ?, ?)",
                           [(provider.public_key, index, request_id, b"entry")]))
        statements.append(("INSERT INTO witnessed (provider_key, size, root, head_hash, compact, note) VALUES "
                           "(?, ?, ?, ?, ?, ?) ON CONFLICT (provider_key) DO UPDATE SET size = excluded.size, "
                           "root = excluded.root", [(provider.public_key, index + 1,
                                                     hashlib.sha256(request_id.encode()).digest(), bytes(32), b"",
                                                     b"")]))
        await self.database.transaction(statements)
        self.earned[peer] += amount
        self.last_request[peer] = request_id

    async def correct(self, provider: SigningKey, posted_ms: int) -> None:
        """A spot-check credit: the payout of the provider's last request goes back to the customer."""
        request_id = self.last_request.get(provider.peer_id)
        if request_id is None:
            return
        legs = await Books(self.database).posted_legs(request_id)
        if any(leg.name == CREDIT_LEG_PREFIX + "payout" for leg in legs):
            return                      # a request is credited once (a second credit of it posts nothing)
        payout = next(leg for leg in legs if leg.name == "payout")
        await self.database.transaction(Books.leg_statements(
            request_id, None, [Leg(CREDIT_LEG_PREFIX + "payout", provider_account(provider.peer_id),
                                   tenant_account("acme"), payout.amount)],
            "EUR", time_period(posted_ms), "acme", provider.peer_id, "m", (0, 0), 4000, posted_ms))
        self.charged[provider.peer_id] += payout.amount

    async def provider_balance(self, peer: str) -> int:
        return await Books(self.database).balance(provider_account(peer))


def time_period(ms: int) -> str:
    import time
    return time.strftime("%Y-%m", time.gmtime(ms // 1000))


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(months=st.lists(month_events, min_size=1, max_size=3), minimum=st.sampled_from([0, 10_000_000, 25_000_000]))
def test_payout_runs_never_pay_more_than_earned_and_never_twice(tmp_path_factory, months, minimum):
    trio.run(_runs, tmp_path_factory.mktemp("payouts"), months, minimum)


async def _runs(tmp_path, months, minimum):
    async with open_gateway_db(tmp_path / "gateway.sqlite") as database:
        market = Market(database)
        paid_total = 0
        accounts = {key.peer_id: ACCOUNT for key in PROVIDERS[:2]}      # the third has no payout account
        for month, events in zip(MONTHS, months):
            start, end = month_bounds_ms(month)
            for number, (kind, who, amount) in enumerate(events):
                at = start + (number + 1) * 60_000
                if kind == "earn":
                    await market.earn(PROVIDERS[who], amount, at)
                elif kind == "correct":
                    await market.correct(PROVIDERS[who], at)
                else:                                        # the bank returns the provider's last transfer
                    await _return_last(database, PROVIDERS[who].peer_id, at)
            after_month = end + 3_600_000
            plan = await payouts.plan_run(database, GATEWAY, month, minimum, accounts, [], after_month)
            assert not plan.waiting
            for item in plan.items:
                assert check_sums(item.statement) == [], item.statement.totals
                assert item.amount % 10_000 == 0 and (item.amount == 0 or item.amount >= minimum)
                assert item.amount == 0 or item.provider_id in accounts
            await payouts.record_run(database, plan, "test", {})
            paid_total += plan.total
            legs = await database.fetchone("SELECT COALESCE(SUM(amount), 0) FROM postings WHERE leg = 'payout-run' "
                                           "AND request_id LIKE ?", (f"payout:{plan.run_id}:%",))
            assert legs == (plan.total,)                               # the run's total is its postings
            for item in plan.items:                                     # carried = the balance the books keep
                assert item.carried == await market.provider_balance(item.provider_id)
            again = await payouts.plan_run(database, GATEWAY, month, minimum, accounts, [], after_month + 1000)
            assert again.total == 0 and not again.items                # the same month again: nothing
        returned = await database.fetchone("SELECT COALESCE(SUM(amount), 0) FROM postings WHERE leg = "
                                           "'payout-returned'")
        assert returned is not None
        outgoing = await Books(database).balance(PAYOUTS_ACCOUNT)
        assert outgoing == paid_total - returned[0]
        owed = 0
        for key in PROVIDERS:                       # nobody is paid beyond their balance: what is left is not below
            balance = await market.provider_balance(key.peer_id)    # zero unless corrections took it there
            assert balance >= min(0, -market.charged[key.peer_id])
            owed += max(0, -balance)
        assert outgoing <= sum(market.earned.values()) - sum(market.charged.values()) + owed


async def _return_last(database, peer: str, at: int) -> None:
    row = await database.fetchone("SELECT run_id FROM payout_items WHERE provider_id = ? AND state = 'sent' ORDER BY "
                                  "run_id DESC", (peer,))
    if row is not None:
        await payouts.mark_failed(database, row[0], peer, at)


def test_a_small_balance_is_carried_until_it_reaches_the_minimum(tmp_path):
    async def scenario():
        async with open_gateway_db(tmp_path / "gateway.sqlite") as database:
            market = Market(database)
            provider = PROVIDERS[0]
            accounts = {provider.peer_id: ACCOUNT}
            start, end = month_bounds_ms("2026-11")
            await market.earn(provider, 6_123_456, start + 1000)           # 6.123456 EUR
            plan = await payouts.plan_run(database, GATEWAY, "2026-11", 10_000_000, accounts, [], end + 3_600_000)
            (item,) = plan.items
            assert (item.amount, item.carried, item.statement.account) == (0, 6_123_456, None)
            await payouts.record_run(database, plan, "test", {})
            start, end = month_bounds_ms("2026-12")
            await market.earn(provider, 5_000_000, start + 1000)
            plan = await payouts.plan_run(database, GATEWAY, "2026-12", 10_000_000, accounts, [], end + 3_600_000)
            (item,) = plan.items
            totals = item.statement.totals
            assert (totals["brought_forward"], totals["earned"], totals["paid"], totals["carried_forward"]) == \
                (6_123_456, 5_000_000, 11_120_000, 3_456)                  # whole cents paid, 0.003456 EUR carried
            assert Decimal(item.amount).scaleb(-6) == Decimal("11.12") and item.statement.account == ACCOUNT.masked
            assert [line[1:] for line in item.statement.lines] == [[market.last_request[provider.peer_id],
                                                                    5_000_000]]
    trio.run(scenario)


def test_a_provider_whose_receipts_are_not_witnessed_yet_waits(tmp_path):
    async def scenario():
        async with open_gateway_db(tmp_path / "gateway.sqlite") as database:
            market = Market(database)
            provider = PROVIDERS[0]
            start, end = month_bounds_ms("2026-11")
            await market.earn(provider, 20_000_000, start + 1000)
            await database.transaction([("UPDATE witnessed SET size = 0", [()])])   # the witness is behind
            plan = await payouts.plan_run(database, GATEWAY, "2026-11", 0, {provider.peer_id: ACCOUNT}, [],
                                          end + 3_600_000)
            assert plan.items == [] and "not witnessed yet" in plan.waiting[provider.peer_id]
    trio.run(scenario)


def test_the_vector_statement_checks_against_the_vector_ledger_and_a_changed_line_fails():
    import dataclasses
    import json
    from pathlib import Path

    from llorch.ledger.payout import check_payout, parse_statement

    fixtures = Path(__file__).parent / "fixtures"
    statement = parse_statement(bytes.fromhex(json.loads((fixtures / "payout_statement_vector.json").read_text())
                                              ["statement_envelope_hex"]))
    entries = [bytes.fromhex(e) for e in json.loads((fixtures / "checkpoint_vector.json").read_text())["entries_hex"]]
    assert check_payout(statement, entries, 0).ok
    lines = [list(line) for line in statement.lines]
    lines[1][2] -= 1
    changed = dataclasses.replace(statement, lines=lines, totals={**statement.totals,
                                                                  "earned": statement.totals["earned"] - 1,
                                                                  "carried_forward": statement.totals[
                                                                      "carried_forward"] - 1})
    problems = check_payout(changed, entries, 0).problems
    assert len(problems) == 1 and "less than the receipt's" in problems[0]
    assert any("only 2 entries" in p for p in check_payout(statement, entries[:2], 0).problems)
