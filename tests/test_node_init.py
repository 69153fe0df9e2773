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


def providers_of(net: LocalNetwork) -> list[tuple[str, str]]:
    return [(p["status"], p["geo"]["country"]) for p in json.loads(net.cli("gateway", "providers", "list",
                                                                            "--config", "gateway.toml"))]


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
        assert providers_of(net) == [("pending", "FR")]
        document = tomllib.loads((tmp_path / "config" / "llorch" / "node.toml").read_text())["node"]
        gateway_peer = net.gateway.state()["peer_id"]
        assert document["trusted_gateways"] == [gateway_peer]
        assert document["bootstrap"][0].startswith("/ip4/127.0.0.1/tcp/")
        assert document["bootstrap"][0].endswith(f"/p2p/{gateway_peer}")
        printed = next(line.split() for line in done.stderr.splitlines()   # the command it tells you to pass on
                       if line.strip().startswith("llorch gateway providers approve"))
        assert printed[4:] == [listed[0]["provider_id"], "--config", "<their", "gateway.toml>"]
        net.cli(*printed[1:5], "--config", "gateway.toml")                # what the operator runs, as printed
        assert providers_of(net) == [("approved", "FR")]
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


def test_init_takes_its_answers_from_a_pipe_and_registers_nothing_it_did_not_ask(tmp_path, model_path):
    """`echo DE | llorch node init ...` used to fail ("--country must be a two-letter code") though no --country
    was given, and init registered an SLA (1000 ms, 99%) and a region it never asked about or measured."""
    piped = subprocess.run(llorch_command() + ["node", "init", "--gateway", GATEWAY_MULTIADDR], cwd=tmp_path,
                           env=environment(tmp_path), input="DE\n", capture_output=True, text=True, timeout=300)
    assert piped.returncode == 0, piped.stderr[-3000:]
    document = tomllib.loads((tmp_path / "config" / "llorch" / "node.toml").read_text())["node"]
    proposed = int(piped.stderr.split("proposed SLA: ")[1].split(" ms")[0])       # from a run measured here
    measured = [int(t) for t in piped.stderr.split("time to first token here: ")[1].split(";")[0]
                .replace(" ms", "").split(", ")]
    assert len(measured) == 3 and proposed == -(-(2 * max(measured) + 250) // 100) * 100
    assert (document["country"], document["region"], document["sla_ttft_ms"], document["sla_uptime_ppm"]) == \
        ("DE", "eu-central", proposed, 950_000)
    assert (document["price_in_per_1m"], document["price_out_per_1m"]) == (100_000, 200_000)
    assert 0 < document["admin_port"] < 65536
    assert "0.10 EUR / 0.20 EUR per 1M tokens" in piped.stderr           # what a person reads is in EUR

    answers = "fr\nParis lab\n0.5\n1.25\n1500\n90\n8599\n"                  # every question answered
    again = subprocess.run(llorch_command() + ["node", "init", "--gateway", GATEWAY_MULTIADDR, "--force"],
                           cwd=tmp_path, env=environment(tmp_path), input=answers, capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    document = tomllib.loads((tmp_path / "config" / "llorch" / "node.toml").read_text())["node"]
    assert (document["country"], document["region"], document["price_in_per_1m"], document["price_out_per_1m"],
            document["sla_ttft_ms"], document["sla_uptime_ppm"], document["admin_port"]) == \
        ("FR", "Paris lab", 500_000, 1_250_000, 1500, 900_000, 8599)
    wrong = subprocess.run(llorch_command() + ["node", "init", "--gateway", GATEWAY_MULTIADDR, "--force",
                                               "--sla-ttft-ms", "100"],
                           cwd=tmp_path, env=environment(tmp_path), input="DE\n\n0.1234567\n", capture_output=True,
                           text=True, timeout=300)
    assert wrong.returncode == 2 and "--price-in '0.1234567' must be 0..1000000 EUR with at most 6 decimals" in \
        wrong.stderr and "Traceback" not in wrong.stderr


def test_init_says_what_to_open_when_the_gateways_libp2p_port_is_closed(tmp_path):
    import http.server
    import socket
    import threading

    with socket.socket() as closed:                     # a port nothing listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]

    class Gateway(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = json.dumps({"peer_id": GATEWAY_MULTIADDR.rsplit("/", 1)[1], "p2p_port": port}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Gateway)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        done = llorch(tmp_path, "node", "init", "--gateway", f"http://127.0.0.1:{server.server_address[1]}",
                      "--country", "DE", "--non-interactive")
    finally:
        server.shutdown()
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert f"cannot reach the gateway's libp2p port: TCP 127.0.0.1:{port}" in done.stderr
    assert f"let TCP port {port} through" in done.stderr and "nothing was registered" in done.stderr
    assert not (tmp_path / "config" / "llorch" / "node.toml").exists()
