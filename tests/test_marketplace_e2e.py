"""The gateway as a marketplace, end to end with several provider processes: tenants and quotas, EU-only placement
(fails closed), cheapest-eligible placement, provider registration, and failover that resumes a stream when the
serving provider is killed."""

import base64
import concurrent.futures
import json
import signal
import sqlite3
import threading
import time

import httpx
import openai
import pytest

from llorch.gateway.localnet import LocalNetwork
from llorch.ledger.objects import VERSION
from llorch.ledger.signing import SigningKey, load_key_file
from llorch.node.wire.registration import Registration

pytestmark = pytest.mark.e2e

MODEL = "smollm2-135m-instruct-q4_1"
MESSAGES = [{"role": "user", "content": "Tell me a long story about a lighthouse keeper and a storm."}]


@pytest.fixture(scope="module")
def market(tmp_path_factory, model_path):
    net = LocalNetwork(tmp_path_factory.mktemp("market"))
    try:
        net.start_gateway()
        net.start_node("us_cheapest", price_in=10_000, price_out=10_000, country="US")
        net.start_node("de_uncertified", price_in=20_000, price_out=20_000, country="DE", certify=False)
        net.start_node("de_cheap", price_in=100_000, price_out=150_000, country="DE")
        net.start_node("fr_dear", price_in=300_000, price_out=400_000, country="FR")
        net.wait_for_providers(4)
        net.peers = {node.name: node.state()["peer_id"] for node in net.nodes}
        yield net
    finally:
        net.stop()


def tenant(market, name, *options):
    return market.cli("gateway", "tenants", "add", name, "--config", "gateway.toml", *options).strip()


def client_for(market, key):
    return openai.OpenAI(base_url=market.base_url, api_key=key, max_retries=0, timeout=120)


def served_by(market, client, **extra):
    response = client.chat.completions.with_raw_response.create(model=MODEL, messages=MESSAGES, max_tokens=8,
                                                                **extra)
    peer = response.headers["x-llorch-provider"]
    return next(name for name, p in market.peers.items() if p == peer), response.parse()


def test_cheapest_eligible_provider_wins(market):
    client = client_for(market, tenant(market, "plain"))
    assert served_by(market, client, seed=1)[0] == "us_cheapest"
    ceiling = {"llorch": {"max_price_out_per_1m": 5_000}}
    with pytest.raises(openai.APIStatusError) as caught:
        served_by(market, client, seed=1, extra_body=ceiling)
    assert caught.value.status_code == 503 and "above the output price ceiling" in caught.value.body["message"]


def test_eu_only_tenants_land_only_on_certified_eu_providers(market):
    client = client_for(market, tenant(market, "eu", "--eu-only"))
    landed = {served_by(market, client, seed=n)[0] for n in range(4)}
    assert landed <= {"de_cheap", "fr_dear"} and "de_cheap" in landed


def test_eu_only_waits_for_a_certified_eu_provider_when_they_are_busy_and_never_goes_elsewhere(market):
    """Fails closed under load: with both certified EU providers busy, an EU-only request waits in the admission
    queue and is served by one of them, never by the free (and cheaper) US or uncertified DE provider."""
    eu_key = tenant(market, "eu_busy", "--eu-only")
    blockers = []

    def occupy():
        with httpx.stream("POST", f"{market.base_url}/chat/completions", timeout=120,
                          headers={"Authorization": f"Bearer {eu_key}"},
                          json={"model": MODEL, "messages": MESSAGES, "max_tokens": 400, "stream": True,
                                "seed": 5}) as response:
            for _ in response.iter_lines():
                pass

    for _ in range(2):                       # both certified EU providers (1 slot each) get a long request
        thread = threading.Thread(target=occupy)
        thread.start()
        blockers.append(thread)
    time.sleep(3)
    response = httpx.post(f"{market.base_url}/chat/completions", headers={"Authorization": f"Bearer {eu_key}"},
                          json={"model": MODEL, "messages": MESSAGES, "max_tokens": 4}, timeout=60)
    assert response.status_code == 200, response.text
    served = next(name for name, peer in market.peers.items() if peer == response.headers["x-llorch-provider"])
    assert served in {"de_cheap", "fr_dear"}, served
    for thread in blockers:
        thread.join()


