"""Circuit Relay v2 through the gateway and the dial-back probe, over real libp2p hosts on loopback (the namespace
test, tests/test_behind_nat.py, does the same across real NAT). The attacks come first: py-libp2p alone lets any
peer reserve (in its own or another peer's name) and lets any connected peer open a circuit into a node."""

from __future__ import annotations

import socket
import time

import pytest
import trio
from libp2p.custom_types import TProtocol
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.tools.anyio_service import background_trio_service
from multiaddr import Multiaddr

from llorch.gateway.relay import ProviderRelay, serve_dialback
from llorch.ledger.signing import SigningKey
from llorch.ledger.store import LedgerStore
from llorch.node import relay as node_relay
from llorch.node.ledger_client import fetch_ledger
from llorch.node.ledger_service import LedgerService
from llorch.node.p2p import connect_relayed, running_host
from llorch.node.relay import RelayError, TrustedStop, probe, relayed_addr, reserve
from llorch.node.wire.dialback import DIALBACK_PROTOCOL_ID, Observation
from llorch.node.wire.ledger_protocol import LEDGER_PROTOCOL_ID
from tests.helpers import receipt_fields
from tests.test_ledger_access import grant

LOOPBACK = "/ip4/127.0.0.1/tcp/0"


def address(p2p) -> str:
    first = p2p.addrs()[0]
    return first if "/p2p/" in first else f"{first}/p2p/{p2p.peer_id}"


async def connect(p2p, addr: str) -> None:
    with trio.fail_after(10):
        await p2p.host.connect(info_from_p2p_addr(Multiaddr(addr)))


async def test_an_auditor_reaches_a_node_only_through_the_gateway_relay_it_trusts(tmp_path):
    provider, gateway, auditor, stranger, impostor = (SigningKey.generate() for _ in range(5))
    approved = {provider.peer_id}

    async def may_reserve(peer) -> bool:
        return peer.to_base58() in approved

    async def approve_everyone(peer) -> bool:
        return True

    async with LedgerStore.open(tmp_path / "l.sqlite", provider) as ledger, \
            running_host(gateway, LOOPBACK) as gateway_p2p, running_host(stranger, LOOPBACK) as stranger_p2p, \
            running_host(provider, "/ip4/127.0.0.1/tcp/0") as node_p2p, running_host(auditor, LOOPBACK) as auditor_p2p, \
            running_host(impostor, LOOPBACK) as impostor_p2p, \
            background_trio_service(ProviderRelay(gateway_p2p.host, may_reserve)), \
            background_trio_service(ProviderRelay(stranger_p2p.host, approve_everyone)), \
            background_trio_service(TrustedStop(node_p2p.host, frozenset({gateway.peer_id}))):
        for i in range(3):
            await ledger.append(receipt_fields(provider, f"req-{i:08d}"))
        node_p2p.host.set_stream_handler(TProtocol(LEDGER_PROTOCOL_ID),
                                         LedgerService(ledger, frozenset({gateway.public_key})).serve_ledger)
        await connect(node_p2p, address(gateway_p2p))
        await connect(impostor_p2p, address(gateway_p2p))

        # The attacks: an unapproved peer reserves; a peer reserves in the approved provider's name.
        with pytest.raises(RelayError, match="PERMISSION_DENIED"):
            await reserve(impostor_p2p, gateway_p2p.host.get_id())
        with pytest.raises(RelayError, match="PERMISSION_DENIED"):
            await reserve_in_the_name_of(impostor_p2p, gateway_p2p.host.get_id(), node_p2p.host.get_id())

        expires = await reserve(node_p2p, gateway_p2p.host.get_id())
        assert expires >= time.time() + 500
        assert await reserve(node_p2p, gateway_p2p.host.get_id()) >= expires        # a renewal
        circuit = relayed_addr(address(gateway_p2p), provider.peer_id)
        material = await fetch_ledger(auditor_p2p, circuit, grant(provider, auditor))
        assert len(material.entries) == 3               # the node never dialled the auditor
        assert str(auditor_p2p.host.get_id()) in {str(peer) for peer in node_p2p.host.get_network().connections}

        # A relay the node does not trust (the node connected and "reserved" there): no circuit gets through.
        await connect(node_p2p, address(stranger_p2p))
        await reserve(node_p2p, stranger_p2p.host.get_id())
        async with running_host(SigningKey.generate(), LOOPBACK) as second_auditor:
            reached = await connect_relayed(second_auditor, node_p2p.host.get_id(),
                                            [relayed_addr(address(stranger_p2p), provider.peer_id)])
            assert not reached


