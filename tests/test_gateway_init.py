"""`llorch gateway init`: an operator's gateway.toml without hand-written TOML (one question: the public host
name), from which `gateway start` runs and whose join tokens a home lab can use as they are."""

from __future__ import annotations

import json
import stat
import subprocess
import time
import tomllib
import urllib.request

from llorch.gateway.config import load_gateway_config
from llorch.gateway.localnet import free_port, llorch_command
from llorch.node.wire.invitation import parse_token
from tests.test_node_init import environment


def run(home, *args: str, stdin: str = "", timeout: float = 120):
    return subprocess.run(llorch_command() + list(args), cwd=home, env=environment(home), input=stdin,
                          capture_output=True, text=True, timeout=timeout)


def test_gateway_init_asks_only_the_host_and_writes_a_config_that_starts(tmp_path, model_path):
    http_port, p2p_port = free_port(), free_port()
    done = run(tmp_path, "gateway", "init", "--http-port", str(http_port), "--p2p-port", str(p2p_port),
               stdin="127.0.0.1\n")
    assert done.returncode == 0, done.stderr
    path = tmp_path / "config" / "llorch" / "gateway.toml"
    assert done.stdout.strip() == str(path)
    text = path.read_text()
    assert text.count("#") >= 10 and f"TCP {p2p_port}: libp2p" in text      # says which ports must be open
    config = load_gateway_config(path)
    assert config.public_url == f"http://127.0.0.1:{http_port}" and config.http_host == "0.0.0.0"
    assert config.db_path == tmp_path / "data" / "llorch" / "gateway.sqlite"
    assert stat.S_IMODE(config.key_file.stat().st_mode) == 0o600
    assert tomllib.loads(text)["gateway"]["p2p_listen_addr"] == f"/ip4/0.0.0.0/tcp/{p2p_port}"
    again = run(tmp_path, "gateway", "init", "--host", "gw.example.org")
    assert again.returncode == 2 and "--force" in again.stderr and "Traceback" not in again.stderr

    gateway = subprocess.Popen(llorch_command() + ["gateway", "start", "--config", str(path)], cwd=tmp_path,
                               env=environment(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{config.public_url}/livez", timeout=2):
                    break
            except OSError:
                assert time.monotonic() < deadline and gateway.poll() is None, "the gateway did not come up"
                time.sleep(0.2)
        token = run(tmp_path, "gateway", "providers", "invite", "--config", str(path)).stdout.strip()
        assert parse_token(token).gateway_url == config.public_url          # the URL the node will use
        node_home = tmp_path / "lab"
        node_home.mkdir()
        joined = run(node_home, "node", "init", "--token", token, "--port", "0", "--sla-ttft-ms", "1500",
                     stdin="NL\n", timeout=300)
        assert joined.returncode == 0, joined.stderr[-3000:]
        assert "approved" in joined.stderr
        listed = json.loads(run(tmp_path, "gateway", "providers", "list", "--config", str(path)).stdout)
        assert [(p["status"], p["geo"]["country"], p["geo"]["region"]) for p in listed] == \
            [("approved", "NL", "eu-west")]
    finally:
        gateway.terminate()
        assert gateway.wait(30) == 0, gateway.stderr.read()[-2000:]


def test_gateway_init_refuses_what_it_cannot_use_in_one_line(tmp_path):
    for args, stdin, message in [(["--non-interactive"], "", "--host is needed"),
                                 ([], "", "--host is needed"),
                                 (["--host", "not a host!"], "", "is not a host name"),
                                 (["--host", "gw.example.org", "--p2p-port", "70000"], "", "--p2p-port must be")]:
        result = run(tmp_path, "gateway", "init", *args, stdin=stdin)
        assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr, \
            (args, result.stderr)
    assert not (tmp_path / "config" / "llorch" / "gateway.toml").exists()
