"""The gateway's side of /llorch/ledger/1 (``request_ledger``): one request, one reply, under timeouts."""

from __future__ import annotations

import trio
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID
from multiaddr import Multiaddr

from llorch.ledger.signing import peer_id_of
from llorch.node import limits
from llorch.node.errors import ProtocolError
from llorch.node.wire.frames import Error
from llorch.node.wire.infer_protocol import Role
from llorch.node.wire.ledger_protocol import LEDGER_PROTOCOL_ID, LedgerProtocol
from llorch.node.p2p import P2P
from llorch.node.stream_io import close_quietly, read_frame, write_frame

OPEN_TIMEOUT_S = 10.0


class LedgerRequestFailed(Exception):
    """The provider could not be reached, broke the protocol, or answered with an error frame (``code``)."""

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.code = code


async def request_ledger(p2p: P2P, provider_key: bytes, addrs: list[str], request):
    peer = ID.from_base58(peer_id_of(provider_key))
    if addrs:
        p2p.host.get_peerstore().add_addrs(peer, [Multiaddr(addr) for addr in addrs], 600)
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
