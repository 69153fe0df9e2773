"""Determinism under real conditions, end to end: concurrent requests on a node with 8 slots, a node restart,
replay of receipts (`llorch ledger replay`), cancellation, and limits checked before any work."""

import concurrent.futures
import json
import sqlite3
import subprocess
import sys
import time

import httpx
import openai
import pytest

from llorch.gateway.localnet import LocalNetwork
from llorch.ledger import canonical
from llorch.ledger.objects import Receipt, receipt_fields_of
from llorch.ledger.signing import load_key_file
from llorch.ledger.bundle import bundle_bytes
from llorch.ledger.verify import read_sqlite_entries

pytestmark = pytest.mark.e2e

MODEL = "smollm2-135m-instruct-q4_1"
STORY = [{"role": "user", "content": "Tell me a long story about a lighthouse keeper and a storm."}]


@pytest.fixture(scope="module")
def network(tmp_path_factory, model_path):
    net = LocalNetwork(tmp_path_factory.mktemp("determinism"))
    try:
        net.start_gateway()
        net.start_node("wide", threads=1, extra="slots = 8\n")
        net.wait_for_providers(1)
        yield net
    finally:
        net.stop()


@pytest.fixture(scope="module")
def client(network):
    return openai.OpenAI(base_url=network.base_url, api_key=network.api_key, max_retries=0, timeout=300)


def body(seed=4242, max_tokens=48, **extra):
    return {"model": MODEL, "messages": STORY, "seed": seed, "max_tokens": max_tokens, "temperature": 0.9, **extra}


def complete(client, **overrides):
    request = body(**overrides)
    return request, client.chat.completions.create(**request)


def ledger_entries(network, name="wide"):
    path = network.workdir / f"{name}.ledger.sqlite"
    return {Receipt.from_envelope(e).request_id: e for e in read_sqlite_entries(path)}


def test_eight_concurrent_requests_equal_each_other_and_a_solo_run(client):
    _, solo = complete(client)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: complete(client)[1], range(8)))
    texts = {r.choices[0].message.content for r in results}
    assert texts == {solo.choices[0].message.content}
    _, other = complete(client, seed=4243)
    assert other.choices[0].message.content != solo.choices[0].message.content


def test_same_output_across_a_node_restart(client, network):
    _, before = complete(client, seed=777)
    network.restart_node("wide")
    network.wait_for_providers(1)
    _, after = complete(client, seed=777)
    assert after.choices[0].message.content == before.choices[0].message.content
    assert after.id != before.id


def write_json(path, document):
    path.write_text(json.dumps(document))
    return path


def run_replay(ledger, request_id, request_file, salt, *extra):
    return subprocess.run([sys.executable, "-m", "llorch.gateway", "ledger", "replay", str(ledger), "--request-id",
                           request_id, "--request", str(request_file), "--salt", salt, *extra],
                          capture_output=True, text=True)


def resign(network, entry, **changes):
    """What a dishonest provider could do: sign a receipt with fields of its choosing (its key is its own)."""
    key = load_key_file(network.workdir / "wide.key")
    fields = {**receipt_fields_of(Receipt.from_envelope(entry)), **changes}
    return Receipt(**fields).seal(key)


