"""Hole punching (/llorch/punch/1, node/hole_punch.py) over real libp2p hosts on loopback: an auditor reaches a node
through the gateway's relay and the punch turns that into a direct connection. The attacks: a peer makes the node
dial an address that is not the peer's (its own lie, another peer's observation, a gateway the node does not trust,
no relay at all). The namespace test (tests/test_behind_nat.py) punches through real NAT routers."""

from __future__ import annotations

import time
from contextlib import asynccontextmanager

import pytest
import trio
from libp2p.custom_types import TProtocol
from libp2p.tools.anyio_service import background_trio_service

from llorch.gateway.relay import DialbackProbes, ProviderRelay
from llorch.ledger.objects import VERSION
from llorch.ledger.signing import SigningKey
from llorch.ledger.store import LedgerStore
from llorch.node import hole_punch, limits
from llorch.node.errors import ProtocolError
from llorch.node.hole_punch import Punches, PunchFailed, direct_addr_to, punch
from llorch.node.ledger_client import fetch_ledger
from llorch.node.ledger_service import LedgerService
from llorch.node.p2p import connect_relayed, running_host
from llorch.node.relay import Reach, TrustedStop, relayed_addr, reserve
from llorch.node.wire.dialback import DIALBACK_PROTOCOL_ID, Observation
from llorch.node.wire.ledger_protocol import LEDGER_PROTOCOL_ID
from llorch.node.wire.punch import PUNCH_PROTOCOL_ID, FrameReader, Offer, sync_bytes
from tests.helpers import receipt_fields
from tests.test_ledger_access import grant
from tests.test_relay import LOOPBACK, address, connect


class Market:
    """A gateway (relay, dial-back), a node that reserved on it and answers punches, and its ledger."""

    def __init__(self, gateway, node, gateway_p2p, node_p2p, reach) -> None:
        self.gateway, self.node, self.gateway_p2p, self.node_p2p, self.reach = gateway, node, gateway_p2p, node_p2p, reach
        self.node_dials: list[str] = []

    def circuit(self) -> str:
        return relayed_addr(address(self.gateway_p2p), self.node.peer_id)


@asynccontextmanager
async def market(tmp_path, punch_relays=None):
    gateway, node = SigningKey.generate(), SigningKey.generate()

    async def approved(peer) -> bool:
        return peer.to_base58() == node.peer_id

    async with LedgerStore.open(tmp_path / "l.sqlite", node) as ledger, \
            running_host(gateway, LOOPBACK) as gateway_p2p, running_host(node, LOOPBACK) as node_p2p, \
            background_trio_service(ProviderRelay(gateway_p2p.host, approved)), \
            background_trio_service(TrustedStop(node_p2p.host, frozenset({gateway.peer_id}))):
        for i in range(3):
            await ledger.append(receipt_fields(node, f"req-{i:08d}"))
        gateway_p2p.host.set_stream_handler(TProtocol(DIALBACK_PROTOCOL_ID), DialbackProbes(gateway).serve)
        node_p2p.host.set_stream_handler(TProtocol(LEDGER_PROTOCOL_ID),
                                         LedgerService(ledger, frozenset({gateway.public_key})).serve_ledger)
        reach = Reach()
        node_p2p.host.set_stream_handler(TProtocol(PUNCH_PROTOCOL_ID),
                                         Punches(node_p2p, reach, frozenset({gateway.peer_id}) if punch_relays is None
                                                 else punch_relays).serve)
        await connect(node_p2p, address(gateway_p2p))
        await reserve(node_p2p, gateway_p2p.host.get_id())
        world = Market(gateway, node, gateway_p2p, node_p2p, reach)
        network = node_p2p.host.get_network()
        for name in ("dial_addr", "dial_addr_as_responder"):
            real = getattr(network, name)

            async def recording(addr, peer, source=None, real=real):
                world.node_dials.append(str(addr))
                return await real(addr, peer, source)
            setattr(network, name, recording)
        yield world


