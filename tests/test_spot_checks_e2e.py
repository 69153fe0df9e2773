"""Spot-checks never accuse an honest provider (docs/verification.md §3): two real nodes running the real default
model (one llama.cpp thread each), the gateway re-running every request of a consenting tenant on the other node,
over varied prompts, seeds and sampling (greedy and temperature > 0, top_p, stop strings, chat and raw
completions). Every check must find the two runs byte-identical: zero mismatches, no evidence, nobody suspended.
bench/spot_checks_honest.py runs the long version (300+ requests) with these helpers."""

from __future__ import annotations

import json
import sqlite3
import time

import httpx
import pytest

from llorch.gateway.localnet import LocalNetwork
from tests.helpers import MODEL_ID

pytestmark = pytest.mark.e2e

CHECK_TIMEOUT_S = 120.0

PROMPTS = [
    "Name a prime number.", "Write one sentence about the sea.", "What is the capital of France?",
    "Give me three words that rhyme with cat.", "Tell me a short story about a lighthouse keeper.",
    "Explain what a CPU does in one sentence.", "List two colours of the rainbow.",
    "How many legs does a spider have?", "Say hello in German.", "Describe a cloud to a child.",
    "What is 12 plus 30?", "Suggest a name for a grey cat.", "Why is the sky blue?",
    "Write a haiku about autumn leaves.", "What do bees make?",
]
RAW_PROMPTS = ["Once upon a time, in a small village,", "The three primary colours are", "def fibonacci(n):"]
TEMPERATURES = [0.0, 0.7, 1.0, 1.3]
TOP_PS = [None, 0.9, 0.5]


def request_of(n: int) -> tuple[str, dict]:
    """The n-th request of the honest sweep: (path, body), varying prompt, seed, temperature, top_p, size, stop and
    the endpoint, deterministically in n."""
    sampling = {"model": MODEL_ID, "seed": 1_000 + 7 * n, "temperature": TEMPERATURES[n % len(TEMPERATURES)],
                "max_tokens": 4 + n % 13}
    if TOP_PS[n % len(TOP_PS)] is not None:
        sampling["top_p"] = TOP_PS[n % len(TOP_PS)]
    if n % 5 == 4:
        sampling["stop"] = ["."]
    if n % 6 == 5:
        return "/completions", {**sampling, "prompt": RAW_PROMPTS[n % len(RAW_PROMPTS)]}
    messages = [{"role": "user", "content": PROMPTS[n % len(PROMPTS)]}]
    if n % 4 == 1:
        messages.insert(0, {"role": "system", "content": "Answer briefly."})
    return "/chat/completions", {**sampling, "messages": messages}


def start_honest_network(workdir) -> tuple[LocalNetwork, str]:
    """A gateway that spot-checks every request, two real single-thread nodes, and a tenant that allows re-runs:
    (the network, the tenant's API key)."""
    net = LocalNetwork(workdir)
    net.start_gateway(extra="spot_check_rate_ppm = 1000000\n")
    net.start_node("n1", threads=1)
    net.start_node("n2", threads=1)
    net.wait_for_providers(2)
    api_key = net.cli("gateway", "tenants", "add", "honest", "--spot-checks", "--config",
                      str(net.workdir / "gateway.toml")).strip()
    return net, api_key


def gateway_rows(net: LocalNetwork, sql: str, params: tuple = ()) -> list:
    with sqlite3.connect(net.workdir / "gateway.sqlite") as db:
        return db.execute(sql, params).fetchall()


def wait_for_check(net: LocalNetwork, request_id: str) -> str:
    """The verdict the spot-check of ``request_id`` recorded for the provider that served it; raises if none came
    (the re-run found no other provider, or failed: the gateway's log says why)."""
    deadline = time.monotonic() + CHECK_TIMEOUT_S
    while time.monotonic() < deadline:
        rows = gateway_rows(net, "SELECT verdict FROM spot_checks WHERE request_id = ?", (request_id,))
        if rows:
            return rows[0][0]
        net.report_deaths()
        time.sleep(0.05)
    raise AssertionError(f"no spot-check of {request_id} within {CHECK_TIMEOUT_S:g} s; see {net.gateway.log_path}")


