"""/llorch/dialback/1: a node asks a gateway it trusts whether the node can be dialled directly (docs/protocol.md §5a).

A node behind NAT cannot tell from inside whether its listen port is reachable, and libp2p's AutoNAT cannot tell it
either when the only server is a gateway it is already connected to: py-libp2p's AutoNAT server "dials back" with
``host.connect``, which returns at once on the existing connection and so always reports "reachable"; and AutoNAT
wants four agreeing servers. So the node asks each gateway it bootstraps to for a dial-back over a fresh TCP socket:

    node → gateway   one frame: DialbackRequest {ports: [uint16, 1..4]}
    gateway → node   one frame: DialbackReply {observed_ip: str, reachable: [uint16]}

The gateway connects (plain TCP, a new socket, never its libp2p swarm) to ``observed_ip:port`` for each port, where
``observed_ip`` is the address the node's own connection arrived from: it never dials any other host, so a probe
cannot be turned against a third party. ``reachable`` lists the ports that accepted, a subset of the request.

A frame is an unsigned varint length, then that many bytes of canonical msgpack (the same framing as /llorch/infer/1),
at most DIALBACK_FRAME_BYTES_MAX. Parsing is strict: a field missing, extra or out of range raises ProtocolError.
"""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import ip_address

from llorch.ledger import canonical
from llorch.ledger.errors import EncodingError
from llorch.node import limits
from llorch.node.errors import ProtocolError
from llorch.node.wire.frames import decode_uvarint, encode_uvarint

DIALBACK_PROTOCOL_ID = "/llorch/dialback/1"


def _check_ports(ports: object, name: str, count_min: int) -> tuple[int, ...]:
    if not isinstance(ports, (list, tuple)) or not count_min <= len(ports) <= limits.DIALBACK_PORTS_MAX:
        raise ProtocolError(f"{name} must be a list of {count_min}..{limits.DIALBACK_PORTS_MAX} ports")
    if not all(type(port) is int and 0 < port < 65536 for port in ports) or len(set(ports)) != len(ports):
        raise ProtocolError(f"{name} must be distinct TCP ports 1..65535, got {list(ports)[:8]!r}")
    return tuple(ports)


@dataclass(frozen=True)
class DialbackRequest:
    ports: tuple[int, ...]

    def __post_init__(self) -> None:
        _check_ports(self.ports, "ports", 1)

    def to_bytes(self) -> bytes:
        return _frame({"ports": list(self.ports)})

    @classmethod
    def from_bytes(cls, frame: bytes) -> "DialbackRequest":
        return cls(_check_ports(_unframe(frame, {"ports"})["ports"], "ports", 1))


@dataclass(frozen=True)
class DialbackReply:
    observed_ip: str
    reachable: tuple[int, ...]

    def __post_init__(self) -> None:
        try:
            ip_address(self.observed_ip)
        except ValueError:
            raise ProtocolError(f"observed_ip {str(self.observed_ip)[:64]!r} is not an IPv4 or IPv6 address") from None
        _check_ports(self.reachable, "reachable", 0)

    def to_bytes(self) -> bytes:
        return _frame({"observed_ip": self.observed_ip, "reachable": list(self.reachable)})

    @classmethod
    def from_bytes(cls, frame: bytes) -> "DialbackReply":
        fields = _unframe(frame, {"observed_ip", "reachable"})
        if not isinstance(fields["observed_ip"], str):
            raise ProtocolError("observed_ip must be a string")
        return cls(fields["observed_ip"], _check_ports(fields["reachable"], "reachable", 0))

    def answers(self, request: DialbackRequest) -> "DialbackReply":
        """This reply, if it answers ``request`` (only ports that were asked about); ProtocolError otherwise."""
        if not set(self.reachable) <= set(request.ports):
            raise ProtocolError(f"the gateway reports ports {list(self.reachable)} reachable, but was asked about "
                                f"{list(request.ports)} only")
        return self


def _frame(fields: dict) -> bytes:
    body = canonical.encode(fields)
    return encode_uvarint(len(body)) + body


def _unframe(frame: bytes, keys: set[str]) -> dict:
    """The one message of a complete frame (length prefix included), with exactly ``keys``."""
    if len(frame) > limits.DIALBACK_FRAME_BYTES_MAX:
        raise ProtocolError(f"dial-back frame of {len(frame)} bytes, limit {limits.DIALBACK_FRAME_BYTES_MAX}")
    header = decode_uvarint(frame)
    if header is None or header[1] + header[0] != len(frame):
        raise ProtocolError("dial-back frame: the length prefix does not match the bytes")
    try:
        fields = canonical.decode(frame[header[1]:])
    except EncodingError as exc:
        raise ProtocolError(f"dial-back frame is not canonical msgpack: {exc}") from None
    if not isinstance(fields, dict) or set(fields) != keys:
        raise ProtocolError(f"dial-back frame must be a map with exactly {sorted(keys)}")
    return fields


def frame_length(buffer: bytes) -> int | None:
    """The total length of the frame starting ``buffer`` once its prefix is complete, else None; ProtocolError if
    it announces more than DIALBACK_FRAME_BYTES_MAX."""
    header = decode_uvarint(buffer)
    if header is None:
        return None
    total = header[0] + header[1]
    if total > limits.DIALBACK_FRAME_BYTES_MAX:
        raise ProtocolError(f"dial-back frame of {total} bytes announced, limit {limits.DIALBACK_FRAME_BYTES_MAX}")
    return total
