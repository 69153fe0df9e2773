"""A hostile peer on the attestation topic, against a real gateway process (and one honest node running the
test-only echo engine). The attacker is a real libp2p host that joins the topic and, over its one connection,
publishes garbage, non-canonical msgpack, oversized data, replays, the honest provider's attestation as its own,
validly self-signed attestations with hostile fields, 1,000 attestations from 1,000 fresh keys (GossipSub lets any
peer relay messages whose originator is a key it holds, so one host is enough), and a flood. Afterwards the gateway
still serves a real request, lists and places on no unapproved key, never dialled an address it was only told
about, and /metrics says why each message was dropped.

Before gossip was parsed fully and background loops were supervised, the first attestation with addrs ["/foo"]
killed the gateway at its next witness round.
"""

from __future__ import annotations

import os
import subprocess
from collections import Counter

import httpx
import msgpack
import openai
import pytest
import trio
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.pubsub.pb import rpc_pb2
from libp2p.pubsub.validators import PUBSUB_SIGNING_PREFIX
from multiaddr import Multiaddr
from prometheus_client.parser import text_string_to_metric_families

from llorch.gateway.localnet import LocalNetwork, llorch_command
from llorch.gateway.limits import PENDING_ATTESTATIONS_MAX
from llorch.ledger import canonical
from llorch.ledger.objects import VERSION
from llorch.ledger.signing import SigningKey
from llorch.node.p2p import P2P, key_pair_of, running_host
from llorch.node.stream_io import now_ms
from llorch.node.wire.attestation import TOPIC
from tests.helpers import MODEL_ID, MODEL_SHA256

pytestmark = pytest.mark.e2e

NEVER = 2**63 - 1
FRESH_KEYS = 1_000
FLOOD = 2_000
TOLD_ONLY = ("198.51.100.7", "203.0.113.")          # addresses only ever claimed by keys nobody approved


def fields(key: SigningKey, seq: int, **overrides) -> dict:
    issued = now_ms()
    values = dict(v=VERSION, provider_key=key.public_key, seq=seq, issued_ms=issued, expires_ms=issued + 15_000,
                  addrs=["/ip4/198.51.100.7/tcp/4101"], models=[{"id": MODEL_ID, "sha256": MODEL_SHA256,
                                                                  "context_tokens": 2048}],
                  engine_build="echo/1", slots_total=64, slots_free=64, queue_depth=0, wait_ms=0, price_in=0,
                  price_out=0, currency="EUR", geo={"country": "DE", "region": "x"},
                  sla={"ttft_ms": 0, "uptime_ppm": 1_000_000})
    values.update(overrides)
    return values


def hostile(key: SigningKey, seq: int, **overrides) -> bytes:
    """A validly self-signed attestation with hostile fields, sealed without our own constructor's checks (as a
    hostile peer would)."""
    return key.seal("attestation", fields(key, seq, **overrides))


def non_canonical(key: SigningKey, seq: int) -> bytes:
    """A validly signed attestation whose payload is not canonical msgpack (a uint in a wider form than needed)."""
    payload = bytearray(canonical.encode(fields(key, seq)))
    marker = canonical.encode("seq") + canonical.encode(seq)
    at = payload.index(marker) + len(canonical.encode("seq"))
    wide = b"\xcf" + seq.to_bytes(8, "big")
    payload[at:at + len(canonical.encode(seq))] = wide
    payload = bytes(payload)
    assert msgpack.unpackb(payload)["seq"] == seq
    return canonical.encode({"p": payload, "s": key.sign("attestation", payload)})


class Attacker:
    """One libp2p host that publishes on the topic as itself or as any key it holds."""

    def __init__(self, p2p: P2P) -> None:
        self.p2p = p2p
        p2p.pubsub.router.spam_protection_enabled = False     # an attacker does not rate-limit itself
        self.seqno = 0
        self.published = 0

    async def publish(self, data: bytes, as_key: SigningKey | None = None) -> None:
        if as_key is None:
            await self.p2p.pubsub.publish(TOPIC, data)
        else:
            pair = key_pair_of(as_key)
            self.seqno += 1
            message = rpc_pb2.Message(data=data, topicIDs=[TOPIC], seqno=self.seqno.to_bytes(8, "big"),
                                      from_id=ID.from_pubkey(pair.public_key).to_bytes())
            message.signature = pair.private_key.sign(PUBSUB_SIGNING_PREFIX.encode() + message.SerializeToString())
            message.key = pair.public_key.serialize()
            await self.p2p.pubsub.push_msg(self.p2p.pubsub.my_id, message)
        self.published += 1
        # As fast as its own outbound queue allows: py-libp2p drops RPCs beyond a bounded per-peer queue, and a
        # flood that never leaves the attacker tests nothing.
        await trio.sleep(0.02 if self.published % 20 == 0 else 0)


async def attack(gateway_multiaddr: str, honest_peer_id: str) -> dict[str, int]:
    """Play every hostile case; return how many messages of each kind were sent."""
    sent: Counter = Counter()
    async with running_host(SigningKey.generate(), "/ip4/127.0.0.1/tcp/0") as p2p:
        await p2p.host.connect(info_from_p2p_addr(Multiaddr(gateway_multiaddr)))
        subscription = await p2p.pubsub.subscribe(TOPIC)
        with trio.fail_after(20):                       # the honest provider's attestation, relayed by the gateway
            while (message := await subscription.get()).from_id != ID.from_base58(honest_peer_id).to_bytes():
                pass
        attacker = Attacker(p2p)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(drain, subscription)
            await play(attacker, sent, message.data, honest_peer_id)
            nursery.cancel_scope.cancel()
    return dict(sent)


async def drain(subscription) -> None:
    while True:
        await subscription.get()


