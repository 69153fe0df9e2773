"""A small internet in Linux network namespaces: a public network and two home LANs, each behind its own NAT router.

    public  203.0.113.0/24 (one bridge)        gateway and customer  203.0.113.10
      ├── router1  WAN 203.0.113.21   LAN 198.51.100.1/24  ──  node A  198.51.100.2
      └── router2  WAN 203.0.113.22   LAN 192.0.2.1/24     ──  node B  192.0.2.2

Every address is in an RFC 5737 documentation range; no private range is used anywhere. Each router behaves like a
home router: nftables masquerades what leaves its WAN side behind the WAN address, and its forward chain passes only
connections opened from the LAN and their replies (no port forwarding). The public namespace even has routes to both
LANs through their routers (a neighbour on the same segment can add them), so the only thing between the public side
and a home LAN is the router, as on a real network.

The links between the routers and the public network are veth pairs, or, given a delay and a loss rate, slow lossy
cables (tests/delay_line.py: in user space what ``tc netem`` does, since not every kernel is built with netem).

Needs root and the ``ip``, ``ss`` and ``nft`` commands (Debian's iproute2 and nftables; ``./dev test`` installs
them when it runs as root). ``unavailable_reason`` says why a test cannot build the topology, for its skip message.

Namespaces are named ``llorch-<pid>-<n>-<host>``, so parallel runs never collide. ``SmallInternet`` removes everything
it made when its ``with`` block ends, however it ends (a failed assertion, Ctrl-C); the namespaces of a run that was
killed outright (its pid is gone) are swept by the next run.

``inside(host)`` moves the calling thread into a host's namespace for the duration of a ``with`` block: sockets it
opens and processes it starts there stay there (what ``ip netns exec`` does for one command). So a test drives the
unmodified ``openai`` client from the public namespace in-process, and ``start_market`` starts the ``llorch``
processes through ``LocalNetwork``, each inside its own namespace.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import count
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

if TYPE_CHECKING:
    from llorch.gateway.localnet import LocalNetwork

TOOLS = {"ip": "iproute2", "ss": "iproute2", "nft": "nftables"}
SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
COMMAND_TIMEOUT_S = 20
NETNS_DIR = Path("/run/netns")
REPO = Path(__file__).resolve().parents[1]
CLONE_NEWNET = 0x40000000
NAME = re.compile(r"^llorch-(\d+)-(\d+)-[a-z0-9]+$")

GATEWAY_IP = "203.0.113.10"


@dataclass(frozen=True)
class Home:
    """One home: its router's two addresses and the one machine on its LAN."""

    router: str
    host: str
    wan_ip: str
    lan_net: str
    lan_gateway_ip: str
    host_ip: str


HOMES = (Home("router1", "a", "203.0.113.21", "198.51.100.0/24", "198.51.100.1", "198.51.100.2"),
         Home("router2", "b", "203.0.113.22", "192.0.2.0/24", "192.0.2.1", "192.0.2.2"))

# A home router: masquerade behind the WAN address; forward only what the LAN opened, and the replies to it.
ROUTER_RULES = """
table ip home {
    chain postrouting { type nat hook postrouting priority srcnat; oifname "wan" masquerade; }
    chain forward {
        type filter hook forward priority filter; policy drop;
        ct state established,related accept
        iifname "lan" oifname "wan" accept
    }
}
"""

_serial = count(1)
_libc = ctypes.CDLL(None, use_errno=True)


def start_market(internet: SmallInternet, net: LocalNetwork, threads: int = 1) -> None:
    """Start the gateway in the public namespace and one node in each home LAN (named after its host, "a" and
    "b"), register, approve and certify them, and wait until the gateway has both. Each node listens on every
    interface (as an operator who knows nothing of the network would set it) and signs a checkpoint every second."""
    with internet.inside("public"):
        net.start_gateway(extra=f'p2p_listen_addr = "/ip4/{GATEWAY_IP}/tcp/0"\nhttp_host = "{GATEWAY_IP}"\n')
    for home in HOMES:
        with internet.inside(home.host):
            net.start_node(home.host, threads=threads, extra='listen_addr = "/ip4/0.0.0.0/tcp/0"\n'
                                                              "checkpoint_every_ms = 1000\n")
    with internet.inside("public"):
        net.wait_for_providers(len(HOMES))


@dataclass(frozen=True)
class Served:
    """One streamed chat completion as the customer saw it."""

    seed: int
    request_id: str
    provider: str            # peer id, from the x-llorch-provider header
    text: str
    tokens: int
    ttft_s: float            # request sent → first content chunk
    tokens_per_s: float      # completion tokens / (last chunk − first content chunk)


