"""The gateway's side of /llorch/infer/2 (``request_inference``): take a stream to the provider (one opened ahead of
need by the ``StreamPool`` when there is one, else a new one), send the request, wait for admission, then hand out
tokens frames (saying ``more`` as it takes them: flow control) and the final frame one by one.

Drives node.infer_protocol.InferProtocol in the CLIENT role; all bytes go through node.stream_io.
``AttemptFailed`` means "this provider did not start serving: try the next one".
"""

from __future__ import annotations

import enum
import logging
from collections import deque
from contextlib import asynccontextmanager
from typing import AsyncIterator

import trio
from libp2p.custom_types import TProtocol
from libp2p.host.ping import ID as PING_PROTOCOL_ID, perform_ping_roundtrip
from libp2p.peer.id import ID

from llorch.gateway import limits
from llorch.node.wire.attestation import Attestation
from llorch.node.errors import FrameTimeout, ProtocolError
from llorch.node.wire.frames import Accepted, Busy, Cancel, Error, Final, More, Request, Tokens
from llorch.node.wire.infer_protocol import INFER_PROTOCOL_ID, InferProtocol, Role
from llorch.node.p2p import P2P, dial_only_announced
from llorch.node.stream_io import close_quietly, read_frame, write_frame
from llorch.ledger.errors import sole_exception
from llorch.ledger.signing import peer_id_of

log = logging.getLogger("llorch.gateway")


class Refusal(enum.Enum):
    """Why a provider did not start serving a ticket."""

    BUSY = "busy"                    # every slot taken (no mark against it)
    BAD_REQUEST = "bad_request"      # the request itself is unservable: no other provider would differ
    REFUSED = "refused"              # it refused this ticket (an error frame)
    UNREACHABLE = "unreachable"      # no stream, or the stream broke before admission
    FAILED = "failed"                # admitted, then failed before any text reached the customer
    SUSPENDED = "suspended"          # caught cheating since placement: this gateway sends it nothing more


class AttemptFailed(Exception):
    """The provider refused (busy, rejected ticket) or failed before admission; nothing was served. ``refusal``
    says which; ``code`` is the provider's error code, if it sent one."""

    def __init__(self, reason: str, refusal: Refusal = Refusal.UNREACHABLE, code: str | None = None) -> None:
        super().__init__(reason)
        self.refusal = refusal
        self.code = code

    @property
    def busy(self) -> bool:
        return self.refusal is Refusal.BUSY


class InferenceCall:
    """An admitted request on an open stream; read frames with ``next_frame``."""

    def __init__(self, stream, protocol: InferProtocol) -> None:
        self._stream = stream
        self._protocol = protocol

    async def next_frame(self, timeout_s: float | None = None) -> Tokens | Final:
        """The next tokens or final frame (waiting at most ``timeout_s``, by default TOKEN_TIMEOUT_S). Raises
        FrameTimeout when none arrives in time, ProtocolError on a broken stream or an error frame. Taking a tokens
        frame may say ``more`` to the provider: it sends only so far ahead of what the gateway took, and holds its
        tokens for one frame meanwhile (docs/protocol.md §6)."""
        frame = await read_frame(self._stream, self._protocol, timeout_s or limits.TOKEN_TIMEOUT_S)
        if isinstance(frame, Error):
            raise ProtocolError(f"provider error {frame.code}: {frame.message}")
        assert isinstance(frame, (Tokens, Final))
        if isinstance(frame, Tokens) and self._protocol.owes_more:
            await write_frame(self._stream, self._protocol, More(self._protocol.token_frames))
        return frame

    async def cancel(self) -> None:
        """Tell the provider the customer went away: it stops within a token and still sends its receipt."""
        await write_frame(self._stream, self._protocol, Cancel())


