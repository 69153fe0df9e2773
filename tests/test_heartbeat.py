"""Attestations on change plus a slow heartbeat (node.attestation_interval_ms, 30 s by default), and a provider
that dies is out of placement at once anyway: the gateway takes a provider out when its last libp2p connection to
it closes (a killed process's sockets close with it), until the provider attests again (a node re-announces within a
second of every reconnection). Before: with a 30 s heartbeat a killed node stayed placeable for its attestation's
whole life (3 intervals, 90 s), and customers' requests were tried on it first. Real gateway and node processes;
the nodes run the echo engine (test-only): this is about connections and gossip, not inference."""

from __future__ import annotations

import signal
import sqlite3
import time

import httpx
import pytest

from llorch.gateway.localnet import LocalNetwork
from llorch.ledger.signing import public_key_of_peer_id
from llorch.node import limits
from tests.helpers import MODEL_ID

pytestmark = pytest.mark.e2e

OUT_WITHIN_S = 2.0          # a killed node is out of placement this soon (the gateway's libp2p notices the close)
BACK_WITHIN_S = 5.0         # a restarted node is placed on again this soon


def providers_now(net: LocalNetwork) -> int:
    return httpx.get(f"{net.http_url}/healthz", timeout=5).json()["providers"]


def seconds_until(net: LocalNetwork, providers: int, deadline_s: float) -> float:
    started = time.monotonic()
    while providers_now(net) != providers:
        assert time.monotonic() - started < deadline_s, f"not {providers} providers within {deadline_s} s"
        time.sleep(0.05)
    return time.monotonic() - started


def test_a_killed_node_is_out_of_placement_at_once_and_back_when_restarted(tmp_path):
    assert limits.ATTESTATION_INTERVAL_MS_DEFAULT >= 30_000        # the slow heartbeat this test is about
    net = LocalNetwork(tmp_path / "net")
    try:
        net.start_gateway()
        states = {name: net.start_node(name, extra='engine = "echo"\n', attestation_interval_ms=None)
                  for name in ("a", "b")}
        net.wait_for_providers(2)
        killed_at_ms = int(time.time() * 1000)
        next(p for p in net.nodes if p.name == "b").popen.send_signal(signal.SIGKILL)
        out = seconds_until(net, 1, 30)
        served = 0
        for seed in range(8):
            answer = httpx.post(f"{net.base_url}/chat/completions", timeout=30,
                                headers={"Authorization": f"Bearer {net.api_key}"},
                                json={"model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}],
                                      "max_tokens": 2, "seed": seed})
            served += answer.status_code == 200
        with sqlite3.connect(net.workdir / "gateway.sqlite") as db:
            tried_dead = db.execute("SELECT COUNT(*) FROM tickets WHERE provider_key = ? AND issued_ms > ?",
                                    (public_key_of_peer_id(states["b"]["peer_id"]), killed_at_ms)).fetchone()[0]
        net.restart_node("b")
        back = seconds_until(net, 2, 30)
        print(f"\nkilled node out of placement after {out:.2f} s; restarted, placed on again after {back:.2f} s")
        assert out <= OUT_WITHIN_S, out
        assert served == 8 and tried_dead == 0, (served, tried_dead)
        assert back <= BACK_WITHIN_S, back
    finally:
        net.stop()
