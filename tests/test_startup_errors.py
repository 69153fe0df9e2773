"""Whatever keeps `llorch gateway start`, `llorch node start` or `llorch demo` from starting (a port taken, a file
missing, unreadable or invalid) is one line on stderr saying what and what to do, exit code 2, no traceback.

Before, a taken HTTP port printed hypercorn's traceback (exit 1), a taken libp2p port was logged and the process
ran on with no libp2p address at all, and a demo key readable by others ended the demo in a traceback.
"""

from __future__ import annotations

import re
import socket
import subprocess
from pathlib import Path

import pytest

from llorch.gateway.localnet import llorch_command
from llorch.ledger.signing import SigningKey, write_key_file

LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ [A-Z]+ ")    # configure_logging's format


@pytest.fixture
def taken_port():
    """A port on 127.0.0.1 that something else is listening on."""
    with socket.socket() as holder:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield holder.getsockname()[1]


def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(llorch_command() + args, cwd=cwd, capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL)


def the_one_error_line(result: subprocess.CompletedProcess) -> str:
    """Exit 2, no traceback, and exactly one line on stderr that is not a log line: the error. Returns it."""
    output = result.stdout + result.stderr
    assert "Traceback" not in output, output[-3000:]
    assert result.returncode == 2, (result.returncode, output[-3000:])
    lines = [line for line in result.stderr.splitlines() if line.strip() and not LOG_LINE.match(line)]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-3000:]
    return lines[0]


def gateway_config(directory: Path, **fields) -> Path:
    if not (directory / "gateway.key").exists():
        write_key_file(directory / "gateway.key", SigningKey.generate())
    values = {"key_file": "gateway.key", "db_path": "gateway.sqlite", "http_port": 0,
              "p2p_listen_addr": "/ip4/127.0.0.1/tcp/0", **fields}
    config = directory / "gateway.toml"
    config.write_text("[gateway]\n" + "".join(f"{name} = {value!r}\n".replace("'", '"')
                                              for name, value in values.items()))
    return config


def node_config(directory: Path, **fields) -> Path:
    if not (directory / "node.key").exists():
        write_key_file(directory / "node.key", SigningKey.generate())
    values = {"key_file": "node.key", "ledger_path": "node.sqlite", "bootstrap": [],
              "trusted_gateways": [SigningKey.generate().peer_id], "engine": "echo",
              "listen_addr": "/ip4/127.0.0.1/tcp/0", **fields}
    config = directory / "node.toml"
    config.write_text("[node]\n" + "".join(f"{name} = {value!r}\n".replace("'", '"')
                                           for name, value in values.items()))
    return config


def test_gateway_with_its_http_port_taken(tmp_path, taken_port):
    line = the_one_error_line(run(["gateway", "start", "--config",
                                   str(gateway_config(tmp_path, http_port=taken_port))], tmp_path))
    assert f"127.0.0.1:{taken_port}" in line and "in use" in line and "gateway.http_port" in line, line


def test_gateway_with_its_libp2p_port_taken(tmp_path, taken_port):
    config = gateway_config(tmp_path, p2p_listen_addr=f"/ip4/127.0.0.1/tcp/{taken_port}")
    line = the_one_error_line(run(["gateway", "start", "--config", str(config)], tmp_path))
    assert f"/ip4/127.0.0.1/tcp/{taken_port}" in line and "in use" in line, line
    assert "gateway.p2p_listen_addr" in line, line


@pytest.mark.parametrize("damage, expected", [
    ("no config", "does not exist"),
    ("config not TOML", "not valid TOML"),
    ("key missing", "llorch keys new"),
    ("key readable by others", "chmod 600"),
    ("database directory missing", "cannot open"),
])
def test_gateway_with_a_file_it_cannot_use(tmp_path, damage, expected):
    config = gateway_config(tmp_path, db_path="missing/gateway.sqlite" if "database" in damage else "gateway.sqlite")
    if damage == "no config":
        config.unlink()
    elif damage == "config not TOML":
        config.write_text("[gateway\nkey_file = 1\n")
    elif damage == "key missing":
        (tmp_path / "gateway.key").unlink()
    elif damage == "key readable by others":
        (tmp_path / "gateway.key").chmod(0o644)
    line = the_one_error_line(run(["gateway", "start", "--config", str(config)], tmp_path))
    assert expected in line, line