def test_sigkill_mid_stream_resumes_on_another_provider_byte_identically(market):
    key = tenant(market, "resilient")
    client = client_for(market, key)
    request = dict(model=MODEL, messages=MESSAGES, seed=99, max_tokens=160, temperature=0.9)
    reference = client.chat.completions.create(**request).choices[0].message.content
    time.sleep(1.5)                                      # let every provider attest a free slot again
    pieces = []
    with client.chat.completions.with_streaming_response.create(**request, stream=True) as response:
        serving = response.headers["x-llorch-provider"]
        victim = next(node for node in market.nodes if market.peers[node.name] == serving)
        for chunk in response.parse():
            if chunk.choices and chunk.choices[0].delta.content:
                pieces.append(chunk.choices[0].delta.content)
                if len(pieces) == 10:
                    victim.popen.send_signal(signal.SIGKILL)      # the serving provider dies mid-stream
    assert victim.popen.wait(10) == -signal.SIGKILL
    assert "".join(pieces) == reference
    with sqlite3.connect(market.workdir / "gateway.sqlite") as db:
        receipts = db.execute("SELECT request_id, amount FROM receipts ORDER BY rowid DESC LIMIT 2").fetchall()
        legs = db.execute("SELECT request_id, leg, amount FROM postings WHERE debit = 'tenant:resilient'").fetchall()
    assert len({request_id for request_id, _ in receipts}) == 2          # one receipt per customer request
    assert sorted(r for r, leg, _ in legs if leg == "payout") == sorted(r for r, _ in receipts)   # billed once each
    assert {r: a for r, leg, a in legs if leg == "payout"} == dict(receipts)
    metrics = httpx.get(f"{market.http_url}/metrics").text
    assert "llorch_failovers_total 1" in metrics


def test_budget_is_never_overspent_under_concurrent_load(market):
    key = tenant(market, "budgeted", "--budget", "0.000030", "--eu-only")
    client = client_for(market, key)

    def one(n):
        try:
            client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                           seed=n)
            return 200
        except openai.APIStatusError as exc:
            return exc.status_code

    with concurrent.futures.ThreadPoolExecutor(50) as pool:
        statuses = list(pool.map(one, range(50)))
    with sqlite3.connect(market.workdir / "gateway.sqlite") as db:
        spent = db.execute("SELECT COALESCE(SUM(amount), 0) FROM postings WHERE debit = 'tenant:budgeted'").fetchone()[0]
    assert spent <= 30
    assert statuses.count(402) >= 1 and set(statuses) <= {200, 402, 503}


def test_rate_limit_concurrency_limit_model_list_and_revocation(market):
    limited = tenant(market, "limited", "--rps", "1", "--models", MODEL)
    statuses = [httpx.get(f"{market.base_url}/models", headers={"Authorization": f"Bearer {limited}"}).status_code
                for _ in range(3)]
    assert statuses == [200, 200, 200]                       # listing models is not rate limited
    replies = [httpx.post(f"{market.base_url}/chat/completions", headers={"Authorization": f"Bearer {limited}"},
                          json={"model": MODEL, "messages": MESSAGES, "max_tokens": 2}, timeout=60)
               for _ in range(3)]
    assert [r.status_code for r in replies][0] == 200 and 429 in [r.status_code for r in replies]
    refused = next(r for r in replies if r.status_code == 429)
    assert refused.headers["retry-after"] and refused.json()["error"]["code"] == "rate_limit_exceeded"

    other_model = httpx.post(f"{market.base_url}/chat/completions", headers={"Authorization": f"Bearer {limited}"},
                             json={"model": "gemma-3-270m-q4_k_m", "messages": MESSAGES})
    assert other_model.status_code == 403

    single = tenant(market, "single", "--max-concurrent", "1")
    results = {}

    def long_request():
        results["long"] = httpx.post(f"{market.base_url}/chat/completions",
                                     headers={"Authorization": f"Bearer {single}"},
                                     json={"model": MODEL, "messages": MESSAGES, "max_tokens": 120}, timeout=120)

    thread = threading.Thread(target=long_request)
    thread.start()
    time.sleep(1.0)
    second = httpx.post(f"{market.base_url}/chat/completions", headers={"Authorization": f"Bearer {single}"},
                        json={"model": MODEL, "messages": MESSAGES, "max_tokens": 2}, timeout=60)
    thread.join()
    assert second.status_code == 429 and second.json()["error"]["code"] == "too_many_concurrent"
    assert results["long"].status_code == 200

    market.cli("gateway", "tenants", "revoke", "single", "--config", "gateway.toml")
    revoked = httpx.post(f"{market.base_url}/chat/completions", headers={"Authorization": f"Bearer {single}"},
                         json={"model": MODEL, "messages": MESSAGES, "max_tokens": 2})
    assert revoked.status_code == 401 and "revoked" in revoked.json()["error"]["message"]
    assert revoked.headers["x-request-id"]


