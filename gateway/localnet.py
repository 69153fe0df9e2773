"""A local llorch network on 127.0.0.1: one gateway and N provider nodes, each its own OS process started through
the `llorch` CLI. Used by `llorch demo` (the README's first command), the end-to-end tests and the benchmarks.

Everything lives in one working directory: keys (0600), TOML configs, SQLite files, state files and logs.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from llorch.ledger.signing import SigningKey, load_key_file, write_key_file

READY_TIMEOUT_S = 120.0
STARTUP_FAILED = 2          # the exit code of `llorch ... start` when it cannot start (node/lifecycle.py)


# Example payout accounts (documentation IBANs that pass the checksum), so `llorch billing payouts run` works on a
# fresh demo: the platform's account the transfers are paid from, and one per node.
DEMO_DEBTOR = ('payout_debtor_name = "llorch demo platform"\npayout_debtor_iban = "DE89370400440532013000"\n'
               'payout_debtor_bic = "COBADEFFXXX"\n')
DEMO_PAYOUT_IBANS = ("DE12500105170648489890", "DE77100100100123456789", "DE22200411110123456789")


def demo_payout_account(number: int) -> str:
    return (f'payout_holder = "Demo Home Lab {number + 1}"\n'
            f'payout_iban = "{DEMO_PAYOUT_IBANS[number % len(DEMO_PAYOUT_IBANS)]}"\n')


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (a node's dashboard keeps it across restarts)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class StartFailed(RuntimeError):
    """Raised when a process of the network exits at start-up with STARTUP_FAILED: the message is its one error
    line (a port, a file, a key it cannot use) and where its log is."""
STOP_TIMEOUT_S = 5.0
STOP_GRACE_S = 0.5


def llorch_command() -> list[str]:
    """The `llorch` console script of this interpreter's environment, or the module form if it is not installed."""
    script = Path(sys.executable).parent / "llorch"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "llorch.gateway"]