class StreamPool:
    """Streams to providers, ready for a request: opened and negotiated (multistream-select) ahead of need, or given
    back by a request that ended cleanly (the next request goes on the same stream, docs/protocol.md §6), so a
    request pays for neither on its own path. A take that leaves none orders a spare in the background. At most
    POOLED_STREAMS_PER_PROVIDER_MAX wait per provider, each for at most POOLED_STREAM_AGE_S_MAX (the node waits
    REQUEST_READ_TIMEOUT_S for the request frame): a provider nobody places on keeps none for long.

    Only providers this gateway placed on get streams, on the connection they opened or at an address they announced
    (``dial_only_announced``), exactly like a request's own stream. ``run`` is a long-lived task (supervised)."""

    def __init__(self, p2p: P2P) -> None:
        self._p2p = p2p
        self._idle: dict[ID, deque[tuple[float, object]]] = {}
        self._opening: dict[ID, int] = {}
        self._orders_in, self._orders = trio.open_memory_channel[tuple[ID, list[str]]](1024)
        self._nursery: trio.Nursery | None = None

    def take(self, peer: ID):
        """A fresh idle stream to ``peer``, or None."""
        idle = self._idle.get(peer)
        now = trio.current_time()
        while idle:
            opened, stream = idle.popleft()
            if now - opened < limits.POOLED_STREAM_AGE_S_MAX:
                return stream
            self._discard(stream)
        return None

    def keep_spare(self, peer: ID, addrs: list[str]) -> None:
        """Order a stream to ``peer`` in the background unless one is waiting or being opened already."""
        if len(self._idle.get(peer, ())) + self._opening.get(peer, 0) > 0:
            return
        try:
            self._orders_in.send_nowait((peer, addrs))
            self._opening[peer] = self._opening.get(peer, 0) + 1
        except trio.WouldBlock:      # a backlog of orders already: this one is not needed
            pass

    @property
    def running(self) -> bool:
        return self._nursery is not None

    def give_back(self, peer: ID, stream) -> None:
        """A stream whose request ended cleanly (docs/protocol.md §6: the next request may follow on it) waits for
        the next request to ``peer``, unless ``peer`` already has its share (then it is closed)."""
        idle = self._idle.setdefault(peer, deque())
        if len(idle) >= limits.POOLED_STREAMS_PER_PROVIDER_MAX:
            self._discard(stream)
        else:
            idle.append((trio.current_time(), stream))

    def idle(self, peer: ID) -> int:
        """How many streams to ``peer`` are waiting for a request."""
        return len(self._idle.get(peer, ()))

    def forget(self, peer: ID) -> None:
        """Close every idle stream to ``peer`` (it failed or went away)."""
        for _, stream in self._idle.pop(peer, ()):
            self._discard(stream)

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._expire_forever)
            async for peer, addrs in self._orders:
                nursery.start_soon(self._open, peer, addrs)

    async def _open(self, peer: ID, addrs: list[str]) -> None:
        try:
            dial_only_announced(self._p2p, peer, addrs)
            with trio.move_on_after(limits.STREAM_OPEN_TIMEOUT_S):
                stream = await self._p2p.host.new_stream(peer, [TProtocol(INFER_PROTOCOL_ID)])
                self._idle.setdefault(peer, deque()).append((trio.current_time(), stream))
        except Exception as exc:  # libp2p's many error types: the request that needs it will open its own
            log.debug("could not open a stream ahead to %s: %s: %s", peer, type(exc).__name__, exc)
        finally:
            self._opening[peer] -= 1

    async def _expire_forever(self) -> None:
        while True:
            await trio.sleep(limits.POOLED_STREAM_AGE_S_MAX / 4)
            now = trio.current_time()
            for peer, idle in list(self._idle.items()):
                while idle and now - idle[0][0] >= limits.POOLED_STREAM_AGE_S_MAX:
                    self._discard(idle.popleft()[1])
                if not idle:
                    del self._idle[peer]

    def _discard(self, stream) -> None:
        """Close an unused stream: the node sees it end before a request, which it takes quietly."""
        if self._nursery is not None:
            self._nursery.start_soon(close_quietly, stream, False)


@asynccontextmanager
async def request_inference(p2p: P2P, provider: Attestation, request: Request,
                            pool: StreamPool | None = None) -> AsyncIterator[InferenceCall]:
    """Send ``request`` to ``provider`` and wait until it is admitted; yield the call. Closes the stream on exit.

    With a ``pool``, a stream opened ahead is used when there is one; if that stream turns out dead before the
    provider answered anything (its connection went away meanwhile), the request goes once more on a new stream:
    the provider never saw it, so this is not a failure of the provider.

    From the request to the call's end, ``Liveness`` pings a provider that has sent nothing for a moment, and
    closes the connection of one that does not answer: the read in progress fails at once instead of at its
    timeout (30 s for admission, 60 s between tokens), and the provider is out of placement until it attests
    again (gateway/run.py ``Departures``)."""
    peer = ID.from_base58(peer_id_of(provider.provider_key))
    liveness = Liveness(p2p, peer)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(liveness.watch)
            try:
                async with _admitted(p2p, peer, list(provider.addrs), request, pool, liveness) as call:
                    yield call
            finally:
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:              # the caller catches AttemptFailed and the rest by type
        sole = sole_exception(group)
        if sole is group:
            raise
        if liveness.hung and isinstance(sole, AttemptFailed) and sole.refusal is Refusal.UNREACHABLE:
            raise AttemptFailed(liveness.hung) from None
        raise sole from None


