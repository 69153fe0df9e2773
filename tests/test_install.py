"""From "I have a spare box" to a node under systemd, with no checkout (docs/operating.md, "Install").

One wheel of this checkout is built as the docs say (`pip wheel --no-deps`) and installed the two ways the docs give:
plain `pip install` into a new virtualenv, and pipx (or uv) where one is installed. Each install then joins a running
gateway with a join token (`node init --token`, no operator step), serves a customer's request with `node start`, and
writes its unit with `node install-service`, from a directory outside the checkout, so what runs is the installed
package. The unit
`node install-service` writes is checked line by line and by `systemd-analyze verify` where systemd is installed.

pip resolves the dependencies for real; llama-cpp-python comes from pip's wheel cache (./dev built it), and
CMAKE_ARGS="-DGGML_NATIVE=OFF" is set so a cache miss still builds a portable llama.cpp (5-8 minutes).
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from llorch.gateway.localnet import LocalNetwork, free_port, llorch_command
from llorch.node import cli as node_cli
from llorch.node import install_service, limits
from llorch.node.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
GATEWAY_MULTIADDR = "/ip4/203.0.113.1/tcp/4001/p2p/12D3KooWRndVhVZPCiQwHBBBdg769GyrPUW13zxwqQyf9r3ANaba"
PORTABLE_BUILD = {"CMAKE_ARGS": "-DGGML_NATIVE=OFF"}
INSTALL_TIMEOUT_S = 1500          # a pip cache miss compiles llama.cpp: 5-8 minutes on two busy cores, with room
COMMAND_TIMEOUT_S = 120


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel of this checkout's files (tracked and new; not what .gitignore leaves out), built as the docs say.
    Built from a copy, so no build/ or egg-info lands in the checkout."""
    source = tmp_path_factory.mktemp("source")
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, check=True).stdout
    for name in filter(None, listed.decode().split("\0")):
        if (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    dist = tmp_path_factory.mktemp("dist")
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dist), str(source)],
                           capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr[-3000:]
    found, = dist.glob("llorch-*.whl")
    return found


def provider_environment(home: Path, bin_dir: Path) -> dict[str, str]:
    """A provider's shell: only the install's bin/ on PATH (no checkout, no .venv), its own XDG config and data;
    the model cache this run already holds (node init fetches nothing then)."""
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    environment = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(home), "XDG_CONFIG_HOME": str(home / "config"),
                   "XDG_DATA_HOME": str(home / "data"), "XDG_CACHE_HOME": cache}
    if os.environ.get("LLORCH_MODEL_CACHE"):
        environment["LLORCH_MODEL_CACHE"] = os.environ["LLORCH_MODEL_CACHE"]
    return environment


def run(command: list[str], environment: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(command, env=environment, cwd=cwd, capture_output=True, text=True,
                          timeout=COMMAND_TIMEOUT_S, stdin=subprocess.DEVNULL)


def init_node(llorch: list[str], environment: dict[str, str], cwd: Path) -> Path:
    """`node init` as the docs show it, with the SLA given (no model run to measure); the node.toml it wrote."""
    done = run([*llorch, "node", "init", "--gateway", GATEWAY_MULTIADDR, "--country", "DE", "--non-interactive",
                "--sla-ttft-ms", "2000"], environment, cwd)
    assert done.returncode == 0, done.stderr[-3000:]
    path = Path(done.stdout.strip())
    assert path == Path(environment["XDG_CONFIG_HOME"]) / "llorch" / "node.toml" and path.is_file()
    return path


def join_and_serve(llorch: list[str], environment: dict[str, str], cwd: Path, workdir: Path) -> Path:
    """What the issue asks of every install path: a gateway's operator makes a join token, the installed `node init
    --token` registers approved (no operator step), the installed `node start` joins, and a customer's request is
    served by it. Returns the node.toml."""
    net = LocalNetwork(workdir)
    node = None
    try:
        net.start_gateway()
        token = net.cli("gateway", "providers", "invite", "--config", "gateway.toml", "--url", net.http_url).strip()
        done = subprocess.run([*llorch, "node", "init", "--token", token, "--port", "0", "--sla-ttft-ms", "2000",
                               "--dashboard-port", str(free_port())], env=environment, cwd=cwd, input="DE\n",
                              capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
        assert done.returncode == 0 and "approved" in done.stderr, done.stderr[-3000:]
        peer = next(line.split()[-1] for line in done.stderr.splitlines() if "peer id" in line)
        node = subprocess.Popen([*llorch, "node", "start"], env=environment, cwd=cwd, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        net.wait_for_providers(1, timeout_s=90)
        request = urllib.request.Request(
            net.http_url + "/v1/chat/completions",
            json.dumps({"model": "smollm2-135m-instruct-q4_1", "seed": 1, "max_tokens": 4,
                        "messages": [{"role": "user", "content": "Say hello."}]}).encode(),
            {"Content-Type": "application/json", "Authorization": f"Bearer {net.api_key}"})
        with urllib.request.urlopen(request, timeout=60) as response:
            assert json.loads(response.read())["llorch"]["provider"] == peer      # earned by the installed node
        return Path(done.stdout.strip())
    finally:
        if node is not None:
            node.terminate()
            assert node.wait(30) == 0, node.stderr.read()[-2000:] if node.stderr else ""
        net.stop()


def printed_unit(llorch: list[str], config: Path, environment: dict[str, str], cwd: Path) -> str:
    done = run([*llorch, "node", "install-service", "--print", "--config", str(config)], environment, cwd)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "systemctl daemon-reload" in done.stderr and "journalctl -u llorch-node" in done.stderr, done.stderr
    return done.stdout


def unit_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line and not line.startswith("#")]


def test_a_wheel_installs_with_plain_pip_into_a_new_venv_and_runs_without_the_checkout(wheel, tmp_path, model_path,
                                                                                        capsys):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True, timeout=120)
    started = time.monotonic()
    installed = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "--disable-pip-version-check", str(wheel)],
                               env={**os.environ, **PORTABLE_BUILD}, cwd=tmp_path, capture_output=True, text=True,
                               timeout=INSTALL_TIMEOUT_S)
    install_s = time.monotonic() - started
    assert installed.returncode == 0, installed.stderr[-3000:]
    with capsys.disabled():
        print(f"\n[test_install] pip install of {wheel.name} and its dependencies into a new venv: {install_s:.0f} s")

    environment = provider_environment(tmp_path / "home", venv / "bin")
    where = run([str(venv / "bin" / "python"), "-c", "import llorch.node; print(llorch.node.__file__)"],
                environment, tmp_path)
    assert where.stdout.startswith(str(venv)), f"llorch was imported from {where.stdout}{where.stderr}, not the venv"
    llorch = [str(venv / "bin" / "llorch")]
    helped = run([*llorch, "--help"], environment, tmp_path)
    assert helped.returncode == 0 and "node" in helped.stdout, helped.stderr
    helped = run([*llorch, "node", "init", "--help"], environment, tmp_path)
    assert helped.returncode == 0 and "--token" in helped.stdout, helped.stderr
    config = join_and_serve(llorch, environment, tmp_path, tmp_path / "market")
    unit = printed_unit(llorch, config, environment, tmp_path)
    assert f"ExecStart={venv}/bin/llorch node start --config {config}" in unit_lines(unit), unit


