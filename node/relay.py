"""How a node behind NAT becomes reachable to peers other than the gateways it dialled: it asks each gateway it
trusts for a dial-back probe (node/wire/dialback.py); if no listen port is reachable from outside, it reserves a
Circuit Relay v2 slot on each trusted gateway it is connected to, announces the relayed address
``<gateway's bootstrap address>/p2p-circuit/p2p/<node>`` in its attestations, and renews the reservation before it
expires. Relayed circuits are accepted only from those gateways (``TrustedStop``).

Everything the market already did keeps its path: customers' streams, witnessing and ledger sync use the node's own
connection to each gateway. The relay is for those who have no such connection (an auditor, a second gateway).

``Reach`` is what ``llorch node status`` reports: ``outbound`` (only the node's own connections), ``direct`` (a
gateway's dial-back reached a listen port) or ``relayed`` (with each reservation's expiry); a peer that reached the
node through the relay may turn that into a direct connection with a hole punch (node/hole_punch.py), which the
status reports as ``hole-punched``. The dial-back reply also carries the gateway's signed observation of the
node's IP, which a hole punch shows to the other peer (kept per gateway in ``Reach.observations``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import trio
from libp2p.connection_types import ConnectionType
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.relay.circuit_v2.pb.circuit_pb2 import HopMessage, PeerId as CircuitPeerId
from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID as HOP_PROTOCOL_ID, CircuitV2Protocol
from libp2p.relay.circuit_v2.protocol_buffer import StatusCode
from libp2p.relay.circuit_v2.utils import read_delimited_msg, write_delimited_msg
from multiaddr import Multiaddr

from llorch.node import limits
from llorch.node.errors import ProtocolError
from llorch.node.p2p import P2P, TCP_LISTEN_ADDR, peer_key_of
from llorch.node.stream_io import close_quietly
from llorch.node.wire.dialback import DIALBACK_PROTOCOL_ID, DialbackReply, DialbackRequest, reader as dialback_reader

log = logging.getLogger("llorch.relay")


class RelayError(Exception):
    """A reservation or a dial-back probe failed (no connection to the gateway, refused, timed out, a malformed
    answer); the loop retries after RELAY_RETRY_S and logs the message."""


@dataclass
class Reach:
    """How others reach this node, kept by ``keep_reachable`` and read by the status endpoint."""
    how: str = "outbound"                                       # outbound | direct | relayed
    direct: list[str] = field(default_factory=list)             # dial-back-confirmed addresses
    reservations: dict[str, int] = field(default_factory=dict)  # relayed address → reservation expiry (unix s)
    checked_ms: int = 0                                         # last dial-back answer
    observations: dict[str, tuple[int, bytes]] = field(default_factory=dict)  # gateway → (when, signed envelope)
    punched: dict[str, tuple[str, int]] = field(default_factory=dict)  # peer → (address a punch connected, when ms)

    def relayed(self, now_s: int) -> list[str]:
        return [addr for addr, expires in self.reservations.items() if expires > now_s]


class TrustedStop(CircuitV2Protocol):
    """The node's end of Circuit Relay v2 (``stop``): a circuit is accepted only when the relay is a gateway the node
    trusts. py-libp2p would accept one opened by any connected peer. The circuit's connection is named by its real
    relay, ``/p2p/<relay>/p2p-circuit/p2p/<peer>``: py-libp2p names this host in the relay's place, so the hole
    punch (node/hole_punch.py) could not tell which gateway a circuit came through."""

    def __init__(self, host, trusted_relays: frozenset[str]) -> None:
        super().__init__(host, allow_hop=False)
        self.trusted_relays = trusted_relays

    async def _handle_stop_stream(self, stream) -> None:
        relay = stream.muxed_conn.peer_id.to_base58()
        if relay not in self.trusted_relays:
            log.warning("refused a relayed connection opened by %s, not a gateway this node trusts", relay)
            await stream.reset()
            return
        await super()._handle_stop_stream(stream)

    async def handle_incoming_connection(self, stream, remote_peer_id: bytes) -> None:
        await super().handle_incoming_connection(stream, remote_peer_id)
        peer, me = ID(remote_peer_id), self.host.get_id()
        as_named = f"/p2p/{me}/p2p-circuit/p2p/{peer}"
        found = self.host.get_network().connections.get(peer) or []
        for conn in (found if isinstance(found, list) else [found]):
            if [str(addr) for addr in conn.get_transport_addresses()] == [as_named]:
                relayed = Multiaddr(f"/p2p/{stream.muxed_conn.peer_id}/p2p-circuit/p2p/{peer}")
                # INetConn does not declare set_transport_info; the swarm's connections are SwarmConn, which has it.
                conn.set_transport_info([relayed], ConnectionType.RELAYED)  # type: ignore[attr-defined]


def relayed_addr(bootstrap_addr: str, node_peer_id: str) -> str:
    """The relayed address to announce for a reservation on the gateway at ``bootstrap_addr`` (the address the
    node dials, so one known to reach it): ``/ip4/…/tcp/…/p2p/<gateway>/p2p-circuit/p2p/<node>``."""
    return f"{bootstrap_addr}/p2p-circuit/p2p/{node_peer_id}"


async def reserve(p2p: P2P, relay: ID) -> int:
    """Reserve (or renew) a slot on ``relay`` over the existing connection; return the expiry (unix s). RelayError
    if the relay is not connected, refuses, or does not answer in time."""
    if relay not in p2p.host.get_network().connections:
        raise RelayError(f"not connected to {relay}")
    stream = None
    try:
        with trio.fail_after(limits.RELAY_RESERVE_TIMEOUT_S):
            stream = await p2p.host.new_stream(relay, [HOP_PROTOCOL_ID])
            await write_delimited_msg(stream, HopMessage(type=HopMessage.RESERVE,
                                                         peer=CircuitPeerId(id=p2p.host.get_id().to_bytes())))
            answer = await read_delimited_msg(stream, HopMessage)
    except trio.TooSlowError:
        raise RelayError(f"{relay} did not answer a reservation within {limits.RELAY_RESERVE_TIMEOUT_S} s") from None
    except Exception as exc:  # stream, negotiation and protobuf errors come in many types
        raise RelayError(f"reservation on {relay} failed: {type(exc).__name__}: {exc}") from None
    finally:
        if stream is not None:
            await close_quietly(stream, reset=False)
    status = StatusCode(answer.status) if answer.HasField("status") else StatusCode.OK
    if status != StatusCode.OK or not answer.HasField("reservation"):
        raise RelayError(f"{relay} refused a reservation ({status.name})")
    expires = int(answer.reservation.expire)
    if not time.time() < expires <= time.time() + 86_400:
        raise RelayError(f"{relay} answered a reservation expiring at {expires}, not within a day from now")
    return expires


async def probe(p2p: P2P, gateway: ID, ports: tuple[int, ...]) -> DialbackReply:
    """Ask ``gateway`` to dial back ``ports`` at the address our connection comes from (node/wire/dialback.py), or
    with no ports only for its signed observation of that address. The reply's observation is checked."""
    request = DialbackRequest(ports)
    gateway_key = peer_key_of(gateway)
    if gateway_key is None:
        raise RelayError(f"{gateway} is not an Ed25519 peer id")
    own_key = peer_key_of(p2p.host.get_id())
    assert own_key is not None                      # our own identity is an Ed25519 key (key_pair_of)
    stream, finished = None, False
    try:
        with trio.fail_after(limits.DIALBACK_TIMEOUT_S):
            stream = await p2p.host.new_stream(gateway, [TProtocol(DIALBACK_PROTOCOL_ID)])
            await stream.write(request.to_bytes())
            buffer = await dialback_reader().read(stream)
            finished = True
            return DialbackReply.from_bytes(buffer).answers(request, gateway_key, own_key, int(time.time() * 1000))
    except trio.TooSlowError:
        raise RelayError(f"{gateway} did not answer a dial-back probe within {limits.DIALBACK_TIMEOUT_S} s") from None
    except ProtocolError as exc:
        raise RelayError(f"{gateway} answered a dial-back probe badly: {exc}") from None
    except RelayError:
        raise
    except Exception as exc:  # stream and negotiation errors come in many types
        raise RelayError(f"dial-back probe to {gateway} failed: {type(exc).__name__}: {exc}") from None
    finally:
        if stream is not None:
            await close_quietly(stream, reset=not finished)