async def test_an_auditor_behind_a_relay_punches_through_to_a_direct_connection(tmp_path):
    auditor = SigningKey.generate()
    async with market(tmp_path) as world, running_host(auditor, LOOPBACK) as auditor_p2p:
        said: list[str] = []
        material = await fetch_ledger(auditor_p2p, world.circuit(), grant(world.node, auditor), punch=True,
                                      say=said.append)
        assert len(material.entries) == 3
        assert len(said) == 1 and "(hole-punched)" in said[0], said
        node_id = world.node_p2p.host.get_id()
        assert direct_addr_to(auditor_p2p, node_id) is not None
        assert hole_punch.relay_of([]) is None
        assert not [conn for conn in hole_punch.connections_to(auditor_p2p, node_id)
                    if hole_punch.relay_of(conn.get_transport_addresses())]      # the relayed one is closed
        # The node dialled only the auditor's observed IP at the port it offered, and records the punch.
        auditor_port = auditor_p2p.addrs()[0].split("/tcp/")[1].split("/")[0]
        assert world.node_dials and set(world.node_dials) == {
            f"/ip4/127.0.0.1/tcp/{auditor_port}"}, world.node_dials
        assert set(world.reach.punched) == {auditor.peer_id}
        assert world.reach.punched[auditor.peer_id][0] == f"/ip4/127.0.0.1/tcp/{auditor_port}"


async def offer_as_attacker(p2p, node_id, offer: Offer) -> None:
    """Open a punch stream to the node and play the initiator with ``offer``, then sync, as an honest one would."""
    try:
        stream = await p2p.host.new_stream(node_id, [TProtocol(PUNCH_PROTOCOL_ID)])
        await stream.write(offer.to_bytes())
        with trio.move_on_after(3):
            await FrameReader(stream).next()
            await stream.write(sync_bytes())
    except Exception:  # the node reset the stream: what it should do
        pass
    await trio.sleep(1)               # the node would dial now


def observation(signer: SigningKey, about: SigningKey, ip: str, at_ms: int | None = None) -> bytes:
    return Observation(v=VERSION, gateway_key=signer.public_key, peer_key=about.public_key, ip=ip,
                       observed_ms=int(time.time() * 1000) if at_ms is None else at_ms).seal(signer)


async def test_a_peer_cannot_make_the_node_dial_an_address_that_is_not_its_own(tmp_path):
    attacker, bystander = SigningKey.generate(), SigningKey.generate()
    async with market(tmp_path) as world, running_host(attacker, LOOPBACK) as attacker_p2p:
        node_id = world.node_p2p.host.get_id()
        assert await connect_relayed(attacker_p2p, node_id, [world.circuit()])
        victim = "127.0.0.9"
        lies = [
            observation(attacker, attacker, victim),                          # signed by itself, not the relay
            observation(world.gateway, bystander, victim),                    # the relay's, about another peer
            observation(world.gateway, attacker, victim,
                        at_ms=int(time.time() * 1000) - limits.OBSERVATION_AGE_MS_MAX - 60_000),   # stale
        ]
        for lie in lies:
            await offer_as_attacker(attacker_p2p, node_id, Offer(lie, (4242,)))
        assert world.node_dials == [] and world.reach.punched == {}

    # Over a direct connection (no relay, so no observation can be checked against one): refused.
    (tmp_path / "2").mkdir()
    async with market(tmp_path / "2") as world, running_host(attacker, LOOPBACK) as attacker_p2p:
        node_id = world.node_p2p.host.get_id()
        await connect(attacker_p2p, address(world.node_p2p))
        await offer_as_attacker(attacker_p2p, node_id, Offer(observation(world.gateway, attacker, "127.0.0.1"),
                                                             (4242,)))
        assert world.node_dials == []


async def test_a_punch_through_a_relay_the_node_does_not_trust_for_punches_is_refused(tmp_path):
    """TrustedStop already refuses circuits from other relays; the punch handler checks the relay on its own too."""
    auditor = SigningKey.generate()
    async with market(tmp_path, punch_relays=frozenset()) as world, running_host(auditor, LOOPBACK) as auditor_p2p:
        node_id = world.node_p2p.host.get_id()
        assert await connect_relayed(auditor_p2p, node_id, [world.circuit()])
        with pytest.raises(PunchFailed):
            await punch(auditor_p2p, node_id)
        assert world.node_dials == [] and direct_addr_to(auditor_p2p, node_id) is None


def test_punch_frames_are_strict():
    gateway, peer = SigningKey.generate(), SigningKey.generate()
    envelope = observation(gateway, peer, "198.51.100.7")
    offer = Offer(envelope, (4101,))
    from llorch.node.wire.punch import decode
    assert decode(offer.to_bytes()) == offer and decode(sync_bytes()) == "sync"
    with pytest.raises(ProtocolError):
        Offer(envelope, ())                               # no port to dial
    with pytest.raises(ProtocolError):
        Offer(envelope, (0,))
    for bad_ip in ("0.0.0.0", "224.0.0.1", "not an ip"):
        with pytest.raises(Exception):
            observation(gateway, peer, bad_ip)
    checked = Observation.checked(envelope, gateway.public_key, peer.public_key, int(time.time() * 1000))
    assert checked.ip == "198.51.100.7"
    with pytest.raises(ProtocolError, match="another gateway"):
        Observation.checked(envelope, peer.public_key, peer.public_key, int(time.time() * 1000))


