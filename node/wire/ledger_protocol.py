"""/llorch/ledger/1 as a sans-IO state machine: one request and one response per stream.

    client → server                          server → client
    get_checkpoint {}                        checkpoint {note: bin}            the latest signed checkpoint
    get_entries {start, end, grant: bin}     entries {start, entries: [bin]}   a page of [start, end), maybe shorter;
                                                                               only to a trusted gateway (grant
                                                                               empty) or an auditor's grant holder
    get_consistency {old_size, new_size}     proof {hashes: [bin 32]}          RFC 9162 consistency proof
    get_inclusion {index, size}              proof {hashes: [bin 32]}          RFC 9162 inclusion proof
    put_cosigned {note: bin}                 ack {}                            a witness's cosigned checkpoint
    (any)                                    error {code, message}

States: AWAIT_REQUEST --request--> AWAIT_RESPONSE --its reply | error--> DONE. Frames use the same framing as
/llorch/infer/1 (node/wire/frames.py): uvarint length, canonical msgpack map with "t".
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import ClassVar

from llorch.ledger.note import WITNESS_NAME_PREFIX
from llorch.ledger.signing import peer_id_of
from llorch.node import limits
from llorch.node.errors import ProtocolError
from llorch.node.wire.auditor_grant import GRANT_BYTES_MAX
from llorch.node.wire.frames import Error, FramedProtocol
from llorch.node.wire.infer_protocol import Role

LEDGER_PROTOCOL_ID = "/llorch/ledger/1"


def witness_name(gateway_key: bytes) -> str:
    """The key name a gateway uses for its cosignatures."""
    return WITNESS_NAME_PREFIX + peer_id_of(gateway_key)


HASH_BYTES = 32


def _uint(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**63:
        raise ProtocolError(f"{name} must be an unsigned integer")


def _bins(name: str, values: object, size: int | None = None, count_max: int = 1024) -> None:
    if not isinstance(values, list) or len(values) > count_max or not all(
            isinstance(v, bytes) and (size is None or len(v) == size) for v in values):
        raise ProtocolError(f"{name} must be a list of at most {count_max} bin" + (f" of {size} bytes" if size else ""))


@dataclass(frozen=True)
class GetCheckpoint:
    TYPE: ClassVar[str] = "get_checkpoint"


@dataclass(frozen=True)
class GetEntries:
    TYPE: ClassVar[str] = "get_entries"
    start: int
    end: int
    grant: bytes = b""          # an auditor grant envelope (node/wire/auditor_grant.py); empty from a gateway

    def __post_init__(self) -> None:
        _uint("start", self.start)
        _uint("end", self.end)
        if self.end <= self.start:
            raise ProtocolError("get_entries needs start < end")
        if not isinstance(self.grant, bytes) or len(self.grant) > GRANT_BYTES_MAX:
            raise ProtocolError(f"get_entries.grant must be bin of at most {GRANT_BYTES_MAX} bytes")


@dataclass(frozen=True)
class GetConsistency:
    TYPE: ClassVar[str] = "get_consistency"
    old_size: int
    new_size: int

    def __post_init__(self) -> None:
        _uint("old_size", self.old_size)
        _uint("new_size", self.new_size)
        if self.old_size > self.new_size:
            raise ProtocolError("get_consistency needs old_size <= new_size")


@dataclass(frozen=True)
class GetInclusion:
    TYPE: ClassVar[str] = "get_inclusion"
    index: int
    size: int

    def __post_init__(self) -> None:
        _uint("index", self.index)
        _uint("size", self.size)
        if self.index >= self.size:
            raise ProtocolError("get_inclusion needs index < size")


@dataclass(frozen=True)
class PutCosigned:
    TYPE: ClassVar[str] = "put_cosigned"
    note: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.note, bytes) or not 0 < len(self.note) <= 16 * 1024:
            raise ProtocolError("put_cosigned.note must be 1..16384 bytes")


@dataclass(frozen=True)
class CheckpointReply:
    TYPE: ClassVar[str] = "checkpoint"
    note: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.note, bytes) or not 0 < len(self.note) <= 16 * 1024:
            raise ProtocolError("checkpoint.note must be 1..16384 bytes")


@dataclass(frozen=True)
class EntriesReply:
    TYPE: ClassVar[str] = "entries"
    start: int
    entries: list

    def __post_init__(self) -> None:
        _uint("start", self.start)
        _bins("entries", self.entries)
        if not self.entries:
            raise ProtocolError("an entries reply carries at least one entry")


@dataclass(frozen=True)
class ProofReply:
    TYPE: ClassVar[str] = "proof"
    hashes: list

    def __post_init__(self) -> None:
        _bins("hashes", self.hashes, HASH_BYTES, 128)


@dataclass(frozen=True)
class Ack:
    TYPE: ClassVar[str] = "ack"


LedgerFrame = (GetCheckpoint | GetEntries | GetConsistency | GetInclusion | PutCosigned | CheckpointReply | EntriesReply
               | ProofReply | Ack | Error)
REQUESTS = {cls.TYPE: cls for cls in (GetCheckpoint, GetEntries, GetConsistency, GetInclusion, PutCosigned)}
REPLIES = {cls.TYPE: cls for cls in (CheckpointReply, EntriesReply, ProofReply, Ack, Error)}
REPLY_TO = {GetCheckpoint: CheckpointReply, GetEntries: EntriesReply, GetConsistency: ProofReply,
            GetInclusion: ProofReply, PutCosigned: Ack}


class State(enum.Enum):
    AWAIT_REQUEST = "await_request"
    AWAIT_RESPONSE = "await_response"
    DONE = "done"


class LedgerProtocol(FramedProtocol[LedgerFrame]):
    """One side of one /llorch/ledger/1 stream."""

    RECEIVE_BUFFER_BYTES_MAX = limits.LEDGER_RECEIVE_BUFFER_BYTES_MAX
    INCOMING = {"client": REQUESTS, "server": REPLIES}        # by the role of the peer who sends

    def __init__(self, role: Role) -> None:
        super().__init__(role)
        self.state: State = State.AWAIT_REQUEST
        self.request = None

    def _frame_cap(self) -> int:
        if self.state is State.AWAIT_REQUEST:
            return limits.LEDGER_REQUEST_FRAME_BYTES_MAX
        return limits.LEDGER_RESPONSE_FRAME_BYTES_MAX

    def _advance(self, sender: Role, frame) -> None:
        if self.state is State.AWAIT_REQUEST and sender is Role.CLIENT and type(frame) in REPLY_TO:
            self.request, self.state = frame, State.AWAIT_RESPONSE
        elif self.state is State.AWAIT_RESPONSE and sender is Role.SERVER and (
                isinstance(frame, Error) or type(frame) is REPLY_TO[type(self.request)]):
            self.state = State.DONE
        else:
            raise ProtocolError(f"{frame.TYPE} frame from the {sender.value} is not allowed in state "
                                f"{self.state.value}")