async def play(attacker: Attacker, sent: Counter, honest_attestation: bytes, honest_peer_id: str) -> None:
    """Each hostile case in turn, counted in ``sent`` by the drop reason it must get (or "kept")."""

    async def send(kind: str, data: bytes, as_key: SigningKey | None = None) -> None:
        await attacker.publish(data, as_key)
        sent[kind] += 1

    fresh = SigningKey.generate
    for _ in range(3):
        key = fresh()
        await send("malformed", os.urandom(200), key)
    key = fresh()
    await send("malformed", non_canonical(key, 1), key)
    key = fresh()
    await send("oversized", hostile(key, 1, geo={"country": "DE", "region": "x" * 9_000}), key)
    key = fresh()
    sealed = bytearray(hostile(key, 1))
    sealed[-1] ^= 1
    await send("bad_signature", bytes(sealed), key)
    await send("not_signer", honest_attestation)           # the honest provider's attestation, as the attacker's own
    for addrs in (["/foo"], ["/unix/tmp/llorch"], ["/ip4/127.0.0.1/tcp/9/p2p/" + honest_peer_id]):
        key = fresh()
        await send("bad_address", hostile(key, 1, addrs=addrs), key)
    key = fresh()
    await send("too_long_valid", hostile(key, 1, expires_ms=NEVER), key)
    key = fresh()
    later = now_ms() + 120_000
    await send("from_future", hostile(key, 1, issued_ms=later, expires_ms=later + 15_000), key)
    key = fresh()
    await send("expired", hostile(key, 1, issued_ms=now_ms() - 60_000, expires_ms=now_ms() - 45_000), key)
    key = fresh()
    first = hostile(key, 5)
    await send("kept", first, key)                    # an unapproved key: kept in the pending pool only
    await trio.sleep(0.5)
    await send("replay", first, key)                   # the same bytes again, in a new gossip message
    await send("replay", hostile(key, 4), key)         # an older seq
    for n in range(FRESH_KEYS):
        key = fresh()
        await send("kept", hostile(key, 1, addrs=[f"/ip4/203.0.113.{n % 250 + 1}/tcp/4101"]), key)
    flooder = fresh()
    for _ in range(FLOOD):
        await send("malformed", os.urandom(64), flooder)
    await trio.sleep(3.0)                              # let the gateway drain its queue and run witness rounds


def metric_samples(text: str) -> dict[tuple[str, tuple], float]:
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def test_an_adversarial_peer_neither_knocks_over_nor_fools_the_gateway(tmp_path, model_path):
    net = LocalNetwork(tmp_path)
    try:
        net.start_gateway()
        honest = net.start_node("honest", extra='engine = "echo"\n')
        net.wait_for_providers(1)
        sent = trio.run(attack, net.gateway.state()["multiaddrs"][0], honest["peer_id"])
        assert net.gateway.popen.poll() is None, "the gateway died"

        client = openai.OpenAI(base_url=net.base_url, api_key=net.api_key, max_retries=0, timeout=60)
        answer = client.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": "hi"}],
                                                max_tokens=4, seed=1)
        assert answer.choices[0].message.content
        headers = {"Authorization": f"Bearer {net.api_key}"}
        listed = httpx.get(f"{net.http_url}/v2/platform/providers", headers=headers).json()["providers"]
        assert [p["provider_id"] for p in listed] == [honest["peer_id"]]
        assert httpx.get(f"{net.http_url}/healthz").json()["providers"] == 1

        samples = metric_samples(httpx.get(f"{net.http_url}/metrics").text)
        dropped = {dict(labels)["reason"]: int(value) for (name, labels), value in samples.items()
                   if name == "llorch_attestations_dropped_total"}
        pending = samples[("llorch_attestations_pending", ())]
        print(f"\nsent {sum(sent.values())} hostile messages: {sent}\ndropped by reason: {dropped}\n"
              f"pending pool: {pending:g}")
        for reason in ("oversized", "bad_signature", "not_signer", "bad_address", "too_long_valid",
                       "from_future", "expired", "replay"):
            assert dropped[reason] == sent[reason], (reason, dropped, sent)
        # Part of the 2,000-message flood from one key may be refused by libp2p's own per-peer defences before
        # our validator sees it; what reaches the validator is dropped as malformed, every message of it.
        assert 4 <= dropped["malformed"] <= sent["malformed"], (dropped, sent)
        assert pending == PENDING_ATTESTATIONS_MAX
        log = (tmp_path / "gateway.log").read_text()
        assert not any(address in log for address in TOLD_ONLY), "the gateway acted on an address it was told"
        assert "Traceback" not in log
    finally:
        net.stop()


def test_a_second_node_on_one_config_refuses_to_start_and_the_first_keeps_serving(tmp_path, model_path):
    """Two processes on one ledger would each keep their own head; the witness would see a fork and exclude the
    provider for good. The ledger (and the key) have one process at a time."""
    net = LocalNetwork(tmp_path)
    try:
        net.start_gateway()
        net.start_node("single", extra='engine = "echo"\n')
        net.wait_for_providers(1)
        second = subprocess.run(llorch_command() + ["node", "start", "--config", "single.toml"], cwd=tmp_path,
                                capture_output=True, text=True, timeout=60)
        assert second.returncode == 2, second.stderr[-2000:]
        assert "in use by another process" in second.stderr and "Traceback" not in second.stderr
        client = openai.OpenAI(base_url=net.base_url, api_key=net.api_key, max_retries=0, timeout=60)
        for seed in range(3):
            assert client.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": "hi"}],
                                                  max_tokens=4, seed=seed).choices[0].message.content
        assert net.gateway.popen.poll() is None and "FORKED" not in (tmp_path / "gateway.log").read_text()
    finally:
        net.stop()
