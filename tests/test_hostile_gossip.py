"""A hostile peer on the attestation topic, against a real gateway process (and one honest node running the
test-only echo engine): validly self-signed attestations with hostile fields must never take the gateway down, never
be witnessed or dialled, and never push out an approved provider.

Before gossip was parsed fully and background loops were supervised, the first attestation below (addrs ["/foo"])
killed the gateway at its next witness round.
"""

from __future__ import annotations

import subprocess

import openai
import pytest
import trio
from libp2p.peer.peerinfo import info_from_p2p_addr
from multiaddr import Multiaddr

from llorch.gateway.localnet import LocalNetwork, llorch_command
from llorch.ledger.objects import VERSION
from llorch.ledger.signing import SigningKey
from llorch.node.p2p import running_host
from llorch.node.stream_io import now_ms
from llorch.node.wire.attestation import TOPIC
from tests.helpers import MODEL_ID, MODEL_SHA256

pytestmark = pytest.mark.e2e

NEVER = 2**63 - 1


def hostile(key: SigningKey, seq: int, **overrides) -> bytes:
    """A validly self-signed attestation with hostile fields, sealed without our own constructor's checks (as a
    hostile peer would)."""
    issued = now_ms()
    fields = dict(v=VERSION, provider_key=key.public_key, seq=seq, issued_ms=issued, expires_ms=issued + 15_000,
                  addrs=["/ip4/127.0.0.1/tcp/9"], models=[{"id": MODEL_ID, "sha256": MODEL_SHA256,
                                                            "context_tokens": 2048}],
                  engine_build="echo/1", slots_total=64, slots_free=64, queue_depth=0, wait_ms=0, price_in=0,
                  price_out=0, currency="EUR", geo={"country": "DE", "region": "x"},
                  sla={"ttft_ms": 0, "uptime_ppm": 1_000_000})
    fields.update(overrides)
    return key.seal("attestation", fields)


HOSTILE = [{"addrs": ["/foo"]}, {"expires_ms": NEVER}, {"addrs": ["/unix/tmp/llorch"]},
           {"addrs": ["/ip4/198.51.100.7/tcp/4101"]}]


async def play_hostile_peers(gateway_multiaddr: str) -> None:
    """Each hostile attestation from its own fresh key (the publisher must be the signer), each left in place
    for more than one witness round (1 s here)."""
    for seq, overrides in enumerate(HOSTILE, start=1):
        key = SigningKey.generate()
        async with running_host(key, "/ip4/127.0.0.1/tcp/0") as p2p:
            await p2p.host.connect(info_from_p2p_addr(Multiaddr(gateway_multiaddr)))
            await trio.sleep(1.0)                                 # join the mesh
            await p2p.pubsub.publish(TOPIC, hostile(key, seq, **overrides))
            await trio.sleep(2.5)


def test_hostile_attestations_neither_kill_nor_fool_the_gateway(tmp_path, model_path):
    net = LocalNetwork(tmp_path)
    try:
        net.start_gateway()
        net.start_node("honest", extra='engine = "echo"\n')
        net.wait_for_providers(1)
        trio.run(play_hostile_peers, net.gateway.state()["multiaddrs"][0])
        assert net.gateway.popen.poll() is None, "the gateway died"
        client = openai.OpenAI(base_url=net.base_url, api_key=net.api_key, max_retries=0, timeout=60)
        answer = client.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": "hi"}],
                                                max_tokens=4, seed=1)
        assert answer.choices[0].message.content
        log = (tmp_path / "gateway.log").read_text()
        assert "198.51.100.7" not in log, "the gateway acted on an address it was only told about"
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
