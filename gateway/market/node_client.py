"""The gateway's side of /llorch/infer/1 (``request_inference``): open a stream to a provider, send the request,
wait for admission, then hand out token frames and the final frame one by one.

Drives node.infer_protocol.InferProtocol in the CLIENT role; all bytes go through node.stream_io.
``AttemptFailed`` means "this provider did not start serving: try the next one".
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import AsyncIterator

import trio
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID

from llorch.gateway import limits
from llorch.node.wire.attestation import Attestation
from llorch.node.errors import ProtocolError
from llorch.node.wire.frames import Accepted, Busy, Cancel, Error, Final, Request, Token
from llorch.node.wire.infer_protocol import INFER_PROTOCOL_ID, InferProtocol, Role
from llorch.node.p2p import P2P, dial_only_announced
from llorch.node.stream_io import close_quietly, read_frame, write_frame
from llorch.ledger.signing import peer_id_of


class AttemptFailed(Exception):
    """The provider refused (busy, rejected ticket) or failed before admission; nothing was served."""

    def __init__(self, reason: str, busy: bool = False, code: str | None = None) -> None:
        super().__init__(reason)
        self.busy = busy
        self.code = code


class InferenceCall:
    """An admitted request on an open stream; read frames with ``next_frame``."""

    def __init__(self, stream, protocol: InferProtocol) -> None:
        self._stream = stream
        self._protocol = protocol

    async def next_frame(self, timeout_s: float | None = None) -> Token | Final:
        """The next token or final frame (waiting at most ``timeout_s``, by default TOKEN_TIMEOUT_S). Raises
        FrameTimeout when none arrives in time, ProtocolError on a broken stream or an error frame."""
        frame = await read_frame(self._stream, self._protocol, timeout_s or limits.TOKEN_TIMEOUT_S)
        if isinstance(frame, Error):
            raise ProtocolError(f"provider error {frame.code}: {frame.message}")
        assert isinstance(frame, (Token, Final))
        return frame

    async def cancel(self) -> None:
        """Tell the provider the customer went away: it stops within a token and still sends its receipt."""
        await write_frame(self._stream, self._protocol, Cancel())


@asynccontextmanager
async def request_inference(p2p: P2P, provider: Attestation, request: Request) -> AsyncIterator[InferenceCall]:
    """Send ``request`` to ``provider`` and wait until it is admitted; yield the call. Closes the stream on exit."""
    peer = ID.from_base58(peer_id_of(provider.provider_key))
    dial_only_announced(p2p, peer, list(provider.addrs))
    protocol = InferProtocol(Role.CLIENT)
    try:
        with trio.fail_after(limits.STREAM_OPEN_TIMEOUT_S):
            stream = await p2p.host.new_stream(peer, [TProtocol(INFER_PROTOCOL_ID)])
    except trio.TooSlowError:
        raise AttemptFailed(f"no stream within {limits.STREAM_OPEN_TIMEOUT_S:g} s") from None
    except Exception as exc:  # libp2p dial/negotiation errors come in many types; all mean "unreachable"
        raise AttemptFailed(f"cannot open a stream: {type(exc).__name__}: {exc}") from None
    finished = False
    try:
        try:
            await write_frame(stream, protocol, request)
            admission = await read_frame(stream, protocol, limits.ADMISSION_TIMEOUT_S)
        except ProtocolError as exc:
            raise AttemptFailed(str(exc)) from None
        if isinstance(admission, Busy):
            raise AttemptFailed(f"busy: {admission.reason}", busy=True)
        if isinstance(admission, Error):
            raise AttemptFailed(f"refused ({admission.code}): {admission.message}", code=admission.code)
        assert isinstance(admission, Accepted)
        yield InferenceCall(stream, protocol)
        finished = protocol.done
    finally:
        await close_quietly(stream, reset=not finished)
