"""A gateway restart nobody notices: the gateway is SIGKILLed and started again on the same key, database and ports;
every node reconnects and is placed on, and a customer's request is served, within 5 s of the gateway coming up.
Before: nodes redialled every 2 s into py-libp2p's negative dial cache (a peer whose dial failed once is refused for
60 s), so providers were back after 41-60 s and /healthz said 200 with 0 providers meanwhile. Nodes run the echo
engine (test-only): this is about connections. bench/gateway_restart.py measures 10 restarts."""

from __future__ import annotations

import time

import httpx
import pytest

from llorch.gateway.localnet import LocalNetwork
from tests.helpers import MODEL_ID

pytestmark = pytest.mark.e2e

RESTARTS = 2
BACK_WITHIN_S = 5.0


def ready_and_served(net: LocalNetwork, providers: int, deadline_s: float) -> float:
    """Seconds until /healthz is ready with ``providers`` and a request is served (polling; fails at the
    deadline)."""
    started = time.monotonic()
    while True:
        elapsed = time.monotonic() - started
        assert elapsed < deadline_s, f"not back within {deadline_s} s; see {net.workdir}"
        try:
            health = httpx.get(f"{net.http_url}/healthz", timeout=2)
            if health.status_code == 200 and health.json()["providers"] >= providers:
                answer = httpx.post(f"{net.base_url}/chat/completions", timeout=10,
                                    headers={"Authorization": f"Bearer {net.api_key}"},
                                    json={"model": MODEL_ID, "messages": [{"role": "user", "content": "back?"}],
                                          "max_tokens": 2})
                if answer.status_code == 200:
                    return time.monotonic() - started
        except httpx.HTTPError:
            pass
        time.sleep(0.05)


def test_after_a_gateway_is_killed_and_restarted_every_node_is_back_within_5_s(tmp_path):
    net = LocalNetwork(tmp_path / "net")
    try:
        net.start_gateway()
        for name in ("a", "b"):
            net.start_node(name, extra='engine = "echo"\n')
        net.wait_for_providers(2)
        seconds = []
        for _ in range(RESTARTS):
            net.restart_gateway()
            seconds.append(ready_and_served(net, 2, 30))
        print(f"\nseconds from the gateway up to both providers placed on: {[round(s, 2) for s in seconds]}")
        assert max(seconds) <= BACK_WITHIN_S, seconds
        for name in ("a", "b"):          # quiet while the gateway is away: a line on loss and one on return
            log = (net.workdir / f"{name}.log").read_text()
            assert log.count("recently failed all addresses") == 0
            assert log.count("bootstrap dial") + log.count("gateway") <= 6 * RESTARTS + 4, log[-3000:]
    finally:
        net.stop()
