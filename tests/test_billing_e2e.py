"""Billing end to end: tenants on different tiers, two providers; statements match the receipts one by one,
charges = payouts + fees, reconciliation is clean and idempotent, customers verify their own bills offline and
see nobody else's, and a receipt forged into a provider's ledger or missing from it is reported by request_id."""

import base64
import hashlib
import json
import signal
import sqlite3
import subprocess
import sys
import time

import httpx
import openai
import pytest

from llorch.gateway.localnet import LocalNetwork
from llorch.gateway.books.pricing import DEMAND_TABLE, customer_price
from llorch.ledger.objects import VERSION, Receipt, amount_minor, sampling_sha256
from llorch.ledger.signing import load_key_file, public_key_of_peer_id, sha256
from llorch.ledger.store import LedgerStore
from llorch.ledger.verify import read_sqlite_entries

pytestmark = pytest.mark.e2e

MODEL = "smollm2-135m-instruct-q4_1"
MESSAGES = [{"role": "user", "content": "Name three colours of the rainbow."}]
STORY = [{"role": "user", "content": "Tell me a long story about a lighthouse keeper and a storm."}]


@pytest.fixture(scope="module")
def market(tmp_path_factory, model_path):
    net = LocalNetwork(tmp_path_factory.mktemp("billing"))
    try:
        net.start_gateway(extra="margin_bp_enterprise = 2500\n")
        net.start_node("alpha", price_in=100_000, price_out=200_000)
        net.start_node("beta", price_in=100_000, price_out=200_000)
        net.wait_for_providers(2)
        net.keys = {name: net.cli("gateway", "tenants", "add", name, "--config", "gateway.toml", "--tier", tier).strip()
                    for name, tier in (("alice", "hobby"), ("bob", "enterprise"))}
        net.responses = {name: [] for name in net.keys}
        for name, key in net.keys.items():
            client = openai.OpenAI(base_url=net.base_url, api_key=key, max_retries=0, timeout=120)
            for seed in range(3):
                net.responses[name].append(client.chat.completions.create(model=MODEL, messages=MESSAGES, seed=seed,
                                                                          max_tokens=24))
        yield net
    finally:
        net.stop()


def db_rows(market, sql, params=()):
    with sqlite3.connect(market.workdir / "gateway.sqlite") as db:
        return db.execute(sql, params).fetchall()


def wait_witnessed(market, timeout_s=40):
    deadline = time.monotonic() + timeout_s
    for node in market.nodes:
        key = public_key_of_peer_id(node.state()["peer_id"])
        size = len(list(read_sqlite_entries(market.workdir / f"{node.name}.ledger.sqlite")))
        while (db_rows(market, "SELECT size FROM witnessed WHERE provider_key = ?", (key,)) or [(-1,)])[0][0] != size:
            assert time.monotonic() < deadline, f"the witness did not catch up with {node.name}"
            time.sleep(0.5)


def cli_json(market, *args):
    return json.loads(market.cli(*args, "--config", "gateway.toml"))


def period():
    return time.strftime("%Y-%m", time.gmtime())


def test_statements_match_receipts_one_by_one(market):
    wait_witnessed(market)
    receipts = {}
    for node in market.nodes:
        for entry in read_sqlite_entries(market.workdir / f"{node.name}.ledger.sqlite"):
            receipt = Receipt.from_envelope(entry)
            receipts[receipt.request_id] = (node.state()["peer_id"], receipt)
    charged_total = 0
    for name in ("alice", "bob"):
        statement = cli_json(market, "billing", "statement", "--tenant", name, "--period", period())
        responses = market.responses[name]
        assert statement["totals_minor"]["EUR"] == sum(r.model_extra["llorch"]["amount"] for r in responses)
        assert sum(line["requests"] for line in statement["lines"]) == len(responses)
        for response in responses:
            peer, receipt = receipts[response.id]
            assert response.model_extra["llorch"]["provider_amount"] == receipt.amount
            assert response.usage.completion_tokens == receipt.tokens_out
        charged_total += statement["totals_minor"]["EUR"]
    payouts = sum(cli_json(market, "billing", "statement", "--provider", node.state()["peer_id"], "--period",
                           period())["totals_minor"].get("EUR", 0) for node in market.nodes)
    fees = cli_json(market, "billing", "statement", "--platform", "--period", period())["totals_minor"]["EUR"]
    assert charged_total == payouts + fees
    assert payouts == sum(r.amount for _, r in receipts.values())
    # hobby pays a 40% margin (the default), enterprise 25% (this gateway's config)
    for name, margin_bp in (("alice", 4_000), ("bob", 2_500)):
        for response in market.responses[name]:
            extension, usage = response.model_extra["llorch"], response.usage
            assert extension["amount"] in {amount_minor(usage.prompt_tokens, usage.completion_tokens,
                                                        customer_price(100_000, multiplier_bp, margin_bp),
                                                        customer_price(200_000, multiplier_bp, margin_bp))
                                           for _, multiplier_bp in DEMAND_TABLE}
    csv = market.cli("billing", "statement", "--tenant", "alice", "--period", period(), "--format", "csv",
                     "--config", "gateway.toml")
    assert csv.splitlines()[0].startswith("currency,model,provider") and "TOTAL EUR" in csv