def stream_chat(internet: SmallInternet, client, model: str, messages: list[dict], seed: int,
                max_tokens: int) -> Served:
    """One streamed chat completion with the (``openai``) ``client`` from the public namespace, timed there."""
    with internet.inside("public"):
        start = time.perf_counter()
        raw = client.chat.completions.with_raw_response.create(
            model=model, messages=messages, seed=seed, max_tokens=max_tokens, temperature=0.9, stream=True,
            stream_options={"include_usage": True})
        first, parts, tokens, request_id = None, [], 0, ""
        for chunk in raw.parse():
            request_id = chunk.id
            if chunk.choices and chunk.choices[0].delta.content:
                first = first or time.perf_counter()
                parts.append(chunk.choices[0].delta.content)
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
        end = time.perf_counter()
    assert first is not None and tokens > 0, f"request {request_id} streamed no tokens"
    return Served(seed, request_id, raw.headers["x-llorch-provider"], "".join(parts), tokens, first - start,
                  tokens / max(end - first, 1e-6))


def tool(name: str) -> str | None:
    return shutil.which(name, path=SEARCH_PATH)


def unavailable_reason() -> str | None:
    """Why the topology cannot be built here (a sentence for a skip message), or None if it can."""
    if os.geteuid() != 0:
        return "network-namespace tests need root (run ./dev test as root)"
    missing = sorted({f"{name} ({package})" for name, package in TOOLS.items() if tool(name) is None})
    if missing:
        return (f"network-namespace tests need {', '.join(missing)}: install them "
                "(./dev test does so when it runs as root on Debian)")
    probe = f"llorch-{os.getpid()}-0-probe"
    made = subprocess.run([tool("ip"), "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"cannot create a network namespace here: {made.stderr.strip()}"
    subprocess.run([tool("ip"), "netns", "del", probe], capture_output=True)
    return None


def slow_links_unavailable_reason() -> str | None:
    """Why links with delay and loss cannot be made here (a sentence for a skip message), or None if they can."""
    if not Path("/dev/net/tun").exists():
        return "slow links need /dev/net/tun (the kernel's TUN/TAP driver) for their user-space delay line"
    return None


class TopologyError(Exception):
    """A command building or changing the topology failed; the message names the command and its stderr."""


class SmallInternet:
    """The topology drawn in the module docstring, built on ``__enter__`` and removed on ``__exit__``."""

    def __init__(self, delay_ms: int = 0, loss_ppm: int = 0) -> None:
        """``delay_ms`` and ``loss_ppm`` (packets lost per million) apply to each direction of both links between a
        router and the public network: a round trip across one takes 2 × ``delay_ms``."""
        self.prefix = f"llorch-{os.getpid()}-{next(_serial)}"
        self.delay_ms, self.loss_ppm = delay_ms, loss_ppm
        self.namespaces: list[str] = []
        self.cables: list[subprocess.Popen] = []

    def ns(self, host: str) -> str:
        """The namespace name of ``host``: "public", "router1", "router2", "a" or "b"."""
        return f"{self.prefix}-{host}"

    # -- building ---------------------------------------------------------------------------------------------------
    def __enter__(self) -> "SmallInternet":
        sweep_stale()
        try:
            self._build()
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self.remove()

    def _build(self) -> None:
        for host in ("public", *(home.router for home in HOMES), *(home.host for home in HOMES)):
            self._ip("netns", "add", self.ns(host))
            self.namespaces.append(self.ns(host))
            self._ip("-n", self.ns(host), "link", "set", "lo", "up")
        public = self.ns("public")
        self._ip("-n", public, "link", "add", "br0", "type", "bridge")
        self._ip("-n", public, "addr", "add", f"{GATEWAY_IP}/24", "dev", "br0")
        self._ip("-n", public, "link", "set", "br0", "up")
        for home in HOMES:
            self._build_home(home)

    def _build_home(self, home: Home) -> None:
        public, router, host = self.ns("public"), self.ns(home.router), self.ns(home.host)
        # Links are made inside the namespaces, so no interface name ever appears in the caller's namespace.
        if self.delay_ms or self.loss_ppm:
            self._plug_slow_cable(router, "wan", public, home.router)
        else:
            self._ip("-n", router, "link", "add", "wan", "type", "veth", "peer", "name", home.router, "netns", public)
        self._ip("-n", public, "link", "set", home.router, "master", "br0", "up")
        self._ip("-n", router, "link", "add", "lan", "type", "veth", "peer", "name", "eth0", "netns", host)
        self._ip("-n", router, "addr", "add", f"{home.wan_ip}/24", "dev", "wan")
        self._ip("-n", router, "addr", "add", f"{home.lan_gateway_ip}/24", "dev", "lan")
        self._ip("-n", router, "link", "set", "wan", "up")
        self._ip("-n", router, "link", "set", "lan", "up")
        self.run(home.router, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        self.run(home.router, tool("nft"), "-f", "-", stdin=ROUTER_RULES)
        self._ip("-n", host, "addr", "add", f"{home.host_ip}/24", "dev", "eth0")
        self._ip("-n", host, "link", "set", "eth0", "up")
        self._ip("-n", host, "route", "add", "default", "via", home.lan_gateway_ip)
        self._ip("-n", public, "route", "add", home.lan_net, "via", home.wan_ip)

    def _plug_slow_cable(self, namespace_a: str, device_a: str, namespace_b: str, device_b: str) -> None:
        """A link with delay and loss (tests/delay_line.py); it exists as long as its process runs."""
        cable = subprocess.Popen([sys.executable, "-m", "tests.delay_line", namespace_a, device_a, namespace_b,
                                  device_b, f"--delay-ms={self.delay_ms}", f"--loss-ppm={self.loss_ppm}",
                                  f"--seed={len(self.cables) + 1}"],
                                 cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.cables.append(cable)
        ready = cable.stdout.readline().strip()
        if ready != "ready":
            cable.kill()
            raise TopologyError(f"the delay line between {namespace_a} and {namespace_b} did not start: "
                                f"{cable.stderr.read()[-2000:]}")

    # -- using ------------------------------------------------------------------------------------------------------
    def run(self, host: str, *argv: str, stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
        """Run a command in ``host``'s namespace (``ip netns exec``); raise TopologyError if ``check`` and it fails."""
        return self._command([tool("ip"), "netns", "exec", self.ns(host), *argv], stdin, check)

    @contextmanager
    def inside(self, host: str) -> Iterator[None]:
        """Move the calling thread into ``host``'s namespace until the block ends."""
        with entered(NETNS_DIR / self.ns(host)):
            yield

    def can_connect(self, host: str, address: str, port: int, timeout_s: float = 1.5) -> bool:
        """Whether a TCP connection from ``host`` to ``address``:``port`` is accepted within ``timeout_s``."""
        with self.inside(host):
            try:
                with socket.create_connection((address, port), timeout=timeout_s):
                    return True
            except OSError:
                return False

    def established_peers(self, host: str, local_port: int) -> set[tuple[str, int]]:
        """(address, port) of the far end of each TCP connection established to ``local_port`` in ``host``'s
        namespace."""
        listing = self.run(host, tool("ss"), "-Htn", "state", "established", f"( sport = :{local_port} )").stdout
        peers = (line.split()[-1].rsplit(":", 1) for line in listing.splitlines() if line.strip())
        return {(address, int(port)) for address, port in peers}

    # -- removing ---------------------------------------------------------------------------------------------------
    def remove(self) -> None:
        """Unplug the slow cables, kill whatever still runs in our namespaces and delete them (deleting a namespace
        removes its links)."""
        for cable in self.cables:
            cable.kill()
            cable.wait()
        self.cables.clear()
        for name in reversed(self.namespaces):
            remove_namespace(name)
        self.namespaces.clear()

    def _ip(self, *argv: str) -> None:
        self._command([tool("ip"), *argv], None, True)

    @staticmethod
    def _command(argv: list[str], stdin: str | None, check: bool) -> subprocess.CompletedProcess:
        result = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
        if check and result.returncode != 0:
            raise TopologyError(f"{' '.join(argv)} failed ({result.returncode}): {result.stderr.strip()}")
        return result


@contextmanager
def entered(namespace_file: Path) -> Iterator[None]:
    """setns(2) the calling thread into the network namespace at ``namespace_file``, and back when the block ends."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        target = os.open(namespace_file, os.O_RDONLY)
        try:
            _setns(target)
        finally:
            os.close(target)
        try:
            yield
        finally:
            _setns(home)
    finally:
        os.close(home)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"setns: {os.strerror(code)}")


def remove_namespace(name: str) -> None:
    ip = tool("ip")
    pids = subprocess.run([ip, "netns", "pids", name], capture_output=True, text=True).stdout.split()
    for pid in pids:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass
    subprocess.run([ip, "netns", "del", name], capture_output=True)


def sweep_stale() -> None:
    """Remove the namespaces of earlier runs whose process is gone (a run killed before it could clean up)."""
    try:
        names = [entry.name for entry in NETNS_DIR.iterdir()]
    except FileNotFoundError:
        return
    for name in names:
        match = NAME.match(name)
        if match and not _alive(int(match.group(1))):
            remove_namespace(name)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError as exc:
        return exc.errno == errno.EPERM
    return True
