"""The libp2p host both roles run: Noise-only security, Yamux, GossipSub, one persistent Ed25519 identity.

``running_host`` owns the host's whole life inside a trio nursery and shuts it down with the recipe that leaks
nothing (disconnect every peer inside ``host.run``, close the host shielded, stop the seen-message cache's thread).
"""

from __future__ import annotations

import hashlib
import logging
import random
import re
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import AsyncIterator, Callable

import trio
from libp2p import new_host
from libp2p.abc import IHost
from libp2p.crypto.ed25519 import Ed25519PrivateKey
from libp2p.crypto.keys import KeyPair
from libp2p.crypto.x25519 import create_new_key_pair as create_x25519_key_pair
from libp2p.network.config import ConnectionConfig
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr
from libp2p.pubsub.gossipsub import PROTOCOL_ID as GOSSIPSUB_V10, PROTOCOL_ID_V11, PROTOCOL_ID_V12, GossipSub
from libp2p.pubsub.pubsub import Pubsub
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID, Transport as NoiseTransport
from libp2p.stream_muxer.yamux.yamux import Yamux
from libp2p.tools.anyio_service import background_trio_service
from multiaddr import Multiaddr

from llorch.ledger.signing import SigningKey
from llorch.node import limits
from llorch.node.errors import StartupError
from llorch.node.lifecycle import bind_failure

log = logging.getLogger("llorch.p2p")


async def _write_frame_whole(self, data: bytes) -> None:
    """py-libp2p's ``Yamux._write_frame`` with the write shielded from cancellation (installed below).

    A Yamux frame goes out as one Noise message: the cipher's nonce advances when it is encrypted, then its bytes are
    sent. py-libp2p lets the writing task be cancelled in between, and a frame half-sent (or encrypted and not sent)
    breaks every later message on the connection: the peer fails to authenticate the next one and drops the whole
    connection, with every stream on it. Any task that touches a stream can be that writer: reading a stream sends
    the window update its reading earned, so cancelling a reader (a provider stops reading the gateway's ``more``
    frames when its request ends) could cut a window update in half; bench/market_scale.py's relay at 32 streams
    lost the gateway's connection in about one run of two before this. A write that cannot finish in
    LIBP2P_WRITE_TIMEOUT_S has a dead peer: the connection is closed then, never left torn."""
    async with self._write_lock:
        with trio.CancelScope(shield=True):
            with trio.move_on_after(limits.LIBP2P_WRITE_TIMEOUT_S) as bound:
                await self.secured_conn.write(data)
            if bound.cancelled_caught:
                with trio.move_on_after(limits.SHUTDOWN_GRACE_S):
                    await self.secured_conn.close()
                raise trio.BrokenResourceError(f"a Yamux frame could not be written in "
                                               f"{limits.LIBP2P_WRITE_TIMEOUT_S:g} s: the connection is closed")
    await trio.lowlevel.checkpoint()


_write_frame_as_shipped = Yamux._write_frame
Yamux._write_frame = _write_frame_whole        # type: ignore[method-assign]


def key_pair_of(key: SigningKey) -> KeyPair:
    """The libp2p key pair of a llorch key: the same Ed25519 seed, so peer id and signing key are one."""
    private = Ed25519PrivateKey.from_bytes(key.seed)
    return KeyPair(private, private.get_public_key())


def peer_key_of(peer_id: ID) -> bytes | None:
    """Raw Ed25519 public key of a peer id, or None if the id is not an Ed25519 identity."""
    try:
        public = peer_id.extract_public_key()
    except Exception:
        return None
    if public is None or public.get_type().name != "Ed25519":
        return None
    return public.to_bytes()


def message_id(message) -> bytes:
    """GossipSub message id: a hash of sender, seqno and content. py-libp2p's default (sender + seqno) breaks after a
    restart: the new process starts its seqno counter at the wall clock in seconds, which lags an old process that
    published more than one message a second, so its first messages look like repeats and are dropped for up to
    the 120 s seen-cache lifetime. Replays of identical bytes are still recognised (and attestation seq checks
    catch the rest)."""
    return hashlib.sha256(message.from_id + message.seqno + message.data).digest()


@dataclass
class P2P:
    host: IHost
    pubsub: Pubsub

    @property
    def peer_id(self) -> str:
        return self.host.get_id().to_base58()

    def addrs(self) -> list[str]:
        return [str(addr) for addr in self.host.get_addrs()]


TCP_LISTEN_ADDR = re.compile(r"^/(ip4|ip6)/([^/]+)/tcp/(\d{1,5})$")


