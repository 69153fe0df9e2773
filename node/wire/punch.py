"""/llorch/punch/1: two peers joined by a relayed connection through a gateway try to open a direct one by TCP
simultaneous open (docs/protocol.md §5c). The behaviour is in node/hole_punch.py; this is the wire.

    initiator → responder   offer {t: "offer", observation: bin, ports: [uint16, 1..4]}
    responder → initiator   offer (the responder's)
    initiator → responder   sync  {t: "sync"}

``observation`` is the relaying gateway's signed ``Observation`` of the sender's IP (node/wire/dialback.py), ``ports``
the sender's TCP listen ports. Each side dials only the IP in the other's observation, and only at the ports offered.

A frame is an unsigned varint length, then that many bytes of canonical msgpack, at most PUNCH_FRAME_BYTES_MAX.
Parsing is strict: a field missing, extra or out of range raises ProtocolError.
"""

from __future__ import annotations

from dataclasses import dataclass

from llorch.node.errors import ProtocolError
from llorch.node.wire.dialback import check_ports
from llorch.node.wire.frames import decode_small_frame, encode_small_frame, small_frame_length

PUNCH_PROTOCOL_ID = "/llorch/punch/1"
PUNCH_FRAME_BYTES_MAX = 1024
OBSERVATION_BYTES_MAX = 512


@dataclass(frozen=True)
class Offer:
    observation: bytes
    ports: tuple[int, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.observation, bytes) or not 0 < len(self.observation) <= OBSERVATION_BYTES_MAX:
            raise ProtocolError(f"an offer's observation must be 1..{OBSERVATION_BYTES_MAX} bytes of bin")
        check_ports(self.ports, "ports", 1)

    def to_bytes(self) -> bytes:
        return _frame({"t": "offer", "observation": self.observation, "ports": list(self.ports)})


SYNC = "sync"


def sync_bytes() -> bytes:
    return _frame({"t": SYNC})


def decode(frame: bytes) -> Offer | str:
    """An ``Offer`` or ``SYNC`` from one complete frame; ProtocolError for anything else."""
    fields = _unframe(frame)
    kind = fields.get("t")
    if kind == "offer" and set(fields) == {"t", "observation", "ports"}:
        return Offer(fields["observation"], check_ports(fields["ports"], "ports", 1))
    if kind == SYNC and set(fields) == {"t"}:
        return SYNC
    raise ProtocolError(f"a punch frame must be an offer or a sync with exactly their fields, got keys "
                        f"{sorted(fields)[:8]} and t={str(kind)[:16]!r}")


class FrameReader:
    """Reads the frames of one punch stream in order, whatever the reads' boundaries (two frames may arrive in one
    read); never buffers more than one frame's limit."""

    def __init__(self, stream) -> None:
        self.stream = stream
        self._buffer = b""

    async def next(self) -> Offer | str:
        while True:
            total = small_frame_length(self._buffer, PUNCH_FRAME_BYTES_MAX, "punch")
            if total is not None and len(self._buffer) >= total:
                frame, self._buffer = self._buffer[:total], self._buffer[total:]
                return decode(frame)
            data = await self.stream.read(PUNCH_FRAME_BYTES_MAX)
            if not data:
                raise ProtocolError("the punch stream ended before a whole frame")
            self._buffer += data


_frame = encode_small_frame


def _unframe(frame: bytes) -> dict:
    return decode_small_frame(frame, PUNCH_FRAME_BYTES_MAX, "punch")