def test_reconciliation_is_clean_and_changes_nothing(market):
    wait_witnessed(market)
    before = hashlib.sha256((market.workdir / "gateway.sqlite").read_bytes()).hexdigest()
    first = cli_json(market, "billing", "reconcile", "--grace-s", "0")
    second = cli_json(market, "billing", "reconcile", "--grace-s", "0")
    assert first == second and first["ok"] and first["matched"] >= 6 and first["findings"] == []
    assert db_rows(market, "SELECT COUNT(*) FROM postings")[0][0] == 2 * first["matched"]


def test_a_correction_is_a_new_entry_and_nets_in_the_balance(market):
    request_id = market.responses["bob"][1].id
    legs = db_rows(market, "SELECT leg, debit, credit, amount FROM postings WHERE request_id = ?", (request_id,))
    fee = next(amount for leg, _, _, amount in legs if leg == "fee")
    before = cli_json(market, "gateway", "tenants", "list")
    market.cli("billing", "correct", "--request-id", request_id, "--from", "platform:fees", "--to", "tenant:bob",
               "--amount", str(fee), "--config", "gateway.toml")          # refund bob's fee on one request
    after = cli_json(market, "gateway", "tenants", "list")
    spent = {t["name"]: t["spent"] for t in before}, {t["name"]: t["spent"] for t in after}
    assert float(spent[0]["bob"]) * 1_000_000 - fee == pytest.approx(float(spent[1]["bob"]) * 1_000_000)
    statement = cli_json(market, "billing", "statement", "--tenant", "bob", "--period", period())
    assert statement["corrections"] == [{"request_id": request_id, "leg": "correction:1", "currency": "EUR",
                                         "amount_minor": -fee}]
    assert statement["totals_minor"]["EUR"] == sum(r.model_extra["llorch"]["amount"]
                                                   for r in market.responses["bob"]) - fee
    legs_after = db_rows(market, "SELECT leg FROM postings WHERE request_id = ? ORDER BY leg", (request_id,))
    assert [leg for (leg,) in legs_after] == ["correction:1", "fee", "payout"]      # nothing edited
    refused = subprocess.run([sys.executable, "-m", "llorch.gateway", "billing", "correct", "--config",
                              str(market.workdir / "gateway.toml"), "--request-id", request_id, "--from",
                              "tenant:alice", "--to", "platform:fees", "--amount", "5"], capture_output=True, text=True)
    assert refused.returncode == 2 and "moves money between" in refused.stderr
    with pytest.raises(sqlite3.IntegrityError):
        db_rows(market, "UPDATE postings SET amount = 0 WHERE request_id = ?", (request_id,))


def test_tenants_see_only_their_own_usage_and_receipts(market, tmp_path):
    alice, bob = market.keys["alice"], market.keys["bob"]
    usage = httpx.get(f"{market.http_url}/v2/billing/usage", headers={"Authorization": f"Bearer {alice}"},
                      params={"period": period()}).json()
    assert usage["subject"] == "alice" and usage["totals_minor"]["EUR"] == sum(
        r.model_extra["llorch"]["amount"] for r in market.responses["alice"])
    request_id = market.responses["alice"][0].id
    assert httpx.get(f"{market.http_url}/v2/receipts/{request_id}",
                     headers={"Authorization": f"Bearer {bob}"}).status_code == 404
    assert httpx.get(f"{market.http_url}/v2/receipts/{request_id}").status_code == 401
    assert httpx.get(f"{market.http_url}/v2/billing/usage").status_code == 401
    wait_witnessed(market)
    proof = httpx.get(f"{market.http_url}/v2/receipts/{request_id}", headers={"Authorization": f"Bearer {alice}"})
    assert proof.status_code == 200 and proof.json()["checkpoint"]
    path = tmp_path / "bill.json"
    path.write_text(proof.text)
    gateway_peer = market.gateway.state()["peer_id"]
    check = [sys.executable, "-m", "llorch.gateway", "ledger", "verify-receipt", str(path), "--witness", gateway_peer]
    ok = subprocess.run(check, capture_output=True, text=True)
    assert ok.returncode == 0 and request_id in ok.stdout, ok.stderr
    document = proof.json()
    if document["inclusion_proof"]:                    # flip one bit of the first proof hash
        first = bytearray(base64.b64decode(document["inclusion_proof"][0]))
        first[0] ^= 1
        document["inclusion_proof"][0] = base64.b64encode(bytes(first)).decode()
    else:                                              # a one-entry tree: any proof element is one too many
        document["inclusion_proof"] = [base64.b64encode(bytes(32)).decode()]
    path.write_text(json.dumps(document))
    bad = subprocess.run(check, capture_output=True, text=True)
    assert bad.returncode == 1 and "(3)" in bad.stderr


