"""Frames of /llorch/infer/2 and their byte encoding: unsigned-varint length, then a canonical msgpack map.

Every frame map has a "t" key naming its type; the other keys are fixed per type (docs/protocol.md, "Frames").
Frames are frozen dataclasses validated when built; ``decode_frame`` parses strictly.
"""

from __future__ import annotations

import enum
from dataclasses import Field, dataclass, fields
from typing import Any, ClassVar, Generic, Protocol, TypeVar

from llorch.ledger import canonical
from llorch.ledger.errors import EncodingError
from llorch.ledger.objects import check_logprobs_entry
from llorch.node import limits
from llorch.node.errors import ProtocolError


@dataclass(frozen=True)
class Request:
    """client → server: a signed ticket, the prompt-commitment salt, and the prompt."""

    TYPE: ClassVar[str] = "request"
    ticket: bytes
    salt: bytes
    prompt: dict

    def __post_init__(self) -> None:
        if not isinstance(self.ticket, bytes) or not self.ticket:
            raise ProtocolError("request.ticket must be non-empty bin")
        if not isinstance(self.salt, bytes) or len(self.salt) != limits.SALT_BYTES:
            raise ProtocolError(f"request.salt must be {limits.SALT_BYTES} bytes")
        check_prompt(self.prompt)


@dataclass(frozen=True)
class Accepted:
    """server → client: the request has a slot; tokens frames follow."""

    TYPE: ClassVar[str] = "accepted"


@dataclass(frozen=True)
class Busy:
    """server → client: no free slot right now; try another provider."""

    TYPE: ClassVar[str] = "busy"
    reason: str

    def __post_init__(self) -> None:
        _check_text("busy.reason", self.reason, limits.ERROR_MESSAGE_CHARS_MAX)


@dataclass(frozen=True)
class Tokens:
    """server → client: the next tokens' text, one text per generated token (docs/protocol.md §6). ``index`` is the
    number of tokens this request sent before this frame. ``logprobs``: when the ticket asks for them, one entry per
    text (the token's log-probability and its most likely alternatives); absent on the one frame of held-back text
    that carries no token. A provider puts several tokens in one frame only when the gateway is behind (flow
    control: ``More``)."""

    TYPE: ClassVar[str] = "tokens"
    index: int
    texts: list[str]
    logprobs: list[dict] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.index, bool) or not isinstance(self.index, int) or self.index < 0:
            raise ProtocolError("tokens.index must be an unsigned integer")
        if not isinstance(self.texts, list) or not 1 <= len(self.texts) <= limits.TOKENS_PER_FRAME_MAX:
            raise ProtocolError(f"tokens.texts must be a list of 1-{limits.TOKENS_PER_FRAME_MAX} texts")
        for text in self.texts:
            _check_text("tokens.texts[]", text, limits.TOKEN_TEXT_CHARS_MAX)
        if self.logprobs is not None:
            if not isinstance(self.logprobs, list) or len(self.logprobs) != len(self.texts):
                raise ProtocolError("tokens.logprobs must be a list of one entry per text")
            try:
                for entry in self.logprobs:
                    check_logprobs_entry(entry)
            except EncodingError as exc:
                raise ProtocolError(f"tokens.logprobs[].{exc}") from None


@dataclass(frozen=True)
class More:
    """client → server, while streaming: flow control. ``taken`` is how many tokens frames of this request the
    gateway has taken off the stream; the provider keeps at most TOKEN_FRAMES_AHEAD_MAX frames beyond it."""

    TYPE: ClassVar[str] = "more"
    taken: int

    def __post_init__(self) -> None:
        if isinstance(self.taken, bool) or not isinstance(self.taken, int) or self.taken < 0:
            raise ProtocolError("more.taken must be an unsigned integer")


@dataclass(frozen=True)
class Final:
    """server → client: the signed receipt, already durable in the provider's ledger."""

    TYPE: ClassVar[str] = "final"
    receipt: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.receipt, bytes) or not self.receipt:
            raise ProtocolError("final.receipt must be non-empty bin")


@dataclass(frozen=True)
class Cancel:
    """client → server, while streaming: the customer went away. The server stops generating within a token,
    records what it generated, and still sends the final frame with the receipt (``finish_reason`` "cancelled")."""

    TYPE: ClassVar[str] = "cancel"


@dataclass(frozen=True)
class Error:
    """server → client: the request failed; ``code`` is stable, ``message`` says why."""

    TYPE: ClassVar[str] = "error"
    code: str
    message: str

    def __post_init__(self) -> None:
        _check_text("error.code", self.code, 64)
        _check_text("error.message", self.message, limits.ERROR_MESSAGE_CHARS_MAX)


Frame = Request | Accepted | Busy | Tokens | More | Final | Cancel | Error
FRAME_TYPES: dict[str, type] = {cls.TYPE: cls for cls in (Request, Accepted, Busy, Tokens, More, Final, Cancel,
                                                          Error)}


