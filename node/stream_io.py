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