def registration_body(key: SigningKey, **overrides) -> dict:
    fields = dict(v=VERSION, provider_key=key.public_key, provider_id=key.peer_id, endpoint="/ip4/127.0.0.1/tcp/9",
                  pricing={"currency": "EUR", "input_per_1m": 1, "output_per_1m": 2},
                  capacity={"slots": 1, "gpus": 1, "vram_gb": 8}, sla={"uptime_ppm": 990_000, "ttft_ms": 100},
                  geo={"country": "DE", "region": "eu"}, issued_ms=int(time.time() * 1000))
    fields.update(overrides)
    payload_key = overrides.pop("_signer", key)
    return fields, payload_key


def post_registration(market, envelope: bytes | str):
    text = envelope if isinstance(envelope, str) else base64.b64encode(envelope).decode()
    return httpx.post(f"{market.http_url}/v2/platform/providers/register", json={"registration": text})


def test_registration_rejects_forgeries_and_bad_numbers_and_stores_nothing(market):
    listed_before = market.cli("gateway", "providers", "list", "--config", "gateway.toml")
    me, victim = SigningKey.generate(), load_key_file(market.workdir / "de_cheap.key")
    good = Registration(**registration_body(me)[0]).seal(me)
    forged = bytearray(good)
    forged[-3] ^= 1
    assert post_registration(market, bytes(forged)).status_code == 400
    stolen_id = registration_body(me, provider_id=victim.peer_id)[0]
    signed_by_me = me.seal("registration", stolen_id)          # claims the victim's id, signed with my key
    reply = post_registration(market, signed_by_me)
    assert reply.status_code == 400 and "only register itself" in reply.json()["error"]["message"]
    victim_payload = registration_body(victim)[0]
    victim_payload["provider_key"] = victim.public_key
    impersonation = me.seal("registration", victim_payload)    # the victim's payload, my signature
    assert post_registration(market, impersonation).status_code == 400
    for bad in ({"pricing": {"currency": "EUR", "input_per_1m": -1, "output_per_1m": 2}},
                {"capacity": {"slots": 10**9, "gpus": 1, "vram_gb": 8}},
                {"geo": {"country": "Germany", "region": "x"}},
                {"issued_ms": 1}):
        fields = registration_body(me)[0]
        fields.update(bad)
        reply = post_registration(market, me.seal("registration", fields))
        assert reply.status_code == 400, (bad, reply.text)
    assert post_registration(market, "%%%not base64").status_code == 400
    assert httpx.post(f"{market.http_url}/v2/platform/providers/register", content=b"{").status_code == 400
    huge = httpx.post(f"{market.http_url}/v2/platform/providers/register", content=b"x" * 100_000)
    assert huge.status_code == 400
    assert market.cli("gateway", "providers", "list", "--config", "gateway.toml") == listed_before

    created = post_registration(market, good)
    assert created.status_code == 201 and created.json()["status"] == "pending"
    replayed = post_registration(market, good)
    assert replayed.status_code == 400 and "newer registration" in replayed.json()["error"]["message"]


def test_provider_listing_and_capacity(market):
    key = tenant(market, "looker")
    headers = {"Authorization": f"Bearer {key}"}
    listing = httpx.get(f"{market.base_url.removesuffix('/v1')}/v2/platform/providers", headers=headers).json()
    by_id = {p["provider_id"]: p for p in listing["providers"]}
    assert by_id[market.peers["de_cheap"]]["status"] == "approved"
    assert by_id[market.peers["de_uncertified"]]["geo_certified"] is False
    capacity = httpx.get(f"{market.http_url}/v2/platform/providers/{market.peers['fr_dear']}/capacity",
                         headers=headers).json()
    assert capacity["total_slots"] == 1 and capacity["available_slots"] in (0, 1) and "estimated_wait_ms" in capacity
    metrics = httpx.get(f"{market.http_url}/metrics").text
    assert 'llorch_providers{state="approved"}' in metrics and "llorch_requests_total" in metrics