class FrameLike(Protocol):
    """A frame of any stream protocol here (this module's, node/wire/ledger_protocol.py's): a frozen dataclass whose
    ``TYPE`` is its "t" on the wire."""

    TYPE: ClassVar[str]
    __dataclass_fields__: ClassVar[dict[str, Field[Any]]]


F = TypeVar("F", bound=FrameLike)


def _check_text(name: str, value: object, chars_max: int) -> None:
    if not isinstance(value, str) or len(value) > chars_max:
        raise ProtocolError(f"{name} must be a str of at most {chars_max} characters")


def check_prompt(prompt: object) -> None:
    """A prompt is {"messages": [{"role": str, "content": str}, ...]} (chat) or {"text": str} (completion)."""
    if isinstance(prompt, dict) and set(prompt) == {"text"}:
        if not isinstance(prompt["text"], str) or not prompt["text"]:
            raise ProtocolError("prompt.text must be a non-empty str")
        return
    if not isinstance(prompt, dict) or set(prompt) != {"messages"} or not isinstance(prompt["messages"], list):
        raise ProtocolError('prompt must be a map {"messages": [...]} or {"text": str}')
    if not 0 < len(prompt["messages"]) <= 256:
        raise ProtocolError("prompt must have 1..256 messages")
    for message in prompt["messages"]:
        if (not isinstance(message, dict) or set(message) != {"role", "content"}
                or message["role"] not in ("system", "user", "assistant")
                or not isinstance(message["content"], str)):
            raise ProtocolError('each message must be {"role": system|user|assistant, "content": str}')


def prompt_chars(prompt: dict) -> int:
    return len(prompt["text"]) if "text" in prompt else sum(len(m["content"]) for m in prompt["messages"])


def prompt_parts(prompt: dict) -> int:
    return 1 if "text" in prompt else len(prompt["messages"])


def encode_frame(frame: FrameLike) -> bytes:
    """A field whose default is None is optional: absent from the frame when it is None."""
    body = canonical.encode({"t": frame.TYPE, **{f.name: value for f in fields(frame)
                                                 if (value := getattr(frame, f.name)) is not None
                                                 or f.default is not None}})
    return encode_uvarint(len(body)) + body


def decode_frame(body: bytes, types: dict[str, type] = FRAME_TYPES):
    """Parse one frame body (without its length prefix) into one of ``types``."""
    try:
        value = canonical.decode(body)
    except EncodingError as exc:
        raise ProtocolError(f"frame is not canonical msgpack: {exc}") from None
    if not isinstance(value, dict) or not isinstance(value.get("t"), str):
        raise ProtocolError('a frame is a map with a str "t"')
    name = value.pop("t")
    cls = types.get(name)
    if cls is None:
        raise ProtocolError("unknown frame type")
    expected = {f.name for f in fields(cls)}
    optional = {f.name for f in fields(cls) if f.default is None}
    if not expected - optional <= set(value) <= expected:
        raise ProtocolError(f"{name} frame must have exactly the fields {sorted(expected - optional)}"
                            + (f" (and may have {sorted(optional)})" if optional else ""))
    if any(value.get(field) is None for field in optional & set(value)):
        raise ProtocolError(f"{name} frame: an optional field is absent, never nil")
    return cls(**value)


def encode_uvarint(number: int) -> bytes:
    out = bytearray()
    while True:
        byte = number & 0x7F
        number >>= 7
        if number:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def decode_uvarint(buffer: bytes | bytearray, max_bytes: int = 4) -> tuple[int, int] | None:
    """(value, bytes used), or None if the buffer ends mid-varint. Raise ProtocolError past ``max_bytes``."""
    value = 0
    for position in range(min(len(buffer), max_bytes)):
        byte = buffer[position]
        value |= (byte & 0x7F) << (7 * position)
        if not byte & 0x80:
            if position > 0 and byte == 0:
                raise ProtocolError("frame length is not a minimal varint")
            return value, position + 1
    if len(buffer) >= max_bytes:
        raise ProtocolError(f"frame length varint longer than {max_bytes} bytes")
    return None


class FrameBuffer:
    """Bytes from a peer, cut into frame bodies. Bounded: more than ``buffer_bytes_max`` without a whole frame, or a
    length header above the caller's cap, is a ProtocolError before the body is buffered."""

    def __init__(self, buffer_bytes_max: int) -> None:
        self._buffer = bytearray()
        self._buffer_bytes_max = buffer_bytes_max

    def feed(self, data: bytes) -> None:
        self._buffer += data
        if len(self._buffer) > self._buffer_bytes_max:
            raise ProtocolError(f"peer sent more than {self._buffer_bytes_max} bytes without a whole frame")

    def next_body(self, frame_bytes_max: int, state_name: str) -> bytes | None:
        header = decode_uvarint(self._buffer)
        if header is None:
            return None
        length, used = header
        if length > frame_bytes_max:
            raise ProtocolError(f"frame of {length} bytes exceeds the {frame_bytes_max}-byte limit in state "
                                f"{state_name}")
        if len(self._buffer) < used + length:
            return None
        body = bytes(self._buffer[used:used + length])
        del self._buffer[:used + length]
        return body


