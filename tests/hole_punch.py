"""TCP simultaneous open between the two home LANs of tests/small_internet.py, with plain sockets: the ground truth
under any hole punch (DCUtR or another), measured without libp2p.

Node A (198.51.100.2 behind router 1) and node B (192.0.2.2 behind router 2) each

1. listen on a port P with SO_REUSEADDR and SO_REUSEPORT, as a libp2p node does;
2. connect from P to an ``Observer`` on the public side (203.0.113.10), which answers with the address it saw, and
   keep that connection open (a node's connection to its gateway);
3. at a moment agreed out of band (a thread barrier here, the relayed connection in a real punch), connect from P to
   the other's observed address, B ``skew_s`` after A.

``QUIET_ROUTER_RULES`` makes a router drop what arrives on its public side for no connection of its own, as many home
routers do; without it a Linux router answers such a SYN with a reset, as the topology of the tests does.
"""

from __future__ import annotations

import errno
import json
import socket
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from tests.small_internet import GATEWAY_IP, HOMES, SmallInternet, tool

OBSERVER_PORT = 4000
ADDRESS_BYTES_MAX = 64
ACCEPT_POLL_S = 0.2

QUIET_ROUTER_RULES = """
table ip quiet {
    chain input { type filter hook input priority filter; policy accept; iifname "wan" ct state new,invalid drop; }
}
"""


@dataclass(frozen=True)
class Side:
    """What one host saw in one attempt."""

    port: int                     # the port it listened on and dialled from
    observed: tuple[str, int]     # the address the observer saw its connection come from
    outcome: str                  # "connected", "refused", "timeout" or another errno name
    exchanged: bool               # a byte crossed each way on the connection

    @property
    def port_kept(self) -> bool:
        return self.observed[1] == self.port


def quiet_routers(internet: SmallInternet) -> None:
    """Make both routers drop unsolicited packets from the public side instead of answering them with a reset."""
    for home in HOMES:
        internet.run(home.router, tool("nft"), "-f", "-", stdin=QUIET_ROUTER_RULES)


class Observer:
    """On the public side, for the length of a ``with`` block: tells each host that connects the address its
    connection came from, and keeps the connection open."""

    def __init__(self, internet: SmallInternet) -> None:
        self.internet = internet
        self.ready, self.stop = threading.Event(), threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> "Observer":
        self.thread.start()
        if not self.ready.wait(5):
            raise RuntimeError("the observer did not start listening within 5 s")
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop.set()
        self.thread.join()

    def _serve(self) -> None:
        with self.internet.inside("public"):
            server = socket.create_server((GATEWAY_IP, OBSERVER_PORT), reuse_port=True)
        server.settimeout(ACCEPT_POLL_S)
        self.ready.set()
        held = []
        try:
            while not self.stop.is_set():
                try:
                    connection, address = server.accept()
                except socket.timeout:
                    continue
                connection.sendall(f"{address[0]}:{address[1]}\n".encode())
                held.append(connection)
        finally:
            for connection in held:
                connection.close()
            server.close()


def simultaneous_open(internet: SmallInternet, first_port: int, skew_s: float = 0.0,
                      timeout_s: float = 2.0) -> dict[str, Side]:
    """One attempt (an ``Observer`` must be running): A listens and dials from ``first_port``, B from
    ``first_port + 1``. Returns each host's ``Side`` by host name ("a", "b")."""
    observed: dict[str, tuple[str, int]] = {}
    sides: dict[str, Side] = {}
    barrier = threading.Barrier(len(HOMES), timeout=4 * timeout_s + 5)
    threads = [threading.Thread(target=_one_side, args=(internet, home.host, home.host_ip, first_port + n, skew_s * n,
                                                        timeout_s, observed, barrier, sides))
               for n, home in enumerate(HOMES)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if len(sides) != len(HOMES):
        raise RuntimeError(f"an attempt ended without a result for {sorted({h.host for h in HOMES} - set(sides))}")
    return sides


def _reuse_socket(ip: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((ip, port))
    return sock


def _outcome_of(exc: OSError) -> str:
    if isinstance(exc, socket.timeout):
        return "timeout"
    if exc.errno == errno.ECONNREFUSED:
        return "refused"
    return errno.errorcode.get(exc.errno, str(exc.errno))


def _one_side(internet: SmallInternet, host: str, ip: str, port: int, delay_s: float, timeout_s: float,
              observed: dict, barrier: threading.Barrier, sides: dict) -> None:
    other_host = "b" if host == "a" else "a"
    with internet.inside(host):
        listener, to_observer, punch = _reuse_socket(ip, port), _reuse_socket(ip, port), _reuse_socket(ip, port)
    try:
        listener.listen(8)
        to_observer.settimeout(timeout_s)
        to_observer.connect((GATEWAY_IP, OBSERVER_PORT))
        seen_ip, seen_port = to_observer.recv(ADDRESS_BYTES_MAX).decode().strip().rsplit(":", 1)
        observed[host] = (seen_ip, int(seen_port))
        barrier.wait()                                  # both know the other's observed address: the "sync"
        punch.settimeout(timeout_s)
        threading.Event().wait(delay_s)
        outcome, exchanged = "connected", False
        try:
            punch.connect(observed[other_host])
        except OSError as exc:
            outcome = _outcome_of(exc)
        if outcome == "connected":
            try:
                punch.sendall(host.encode())
                exchanged = punch.recv(1) == other_host.encode()
            except OSError:
                exchanged = False
        barrier.wait()                                  # neither closes before the other has read
        sides[host] = Side(port, observed[host], outcome, exchanged)
    finally:
        for sock in (punch, to_observer, listener):
            sock.close()


def three_process_round(script: str, public_role: str, quiet: bool, delay_ms: int, wait_s: float) -> dict:
    """One round of a hole-punch bench: a fresh topology, ``script --role R --workdir W`` run as ``public_role`` on
    the public side and as "a" and "b" in the two home LANs; "b" and "a" each write ``<role>.json``, then the public
    process is told to stop (a ``done`` file). Returns those results by role."""
    with SmallInternet(delay_ms=delay_ms) as internet, tempfile.TemporaryDirectory() as workdir:
        if quiet:
            quiet_routers(internet)
        processes = {role: subprocess.Popen([tool("ip"), "netns", "exec", internet.ns(namespace), sys.executable,
                                             script, "--role", role, "--workdir", workdir],
                                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                     for role, namespace in ((public_role, "public"), ("a", "a"), ("b", "b"))}
        try:
            for role in ("b", "a"):
                processes[role].wait(timeout=wait_s)
        finally:
            (Path(workdir) / "done").write_text("")
            processes[public_role].wait(timeout=10)
            for process in processes.values():
                if process.poll() is None:
                    process.kill()
        return {role: json.loads((Path(workdir) / f"{role}.json").read_text()) for role in ("a", "b")
                if (Path(workdir) / f"{role}.json").exists()}
