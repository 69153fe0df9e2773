"""The client side of /llorch/ledger/1: ``request_ledger`` (one request, one reply, under timeouts) for the gateway's
witness, and ``fetch_ledger`` (a whole ledger, paged) for an auditor holding a grant."""

from __future__ import annotations

import trio
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr
from multiaddr import Multiaddr

from llorch.ledger import limits as ledger_limits
from llorch.ledger.note import NoteError, open_checkpoint
from llorch.ledger.objects import ledger_origin
from llorch.ledger.signing import peer_id_of
from llorch.ledger.material import LedgerMaterial
from llorch.node import limits
from llorch.node.errors import ProtocolError
from llorch.node.wire.frames import Error
from llorch.node.wire.infer_protocol import Role
from llorch.node.wire.ledger_protocol import LEDGER_PROTOCOL_ID, GetCheckpoint, GetEntries, LedgerProtocol
from llorch.node.hole_punch import PunchFailed, direct_addr_to, punch
from llorch.node.p2p import P2P, connect_relayed, dial_only_announced, peer_key_of
from llorch.node.stream_io import close_quietly, read_frame, write_frame

OPEN_TIMEOUT_S = 10.0


class LedgerRequestFailed(Exception):
    """The provider could not be reached, broke the protocol, or answered with an error frame (``code``)."""

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.code = code


async def request_ledger(p2p: P2P, provider_key: bytes, addrs: list[str], request):
    peer = ID.from_base58(peer_id_of(provider_key))
    dial_only_announced(p2p, peer, addrs)
    if peer not in p2p.host.get_network().connections:
        await connect_relayed(p2p, peer, addrs)       # a relayed address is one the provider announced
    protocol = LedgerProtocol(Role.CLIENT)
    try:
        with trio.fail_after(OPEN_TIMEOUT_S):
            stream = await p2p.host.new_stream(peer, [TProtocol(LEDGER_PROTOCOL_ID)])
    except Exception as exc:  # dial and negotiation errors come in many types; all mean "unreachable now"
        raise LedgerRequestFailed(f"cannot open a ledger stream: {type(exc).__name__}: {exc}") from None
    finished = False
    try:
        await write_frame(stream, protocol, request)
        reply = await read_frame(stream, protocol, limits.LEDGER_READ_TIMEOUT_S)
        finished = True
    except ProtocolError as exc:
        raise LedgerRequestFailed(str(exc)) from None
    finally:
        await close_quietly(stream, reset=not finished)
    if isinstance(reply, Error):
        raise LedgerRequestFailed(f"provider refused ({reply.code}): {reply.message}", reply.code)
    return reply


async def fetch_ledger(p2p: P2P, provider_address: str, grant: bytes = b"",
                       page_entries: int = ledger_limits.ENTRIES_PAGE_MAX, punch: bool = False,
                       say=lambda line: None) -> LedgerMaterial:
    """An auditor's copy of a provider's ledger: its latest signed checkpoint and every entry up to it, paged, as
    material `llorch ledger verify` checks (the entries are trusted no more than a file's would be). ``grant`` is
    the provider's auditor grant for this host's key (empty for a gateway the node trusts). With ``punch``, a
    provider reached through a relay is asked for a hole punch first (node/hole_punch.py); ``say`` is told how the
    provider was reached."""
    try:
        info = info_from_p2p_addr(Multiaddr(provider_address))
        provider_key = peer_key_of(info.peer_id)
    except Exception as exc:  # py-multiaddr and py-libp2p raise several types for a bad address
        raise LedgerRequestFailed(f"not a provider address ending in /p2p/<peer id>: {provider_address!r} "
                                  f"({exc})") from None
    if provider_key is None:
        raise LedgerRequestFailed(f"{info.peer_id} is not an Ed25519 peer id")
    addrs = [str(addr) for addr in info.addrs]
    if punch:
        await reach_directly(p2p, info.peer_id, addrs, say)
    checkpoint = await request_ledger(p2p, provider_key, addrs, GetCheckpoint())
    try:
        size = open_checkpoint(checkpoint.note, ledger_origin(provider_key), provider_key).size
    except NoteError as exc:
        raise LedgerRequestFailed(f"the provider's checkpoint is not valid: {exc}") from None
    entries: list[bytes] = []
    while len(entries) < size:
        end = min(size, len(entries) + page_entries)
        reply = await request_ledger(p2p, provider_key, addrs, GetEntries(len(entries), end, grant))
        if reply.start != len(entries) or len(reply.entries) > end - len(entries):
            raise LedgerRequestFailed(f"the provider answered entries {reply.start}+{len(reply.entries)} to a "
                                      f"request for [{len(entries)}, {end})")
        entries.extend(reply.entries)
    return LedgerMaterial(entries, [checkpoint.note], [])


async def reach_directly(p2p: P2P, peer: ID, addrs: list[str], say) -> None:
    """If ``peer`` announced only relayed addresses, connect through its relay and try a hole punch; ``say`` how it
    is reached. A failed punch leaves the relayed connection in use; a peer with a direct address is left to the
    first request to dial."""
    if any("/p2p-circuit" not in addr for addr in addrs):
        return
    dial_only_announced(p2p, peer, addrs)
    if not await connect_relayed(p2p, peer, addrs):
        return                                       # the first request says why it cannot reach the peer
    if direct_addr_to(p2p, peer) is not None:
        say(f"reached {peer} directly at {direct_addr_to(p2p, peer)}")
        return
    try:
        say(f"reached {peer} directly at {await punch(p2p, peer)} (hole-punched)")
    except PunchFailed as exc:
        say(f"reached {peer} through a relay; hole punch failed: {exc}")
