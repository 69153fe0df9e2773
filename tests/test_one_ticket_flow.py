"""One ticket flow (gateway/ticket_runner.py): every ticket the gateway sends, whoever pays for it, is issued,
relayed, metered, checked and settled by the ticket runner; money is computed by gateway/books/settlement.py alone.

The structural half reads the code: no module but the runner opens /llorch/infer/1 streams (``request_inference``)
and no module but the runner and reconciliation calls ``settle``; the books compute no amounts. The behavioural
half runs each payer through a real in-process market (real libp2p, real SQLite) and checks the legs."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from llorch.gateway.books.postings import PLATFORM_ACCOUNT, provider_account, tenant_account
from llorch.gateway.books.settlement import Payer
from llorch.gateway.ticket_runner import Keep, Order, new_request_id
from tests.cheaters import HeldBackEngine
from tests.inprocess import market

ROOT = Path(__file__).resolve().parent.parent
GATEWAY_MODULES = sorted(p for p in (ROOT / "gateway").rglob("*.py"))


def modules_using(name: str) -> set[str]:
    """The gateway modules that import ``name`` from one of ours, or call something by that name."""
    found = set()
    for path in GATEWAY_MODULES:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            imported = isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("llorch.") and \
                any(alias.name == name for alias in node.names)
            called = isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == name
            if imported or called:
                found.add(str(path.relative_to(ROOT)))
    return found


def test_only_the_ticket_runner_opens_inference_streams():
    assert modules_using("request_inference") == {"gateway/ticket_runner.py"}     # node_client.py defines it
    protocol_users = {str(p.relative_to(ROOT)) for p in GATEWAY_MODULES if "INFER_PROTOCOL_ID" in p.read_text()}
    assert protocol_users == {"gateway/market/node_client.py"}


def test_settle_is_called_only_by_the_ticket_runner_and_reconciliation():
    assert modules_using("settle") == {"gateway/ticket_runner.py", "gateway/books/reconcile.py"}


def test_the_books_compute_no_money():
    """postings.py and tickets.py store legs: no arithmetic on amounts, no SELECT that builds a leg."""
    for name in ("gateway/books/postings.py", "gateway/books/tickets.py"):
        text = (ROOT / name).read_text()
        assert "INSERT INTO postings" not in text or "SELECT request_id, 'correction" not in text, name
        assert "amount_minor(" not in text, name


def order(m, provider_name: str, payer: Payer, tenant: str = "acme", max_tokens: int = 6) -> Order:
    provider = m.providers[provider_name].attestation
    model = provider.models[0]
    sampling = {"seed": 3, "temperature_ppm": 0, "top_p_ppm": 1_000_000, "max_tokens": max_tokens, "stop": []}
    return Order(new_request_id(), tenant, payer, model["id"], model["sha256"], sampling, bytes(16),
                 {"messages": [{"role": "user", "content": "say something"}]}, 64, 10_000)


@pytest.mark.parametrize("payer", [Payer.SPOT_CHECK, Payer.PROBE])
async def test_a_platform_run_is_paid_by_the_platform_and_charges_nobody(tmp_path, payer):
    async with market(tmp_path, {"a": {}}) as m:
        run = await m.gateway.runner.run(order(m, "a", payer), m.providers["a"].attestation, Keep())
        settlement = run.settlement
        assert settlement is not None and settlement.receipt_used and settlement.payout > 0
        assert (settlement.charge, settlement.fee, settlement.platform_cost) == (0, 0, settlement.payout)
        legs = await m.rows("SELECT leg, debit, credit, amount FROM postings WHERE request_id = ?",
                            (run.ticket.request_id,))
        assert legs == [(payer.value, PLATFORM_ACCOUNT, provider_account(m.providers["a"].key.peer_id),
                         settlement.payout)]
        assert await m.rows("SELECT payer FROM tickets WHERE request_id = ?", (run.ticket.request_id,)) == \
            [(payer.value,)]
        assert await m.gateway.books.tenant_spent("acme") == 0


async def test_a_run_ending_in_held_back_text_is_accepted_for_every_payer(tmp_path):
    """max_tokens token frames plus one with the held-back text (docs/protocol.md §6): one relay loop, one bound."""
    async with market(tmp_path, {"a": {"engine": HeldBackEngine}}) as m:
        for payer in Payer:
            if payer is Payer.CUSTOMER:
                completion = await m.complete("acme", {"messages": [{"role": "user", "content": "hi"}],
                                                       "max_tokens": 6, "seed": 3})
                assert completion.settlement.tokens_out == 6 and completion.charge.charge > 0
                continue
            run = await m.gateway.runner.run(order(m, "a", payer), m.providers["a"].attestation, Keep())
            assert run.meter.frames == 7 and run.settlement is not None and run.settlement.tokens_out == 6


async def test_a_customer_run_pays_payout_and_fee_and_nothing_else(tmp_path):
    async with market(tmp_path, {"a": {}}) as m:
        completion = await m.complete("acme", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
        legs = await m.rows("SELECT leg, debit, credit, amount FROM postings WHERE request_id = ? ORDER BY leg",
                            (completion.request_id,))
        provider = provider_account(m.providers["a"].key.peer_id)
        assert legs == [("fee", tenant_account("acme"), PLATFORM_ACCOUNT, completion.charge.fee),
                        ("payout", tenant_account("acme"), provider, completion.charge.payout)]
        assert completion.charge.charge == completion.charge.payout + completion.charge.fee