async def reserve_in_the_name_of(p2p, relay, victim) -> int:
    """What `reserve` sends, with another peer's id in RESERVE's peer field."""
    from libp2p.relay.circuit_v2.pb.circuit_pb2 import HopMessage, PeerId
    from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID
    from libp2p.relay.circuit_v2.protocol_buffer import StatusCode
    from libp2p.relay.circuit_v2.utils import read_delimited_msg, write_delimited_msg

    with trio.fail_after(10):
        stream = await p2p.host.new_stream(relay, [PROTOCOL_ID])
        await write_delimited_msg(stream, HopMessage(type=HopMessage.RESERVE, peer=PeerId(id=victim.to_bytes())))
        answer = await read_delimited_msg(stream, HopMessage)
    status = StatusCode(answer.status)
    if status != StatusCode.OK:
        raise RelayError(f"refused ({status.name})")
    return answer.reservation.expire


async def test_the_dial_back_probe_reaches_an_open_port_and_not_a_closed_one():
    node, gateway = SigningKey.generate(), SigningKey.generate()
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    closed_port = closed.getsockname()[1]                  # bound, never listening: connections are refused
    async with running_host(gateway, LOOPBACK) as gateway_p2p, running_host(node, LOOPBACK) as node_p2p:
        gateway_p2p.host.set_stream_handler(TProtocol(DIALBACK_PROTOCOL_ID),
                                            lambda stream: serve_dialback(stream, gateway))
        await connect(node_p2p, address(gateway_p2p))
        open_port = node_relay.listen_ports(node_p2p)[0]
        reply = await probe(node_p2p, gateway_p2p.host.get_id(), (open_port, closed_port))
    closed.close()
    assert reply.observed_ip == "127.0.0.1" and reply.reachable == (open_port,)
    observation = Observation.from_envelope(reply.observation)         # signed by the gateway, about this node
    assert (observation.gateway_key, observation.peer_key, observation.ip) == (gateway.public_key, node.public_key,
                                                                              "127.0.0.1")


async def test_one_peer_cannot_make_the_gateway_run_many_dial_back_probes_at_once(monkeypatch):
    """Each probe costs the gateway up to 4 TCP connects of up to 3 s in worker threads: one connected peer opening
    probe streams in a loop had the gateway connecting without bound. Now one probe per peer at a time; the rest
    are refused at once."""
    from llorch.gateway import relay as gateway_relay
    connects = []

    async def slow_accepts(host: str, port: int) -> bool:
        connects.append(port)
        await trio.sleep(0.3)                           # a connect that takes its time
        return False

    monkeypatch.setattr(gateway_relay, "_accepts", slow_accepts)
    node, gateway = SigningKey.generate(), SigningKey.generate()
    outcomes = []
    async with running_host(gateway, LOOPBACK) as gateway_p2p, running_host(node, LOOPBACK) as node_p2p:
        gateway_p2p.host.set_stream_handler(TProtocol(DIALBACK_PROTOCOL_ID), gateway_relay.DialbackProbes(gateway).serve)
        await connect(node_p2p, address(gateway_p2p))

        async def one() -> None:
            try:
                await probe(node_p2p, gateway_p2p.host.get_id(), (1001, 1002, 1003, 1004))
                outcomes.append("answered")
            except RelayError:
                outcomes.append("refused")

        async with trio.open_nursery() as nursery:
            for _ in range(10):
                nursery.start_soon(one)
    assert outcomes.count("answered") == 1 and outcomes.count("refused") == 9, outcomes
    assert len(connects) == 4
