"""Hole punching: turning a relayed connection through a gateway into a direct one (/llorch/punch/1, the wire in
node/wire/punch.py, docs/protocol.md §5c).

Two peers behind NAT routers joined by a relayed connection (say an auditor at home fetching a provider's ledger)
each learn from the relaying gateway, in a signed ``Observation``, the IP their connection comes from; they swap
those observations and their listen ports over the relayed connection, then both dial the other at once from their
own listen port (TCP simultaneous open): each router sees its host's SYN leave before the other's arrives, and lets
the other's in as the answer. Where that works (routers that drop unsolicited packets, as most home routers do,
and that keep the source port) the connection is direct from then on; where it does not, the relay still serves.

py-libp2p ships DCUtR for this; it is not used because it dials every address in the peerstore (a node's own
``0.0.0.0`` listen address among them) and any address a peer names, answers a punch from any peer, and starts one
itself every 2 s. Here:

- a punch is answered only over a relayed connection through a gateway the node trusts (``trusted``);
- each side dials only the IP the relaying gateway signed for the other peer, fresh (OBSERVATION_AGE_MS_MAX), at
  the ports offered: no third party can be made a target, not even by a peer lying about its address;
- a node answers one punch per peer and PUNCHES_AT_ONCE_MAX in all; only the initiator starts one.

``Reach.punched`` keeps each peer a punch connected, for ``llorch node status`` (reached: hole-punched).
"""

from __future__ import annotations

import errno
import logging
import time
from dataclasses import dataclass

import trio
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID
from multiaddr import Multiaddr

from llorch.node import limits
from llorch.node.errors import ProtocolError
from llorch.node.p2p import P2P, peer_key_of, relay_and_target
from llorch.node.relay import Reach, RelayError, listen_ports, probe, tcp_listen_addrs
from llorch.node.stream_io import close_quietly
from llorch.node.wire.dialback import Observation
from llorch.node.wire.punch import PUNCH_PROTOCOL_ID, SYNC, FrameReader, Offer, sync_bytes

log = logging.getLogger("llorch.punch")

DIAL_ENDED_CHARS_MAX = 80                 # of one dial's failure in a punch's message


class PunchFailed(Exception):
    """A hole punch did not produce a direct connection; the message says why (the relayed one still works)."""


def relay_of(addrs) -> str | None:
    """The relay's peer id if every address of a connection is a circuit through one relay
    (``…/p2p/<relay>/p2p-circuit/p2p/<peer>``), else None (a direct connection, or addresses unknown)."""
    relays = set()
    for addr in map(str, addrs or []):
        parts = relay_and_target(addr) if "/p2p/" in addr.partition("/p2p-circuit")[0] else None
        if parts is None:
            return None
        relays.add(parts[1].split("/")[0])
    return relays.pop() if len(relays) == 1 else None


def connections_to(p2p: P2P, peer: ID) -> list:
    found = p2p.host.get_network().connections.get(peer) or []
    return list(found) if isinstance(found, (list, tuple)) else [found]


def direct_addr_to(p2p: P2P, peer: ID) -> str | None:
    """The address of a direct (not relayed) connection to ``peer``, if there is one."""
    for conn in connections_to(p2p, peer):
        addrs = [str(addr) for addr in conn.get_transport_addresses()]
        if addrs and relay_of(addrs) is None:
            return addrs[0]
    return None


def relay_of_stream(p2p: P2P, stream) -> str | None:
    """The relay of the connection ``stream`` runs on, if it is a relayed connection (None otherwise)."""
    for conn in connections_to(p2p, stream.muxed_conn.peer_id):
        if getattr(conn, "muxed_conn", None) is stream.muxed_conn:
            return relay_of(conn.get_transport_addresses())
    return None


async def own_observation(p2p: P2P, gateway: ID, reach: Reach | None = None) -> bytes:
    """``gateway``'s signed observation of this host's IP: ``reach``'s if fresh enough, else a new one (a
    /llorch/dialback/1 request with no ports). RelayError if the gateway does not give one."""
    now_ms = int(time.time() * 1000)
    if reach is not None:
        made_ms, envelope = reach.observations.get(gateway.to_base58(), (0, b""))
        if envelope and now_ms - made_ms < limits.OBSERVATION_REFRESH_MS:
            return envelope
    envelope = (await probe(p2p, gateway, ())).observation
    if reach is not None:
        reach.observations[gateway.to_base58()] = (now_ms, envelope)
    return envelope


def _check_offer(message, relay: str, peer: ID) -> tuple[Offer, Observation]:
    """The offer and its observation, if ``message`` is an offer whose observation ``relay`` signed about ``peer``."""
    if not isinstance(message, Offer):
        raise ProtocolError("expected an offer")
    relay_key, peer_key = peer_key_of(ID.from_base58(relay)), peer_key_of(peer)
    if relay_key is None or peer_key is None:
        raise ProtocolError("the relay and the peer must have Ed25519 peer ids")
    return message, Observation.checked(message.observation, relay_key, peer_key, int(time.time() * 1000))