async def test_a_punch_asked_again_while_the_last_ones_dials_still_run_is_answered(tmp_path, monkeypatch):
    """A fetch that gave up (its punch's dials still running on the node, towards a router that drops them) and is
    retried at once: the node refused the retry ("one is running for this peer") until the old dials timed out. Now
    the newer punch replaces the older one's dials."""
    auditor = SigningKey.generate()
    real_dial, calls = hole_punch._dial, []

    async def first_dials_hang(p2p, peer, ip, ports, as_responder):
        calls.append(as_responder)
        if not as_responder and calls.count(False) == 1:
            await trio.sleep(30)                 # the first punch's dials: a router that drops every packet
        return await real_dial(p2p, peer, ip, ports, as_responder)

    monkeypatch.setattr(hole_punch, "_dial", first_dials_hang)
    async with market(tmp_path) as world, running_host(auditor, LOOPBACK) as auditor_p2p:
        node_id = world.node_p2p.host.get_id()
        assert await connect_relayed(auditor_p2p, node_id, [world.circuit()])
        async with trio.open_nursery() as nursery:
            nursery.start_soon(punch, auditor_p2p, node_id)          # its node side hangs in the dials
            await trio.sleep(1)
            nursery.cancel_scope.cancel()                            # the auditor gives up
        with trio.fail_after(10):
            assert await punch(auditor_p2p, node_id)                 # and asks again at once
        assert set(world.reach.punched) == {auditor.peer_id}


async def test_a_punch_whose_first_exchange_loses_the_race_connects_on_a_fresh_exchange(tmp_path, monkeypatch):
    """The SYNs of one exchange did not cross (a loaded machine sent one late; here neither side dials at all in the
    first exchange): the initiator gave up and stayed relayed after one exchange. Now it runs a fresh exchange, a
    fresh moment for both SYNs, up to PUNCH_ATTEMPTS times."""
    auditor = SigningKey.generate()
    real_dial, calls = hole_punch._dial, []

    async def first_exchange_dials_nothing(p2p, peer, ip, ports, as_responder):
        calls.append(as_responder)
        if calls.count(as_responder) == 1:
            return hole_punch.Dials(None, [[f"{port}: no answer within 2 s" for port in ports]])
        return await real_dial(p2p, peer, ip, ports, as_responder)

    monkeypatch.setattr(hole_punch, "_dial", first_exchange_dials_nothing)
    async with market(tmp_path) as world, running_host(auditor, LOOPBACK) as auditor_p2p:
        node_id = world.node_p2p.host.get_id()
        assert await connect_relayed(auditor_p2p, node_id, [world.circuit()])
        with trio.fail_after(20):
            assert await punch(auditor_p2p, node_id) == direct_addr_to(auditor_p2p, node_id)
        assert sorted(calls) == [False, False, True, True]      # two exchanges, each side dialled in both
        assert set(world.reach.punched) == {auditor.peer_id}


async def test_a_failed_punch_says_how_each_dial_of_each_exchange_ended(tmp_path, monkeypatch):
    """Every dial refused (the far router answers each SYN with a reset; here: a port nobody listens on): the error
    names each exchange, each round and the socket's error, so a failed punch in the field (or in CI) says which
    way it failed instead of only that it did."""
    auditor = SigningKey.generate()
    real_dial = hole_punch._dial
    with trio.socket.socket() as closed:
        await closed.bind(("127.0.0.1", 0))
        nobody = closed.getsockname()[1]

    async def to_nobody(p2p, peer, ip, ports, as_responder):
        return await real_dial(p2p, peer, ip, (nobody,), as_responder)

    monkeypatch.setattr(hole_punch, "_dial", to_nobody)
    async with market(tmp_path) as world, running_host(auditor, LOOPBACK) as auditor_p2p:
        node_id = world.node_p2p.host.get_id()
        assert await connect_relayed(auditor_p2p, node_id, [world.circuit()])
        with trio.fail_after(30), pytest.raises(PunchFailed) as failed:
            await punch(auditor_p2p, node_id)
        message = str(failed.value)
        assert "the relayed connection stays" in message, message
        for attempt in range(1, limits.PUNCH_ATTEMPTS + 1):
            assert f"attempt {attempt}: round 1: {nobody}: ECONNREFUSED" in message, message
        assert message.count("ECONNREFUSED") == limits.PUNCH_ATTEMPTS * limits.PUNCH_ROUNDS, message
        assert direct_addr_to(auditor_p2p, node_id) is None
