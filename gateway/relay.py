"""What the gateway offers providers behind NAT besides their own connection: a Circuit Relay v2 hop service (so a
peer that must open its own connection to a provider, an auditor or another gateway, can) and the dial-back probe a
node asks to learn whether it is directly reachable (node/wire/dialback.py).

The relay is py-libp2p's ``CircuitV2Protocol`` with this market's rules on top:

- only an approved provider may reserve, and only for itself (py-libp2p takes the RESERVE message's optional peer
  field at its word, so any peer could reserve in another's name);
- reservations, circuits per provider, a circuit's life and its bytes are bounded (gateway/limits.py);
- circuits are opened to a provider only over the connection it keeps to the gateway (a reservation lapses when
  that connection does).
"""

from __future__ import annotations

import logging
import socket
import time

import trio
from libp2p.peer.id import ID
from libp2p.relay.circuit_v2.protocol import CircuitV2Protocol
from libp2p.relay.circuit_v2.protocol_buffer import StatusCode
from libp2p.relay.circuit_v2.resources import RelayLimits

from llorch.gateway import limits
from llorch.gateway.storage import log_fault
from llorch.ledger.objects import VERSION
from llorch.ledger.signing import SigningKey
from llorch.node.errors import ProtocolError
from llorch.node.stream_io import close_quietly
from llorch.node.p2p import peer_key_of
from llorch.node.wire.dialback import DialbackReply, DialbackRequest, Observation, reader as dialback_reader

log = logging.getLogger("llorch.gateway.relay")

RELAY_LIMITS = RelayLimits(duration=limits.RELAY_CIRCUIT_DURATION_S, data=limits.RELAY_CIRCUIT_BYTES_MAX,
                           max_circuit_conns=limits.RELAY_CIRCUITS_PER_PEER_MAX,
                           max_reservations=limits.RELAY_RESERVATIONS_MAX,
                           reservation_ttl=limits.RELAY_RESERVATION_S)


class ProviderRelay(CircuitV2Protocol):
    """A hop service that reserves slots for approved providers only. ``may_reserve(peer_id) -> bool`` (async)
    says whether a peer is an approved provider."""

    def __init__(self, host, may_reserve) -> None:
        super().__init__(host, limits=RELAY_LIMITS, allow_hop=True)
        self.may_reserve = may_reserve

    async def _handle_reserve(self, stream, msg) -> None:
        remote = stream.muxed_conn.peer_id
        if msg.HasField("peer") and msg.peer.id and msg.peer.id != remote.to_bytes():
            return await self._refuse(stream, remote, "a reservation in another peer's name")
        try:
            approved = await self.may_reserve(remote)
        except Exception:  # the database is closing or busy: refuse this one, the node retries
            log_fault(log, "cannot tell whether %s may reserve; refused", remote)
            approved = False
        if not approved:
            return await self._refuse(stream, remote, "not an approved provider")
        await super()._handle_reserve(stream, msg)

    async def _refuse(self, stream, remote: ID, why: str) -> None:
        log.info("relay reservation refused to %s: %s", remote, why)
        await self._send_status(stream, StatusCode.PERMISSION_DENIED, why)


class DialbackProbes:
    """The /llorch/dialback/1 handler with its costs bounded: each probe is up to DIALBACK_PORTS_MAX TCP connects of
    up to DIALBACK_CONNECT_TIMEOUT_S in worker threads, so a peer gets one probe at a time, and all peers together
    DIALBACK_PROBES_MAX; a probe beyond that is refused at once (the stream is reset; the node asks again later)."""

    def __init__(self, key: SigningKey) -> None:
        self.key = key
        self._busy: set[ID] = set()

    async def serve(self, stream) -> None:
        peer = stream.muxed_conn.peer_id
        if peer in self._busy or len(self._busy) >= limits.DIALBACK_PROBES_MAX:
            log.info("dial-back probe from %s refused: %s", peer,
                     "one is running for it already" if peer in self._busy else "too many probes at once")
            await close_quietly(stream, reset=True)
            return
        self._busy.add(peer)
        try:
            await serve_dialback(stream, self.key)
        finally:
            self._busy.discard(peer)


async def serve_dialback(stream, key: SigningKey) -> None:
    """/llorch/dialback/1, the gateway side: read one DialbackRequest, try a plain TCP connect to the requester's
    observed IP on each asked port, answer which accepted with an ``Observation`` of that IP signed by ``key``.
    Never dials another host; never over a relayed connection (its observed address is the relay's)."""
    finished = False
    try:
        remote = stream.get_remote_address()
        peer_key = peer_key_of(stream.muxed_conn.peer_id)
        if not remote or peer_key is None or "/p2p-circuit" in str(
                getattr(stream.muxed_conn, "get_transport_addresses", lambda: "")()):
            return
        with trio.fail_after(limits.DIALBACK_CONNECT_TIMEOUT_S):
            request = DialbackRequest.from_bytes(await dialback_reader().read(stream))
        reachable = [port for port in request.ports if await _accepts(remote[0], port)]
        observation = Observation(v=VERSION, gateway_key=key.public_key, peer_key=peer_key, ip=remote[0],
                                  observed_ms=int(time.time() * 1000)).seal(key)
        with trio.fail_after(limits.DIALBACK_CONNECT_TIMEOUT_S):
            await stream.write(DialbackReply(remote[0], tuple(reachable), observation).to_bytes())
        finished = True
    except (ProtocolError, trio.TooSlowError) as exc:
        log.info("dial-back probe from %s refused: %s", stream.muxed_conn.peer_id, exc)
    except Exception as exc:  # the peer hung up mid-probe: nothing to answer
        log.debug("dial-back probe ended: %s", exc)
    finally:
        await close_quietly(stream, reset=not finished)


async def _accepts(host: str, port: int) -> bool:
    """Whether a fresh TCP connection to host:port is accepted within the timeout (then closed at once)."""
    def connect() -> bool:
        try:
            with socket.create_connection((host, port), timeout=limits.DIALBACK_CONNECT_TIMEOUT_S):
                return True
        except OSError:
            return False
    return await trio.to_thread.run_sync(connect)