def _source(p2p: P2P, kind: str = "ip4") -> tuple[str, int]:
    """The (ip, port) this host listens on, to dial from: the SYN must leave from the listen port, so that the NAT
    mapping it makes is the address the other side dials (routers keep the source port when they can)."""
    for family, ip, port in tcp_listen_addrs(p2p):
        if family == kind:
            return ip, port
    raise PunchFailed(f"this host listens on no {kind} TCP port to punch from")


def _dial_ended(exc: BaseException) -> str:
    """How one dial failed, in a few words: the socket error's name if there is one under py-libp2p's wrapping
    (``ECONNREFUSED``: the far router answered our SYN with a reset), else the exception's type and message."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno is not None:
            return errno.errorcode.get(seen.errno, str(seen.errno))
        seen = seen.__cause__ or seen.__context__
    return f"{type(exc).__name__}: {exc}"[:DIAL_ENDED_CHARS_MAX]


@dataclass
class Dials:
    """What a punch's dials came to: the direct address connected (None if none) and how each dial of each round
    ended, for the message that says why a punch failed."""

    addr: str | None
    rounds: list[list[str]]

    def summary(self) -> str:
        return "; ".join(f"round {n}: {', '.join(ends)}" for n, ends in enumerate(self.rounds, 1))


async def _dial(p2p: P2P, peer: ID, ip: str, ports: tuple[int, ...], as_responder: bool) -> Dials:
    """Dial ``ip`` at each of ``ports`` from our listen port, in up to PUNCH_ROUNDS rounds, until a direct
    connection to ``peer`` exists. ``as_responder``: the punch's initiator upgrades its dials as the libp2p
    responder, so that the one TCP connection a simultaneous open makes has one Noise initiator (the other side)."""
    network = p2p.host.get_network()
    dial = network.dial_addr_as_responder if as_responder else network.dial_addr
    kind = "ip6" if ":" in ip else "ip4"
    source = _source(p2p, kind)
    rounds: list[list[str]] = []

    async def one(port: int, ends: list[str]) -> None:
        ended = f"{port}: no answer within {limits.PUNCH_DIAL_TIMEOUT_S:g} s"
        with trio.move_on_after(limits.PUNCH_DIAL_TIMEOUT_S):
            try:
                await dial(Multiaddr(f"/{kind}/{ip}/tcp/{port}"), peer, source)
                ended = f"{port}: connected"
            except Exception as exc:  # refused, reset, handshake lost the race: the next round tries again
                ended = f"{port}: {_dial_ended(exc)}"
                log.debug("punch dial to %s:%s failed: %s: %s", ip, port, type(exc).__name__, exc)
        ends.append(ended)

    for _ in range(limits.PUNCH_ROUNDS):
        rounds.append([])
        async with trio.open_nursery() as nursery:
            for port in ports:
                nursery.start_soon(one, port, rounds[-1])
        if (addr := direct_addr_to(p2p, peer)) is not None:
            return Dials(addr, rounds)
        await trio.sleep(0.2)
    return Dials(direct_addr_to(p2p, peer), rounds)


class Punches:
    """The responder: answers /llorch/punch/1 streams on relayed connections through ``trusted`` gateways. One
    exchange per peer at a time; a peer's newer punch replaces the dials of its older one (a fetch retried while the
    node still dials a router that drops them); PUNCHES_AT_ONCE_MAX exchanges and dials in all."""

    def __init__(self, p2p: P2P, reach: Reach, trusted: frozenset[str]) -> None:
        self.p2p, self.reach, self.trusted = p2p, reach, trusted
        self._exchanging: set[ID] = set()
        self._dialling: dict[ID, trio.CancelScope] = {}

    async def serve(self, stream) -> None:
        peer = stream.muxed_conn.peer_id
        relay = relay_of_stream(self.p2p, stream)
        others = len(self._exchanging) + len([p for p in self._dialling if p != peer])
        why = ("it did not come over a relayed connection" if relay is None else
               f"it came through {relay}, not a gateway this node trusts" if relay not in self.trusted else
               "an exchange is running for this peer" if peer in self._exchanging else
               "too many punches at once" if others >= limits.PUNCHES_AT_ONCE_MAX else None)
        if why is not None:
            log.warning("refused a hole punch from %s: %s", peer, why)
            await close_quietly(stream, reset=True)
            return
        assert relay is not None                    # else ``why`` said so
        self._exchanging.add(peer)
        try:
            agreed = await self._exchange(stream, peer, relay)
        finally:
            self._exchanging.discard(peer)
        if agreed is not None:
            await self._dial_replacing(peer, *agreed)

    async def _exchange(self, stream, peer: ID, relay: str) -> tuple[str, tuple[int, ...]] | None:
        """The offers and the sync; the peer's observed IP and ports to dial, or None (logged) if it went wrong."""
        finished = False
        try:
            with trio.fail_after(limits.PUNCH_TIMEOUT_S):
                reader = FrameReader(stream)
                offer, theirs = _check_offer(await reader.next(), relay, peer)
                mine = await own_observation(self.p2p, ID.from_base58(relay), self.reach)
                await stream.write(Offer(mine, listen_ports(self.p2p)).to_bytes())
                if await reader.next() != SYNC:
                    raise ProtocolError("expected a sync after the offers")
                finished = True
                return theirs.ip, offer.ports
        except (ProtocolError, RelayError, PunchFailed) as exc:
            log.warning("hole punch from %s refused: %s", peer, exc)
        except trio.TooSlowError:
            log.info("hole punch from %s: no sync within %s s", peer, limits.PUNCH_TIMEOUT_S)
        except Exception as exc:  # the peer hung up mid-exchange
            log.info("hole punch from %s ended: %s: %s", peer, type(exc).__name__, exc)
        finally:
            await close_quietly(stream, reset=not finished)
        return None

    async def _dial_replacing(self, peer: ID, ip: str, ports: tuple[int, ...]) -> None:
        older = self._dialling.pop(peer, None)
        if older is not None:
            older.cancel()
        with trio.CancelScope() as scope:
            self._dialling[peer] = scope
            try:
                dials = await _dial(self.p2p, peer, ip, ports, as_responder=False)
            finally:
                if self._dialling.get(peer) is scope:
                    del self._dialling[peer]
        if scope.cancelled_caught:
            log.info("hole punch with %s: its newer punch replaced this one's dials", peer)
        elif dials.addr is None:
            log.info("hole punch with %s at %s%s did not connect; it stays relayed (%s)", peer, ip, list(ports),
                     dials.summary())
        else:
            self.reach.punched[peer.to_base58()] = (dials.addr, int(time.time() * 1000))
            log.info("hole punch with %s connected directly: %s", peer, dials.addr)