def test_pipx_or_uv_installs_the_wheel_as_a_command(wheel, tmp_path, model_path, capsys):
    pipx, uv = shutil.which("pipx"), shutil.which("uv")
    if pipx is None and uv is None:
        pytest.skip("neither pipx nor uv is installed (./dev test installs Debian's pipx as root): the docs' pipx "
                    "install is not checked here")
    bin_dir = tmp_path / "bin"
    tool_env = {**os.environ, **PORTABLE_BUILD, "PIPX_HOME": str(tmp_path / "pipx"), "PIPX_BIN_DIR": str(bin_dir),
                "PIPX_MAN_DIR": str(tmp_path / "man"), "UV_TOOL_DIR": str(tmp_path / "uv"),
                "UV_TOOL_BIN_DIR": str(bin_dir)}
    command = [pipx, "install", str(wheel)] if pipx else [str(uv), "tool", "install", str(wheel)]
    started = time.monotonic()
    installed = subprocess.run(command, env=tool_env, cwd=tmp_path, capture_output=True, text=True,
                               timeout=INSTALL_TIMEOUT_S)
    install_s = time.monotonic() - started
    assert installed.returncode == 0, installed.stdout[-2000:] + installed.stderr[-3000:]
    with capsys.disabled():
        print(f"\n[test_install] {Path(command[0]).name} install of {wheel.name}: {install_s:.0f} s")

    environment = provider_environment(tmp_path / "home", bin_dir)
    llorch = [str(bin_dir / "llorch")]
    helped = run([*llorch, "node", "install-service", "--help"], environment, tmp_path)
    assert helped.returncode == 0 and "--user" in helped.stdout, helped.stderr
    config = join_and_serve(llorch, environment, tmp_path, tmp_path / "market")
    unit = printed_unit(llorch, config, environment, tmp_path)
    assert f"ExecStart={bin_dir}/llorch node start --config {config}" in unit_lines(unit), unit


@pytest.fixture(scope="module")
def initialised(tmp_path_factory) -> tuple[dict[str, str], Path, Path]:
    """A node.toml `node init` wrote under a directory with a blank in its name (the unit must quote it): the
    environment, the config, and a working directory outside the checkout."""
    home = tmp_path_factory.mktemp("provider") / "home of a provider"
    home.mkdir()
    environment = {**os.environ, "XDG_CONFIG_HOME": str(home / "config"), "XDG_DATA_HOME": str(home / "data")}
    return environment, init_node(llorch_command(), environment, home), home


def service(initialised, *args: str) -> subprocess.CompletedProcess:
    environment, config, home = initialised
    return run([*llorch_command(), "node", "install-service", "--config", str(config), *args], environment, home)