def check_can_listen(listen_addr: str, setting: str) -> None:
    """Raise StartupError if this machine cannot listen on ``listen_addr`` (a port in use, an address it does not
    have), naming the address and ``setting``, the config key that chooses it. py-libp2p only logs such a failure and
    runs on with no address at all, so the port is tried here first. An address of another shape is left to libp2p
    (``running_host`` refuses a host that ends up with no address)."""
    try:
        Multiaddr(listen_addr)
    except Exception as exc:      # py-multiaddr raises several types for a bad string; all mean the same here
        raise StartupError(f"{setting} is {listen_addr!r}, not a multiaddr like /ip4/0.0.0.0/tcp/4001 ({exc})") from None
    match = TCP_LISTEN_ADDR.match(listen_addr)
    if match is None:
        return
    _, host, port = match.groups()
    reason = bind_failure(host, int(port))
    if reason is not None:
        raise StartupError(f"cannot listen for libp2p on {listen_addr}: {reason}: stop what uses it or set "
                           f"{setting} to another address or port")


@asynccontextmanager
async def running_host(key: SigningKey, listen_addr: str,
                       setting: str = "the libp2p listen address") -> AsyncIterator[P2P]:
    """Run a Noise+Yamux libp2p host with GossipSub until the block exits. StartupError if it cannot listen on
    ``listen_addr`` (``setting`` names the config key that chooses it, for the message)."""
    check_can_listen(listen_addr, setting)
    key_pair = key_pair_of(key)
    noise = NoiseTransport(key_pair, create_x25519_key_pair().private_key)
    host = new_host(key_pair=key_pair, sec_opt={NOISE_PROTOCOL_ID: noise},
                    connection_config=ConnectionConfig(max_connections_per_peer=1, min_connections=0,
                                                      low_watermark=0))
    gossipsub = GossipSub(protocols=[PROTOCOL_ID_V12, PROTOCOL_ID_V11, GOSSIPSUB_V10], degree=6, degree_low=4,
                          degree_high=12, heartbeat_initial_delay=0.1, heartbeat_interval=1)
    pubsub = Pubsub(host, gossipsub, msg_id_constructor=message_id,
                    max_concurrent_validator_count=limits.GOSSIP_VALIDATIONS_AT_ONCE_MAX)
    try:
        async with host.run(listen_addrs=[Multiaddr(listen_addr)]):
            if not host.get_addrs():              # lost a race for the port since the check: libp2p logged why
                raise StartupError(f"cannot listen for libp2p on {listen_addr} (see the log line above): set "
                                   f"{setting} to an address of this machine with a free port")
            async with background_trio_service(pubsub), background_trio_service(gossipsub):
                await pubsub.wait_until_ready()
                try:
                    yield P2P(host, pubsub)
                finally:
                    with trio.CancelScope(shield=True), trio.move_on_after(limits.SHUTDOWN_GRACE_S):
                        for peer in list(host.get_network().connections.keys()):
                            await host.disconnect(peer)
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(limits.SHUTDOWN_GRACE_S):
            await host.close()
        pubsub.seen_messages.stop()


def dial_only_announced(p2p: P2P, peer: ID, addrs: list[str]) -> None:
    """Before opening a stream to ``peer``: an existing connection (the one a node behind NAT opened to us) is used
    as it is; without one, libp2p may dial only ``addrs``, what the peer announced in its signed attestation, never
    what identify or an earlier connection left in the peerstore (a node's 0.0.0.0 listen address, a LAN address).
    Announcing nothing means: reachable only over its own connection."""
    peerstore = p2p.host.get_peerstore()
    peerstore.clear_addrs(peer)
    if addrs:
        peerstore.add_addrs(peer, [Multiaddr(addr) for addr in addrs], 600)


def relay_and_target(addr: str) -> tuple[str, str] | None:
    """(the relay part ``/ip4/…/tcp/…/p2p/<relay>``, the relay's peer id) of an announced relayed address, or None
    for a direct one. The address already passed the attestation rules (docs/protocol.md §5)."""
    if "/p2p-circuit" not in addr:
        return None
    relay_part = addr.split("/p2p-circuit")[0]
    return relay_part, relay_part.rsplit("/p2p/", 1)[1]


