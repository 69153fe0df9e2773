"""/llorch/dialback/1: a node asks a gateway it trusts whether the node can be dialled directly (docs/protocol.md §5a).

A node behind NAT cannot tell from inside whether its listen port is reachable, and libp2p's AutoNAT cannot tell it
either when the only server is a gateway it is already connected to: py-libp2p's AutoNAT server "dials back" with
``host.connect``, which returns at once on the existing connection and so always reports "reachable"; and AutoNAT
wants four agreeing servers. So the node asks each gateway it bootstraps to for a dial-back over a fresh TCP socket:

    node → gateway   one frame: DialbackRequest {ports: [uint16, 0..4]}
    gateway → node   one frame: DialbackReply {observed_ip: str, reachable: [uint16], observation: bin}

The gateway connects (plain TCP, a new socket, never its libp2p swarm) to ``observed_ip:port`` for each port, where
``observed_ip`` is the address the node's own connection arrived from: it never dials any other host, so a probe
cannot be turned against a third party. ``reachable`` lists the ports that accepted, a subset of the request.
``observation`` is an ``Observation`` envelope the gateway signs: "peer P's connection came from ``observed_ip`` at
``observed_ms``". A peer shows it to another peer in a hole punch (node/hole_punch.py), which dials only that IP.
A request with no ports asks for the observation alone (nothing is dialled).

A frame is an unsigned varint length, then that many bytes of canonical msgpack (the same framing as /llorch/infer/1),
at most DIALBACK_FRAME_BYTES_MAX. Parsing is strict: a field missing, extra or out of range raises ProtocolError.
"""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import ip_address
from typing import ClassVar

from llorch.ledger.errors import EncodingError, SignatureError
from llorch.ledger.objects import SignedObject
from llorch.node import limits
from llorch.node.errors import ProtocolError
from llorch.node.wire.frames import OneFrame, decode_small_frame, encode_small_frame

DIALBACK_PROTOCOL_ID = "/llorch/dialback/1"


def check_ports(ports: object, name: str, count_min: int) -> tuple[int, ...]:
    if not isinstance(ports, (list, tuple)) or not count_min <= len(ports) <= limits.DIALBACK_PORTS_MAX:
        raise ProtocolError(f"{name} must be a list of {count_min}..{limits.DIALBACK_PORTS_MAX} ports")
    if not all(type(port) is int and 0 < port < 65536 for port in ports) or len(set(ports)) != len(ports):
        raise ProtocolError(f"{name} must be distinct TCP ports 1..65535, got {list(ports)[:8]!r}")
    return tuple(ports)


@dataclass(frozen=True)
class DialbackRequest:
    ports: tuple[int, ...]

    def __post_init__(self) -> None:
        check_ports(self.ports, "ports", 0)

    def to_bytes(self) -> bytes:
        return _frame({"ports": list(self.ports)})

    @classmethod
    def from_bytes(cls, frame: bytes) -> "DialbackRequest":
        return cls(check_ports(_unframe(frame, {"ports"})["ports"], "ports", 0))


def check_ip(ip: object, name: str) -> str:
    """An IPv4 or IPv6 address a peer can be dialled at (not unspecified, not multicast); ProtocolError otherwise."""
    try:
        parsed = ip_address(ip) if isinstance(ip, str) else None
    except ValueError:
        parsed = None
    if not isinstance(ip, str) or parsed is None or parsed.is_unspecified or parsed.is_multicast:
        raise ProtocolError(f"{name} {str(ip)[:64]!r} is not a unicast IPv4 or IPv6 address")
    return ip


@dataclass(frozen=True)
class Observation(SignedObject):
    """A gateway's signed statement that ``peer_key``'s connection to it came from ``ip`` at ``observed_ms``."""
    SIGNED_TYPE: ClassVar[str] = "observation"
    SIGNER_FIELD: ClassVar[str] = "gateway_key"
    FIELDS: ClassVar[dict[str, str]] = {
        "v": "uint", "gateway_key": "key", "peer_key": "key", "ip": "str", "observed_ms": "uint",
    }

    v: int
    gateway_key: bytes
    peer_key: bytes
    ip: str
    observed_ms: int

    def _validate(self) -> None:
        try:
            check_ip(self.ip, "ip")
        except ProtocolError as exc:
            raise EncodingError(str(exc)) from None

    @classmethod
    def checked(cls, envelope: bytes, gateway_key: bytes, peer_key: bytes, now_ms: int) -> "Observation":
        """The observation in ``envelope`` if ``gateway_key`` signed it about ``peer_key`` within
        OBSERVATION_AGE_MS_MAX of ``now_ms``; ProtocolError saying what is wrong otherwise."""
        try:
            observation = cls.from_envelope(envelope)
        except (EncodingError, SignatureError) as exc:
            raise ProtocolError(f"not a valid observation: {exc}") from None
        if observation.gateway_key != gateway_key:
            raise ProtocolError("the observation is signed by another gateway than the one asked")
        if observation.peer_key != peer_key:
            raise ProtocolError("the observation is about another peer")
        if abs(now_ms - observation.observed_ms) > limits.OBSERVATION_AGE_MS_MAX:
            raise ProtocolError(f"the observation was made at {observation.observed_ms}, more than "
                                f"{limits.OBSERVATION_AGE_MS_MAX} ms from now ({now_ms})")
        return observation


@dataclass(frozen=True)
class DialbackReply:
    observed_ip: str
    reachable: tuple[int, ...]
    observation: bytes

    def __post_init__(self) -> None:
        check_ip(self.observed_ip, "observed_ip")
        check_ports(self.reachable, "reachable", 0)
        if not isinstance(self.observation, bytes) or not self.observation:
            raise ProtocolError("observation must be non-empty bin")

    def to_bytes(self) -> bytes:
        return _frame({"observed_ip": self.observed_ip, "reachable": list(self.reachable),
                       "observation": self.observation})

    @classmethod
    def from_bytes(cls, frame: bytes) -> "DialbackReply":
        fields = _unframe(frame, {"observed_ip", "reachable", "observation"})
        return cls(fields["observed_ip"], check_ports(fields["reachable"], "reachable", 0), fields["observation"])

    def answers(self, request: DialbackRequest, gateway_key: bytes, peer_key: bytes, now_ms: int) -> "DialbackReply":
        """This reply, if it answers ``request`` (only ports that were asked about) with an observation of
        ``peer_key`` at ``observed_ip`` signed by ``gateway_key``; ProtocolError otherwise."""
        if not set(self.reachable) <= set(request.ports):
            raise ProtocolError(f"the gateway reports ports {list(self.reachable)} reachable, but was asked about "
                                f"{list(request.ports)} only")
        if Observation.checked(self.observation, gateway_key, peer_key, now_ms).ip != self.observed_ip:
            raise ProtocolError("the signed observation names another IP than observed_ip")
        return self


_frame = encode_small_frame


def reader() -> OneFrame:
    """Reads one dial-back frame off a stream."""
    return OneFrame(limits.DIALBACK_FRAME_BYTES_MAX, "dial-back")


def _unframe(frame: bytes, keys: set[str]) -> dict:
    """The one message of a complete frame (length prefix included), with exactly ``keys``."""
    fields = decode_small_frame(frame, limits.DIALBACK_FRAME_BYTES_MAX, "dial-back")
    if set(fields) != keys:
        raise ProtocolError(f"dial-back frame must be a map with exactly {sorted(keys)}")
    return fields