async def punch(p2p: P2P, peer: ID) -> str:
    """The initiator: over our relayed connection to ``peer``, swap signed observations through its relay, then
    dial, in up to PUNCH_ATTEMPTS attempts (each a fresh exchange, so a fresh moment for both SYNs: the timing is a
    race). Returns the direct address; PunchFailed says why not (the relayed connection is left as it was). On
    success the relayed connection is closed, so new streams use the direct one."""
    direct = direct_addr_to(p2p, peer)
    if direct is not None:
        return direct
    relayed = [conn for conn in connections_to(p2p, peer) if relay_of(conn.get_transport_addresses())]
    if not relayed:
        raise PunchFailed(f"no relayed connection to {peer}")
    relay = relay_of(relayed[0].get_transport_addresses())
    assert relay is not None                        # ``relayed`` holds only connections through a relay
    _source(p2p)
    tries: list[str] = []
    for attempt in range(1, limits.PUNCH_ATTEMPTS + 1):
        ip, ports, dials = await _punch_once(p2p, peer, relay)
        if dials.addr is not None:
            for conn in relayed:
                await conn.close()
            return dials.addr
        tries.append(f"attempt {attempt}: {dials.summary()}")
    raise PunchFailed(f"no direct connection to {ip} at {list(ports)} (the routers' way with unsolicited packets, "
                      f"or the timing); the relayed connection stays ({'; '.join(tries)})")


async def _punch_once(p2p: P2P, peer: ID, relay: str) -> tuple[str, tuple[int, ...], Dials]:
    """One exchange of offers and the sync over a new punch stream, then the dials: the peer's observed IP, its
    ports and what the dials came to. PunchFailed if the exchange fails (a node that does not punch, or refuses)."""
    stream, finished = None, False
    try:
        with trio.fail_after(limits.PUNCH_TIMEOUT_S):
            mine = await own_observation(p2p, ID.from_base58(relay))
            stream = await p2p.host.new_stream(peer, [TProtocol(PUNCH_PROTOCOL_ID)])
            reader = FrameReader(stream)
            sent = trio.current_time()
            await stream.write(Offer(mine, listen_ports(p2p)).to_bytes())
            offer, theirs = _check_offer(await reader.next(), relay, peer)
            round_trip = trio.current_time() - sent
            await stream.write(sync_bytes())
            finished = True
    except trio.TooSlowError:
        raise PunchFailed(f"{peer} did not answer the punch within {limits.PUNCH_TIMEOUT_S} s") from None
    except (ProtocolError, RelayError) as exc:
        raise PunchFailed(str(exc)) from None
    except PunchFailed:
        raise
    except Exception as exc:  # stream and negotiation errors come in many types (a node that does not punch)
        raise PunchFailed(f"punch stream to {peer} failed: {type(exc).__name__}: {exc}") from None
    finally:
        if stream is not None:
            await close_quietly(stream, reset=not finished)
    await trio.sleep(min(round_trip / 2, 1.0))     # the sync reaches the responder, which dials at once
    return theirs.ip, offer.ports, await _dial(p2p, peer, theirs.ip, offer.ports, as_responder=True)