@dataclass
class Process:
    name: str
    popen: subprocess.Popen
    log_path: Path
    state_path: Path

    def state(self) -> dict | None:
        try:
            return json.loads(self.state_path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def started_state(self) -> dict:
        """The state of a process that came up (``_wait_state`` saw its state file)."""
        state = self.state()
        assert state is not None, f"{self.name} has not come up: no state in {self.state_path}"
        return state

    def stop(self, signum: int = signal.SIGTERM) -> int | None:
        """Signal the process and wait up to STOP_TIMEOUT_S; kill it if it does not exit. Returns its exit code.

        A process that is already stopping (a terminal's Ctrl-C reaches the whole process group) gets a moment to
        finish first."""
        try:
            self.popen.wait(STOP_GRACE_S if signum == signal.SIGTERM else 0.01)
        except subprocess.TimeoutExpired:
            pass
        if self.popen.poll() is None:
            self.popen.send_signal(signum)
            try:
                self.popen.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
                return None
        return self.popen.returncode


@dataclass
class LocalNetwork:
    workdir: Path
    http_port: int = 0
    probe_interval_ms: int = 0           # the gateways' probes: none unless asked, a probe is a request no test sent
    api_key: str = field(default_factory=lambda: "sk-llorch-" + secrets.token_urlsafe(24))
    gateway: Process | None = None
    nodes: list[Process] = field(default_factory=list)
    replicas: list[Process] = field(default_factory=list)      # more gateways on the first one's database
    database: str = ""
    _reported: set[str] = field(default_factory=set)         # nodes whose death report_deaths already reported

    def __post_init__(self) -> None:
        self.workdir = Path(self.workdir).resolve()
        self.workdir.mkdir(parents=True, exist_ok=True)

    # -- setup ----------------------------------------------------------------------------------------------------
    def key(self, name: str) -> SigningKey:
        path = self.workdir / f"{name}.key"
        if not path.exists():
            write_key_file(path, SigningKey.generate())
        return load_key_file(path)

    def start_gateway(self, determinism_pin: str = "", extra: str = "", database: str = "") -> dict:
        """Start the gateway; ``database``: its gateway.database (empty: SQLite, gateway.sqlite here)."""
        self.database = database
        config = self._gateway_config("gateway", self.http_port, determinism_pin, extra)
        self.gateway = self._spawn("gateway", ["gateway", "start", "--config", str(config)], "gateway.state.json")
        return self._wait_state(self.gateway)

    def start_replica(self, name: str, determinism_pin: str = "", extra: str = "") -> dict:
        """Start another gateway replica (its own key and HTTP port) on the first gateway's database, which must be
        PostgreSQL. Nodes started afterwards dial and trust every replica."""
        assert self.gateway is not None and self.database, "start the gateway on a PostgreSQL database first"
        config = self._gateway_config(name, 0, determinism_pin, extra)
        process = self._spawn(name, ["gateway", "start", "--config", str(config)], f"{name}.state.json")
        self.replicas.append(process)
        return self._wait_state(process)

    def restart_gateway(self, name: str = "gateway", signum: int = signal.SIGKILL) -> dict:
        """Stop a gateway (SIGKILL by default: a crash) and start it again on the same key, database and ports (the
        nodes' bootstrap addresses and the customers' URL stay right). Returns its new state once it is up."""
        process = self.gateway if name == "gateway" else next(p for p in self.replicas if p.name == name)
        assert process is not None
        state = process.started_state()
        http_port = int(state["base_url"].removesuffix("/v1").rsplit(":", 1)[1])
        p2p_port = int(state["multiaddrs"][0].split("/tcp/")[1].split("/")[0])
        process.stop(signum)
        config = self.workdir / f"{name}.toml"
        lines = [line for line in config.read_text().splitlines()
                 if not line.startswith(("http_port =", "p2p_listen_addr ="))]
        at = lines.index("[gateway]") + 1
        lines[at:at] = [f"http_port = {http_port}", f'p2p_listen_addr = "/ip4/127.0.0.1/tcp/{p2p_port}"']
        config.write_text("\n".join(lines) + "\n")
        restarted = self._spawn(name, ["gateway", "start", "--config", str(config)], f"{name}.state.json")
        if name == "gateway":
            self.gateway = restarted
        else:
            self.replicas = [restarted if p.name == name else p for p in self.replicas]
        return self._wait_state(restarted)

    def _gateway_config(self, name: str, http_port: int, determinism_pin: str, extra: str) -> Path:
        self.key(name)
        config = self.workdir / f"{name}.toml"
        config.write_text(
            "[gateway]\n"
            f'key_file = "{name}.key"\n'
            f'db_path = "{name}.sqlite"\n'
            f'api_key_sha256 = "{hashlib.sha256(self.api_key.encode()).hexdigest()}"\n'
            f"http_port = {http_port}\n"
            "witness_interval_ms = 1000\n"
            f"probe_interval_ms = {self.probe_interval_ms}\n"
            f'determinism_pin = "{determinism_pin}"\n'
            f'state_file = "{name}.state.json"\n' + (f'database = "{self.database}"\n' if self.database else "")
            + DEMO_DEBTOR + extra)
        return config

    def start_node(self, name: str, price_in: int = 100_000, price_out: int = 200_000, country: str = "DE",
                   threads: int = 1, extra: str = "", approve: bool = True, certify: bool = True,
                   also_trusted: tuple[str, ...] = (), attestation_interval_ms: int | None = 1000) -> dict:
        """Start a provider node, register it with the gateway, and (as the operator) approve it and certify its
        geo claim unless told otherwise. Its heartbeat is 1 s unless told otherwise (None: the default, 30 s), so
        a node that stops answering without closing its connection (SIGSTOP) is out of placement within 3 s."""
        assert self.gateway is not None, "start the gateway first"
        gateways = [process.started_state() for process in (self.gateway, *self.replicas)]
        self.key(name)
        config = self.workdir / f"{name}.toml"
        config.write_text(
            "[node]\n"
            f'key_file = "{name}.key"\n'
            f'ledger_path = "{name}.ledger.sqlite"\n'
            f"bootstrap = {json.dumps([addr for state in gateways for addr in state['multiaddrs']])}\n"
            f"trusted_gateways = {json.dumps([state['peer_id'] for state in gateways] + list(also_trusted))}\n"
            f"threads_per_slot = {threads}\n"
            + ("" if attestation_interval_ms is None else f"attestation_interval_ms = {attestation_interval_ms}\n")
            + f"price_in_per_1m = {price_in}\n"
            f"price_out_per_1m = {price_out}\n"
            f'country = "{country}"\n'
            f'state_file = "{name}.state.json"\n'
            + ("" if "admin_port" in extra else f"admin_port = {free_port()}\n")   # kept across restarts
            + ("" if "payout_iban" in extra else demo_payout_account(len(self.nodes)))
            + extra)
        process = self._spawn(name, ["node", "start", "--config", str(config)], f"{name}.state.json")
        self.nodes.append(process)
        state = self._wait_state(process)
        self.cli("node", "register", "--config", str(config), "--gateway", self.http_url,
                 "--endpoint", state["addrs"][0])
        if approve:
            self.cli("gateway", "providers", "approve", state["peer_id"], "--config", str(self.workdir / "gateway.toml"))
        if certify:
            self.cli("gateway", "providers", "certify", state["peer_id"], "--config", str(self.workdir / "gateway.toml"))
        return state

    def cli(self, *args: str) -> str:
        """Run a `llorch` command in the working directory; return its stdout, or raise with its stderr."""
        result = subprocess.run(llorch_command() + list(args), cwd=self.workdir, capture_output=True, text=True,
                                timeout=120)
        if result.returncode != 0:
            raise RuntimeError(f"llorch {' '.join(args)} failed ({result.returncode}): {result.stderr[-2000:]}")
        return result.stdout

    def restart_node(self, name: str) -> dict:
        """Stop a node (SIGTERM) and start it again with the same key, config and ledger."""
        index = next(i for i, process in enumerate(self.nodes) if process.name == name)
        self.nodes[index].stop()
        process = self._spawn(name, ["node", "start", "--config", str(self.workdir / f"{name}.toml")],
                              f"{name}.state.json")
        self.nodes[index] = process
        return self._wait_state(process)

    def wait_for_providers(self, count: int, timeout_s: float = READY_TIMEOUT_S) -> None:
        """Wait until the gateway has fresh attestations from ``count`` providers."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                with urllib.request.urlopen(f"{self.http_url}/healthz", timeout=2) as response:
                    if json.loads(response.read())["providers"] >= count:
                        return
            except (urllib.error.URLError, OSError, ValueError):
                pass
            time.sleep(0.2)
        raise TimeoutError(f"the gateway did not see {count} providers within {timeout_s:g} s; see {self.workdir}")

    @property
    def base_url(self) -> str:
        assert self.gateway is not None
        return self.gateway.started_state()["base_url"]

    @property
    def http_url(self) -> str:
        return self.base_url.removesuffix("/v1")

    def stop(self) -> dict[str, int | None]:
        """SIGTERM every process (nodes first) and return their exit codes."""
        codes = {process.name: process.stop() for process in (*self.nodes, *self.replicas)}
        if self.gateway is not None:
            codes["gateway"] = self.gateway.stop()
        return codes

    # -- internals ----------------------------------------------------------------------------------------------
    def _spawn(self, name: str, args: list[str], state_name: str) -> Process:
        state_path = self.workdir / state_name
        state_path.unlink(missing_ok=True)
        log_path = self.workdir / f"{name}.log"
        log = open(log_path, "ab")
        environment = {**os.environ, "PYTHONUNBUFFERED": "1"}
        popen = subprocess.Popen(llorch_command() + args, cwd=self.workdir, stdout=log, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, env=environment)
        log.close()
        return Process(name, popen, log_path, state_path)

    def _wait_state(self, process: Process) -> dict:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            state = process.state()
            if state is not None:
                return state
            if process.popen.poll() is not None:
                log = process.log_path.read_text()
                if process.popen.returncode == STARTUP_FAILED:
                    reason = next((line.removeprefix("error: ") for line in reversed(log.splitlines())
                                   if line.startswith("error: ")), "see its log")
                    raise StartFailed(f"{process.name} could not start: {reason} (log: {process.log_path})")
                raise RuntimeError(f"{process.name} exited with {process.popen.returncode}:\n{log[-3000:]}")
            time.sleep(0.1)
        raise TimeoutError(f"{process.name} did not come up within {READY_TIMEOUT_S:g} s; see {process.log_path}")

    def report_deaths(self) -> list[str]:
        """One line per node that died since the last call (each reported once); raise RuntimeError if the gateway
        died, since nothing works without it. The other nodes keep serving."""
        if self.gateway is not None and self.gateway.popen.poll() is not None:
            raise RuntimeError(f"gateway exited with {self.gateway.popen.returncode}:\n"
                               f"{self.gateway.log_path.read_text()[-3000:]}")
        lines = []
        for process in self.nodes:
            if process.popen.poll() is not None and process.name not in self._reported:
                self._reported.add(process.name)
                alive = sum(node.popen.poll() is None for node in self.nodes)
                lines.append(f"{process.name} exited with {process.popen.returncode} (log: {process.log_path}); "
                             f"{alive} provider node(s) still serving")
        return lines

    def _check_alive(self) -> None:
        for process in [self.gateway, *self.nodes]:
            if process is not None and process.popen.poll() is not None:
                raise RuntimeError(f"{process.name} exited with {process.popen.returncode}:\n"
                                   f"{process.log_path.read_text()[-3000:]}")
