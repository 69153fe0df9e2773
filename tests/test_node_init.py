"""`llorch node init` as a new provider runs it: no hand-written TOML, and `llorch node start` with no flags."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import tomllib

from llorch.gateway.localnet import LocalNetwork, llorch_command
from llorch.node.config import NodeConfig

GATEWAY_MULTIADDR = "/ip4/203.0.113.1/tcp/4001/p2p/12D3KooWRndVhVZPCiQwHBBBdg769GyrPUW13zxwqQyf9r3ANaba"


def environment(tmp_path) -> dict:
    return {**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "config"), "XDG_DATA_HOME": str(tmp_path / "data")}


def llorch(tmp_path, *args, timeout=120):
    return subprocess.run(llorch_command() + list(args), cwd=tmp_path, env=environment(tmp_path),
                          capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def test_init_with_a_multiaddr_writes_a_working_commented_config(tmp_path, model_path):
    done = llorch(tmp_path, "node", "init", "--gateway", GATEWAY_MULTIADDR, "--country", "de", "--non-interactive")
    assert done.returncode == 0, done.stderr
    path = tmp_path / "config" / "llorch" / "node.toml"
    assert done.stdout.strip() == str(path)
    text = path.read_text()
    assert text.count("#") >= 5                                      # commented for a human
    document = tomllib.loads(text)["node"]
    config = NodeConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in document.items()})
    assert config.trusted_gateways == ("12D3KooWRndVhVZPCiQwHBBBdg769GyrPUW13zxwqQyf9r3ANaba",)
    assert config.bootstrap == (GATEWAY_MULTIADDR,) and config.country == "DE"
    assert config.slots * config.threads_per_slot <= len(os.sched_getaffinity(0))
    key = tmp_path / "config" / "llorch" / "node.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    info = llorch(tmp_path, "node", "info")                          # no --config: it finds node.toml
    assert info.returncode == 0, info.stderr
    assert json.loads(info.stdout)["geo"]["country"] == "DE"
    again = llorch(tmp_path, "node", "init", "--gateway", GATEWAY_MULTIADDR, "--country", "DE", "--non-interactive")
    assert again.returncode == 2 and "--force" in again.stderr and "Traceback" not in again.stderr


def test_init_refuses_what_it_cannot_use_in_one_line(tmp_path):
    for args, message in [(["--gateway", "gateway.example", "--country", "DE"], "neither a multiaddr"),
                          (["--gateway", GATEWAY_MULTIADDR], "--country"),
                          (["--gateway", GATEWAY_MULTIADDR, "--country", "DE", "--slots", "64", "--threads", "64"],
                           "cores")]:
        result = llorch(tmp_path, "node", "init", "--non-interactive", *args)
        assert result.returncode == 2 and message in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr
    assert not (tmp_path / "config" / "llorch" / "node.toml").exists()
    missing = llorch(tmp_path, "node", "start")
    assert missing.returncode == 2 and "llorch node init" in missing.stderr


def test_init_with_the_gateways_url_registers_and_node_start_needs_no_flags(tmp_path, model_path):
    net = LocalNetwork(tmp_path / "net")
    try:
        net.start_gateway()
        net.cli("gateway", "models", "add", "--config", "gateway.toml", "--id", "too-big-q4", "--kind", "base",
                "--sha256", "ab" * 32, "--size", str(2**37), "--context-tokens", "8192", "--license", "MIT",
                "--url", "https://models.example/too-big.gguf", "--memory-min", str(200 * 2**30))
        refused = llorch(tmp_path, "node", "init", "--gateway", net.http_url, "--country", "FR", "--port", "0",
                         "--non-interactive", "--model", "too-big-q4")
        assert refused.returncode == 2 and "--model too-big-q4 needs about 200.0 GiB" in refused.stderr
        assert not (tmp_path / "config" / "llorch" / "node.toml").exists()
        done = llorch(tmp_path, "node", "init", "--gateway", net.http_url, "--country", "FR", "--port", "0",
                      "--non-interactive")
        assert done.returncode == 0, done.stderr
        assert "registered" in done.stderr
        assert "models in the gateway catalog" in done.stderr           # the gateway's signed one, with what fits
        shown = {line.split()[0]: line for line in done.stderr.splitlines() if line.startswith("  ")}
        assert "needs ~" in shown["too-big-q4"] and shown["smollm2-135m-instruct-q4_1"].endswith("fits")
        kept = tmp_path / "data" / "llorch" / "ledger.sqlite.catalog"
        assert kept.is_file()                                        # node start serves from it at once
        listed = json.loads(net.cli("gateway", "providers", "list", "--config", "gateway.toml"))
        assert [(p["status"], p["geo"]["country"]) for p in listed] == [("pending", "FR")]
        document = tomllib.loads((tmp_path / "config" / "llorch" / "node.toml").read_text())["node"]
        gateway_peer = net.gateway.state()["peer_id"]
        assert document["trusted_gateways"] == [gateway_peer]
        assert document["bootstrap"][0].startswith("/ip4/127.0.0.1/tcp/")
        assert document["bootstrap"][0].endswith(f"/p2p/{gateway_peer}")
        net.cli("gateway", "providers", "approve", listed[0]["provider_id"], "--config", "gateway.toml")
        node = subprocess.Popen(llorch_command() + ["node", "start"], cwd=tmp_path, env=environment(tmp_path),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            net.wait_for_providers(1, timeout_s=90)                 # it found node.toml, dialled and attested
        finally:
            node.terminate()
            assert node.wait(30) == 0, node.stderr.read()[-2000:]
    finally:
        net.stop()


def test_gpu_layers_on_a_build_without_a_gpu_backend_is_one_line_at_start(tmp_path, model_path):
    """CPU stays the default; asking for GPU offload on a CPU-only llama.cpp build is refused at start (one line,
    exit 2, saying how to build for CUDA or Metal) instead of silently running on the CPU in a GPU class."""
    from llorch.inference.engine import build_fingerprint

    assert "gpu-layers" not in build_fingerprint(2048, 512)
    done = llorch(tmp_path, "node", "init", "--gateway", GATEWAY_MULTIADDR, "--country", "DE", "--non-interactive")
    assert done.returncode == 0, done.stderr
    config = tmp_path / "config" / "llorch" / "node.toml"
    config.write_text(config.read_text().replace("slots = ", "gpu_layers = 8\nslots = "))
    for command in (["node", "info"], ["node", "start"]):
        refused = llorch(tmp_path, *command)
        assert refused.returncode == 2, (command, refused.stderr[-2000:])
        assert "GGML_CUDA" in refused.stderr and "Traceback" not in refused.stderr, refused.stderr[-2000:]