def test_a_receipt_forged_into_a_ledger_is_reported(market):
    beta = next(node for node in market.nodes if node.name == "beta")
    key = load_key_file(market.workdir / "beta.key")
    gateway_key = public_key_of_peer_id(market.gateway.state()["peer_id"])
    beta.stop()

    async def forge():
        async with LedgerStore.open(market.workdir / "beta.ledger.sqlite", key) as ledger:
            await ledger.append(dict(
                request_id="chatcmpl-forged0000000000000001", ticket_sha256=sha256(b"never issued"),
                gateway_key=gateway_key, tenant="t_unknown", provider_key=key.public_key, model_id=MODEL,
                model_sha256=bytes.fromhex("b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),
                engine_build="x", seed=1, sampling_sha256=sampling_sha256({"seed": 1}), tokens_in=10, tokens_out=900,
                accepted_ms=int(time.time() * 1000), first_token_ms=int(time.time() * 1000),
                finished_ms=int(time.time() * 1000), price_in=100_000, price_out=200_000, currency="EUR",
                amount=amount_minor(10, 900, 100_000, 200_000), prompt_commitment=bytes(32),
                output_sha256=bytes(32), finish_reason="stop"))

    import trio
    trio.run(forge)
    market.restart_node("beta")
    market.wait_for_providers(2)
    wait_witnessed(market)
    result = subprocess.run([sys.executable, "-m", "llorch.gateway", "billing", "reconcile", "--config",
                             str(market.workdir / "gateway.toml"), "--grace-s", "0"], capture_output=True, text=True)
    report = json.loads(result.stdout)
    assert result.returncode == 1 and not report["ok"]
    forged = [f for f in report["findings"] if f["kind"] == "receipt_without_ticket"]
    assert [f["request_id"] for f in forged] == ["chatcmpl-forged0000000000000001"]


def test_an_accepted_ticket_without_a_receipt_is_reported(market):
    client = openai.OpenAI(base_url=market.base_url, api_key=market.keys["alice"], max_retries=0, timeout=120)
    time.sleep(1.5)
    pieces = []
    with client.chat.completions.with_streaming_response.create(model=MODEL, messages=STORY, seed=5, max_tokens=160,
                                                                stream=True) as response:
        serving = response.headers["x-llorch-provider"]
        victim = next(node for node in market.nodes if node.state()["peer_id"] == serving)
        for chunk in response.parse():
            if chunk.choices and chunk.choices[0].delta.content:
                pieces.append(chunk.choices[0].delta.content)
                if len(pieces) == 5:
                    victim.popen.send_signal(signal.SIGKILL)     # dies before it can write a receipt
                request_id = chunk.id
    market.restart_node(victim.name)
    market.wait_for_providers(2)
    wait_witnessed(market)
    time.sleep(2.5)                                            # at least one more witness round after the ticket
    report = json.loads(subprocess.run([sys.executable, "-m", "llorch.gateway", "billing", "reconcile", "--config",
                                        str(market.workdir / "gateway.toml"), "--grace-s", "0"],
                                       capture_output=True, text=True).stdout)
    missing = [f for f in report["findings"] if f["kind"] == "ticket_without_receipt"]
    assert [f["request_id"] for f in missing] == [request_id]
    assert missing[0]["provider_id"] == serving
    billed = db_rows(market, "SELECT COUNT(*) FROM postings WHERE request_id = ? AND leg = 'payout'", (request_id,))
    assert billed[0][0] == 1                                   # the customer paid once, to the provider that finished