async def connect_relayed(p2p: P2P, peer: ID, addrs: list[str]) -> bool:
    """Without a connection to ``peer``, open one through the first relay among its announced ``addrs`` that is not
    this host (Circuit Relay v2 hop CONNECT; the relay is reached at the address's own first part). True if a
    connection exists afterwards. libp2p's own dialler skips relayed addresses, so this is the only way one is
    used. Raises nothing: a failed attempt is logged and the next relay tried."""
    from libp2p.peer.peerinfo import PeerInfo
    from libp2p.relay.circuit_v2.config import RelayConfig, RelayRole
    from libp2p.relay.circuit_v2.protocol import CircuitV2Protocol
    from libp2p.relay.circuit_v2.transport import CircuitV2Transport

    for addr in addrs:
        if peer in p2p.host.get_network().connections:
            return True
        parts = relay_and_target(addr)
        if parts is None or parts[1] == p2p.peer_id:
            continue
        relay_part, relay = parts
        target = f"{relay_part}/p2p-circuit/p2p/{peer.to_base58()}"   # as announced (a peer info drops the tail)
        transport = CircuitV2Transport(p2p.host, CircuitV2Protocol(p2p.host), RelayConfig(roles=RelayRole.STOP))
        try:
            with trio.fail_after(limits.RELAY_DIAL_TIMEOUT_S):
                await p2p.host.connect(PeerInfo(ID.from_base58(relay), [Multiaddr(relay_part)]))
                await transport.dial(Multiaddr(target))
        except Exception as exc:  # dial, hop and handshake failures come in many types; try the next relay
            log.warning("no circuit to %s through %s: %s: %s", peer, relay, type(exc).__name__, exc)
    return peer in p2p.host.get_network().connections


async def keep_connected(p2p: P2P, bootstrap: tuple[str, ...],
                         on_connected: Callable[[], None] | None = None) -> None:
    """Keep a connection to every bootstrap peer (the gateways a node trusts) through their restarts, one task per
    gateway: a lost connection is seen within BOOTSTRAP_CHECK_S and redialled at once, then on a jittered back-off
    from REDIAL_S_MIN doubling to REDIAL_S_MAX, every time past py-libp2p's negative dial cache (which refuses, for
    60 s, a peer whose dial failed once: a gateway restarting would otherwise be unreachable for a minute after it
    came back). ``on_connected()`` is called at each (re)connection and twice more in the next seconds, so the
    gateway hears an attestation as soon as gossip can carry one. Quiet while a gateway is away: a line on loss, a
    line on return (how long it was away), and a summary every REDIAL_SUMMARY_S. Runs until cancelled."""
    infos = [info_from_p2p_addr(Multiaddr(addr)) for addr in bootstrap]
    async with trio.open_nursery() as nursery:
        for info in infos:
            nursery.start_soon(_keep_one, p2p, info, on_connected)


async def _keep_one(p2p: P2P, info: PeerInfo, on_connected: Callable[[], None] | None) -> None:
    network = p2p.host.get_network()
    peer = info.peer_id
    lost_at: float | None = trio.current_time()
    first, attempts, backoff, summarised, error = True, 0, limits.REDIAL_S_MIN, trio.current_time(), ""
    while True:
        if peer in network.connections:
            if lost_at is not None:
                away = trio.current_time() - lost_at
                log.info("connected to gateway %s" + ("" if first else f" again after {away:.1f} s "
                                                                        f"({attempts} dials)"), peer)
                first, lost_at, attempts, backoff, error = False, None, 0, limits.REDIAL_S_MIN, ""
                await _announce(on_connected)
            await trio.sleep(limits.BOOTSTRAP_CHECK_S)
            continue
        if lost_at is None:
            lost_at = summarised = trio.current_time()
            log.warning("lost the connection to gateway %s; redialling", peer)
        unblock = getattr(network, "unblock_peer", None)
        if unblock is not None:              # a trusted gateway is always worth a dial: past the negative cache
            unblock(peer)
        attempts += 1
        try:
            with trio.fail_after(limits.DIAL_TIMEOUT_S):
                await p2p.host.connect(info)
            continue                         # connected: said at the top of the loop
        except Exception as exc:  # libp2p raises many types on a failed dial; all mean "try again shortly"
            error = f"{type(exc).__name__}: {exc}"
            log.debug("dial to gateway %s failed: %s", peer, error)
        if trio.current_time() - summarised >= limits.REDIAL_SUMMARY_S:
            summarised = trio.current_time()
            log.warning("gateway %s unreachable for %.0f s (%d dials; the last: %s)", peer,
                        summarised - lost_at, attempts, error[:200])
        await trio.sleep(backoff * random.uniform(0.75, 1.25))
        backoff = min(backoff * 2, limits.REDIAL_S_MAX)


async def _announce(on_connected: Callable[[], None] | None) -> None:
    """Tell the caller a connection is (re)made, now and twice more while gossip's subscriptions are exchanged."""
    if on_connected is None:
        return
    for pause in limits.ANNOUNCE_AFTER_CONNECT_S:
        await trio.sleep(pause)
        on_connected()
