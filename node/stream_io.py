"""The I/O half of the stream protocols: move bytes between a libp2p stream and a sans-IO protocol object.

Every read is size-capped (by the protocol's buffer and frame limits) and timed out; libp2p's stream exceptions are
translated into ProtocolError here, so callers handle one error type for "the peer or the link failed".
"""

from __future__ import annotations

import logging
import time

import trio
from libp2p.exceptions import BaseLibp2pError
from libp2p.network.stream.exceptions import StreamEOF

from llorch.node import limits
from llorch.node.errors import FrameTimeout, ProtocolError
from llorch.node.wire.frames import F, FramedProtocol

log = logging.getLogger("llorch.node")


def now_ms() -> int:
    """Wall-clock time in integer milliseconds: the time base of every signed object."""
    return time.time_ns() // 1_000_000


async def read_frame(stream, protocol: FramedProtocol[F], timeout_s: float) -> F:
    """Read until the protocol yields one frame; raise ProtocolError on timeout, EOF, reset or a bad frame."""
    with trio.move_on_after(timeout_s) as scope:
        while True:
            frame = protocol.next_frame()
            if frame is not None:
                return frame
            try:
                data = await stream.read(limits.STREAM_READ_BYTES)
            except StreamEOF:
                raise ProtocolError("peer closed the stream before a complete frame") from None
            except BaseLibp2pError as exc:
                raise ProtocolError(f"stream failed while reading: {type(exc).__name__}: {exc}") from None
            if not data:
                raise ProtocolError("peer closed the stream before a complete frame")
            protocol.receive_data(data)
    assert scope.cancelled_caught
    raise FrameTimeout(f"no complete frame within {timeout_s:g} s")


async def write_frame(stream, protocol: FramedProtocol[F], frame: F,
                      timeout_s: float = limits.FRAME_WRITE_TIMEOUT_S) -> None:
    data = protocol.send(frame)
    with trio.move_on_after(timeout_s) as scope:
        try:
            await stream.write(data)
        except BaseLibp2pError as exc:
            raise ProtocolError(f"stream failed while writing: {type(exc).__name__}: {exc}") from None
    if scope.cancelled_caught:
        raise ProtocolError(f"peer did not take a {frame.TYPE} frame within {timeout_s:g} s")


async def close_quietly(stream, reset: bool) -> None:
    """Half-close (or reset) a stream, ignoring a peer that is already gone."""
    with trio.CancelScope(shield=True), trio.move_on_after(limits.FRAME_WRITE_TIMEOUT_S):
        try:
            await (stream.reset() if reset else stream.close())
        except Exception:  # the stream is finished either way
            pass


async def serve_stream(stream, name: str, serve) -> None:
    """Run ``serve(stream)`` as a libp2p stream handler: never let an exception escape (it would take the whole
    host down), log why a stream was dropped, and close the stream cleanly on success or reset it on failure."""
    reset = True
    try:
        await serve(stream)
        reset = False
    except ProtocolError as exc:
        log.warning("%s stream dropped: %s", name, exc)
    except trio.Cancelled:
        raise
    except Exception:
        log.exception("%s stream failed unexpectedly", name)
    finally:
        await close_quietly(stream, reset=reset)


class Unanswered(Exception):
    """A one-question exchange (``ask_once``) got no answer: not connected, no answer in time, the stream closed
    or failed, or the answer is not one frame; the message says which."""


async def ask_once(host, peer, protocol_id: str, question: bytes, answer_bytes_max: int, timeout_s: float,
                   what: str, clock=now_ms) -> tuple[bytes, int, int]:
    """Send one question frame to ``peer`` on a new stream over the connection this host keeps to it (never a new
    dial) and read one answer frame (at most ``answer_bytes_max``), all within ``timeout_s``; return (the answer
    frame, the clock when the question went, the clock when the answer was in). ``what`` names the protocol in
    the Unanswered it raises. /llorch/listing/1 and /llorch/catalog/1 (node → gateway) use it."""
    from libp2p.custom_types import TProtocol

    from llorch.node.wire.frames import OneFrame

    if peer not in host.get_network().connections:
        raise Unanswered(f"not connected to {peer}")
    stream, finished = None, False
    try:
        with trio.fail_after(timeout_s):
            stream = await host.new_stream(peer, [TProtocol(protocol_id)])
            sent_ms = clock()
            await stream.write(question)
            reader = OneFrame(answer_bytes_max, what)
            while reader.frame is None:
                data = await stream.read(answer_bytes_max)
                if not data:
                    raise Unanswered(f"{peer} closed the {what} stream without answering (a gateway from before "
                                     f"{protocol_id} does not answer it)")
                reader.receive_data(data)
            received_ms = clock()
            finished = True
        return reader.frame, sent_ms, received_ms
    except trio.TooSlowError:
        raise Unanswered(f"{peer} did not answer a {what} question within {timeout_s:g} s") from None
    except ProtocolError as exc:
        raise Unanswered(f"{peer} answered a {what} question badly: {exc}") from None
    except Unanswered:
        raise
    except Exception as exc:  # stream and negotiation errors come in many types
        raise Unanswered(f"{what} question to {peer} failed: {type(exc).__name__}: {exc}") from None
    finally:
        if stream is not None:
            await close_quietly(stream, reset=not finished)


async def answer_once(stream, limiter: trio.CapacityLimiter, busy, question_bytes_max: int, read_timeout_s: float,
                      write_timeout_s: float, answer, what: str):
    """Serve one question stream of a one-question protocol (the peer's side of ``ask_once``): read one question
    frame within ``read_timeout_s`` (a frame over ``question_bytes_max``, or with bytes after it, is handed to
    ``answer`` as it is, to be refused as malformed), write ``await answer(frame)`` (``busy`` when ``limiter`` has
    no room) within ``write_timeout_s``, close. Returns what was sent, or None if nothing was; never raises."""
    asker = stream.muxed_conn.peer_id
    finished, sent = False, None
    try:
        try:
            limiter.acquire_nowait()
        except trio.WouldBlock:
            reply = busy
        else:
            try:
                reply = await answer(await read_question(stream, question_bytes_max, read_timeout_s, what))
            finally:
                limiter.release()
        with trio.fail_after(write_timeout_s):
            await stream.write(reply.to_bytes())
        finished, sent = True, reply
    except (ProtocolError, trio.TooSlowError) as exc:
        log.info("%s question from %s dropped: %s", what, asker, exc or "timed out")
    except Exception as exc:  # the peer hung up mid-question: nothing to answer
        log.debug("%s question from %s ended: %s", what, asker, exc)
    finally:
        await close_quietly(stream, reset=not finished)
    return sent


async def read_question(stream, bytes_max: int, timeout_s: float, what: str) -> bytes:
    """One whole question frame, within ``timeout_s`` and ``bytes_max``. A frame over the limit, or bytes after it,
    is returned as it is, to be refused as malformed; a peer that closes early or is too slow raises ProtocolError
    / TooSlowError."""
    from llorch.node.wire.frames import OneFrame

    reader = OneFrame(bytes_max, what)
    received = b""
    with trio.fail_after(timeout_s):
        while reader.frame is None:
            data = await stream.read(bytes_max)
            if not data:
                raise ProtocolError(f"the peer closed the stream before a whole {what} question")
            received += data
            try:
                reader.receive_data(data)
            except ProtocolError:
                return received
    return reader.frame