def tcp_listen_addrs(p2p: P2P) -> list[tuple[str, str, int]]:
    """(ip4 or ip6, ip, port) of each TCP address this host listens on (no relayed ones), in order."""
    found = []
    for addr in p2p.addrs():
        match = TCP_LISTEN_ADDR.match(addr.split("/p2p/")[0])
        if match is not None:
            found.append((match.group(1), match.group(2), int(match.group(3))))
    return found


def listen_ports(p2p: P2P) -> tuple[int, ...]:
    ports = []
    for _, _, port in tcp_listen_addrs(p2p):
        if port not in ports:
            ports.append(port)
    return tuple(ports[:limits.DIALBACK_PORTS_MAX])


async def keep_reachable(p2p: P2P, bootstrap: tuple[str, ...], trusted: frozenset[str], reach: Reach,
                         changed=lambda: None) -> None:
    """Runs until cancelled (under ``supervise``): probe, then reserve and renew on each trusted gateway in
    ``bootstrap`` while no listen port is reachable from outside. ``changed()`` is called when the announced
    addresses change (the node then re-attests at once)."""
    gateways = [(addr, info_from_p2p_addr(Multiaddr(addr)).peer_id) for addr in bootstrap]
    gateways = [(addr, peer) for addr, peer in gateways if peer.to_base58() in trusted]
    next_probe = 0.0
    while True:
        if trio.current_time() >= next_probe and await _probe_any(p2p, gateways, reach):
            next_probe = trio.current_time() + limits.REACHABILITY_RECHECK_S
        before = (reach.how, sorted(reach.direct), sorted(reach.reservations))
        wait_s = limits.RELAY_RETRY_S
        if reach.direct:
            reach.how, reach.reservations = "direct", {}
            wait_s = limits.REACHABILITY_RECHECK_S
        else:
            wait_s = await _renew_reservations(p2p, gateways, reach)
            reach.how = "relayed" if reach.relayed(int(time.time())) else "outbound"
        if (reach.how, sorted(reach.direct), sorted(reach.reservations)) != before:
            log.info("reached: %s %s", reach.how, ", ".join(reach.direct or list(reach.reservations)) or "")
            changed()
        await trio.sleep(max(1.0, min(wait_s, next_probe - trio.current_time())))