def test_node_with_its_libp2p_port_taken(tmp_path, taken_port):
    config = node_config(tmp_path, listen_addr=f"/ip4/127.0.0.1/tcp/{taken_port}")
    line = the_one_error_line(run(["node", "start", "--config", str(config)], tmp_path))
    assert f"/ip4/127.0.0.1/tcp/{taken_port}" in line and "in use" in line and "node.listen_addr" in line, line


@pytest.mark.parametrize("damage, expected", [
    ("model not fetched", "llorch models fetch"),
    ("unknown config key", "unknown keys"),
    ("listen address not a multiaddr", "node.listen_addr"),
    ("key missing", "llorch keys new"),
])
def test_node_with_a_file_it_cannot_use(tmp_path, damage, expected):
    fields = {"engine": "llama.cpp", "model_cache_dir": "empty-cache"} if damage == "model not fetched" else {}
    if damage == "unknown config key":
        fields["slot"] = 2
    if damage == "listen address not a multiaddr":
        fields["listen_addr"] = "127.0.0.1:4101"
    config = node_config(tmp_path, **fields)
    (tmp_path / "empty-cache").mkdir()
    if damage == "key missing":
        (tmp_path / "node.key").unlink()
    line = the_one_error_line(run(["node", "start", "--config", str(config)], tmp_path))
    assert expected in line, line


def test_demo_with_its_http_port_taken(tmp_path, taken_port):
    line = the_one_error_line(run(["demo", "--dir", str(tmp_path / "demo"), "--http-port", str(taken_port)],
                                  tmp_path))
    assert f"{taken_port}" in line and "in use" in line and "--http-port" in line, line
    assert not (tmp_path / "demo" / "gateway.log").exists(), "nothing was started"


def test_demo_with_a_key_readable_by_others(tmp_path):
    (tmp_path / "demo").mkdir()
    write_key_file(tmp_path / "demo" / "gateway.key", SigningKey.generate())
    (tmp_path / "demo" / "gateway.key").chmod(0o644)
    line = the_one_error_line(run(["demo", "--dir", str(tmp_path / "demo"), "--http-port", "0"], tmp_path))
    assert "chmod 600" in line, line


def test_debug_shows_the_traceback(tmp_path, taken_port):
    result = run(["gateway", "start", "--debug", "--config", str(gateway_config(tmp_path, http_port=taken_port))],
                 tmp_path)
    assert result.returncode == 2 and "Traceback" in result.stderr, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1].startswith("error: "), result.stderr[-3000:]


def test_node_with_a_model_its_memory_cannot_hold(tmp_path):
    """The model needs more than node.memory_max_bytes (or what the machine has): refused at start, one line naming
    the memory it needs, before any engine is loaded."""
    config = node_config(tmp_path, engine="llama.cpp", slots=2, memory_max_bytes=100_000_000)
    line = the_one_error_line(run(["node", "start", "--config", str(config)], tmp_path))
    assert "needs about" in line and "GiB" in line and "2 slot(s)" in line and "node.memory_max_bytes" in line, line


def test_node_with_two_models_that_fit_alone_but_not_together(tmp_path, model_path):
    """Two models from the node's kept signed catalog, each within node.memory_max_bytes alone: together they are
    refused at start, one line naming what each needs."""
    from dataclasses import replace

    from llorch.inference import catalog, memory, metadata
    from llorch.node.catalog import keep
    from llorch.node.wire.catalog import SignedCatalog

    gateway = SigningKey.generate()
    default = catalog.lookup(catalog.DEFAULT_MODEL_ID)
    copy = replace(default, id="smollm2-copy", file_name="smollm2-copy.gguf", parts=(), package="",
                   urls=("https://models.example/smollm2-copy.gguf",))
    cache = tmp_path / "cache"
    cache.mkdir()
    for entry in (default, copy):
        (cache / entry.file_name).symlink_to(model_path)
    keep(tmp_path / "node.catalog", SignedCatalog.of(gateway.public_key, 7, 1, [default, copy]).seal(gateway))
    one = memory.memory_need(model_path, metadata.read_metadata(model_path), 2048, 1).total_bytes
    config = node_config(tmp_path, engine="llama.cpp", models=[default.id, copy.id], model_cache_dir="cache",
                         catalog_file="node.catalog", trusted_gateways=[gateway.peer_id],
                         memory_max_bytes=one * 3 // 2)
    line = the_one_error_line(run(["node", "start", "--config", str(config)], tmp_path))
    assert f"{default.id} needs about" in line and f"and {copy.id} needs about" in line, line
    assert "node.memory_max_bytes" in line, line