def run_honest_requests(net: LocalNetwork, api_key: str, count: int, first: int = 0) -> list[tuple[str, str]]:
    """``count`` requests one after another, each waited for until its spot-check is recorded (so the re-run finds
    the other node's single slot free): [(request id, verdict)]."""
    results = []
    with httpx.Client(base_url=net.base_url, headers={"Authorization": f"Bearer {api_key}"}, timeout=300) as http:
        for n in range(first, first + count):
            path, body = request_of(n)
            response = http.post(path, json=body)
            assert response.status_code == 200, (n, response.status_code, response.text)
            request_id = response.json()["id"]
            results.append((request_id, wait_for_check(net, request_id)))
    return results


def honest_summary(net: LocalNetwork) -> dict:
    """What the gateway's books say about the checks: verdict counts, evidence rows, provider statuses."""
    verdicts = dict(gateway_rows(net, "SELECT verdict, COUNT(*) FROM spot_checks GROUP BY verdict"))
    return {"verdicts": verdicts, "evidence": gateway_rows(net, "SELECT COUNT(*) FROM evidence")[0][0],
            "statuses": sorted(s for (s,) in gateway_rows(net, "SELECT status FROM providers")),
            "spot_check_legs": gateway_rows(net, "SELECT COUNT(*) FROM postings WHERE leg = 'spot_check'")[0][0]}


def test_two_honest_llama_cpp_providers_never_disagree_at_a_100_percent_spot_check_rate(tmp_path, model_path):
    net, api_key = start_honest_network(tmp_path)
    try:
        results = run_honest_requests(net, api_key, 20)
        summary = honest_summary(net)
    finally:
        net.stop()
    assert [verdict for _, verdict in results] == ["clean"] * 20
    # both runs of every request judged clean (the customer's provider and the re-run's), nothing else
    assert summary == {"verdicts": {"clean": 40}, "evidence": 0, "statuses": ["approved", "approved"],
                       "spot_check_legs": 20}, summary


def test_the_gateways_probes_to_two_honest_llama_cpp_providers_agree_and_count_as_answered(tmp_path, model_path):
    """The probe loop of `llorch gateway start` (one probe a second on average here) with no customer traffic: every
    probe input is run by both nodes and they agree; `providers sla` counts the probes as sent and answered."""
    net = LocalNetwork(tmp_path, probe_interval_ms=1000)
    try:
        net.start_gateway()
        net.start_node("n1", threads=1)
        net.start_node("n2", threads=1)
        net.wait_for_providers(2)
        deadline = time.monotonic() + CHECK_TIMEOUT_S
        while gateway_rows(net, "SELECT COUNT(*) FROM probe_runs WHERE verdict = 'clean'")[0][0] < 6:
            assert time.monotonic() < deadline, f"fewer than 3 probes settled; see {net.gateway.log_path}"
            net.report_deaths()
            time.sleep(0.2)
        sla = json.loads(net.cli("gateway", "providers", "sla", "--config", str(net.workdir / "gateway.toml")))
        verdicts = dict(gateway_rows(net, "SELECT verdict, COUNT(*) FROM probe_runs GROUP BY verdict"))
        evidence = gateway_rows(net, "SELECT COUNT(*) FROM evidence")[0][0]
    finally:
        net.stop()
    assert set(verdicts) <= {"clean", "pending"} and evidence == 0, (verdicts, evidence)
    assert len(sla) == 2 and all(row["probes_sent"] >= 1 and row["uptime_ppm"] is not None for row in sla), sla
    assert all(row["probes_answered"] <= row["probes_sent"] for row in sla)