async def _probe_any(p2p: P2P, gateways, reach: Reach) -> bool:
    """Ask the first connected gateway that answers; True once one did (the verdict is in ``reach``)."""
    ports = listen_ports(p2p)
    if not ports:
        return True
    for _, gateway in gateways:
        if gateway not in p2p.host.get_network().connections:
            continue
        try:
            reply = await probe(p2p, gateway, ports)
        except RelayError as exc:
            log.info("dial-back probe: %s", exc)
            continue
        kind = "ip6" if ":" in reply.observed_ip else "ip4"
        reach.direct = [f"/{kind}/{reply.observed_ip}/tcp/{port}/p2p/{p2p.peer_id}" for port in reply.reachable]
        reach.checked_ms = int(time.time() * 1000)
        reach.observations[gateway.to_base58()] = (reach.checked_ms, reply.observation)
        return True
    return False


async def _renew_reservations(p2p: P2P, gateways, reach: Reach) -> float:
    """Reserve where there is no reservation, renew the ones within RELAY_RENEW_BEFORE_S of expiry, drop the lapsed
    ones; return how long to sleep before the next renewal is due (at most RELAY_RETRY_S after a failure)."""
    now = int(time.time())
    wait_s = float(limits.REACHABILITY_RECHECK_S)
    for bootstrap_addr, gateway in gateways:
        addr = relayed_addr(bootstrap_addr, p2p.peer_id)
        expires = reach.reservations.get(addr, 0)
        if expires - now > limits.RELAY_RENEW_BEFORE_S:
            wait_s = min(wait_s, expires - now - limits.RELAY_RENEW_BEFORE_S)
            continue
        try:
            reach.reservations[addr] = await reserve(p2p, gateway)
            wait_s = min(wait_s, reach.reservations[addr] - now - limits.RELAY_RENEW_BEFORE_S)
        except RelayError as exc:
            log.info("relay: %s", exc)
            if expires <= now:
                reach.reservations.pop(addr, None)
            wait_s = min(wait_s, limits.RELAY_RETRY_S)
    return wait_s