class FramedProtocol(Generic[F]):
    """What both stream protocols share: a role, a bounded frame buffer, and send/receive around a transition check.

    A subclass sets ``INCOMING`` (frame types the peer may send, by role of the peer) and implements
    ``_frame_cap`` (the largest frame accepted in the current state) and ``_advance`` (the state machine), which
    raises ProtocolError for a frame that is not allowed. ``F`` is the union of the protocol's frame types.
    """

    RECEIVE_BUFFER_BYTES_MAX: int
    INCOMING: dict
    state: enum.Enum                # the subclass's own State; "done" ends the stream

    def __init__(self, role) -> None:
        self.role = role
        self.peer_role = role.other()
        self._frames = FrameBuffer(self.RECEIVE_BUFFER_BYTES_MAX)
        self.bytes_received = 0

    def send(self, frame: F) -> bytes:
        """Advance the state for a frame we send; return its bytes. A local misuse raises AssertionError."""
        try:
            self._advance(self.role, frame)
        except ProtocolError as exc:
            raise AssertionError(f"{self.role.value} tried to send an invalid frame: {exc}") from None
        return encode_frame(frame)

    def receive_data(self, data: bytes) -> None:
        """Buffer bytes read from the peer. The buffer is bounded: more than one maximal frame is an error."""
        self.bytes_received += len(data)
        self._frames.feed(data)

    def next_frame(self) -> F | None:
        """The next complete frame from the peer, or None if more bytes are needed."""
        body = self._frames.next_body(self._frame_cap(), self.state.value)
        if body is None:
            return None
        frame = decode_frame(body, self.INCOMING[self.peer_role.value])
        self._advance(self.peer_role, frame)
        return frame

    @property
    def done(self) -> bool:
        return self.state.value == "done"

    def _frame_cap(self) -> int:
        raise NotImplementedError

    def _advance(self, sender, frame: F) -> None:
        raise NotImplementedError


# Small one-message protocols (/llorch/dialback/1, /llorch/listing/1, /llorch/punch/1) frame each message the same
# way as /llorch/infer/1: an unsigned varint length, then that many bytes of one canonical msgpack map.

def encode_small_frame(fields: dict) -> bytes:
    body = canonical.encode(fields)
    return encode_uvarint(len(body)) + body


def small_frame_length(buffer: bytes, bytes_max: int, what: str) -> int | None:
    """The total length of the frame starting ``buffer`` once its prefix is complete, else None; ProtocolError if
    it announces more than ``bytes_max`` (checked before the body is read). ``what`` names the protocol."""
    header = decode_uvarint(buffer)
    if header is None:
        return None
    total = header[0] + header[1]
    if total > bytes_max:
        raise ProtocolError(f"{what} frame of {total} bytes announced, limit {bytes_max}")
    return total


def decode_small_frame(frame: bytes, bytes_max: int, what: str) -> dict:
    """The map in one complete frame (length prefix included), at most ``bytes_max`` bytes in all."""
    if small_frame_length(frame, bytes_max, what) != len(frame):
        raise ProtocolError(f"{what} frame: the length prefix does not match the bytes")
    header = decode_uvarint(frame)
    assert header is not None               # small_frame_length found the whole prefix
    try:
        fields = canonical.decode(frame[header[1]:])
    except EncodingError as exc:
        raise ProtocolError(f"{what} frame is not canonical msgpack: {exc}") from None
    if not isinstance(fields, dict):
        raise ProtocolError(f"a {what} frame must be a map")
    return fields


class OneFrame:
    """Sans-IO reader of the single small frame a stream carries (``what`` names its protocol): feed bytes with
    ``receive_data``; ``frame`` is the complete frame once it has arrived. Bytes after it, or a frame over
    ``bytes_max``, raise ProtocolError (before more is buffered than the limit)."""

    def __init__(self, bytes_max: int, what: str) -> None:
        self.bytes_max, self.what = bytes_max, what
        self._buffer = b""
        self.frame: bytes | None = None

    def receive_data(self, data: bytes) -> None:
        if self.frame is not None:
            if data:
                raise ProtocolError(f"bytes after the {self.what} frame")
            return
        self._buffer += data
        total = small_frame_length(self._buffer, self.bytes_max, self.what)
        if total is None:
            return
        if len(self._buffer) > total:
            raise ProtocolError(f"bytes after the {self.what} frame")
        if len(self._buffer) == total:
            self.frame, self._buffer = self._buffer, b""

    async def read(self, stream) -> bytes:
        """Read ``stream`` until the whole frame is in (the caller bounds the time); ProtocolError if the stream
        ends first."""
        while self.frame is None:
            data = await stream.read(self.bytes_max)
            if not data:
                raise ProtocolError(f"the stream ended before a whole {self.what} frame")
            self.receive_data(data)
        return self.frame
