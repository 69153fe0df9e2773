"""End to end, the catalog as an operator and a home lab use it: separate `llorch` processes, real libp2p on
loopback, real llama.cpp, real SQLite, the `openai` SDK as the customer, and the real `huggingface_hub` client
downloading from a local server that speaks the Hub's file protocol (tests/hub_server.py; this machine cannot reach
the Hub).

The node names two models: the default one (cached) and one no catalog lists yet. It serves the first and waits for
the second. The operator adds the second to the running gateway (`llorch gateway models add --hub ...`); the gateway
signs and publishes a new catalog version, the node takes it, downloads the file from the Hub, checks its sha256,
loads it beside the first, and serves both. Then the operator retires it: it is no longer placed, the node stops
offering it, and the receipt of the request it served still verifies.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import shutil
import time
import urllib.request

import httpx
import openai
import pytest

from llorch.gateway.localnet import LocalNetwork, llorch_command
from llorch.inference import catalog
from llorch.ledger.objects import Receipt
from tests.hub_server import HubFiles, HubServer

pytestmark = pytest.mark.e2e

DEFAULT = catalog.lookup(catalog.DEFAULT_MODEL_ID)
NEW_ID = "smollm2-hub-q4_1"
REPO, COMMIT, FILE = "HuggingFaceTB/SmolLM2-135M-Instruct-GGUF", "5f" * 20, "smollm2-135m-instruct.q4_1.gguf"
MESSAGES = [{"role": "user", "content": "Name a colour."}]


def node_status(network: LocalNetwork, name: str) -> dict:
    admin_url = (network.workdir / f"{name}.state.json")
    url = json.loads(admin_url.read_text())["admin_url"]
    with urllib.request.urlopen(f"{url}/status", timeout=5) as response:
        return json.loads(response.read())


def test_a_model_the_operator_adds_is_fetched_from_the_hub_and_served_then_retired(tmp_path, model_path,
                                                                                   monkeypatch):
    cache = tmp_path / "cache"
    cache.mkdir()
    shutil.copyfile(model_path, cache / DEFAULT.file_name)           # the default model, already fetched
    files = HubFiles(files={(REPO, COMMIT, FILE): model_path})
    with HubServer(files) as hub_url:
        monkeypatch.setenv("HF_ENDPOINT", hub_url)                    # the node's huggingface_hub asks this "Hub"
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
        monkeypatch.delenv("HF_TOKEN", raising=False)
        network = LocalNetwork(tmp_path / "net")
        try:
            network.start_gateway()
            network.start_node("lab", threads=1, extra=(
                f'models = ["{DEFAULT.id}", "{NEW_ID}"]\nmodel_cache_dir = "{cache}"\ncatalog_poll_ms = 500\n'))
            network.wait_for_providers(1)
            status = node_status(network, "lab")
            assert [(m["id"], m["serving"]) for m in status["models"]] == [(DEFAULT.id, True), (NEW_ID, False)]
            assert "waiting for a trusted gateway's catalog" in status["models"][1]["waiting"]
            client = openai.OpenAI(base_url=network.base_url, api_key=network.api_key, max_retries=0, timeout=120)
            with pytest.raises(openai.NotFoundError, match="does not exist"):
                client.chat.completions.create(model=NEW_ID, messages=MESSAGES, max_tokens=4)

            added_at = time.monotonic()
            network.cli("gateway", "models", "add", "--config", "gateway.toml", "--id", NEW_ID, "--kind",
                        "instruct", "--sha256", DEFAULT.sha256, "--size", str(model_path.stat().st_size),
                        "--context-tokens", "8192", "--license", "Apache-2.0", "--chat-format", "chatml",
                        "--hub", f"{REPO}@{COMMIT}:{FILE}", "--notes", "the default model's file, from a Hub repo")
            completion, deadline = None, time.monotonic() + 180
            while completion is None and time.monotonic() < deadline:
                try:
                    completion = client.chat.completions.create(model=NEW_ID, messages=MESSAGES, max_tokens=8,
                                                                seed=3)
                except (openai.NotFoundError, openai.APIStatusError) as exc:   # not yet offered by any provider
                    assert exc.status_code in (404, 503), exc
                    time.sleep(0.2)
            assert completion is not None, f"the new model was not served within 180 s; see {network.workdir}"
            print(f"\nmodels add → first request served by the node: {time.monotonic() - added_at:.1f} s "
                  f"(a {model_path.stat().st_size / 2**20:.0f} MiB download from the local hub server)")
            assert ("GET", f"/{REPO}/resolve/{COMMIT}/{FILE}", None) in files.requests      # really downloaded
            assert catalog.file_sha256(cache / FILE) == DEFAULT.sha256
            old = client.chat.completions.create(model=DEFAULT.id, messages=MESSAGES, max_tokens=4, seed=3)
            assert old.choices[0].message.content                           # both served, side by side
            headers = {"Authorization": f"Bearer {network.api_key}"}
            listed = httpx.get(f"{network.base_url}/models", headers=headers, timeout=10).json()["data"]
            assert {m["id"] for m in listed} == {DEFAULT.id, NEW_ID}
            assert next(m for m in listed if m["id"] == NEW_ID)["sha256"] == DEFAULT.sha256
            published = httpx.get(f"{network.base_url}/catalog", timeout=10).json()
            assert NEW_ID in [e["id"] for e in published["entries"]]
            status = node_status(network, "lab")
            assert all(m["serving"] for m in status["models"]) and status["catalog"]["version"] == \
                published["version"]

            network.cli("gateway", "models", "retire", NEW_ID, "--config", "gateway.toml")
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                try:
                    client.chat.completions.create(model=NEW_ID, messages=MESSAGES, max_tokens=4)
                    time.sleep(0.2)
                except openai.NotFoundError as exc:
                    assert "retired" in str(exc)
                    break
            else:
                raise AssertionError("a retired model was still placed 30 s after `models retire`")
            deadline = time.monotonic() + 30
            while node_status(network, "lab")["models"][1]["serving"] and time.monotonic() < deadline:
                time.sleep(0.2)
            assert "retired" in node_status(network, "lab")["models"][1]["waiting"]

            # The receipt of the request the retired model served still verifies: its signature, and the whole
            # ledger it is an entry of (the auditor's checks).
            proof = httpx.get(f"{network.http_url}/v2/receipts/{completion.id}", headers=headers, timeout=10)
            assert proof.status_code == 200, proof.text
            receipt = Receipt.from_envelope(base64.b64decode(proof.json()["receipt"]))
            assert receipt.model_id == NEW_ID and receipt.model_sha256.hex() == DEFAULT.sha256
            network.cli("ledger", "verify", "lab.ledger.sqlite")

            # And it can be re-executed from the gateway's signed catalog, where the retired entry stays.
            (tmp_path / "catalog.json").write_text(httpx.get(f"{network.base_url}/catalog", timeout=10).text)
            request = tmp_path / "request.json"
            request.write_text(json.dumps({"model": NEW_ID, "messages": MESSAGES, "max_tokens": 8, "seed": 3}))
            salt = completion.model_extra["llorch"]["prompt_salt"]
            replay = [*llorch_command(), "ledger", "replay", str(network.workdir / "lab.ledger.sqlite"),
                      "--request-id", completion.id, "--request", str(request), "--salt", salt]
            environment = {**os.environ, "LLORCH_MODEL_CACHE": str(cache)}
            without = subprocess.run(replay, capture_output=True, text=True, timeout=300, env=environment)
            assert without.returncode == 3 and "--catalog" in without.stderr, without.stderr
            matched = subprocess.run([*replay, "--catalog", str(tmp_path / "catalog.json")], capture_output=True,
                                     text=True, timeout=300, env=environment)
            assert matched.returncode == 0 and matched.stdout.startswith("MATCH"), matched.stdout + matched.stderr
        finally:
            network.stop()