@asynccontextmanager
async def _admitted(p2p: P2P, peer: ID, addrs: list[str], request: Request, pool: StreamPool | None,
                    liveness: Liveness) -> AsyncIterator[InferenceCall]:
    dial_only_announced(p2p, peer, addrs)
    stream = pool.take(peer) if pool is not None else None
    if pool is not None:
        pool.keep_spare(peer, addrs)                  # the next request should not wait for a stream either
    if pool is not None and stream is not None:
        protocol = liveness.protocol = InferProtocol(Role.CLIENT)
        try:
            admission = await _send_request(stream, protocol, request)
        except _DeadBeforeAnswer as exc:
            await close_quietly(stream, reset=True)
            pool.forget(peer)
            if liveness.hung:                         # not a stale stream: the provider stopped answering
                raise AttemptFailed(liveness.hung) from None
            log.debug("a pooled stream to %s was dead before any answer (%s): a new one", peer, exc)
            stream = None
    if stream is None:
        stream = await _new_stream(p2p, peer)
        protocol = liveness.protocol = InferProtocol(Role.CLIENT)
        try:
            admission = await _send_request(stream, protocol, request)
        except _DeadBeforeAnswer as exc:
            await close_quietly(stream, reset=True)
            raise AttemptFailed(liveness.hung or str(exc)) from None
    finished = False
    try:
        if isinstance(admission, Busy):
            raise AttemptFailed(f"busy: {admission.reason}", Refusal.BUSY)
        if isinstance(admission, Error):
            refusal = Refusal.BAD_REQUEST if admission.code == "bad_request" else Refusal.REFUSED
            raise AttemptFailed(f"refused ({admission.code}): {admission.message}", refusal, admission.code)
        assert isinstance(admission, Accepted)
        yield InferenceCall(stream, protocol)
        finished = protocol.done
    finally:
        if finished and pool is not None and pool.running:
            pool.give_back(peer, stream)              # the next request to this provider goes on it
        else:
            await close_quietly(stream, reset=not finished)


class Liveness:
    """Whether a provider still answers while it is quiet on a request. Every PROVIDER_QUIET_S that nothing arrived
    on the request's stream, it pings the provider's host (libp2p's /ipfs/ping/1.0.0, which a node answers from its
    event loop even while its engine computes a long prompt); no pong within PROVIDER_PING_TIMEOUT_S, and the
    provider is hung (a frozen machine, or a power cut or a dropped uplink that sent no FIN): every connection to it
    is closed, which fails the read waiting on it and takes the provider out of placement until it attests again.
    A node that wakes finds its connection gone, redials and re-announces. Costs nothing while frames flow."""

    def __init__(self, p2p: P2P, peer: ID) -> None:
        self._p2p, self._peer = p2p, peer
        self.protocol: InferProtocol | None = None
        self.hung = ""                                # why the provider was found hung, once it was

    async def watch(self) -> None:
        seen = 0
        while True:
            await trio.sleep(limits.PROVIDER_QUIET_S)
            received = self.protocol.bytes_received if self.protocol is not None else 0
            if received != seen or (self.protocol is not None and self.protocol.done):
                seen = received
                continue
            if await self._answers_ping():
                continue
            self.hung = (f"{self._peer} sent nothing for {limits.PROVIDER_QUIET_S:g} s and did not answer a ping "
                         f"within {limits.PROVIDER_PING_TIMEOUT_S:g} s")
            log.warning("provider %s: closing its connections", self.hung)
            # Shielded: the request's read fails as the close begins, and its end cancels this task; a close cut
            # short would never tell the network's notifees (Departures), and the provider would stay placeable.
            with trio.CancelScope(shield=True), trio.move_on_after(limits.PROVIDER_PING_TIMEOUT_S):
                await self._p2p.host.get_network().close_peer(self._peer)
            return

    async def _answers_ping(self) -> bool:
        with trio.move_on_after(limits.PROVIDER_PING_TIMEOUT_S):
            stream = None
            try:
                stream = await self._p2p.host.new_stream(self._peer, [PING_PROTOCOL_ID])
                await perform_ping_roundtrip(stream)
                return True
            except Exception as exc:  # a broken connection: the request's own read fails on it too
                log.debug("ping to %s failed: %s: %s", self._peer, type(exc).__name__, exc)
            finally:
                if stream is not None:
                    with trio.CancelScope(shield=True), trio.move_on_after(1):
                        await close_quietly(stream, reset=True)
        return False


class _DeadBeforeAnswer(Exception):
    """The stream failed before the provider answered the request with a single byte."""


async def _new_stream(p2p: P2P, peer: ID):
    try:
        with trio.fail_after(limits.STREAM_OPEN_TIMEOUT_S):
            return await p2p.host.new_stream(peer, [TProtocol(INFER_PROTOCOL_ID)])
    except trio.TooSlowError:
        raise AttemptFailed(f"no stream within {limits.STREAM_OPEN_TIMEOUT_S:g} s") from None
    except Exception as exc:  # libp2p dial/negotiation errors come in many types; all mean "unreachable"
        raise AttemptFailed(f"cannot open a stream: {type(exc).__name__}: {exc}") from None


async def _send_request(stream, protocol: InferProtocol, request: Request):
    """Write the request and read the admission frame (accepted, busy or error). A stream that fails before the
    provider sent a byte raises _DeadBeforeAnswer; one that fails after, AttemptFailed; a slow one FrameTimeout
    is an AttemptFailed too."""
    try:
        await write_frame(stream, protocol, request)
    except ProtocolError as exc:
        raise _DeadBeforeAnswer(str(exc)) from None
    try:
        return await read_frame(stream, protocol, limits.ADMISSION_TIMEOUT_S)
    except ProtocolError as exc:
        if protocol.bytes_received == 0 and not isinstance(exc, FrameTimeout):
            raise _DeadBeforeAnswer(str(exc)) from None
        await close_quietly(stream, reset=True)
        raise AttemptFailed(str(exc)) from None