def test_the_system_unit_runs_this_install_on_this_config_as_its_owner(initialised, tmp_path):
    environment, config, home = initialised
    path = tmp_path / "llorch-node.service"
    done = service(initialised, "--out", str(path))
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"wrote {path}: ") and f"systemctl enable --now {path}" in done.stdout, done.stdout
    lines = unit_lines(path.read_text())
    llorch = install_service.entry_command(llorch_command()[0], sys.executable)
    assert os.path.isabs(llorch[0]) and os.access(llorch[0], os.X_OK)
    assert f'ExecStart={" ".join(llorch)} node start --config "{config}"' in lines, lines
    assert f"User={pwd.getpwuid(config.stat().st_uid).pw_name}" in lines
    assert f'Environment="XDG_CONFIG_HOME={home}/config"' in lines      # where node init put the key and node.toml
    for expected in ("Restart=on-failure", "RestartPreventExitStatus=2", "KillSignal=SIGTERM",
                     "Wants=network-online.target", "After=network-online.target", "WantedBy=multi-user.target"):
        assert expected in lines, (expected, lines)
    restart_s, = (int(line.split("=")[1]) for line in lines if line.startswith("RestartSec="))
    stop_s, = (int(line.split("=")[1]) for line in lines if line.startswith("TimeoutStopSec="))
    assert 1 <= restart_s <= 60 and stop_s > 2 * limits.SHUTDOWN_GRACE_S

    user_path = tmp_path / "user" / "llorch-node.service"
    user_path.parent.mkdir()
    done = service(initialised, "--user", "--out", str(user_path))
    assert done.returncode == 0 and "systemctl --user enable --now" in done.stdout, done.stderr
    lines = unit_lines(user_path.read_text())
    assert "WantedBy=default.target" in lines and not any(line.startswith("User=") for line in lines), lines


def test_exit_2_means_a_config_node_start_cannot_use_and_install_service_refuses_it_first(initialised, tmp_path,
                                                                                        capsys, monkeypatch):
    """RestartPreventExitStatus=2 rests on this: `node start` exits 2 on a config it cannot use."""
    environment, config, home = initialised
    bad = tmp_path / "node.toml"
    bad.write_text('[node]\nkey_file = "node.key"\nledger_path = "l.sqlite"\nbootstrap = []\ntrusted_gateways = []\n'
                   'colour = "blue"\n')
    started = run([*llorch_command(), "node", "start", "--config", str(bad)], environment, home)
    assert started.returncode == 2 and "colour" in started.stderr, started.stderr
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "empty"))      # no node.toml where `node init` writes it
    monkeypatch.delenv("SUDO_USER", raising=False)
    for args, message in [(["--config", str(bad)], "colour"),
                          (["--config", str(tmp_path / "none.toml")], "does not exist"),
                          (["--config", str(config), "--out", str(tmp_path / "no" / "llorch-node.service")],
                           "no directory"),
                          (["--config", str(config), "--out", str(tmp_path / "unit.txt")], ".service"),
                          (["--print"], "run `llorch node init` first")]:
        assert node_cli.main(["node", "install-service", *args]) == 2, args
        out, err = capsys.readouterr()
        assert message in err and not out, (args, out, err)
        assert len(err.strip().splitlines()) == 1 and err.startswith("error: "), err


def test_a_config_owned_by_another_user_gives_a_unit_for_that_user(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root, to give a node.toml to another user")
    config = tmp_path / "node.toml"
    config.write_text("[node]\n")
    os.chown(config, 65534, 65534)
    environment = {"XDG_CACHE_HOME": "/root/.cache"}
    unit = install_service.plan(config, False, ("/usr/bin/llorch",), environment)
    assert unit.user == pwd.getpwuid(65534).pw_name and unit.environment == ()   # root's XDG is not theirs
    with pytest.raises(ConfigError, match="run this command as"):
        install_service.plan(config, True, ("/usr/bin/llorch",), environment)


def test_the_units_pass_systemd_analyze_verify(initialised, tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (Debian's systemd): the units are not verified")
    environment, _, _ = initialised
    for scope in ([], ["--user"]):
        path = tmp_path / ("user" if scope else "system") / "llorch-node.service"
        path.parent.mkdir()
        done = service(initialised, *scope, "--out", str(path))
        assert done.returncode == 0, done.stderr
        runtime = tmp_path / f"runtime{len(scope)}"          # a user manager's runtime directory, for --user
        runtime.mkdir(mode=0o700)
        verified = run([analyze, *scope, "verify", str(path)], {**environment, "XDG_RUNTIME_DIR": str(runtime)},
                       tmp_path)
        assert verified.returncode == 0 and not verified.stderr.strip(), (scope, verified.stderr)
        broken = path.with_name("broken.service")
        broken.write_text(path.read_text().replace("ExecStart=/", "ExecStart=/nonexistent/"))
        refused = run([analyze, *scope, "verify", str(broken)], {**environment, "XDG_RUNTIME_DIR": str(runtime)},
                      tmp_path)
        assert refused.returncode != 0, "systemd-analyze verify passes anything here: this test proves nothing"
