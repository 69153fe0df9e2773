"""`llorch node status` against a running node: gateway connection, reachability, slots, ledger and today's work,
from the node's local admin endpoint (bound to 127.0.0.1 only)."""

from __future__ import annotations

import json
import subprocess
import time

import openai
import pytest

from llorch.gateway.localnet import LocalNetwork, llorch_command
from tests.helpers import MODEL_ID

pytestmark = pytest.mark.e2e


def test_node_status_reports_connection_reachability_ledger_and_today(tmp_path, model_path):
    net = LocalNetwork(tmp_path)
    try:
        net.start_gateway()
        state = net.start_node("lab", extra='engine = "echo"\nadmin_port = 0\n')
        net.wait_for_providers(1)
        assert state["admin_url"].startswith("http://127.0.0.1:")
        client = openai.OpenAI(base_url=net.base_url, api_key=net.api_key, max_retries=0, timeout=60)
        for seed in range(2):
            client.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": "hi"}],
                                           max_tokens=4, seed=seed)
        deadline = time.monotonic() + 30
        while True:          # the witness round that cosigns both receipts, and the gateway's answer since approval
            status = json.loads(net.cli("node", "status", "--config", "lab.toml", "--json"))
            cosigned = status["ledger"]["last_cosignature"]
            listing = status["gateways"][0]["listing"]
            if cosigned and cosigned["size"] == 2 and listing and listing["geo_certified"] or \
                    time.monotonic() > deadline:
                break
            time.sleep(0.5)
        gateway, = status["gateways"]
        assert (gateway["peer_id"], gateway["connected"]) == (net.gateway.state()["peer_id"], True)
        assert (listing["status"], listing["country"], listing["geo_certified"], listing["fork_detected_ms"]) == \
            ("approved", "DE", True, None)
        assert abs(listing["clock_offset_ms"]) <= listing["round_trip_ms"] // 2 + 50      # one machine, one clock
        assert status["warnings"] == [], status["warnings"]
        assert status["slots"]["total"] >= 1 and status["last_attestation"]["age_ms"] < 10_000
        assert status["ledger"]["entries"] == 2 and cosigned and cosigned["size"] == 2
        assert status["ledger"]["uncosigned_ms"] is None                 # the head is cosigned
        assert status["today"]["requests"] == 2 and status["today"]["tokens_out"] > 0
        assert all(addr.startswith("/ip4/127.0.0.1/") for addr in status["reachability"]["announced"])
        assert status["reachability"]["how"] == "direct"     # on one machine, its listen address is dialable
        text = net.cli("node", "status", "--config", "lab.toml")
        assert "connected" in text and "today (UTC): 2 requests" in text and "NOT CONNECTED" not in text
        assert "connected; approved, geo DE certified, not excluded, clock" in text and "to act on" not in text
        assert f"dashboard: {state['admin_url'].rstrip('/')}/" in text                  # where to look
        earned = f"{status['today']['earned_minor'] / 1e6:.6f}".rstrip("0")
        assert f" tokens, {earned.ljust(len(earned.split('.')[0]) + 3, '0')} EUR earned" in text, text
        assert "minor units" not in text                                  # a person reads the currency
        # The node's log: a line when the operator's decision changed, one per served request, quiet otherwise.
        log = (net.workdir / "lab.log").read_text()
        served = [line for line in log.splitlines() if " served chatcmpl-" in line]
        assert len(served) == 2 and all(" EUR" in line and "tokens in" in line for line in served), log[-3000:]
        assert "approved: placed on; geo claim DE certified" in log, log[-3000:]
        # `node status --json | head`: a reader that leaves early is no error and no traceback.
        reader_gone = subprocess.Popen(llorch_command() + ["node", "status", "--config", "lab.toml", "--json"],
                                       cwd=net.workdir, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        reader_gone.stdout.close()
        assert reader_gone.wait(60) == 0 and b"Traceback" not in reader_gone.stderr.read()
    finally:
        net.stop()