def test_replay_confirms_a_genuine_receipt_and_rejects_altered_ones(client, network, tmp_path):
    request, response = complete(client, seed=None, max_tokens=32)       # the gateway chooses the seed
    extension = response.model_extra["llorch"]
    entry = ledger_entries(network)[response.id]
    bundle = tmp_path / "genuine.bundle"
    bundle.write_bytes(bundle_bytes([], [], [entry]))
    request_file = write_json(tmp_path / "request.json", {k: v for k, v in request.items() if v is not None})
    salt, seed = extension["prompt_salt"], str(extension["seed"])

    genuine = run_replay(bundle, response.id, request_file, salt, "--seed", seed, "--json")
    assert genuine.returncode == 0, genuine.stdout + genuine.stderr
    assert json.loads(genuine.stdout)["output_matches"] is True

    wrong_salt = run_replay(bundle, response.id, request_file, "00" * 16, "--seed", seed)
    assert wrong_salt.returncode == 1 and "prompt commitment" in wrong_salt.stderr

    altered = tmp_path / "altered.bundle"
    altered.write_bytes(bundle_bytes([], [], [resign(network, entry, output_sha256=bytes(32))]))
    lying = run_replay(altered, response.id, request_file, salt, "--seed", seed)
    assert lying.returncode == 1 and "regenerated output differs" in lying.stderr

    envelope = canonical.decode(entry)
    tampered_payload = envelope["p"].replace(Receipt.from_envelope(entry).output_sha256, bytes(32))
    tampered = tmp_path / "tampered.bundle"
    tampered.write_bytes(bundle_bytes([], [], [canonical.encode({"p": tampered_payload, "s": envelope["s"]})]))
    forged = run_replay(tampered, response.id, request_file, salt, "--seed", seed)
    assert forged.returncode == 1 and "not genuine" in forged.stderr

    other_class = tmp_path / "other-class.bundle"
    other_build = Receipt.from_envelope(entry).engine_build.replace("ggml-cpu/", "ggml-cpu/ffff")
    other_class.write_bytes(bundle_bytes([], [], [resign(network, entry, engine_build=other_build)]))
    inconclusive = run_replay(other_class, response.id, request_file, salt, "--seed", seed)
    assert inconclusive.returncode == 3 and "another determinism class" in inconclusive.stderr


def test_a_customer_who_disconnects_stops_the_engine_within_a_token(network):
    received = 0
    with httpx.stream("POST", f"{network.base_url}/chat/completions", timeout=120,
                      headers={"Authorization": f"Bearer {network.api_key}"},
                      json=body(seed=31337, max_tokens=400, stream=True)) as response:
        assert response.status_code == 200
        request_id = None
        for line in response.iter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                request_id = chunk["id"]
                if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                    received += 1
                    if received == 5:
                        break                       # the customer goes away
    deadline = time.monotonic() + 30
    while request_id not in ledger_entries(network):
        assert time.monotonic() < deadline, "no receipt for the cancelled request"
        time.sleep(0.2)
    receipt = Receipt.from_envelope(ledger_entries(network)[request_id])
    assert receipt.finish_reason == "cancelled"
    generated_after_disconnect = receipt.tokens_out - received
    print(f"tokens generated after the disconnect: {generated_after_disconnect}")
    assert 0 <= generated_after_disconnect <= 3, receipt.tokens_out
    assert receipt.tokens_out < 400
    # the customer pays for the frames relayed before it left, the provider is paid for them, once
    query = "SELECT outcome, frames, tokens_out, payout, charge FROM tickets WHERE request_id = ? AND state = 'settled'"
    while not gateway_rows(network, query, (request_id,)):
        assert time.monotonic() < deadline, "the cancelled request was never settled"
        time.sleep(0.2)
    (outcome, frames, billed_out, payout, charge), = gateway_rows(network, query, (request_id,))
    assert outcome == "customer_gone" and received <= frames <= receipt.tokens_out
    assert billed_out == frames and charge >= payout > 0
    legs = gateway_rows(network, "SELECT leg, amount FROM postings WHERE request_id = ? ORDER BY leg", (request_id,))
    assert legs == [("fee", charge - payout), ("payout", payout)]


def gateway_rows(network, sql, params=()):
    with sqlite3.connect(network.workdir / "gateway.sqlite") as db:
        return db.execute(sql, params).fetchall()


def test_limits_are_refused_before_any_work(network):
    before = len(ledger_entries(network))
    headers = {"Authorization": f"Bearer {network.api_key}"}
    too_long = httpx.post(f"{network.base_url}/chat/completions", headers=headers, timeout=60, json={
        "model": MODEL, "messages": [{"role": "user", "content": "lighthouse " * 3000}], "max_tokens": 10})
    assert too_long.status_code == 400 and "context" in too_long.json()["error"]["message"]
    over_cap = httpx.post(f"{network.base_url}/chat/completions", headers=headers, json=body(max_tokens=5000))
    assert over_cap.status_code == 400 and over_cap.json()["error"]["param"] == "max_tokens"
    unsupported = httpx.post(f"{network.base_url}/chat/completions", headers=headers,
                             json=body(frequency_penalty=2.5))
    assert unsupported.status_code == 400 and unsupported.json()["error"]["param"] == "frequency_penalty"
    assert len(ledger_entries(network)) == before          # nothing was generated, nothing billed
