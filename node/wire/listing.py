"""/llorch/listing/1: a node asks a gateway it trusts for its listing there (docs/protocol.md §5b).

A provider cannot see the operator's decisions from its side: whether its registration is approved, pending or
suspended, whether its geo claim is certified, whether the witness excluded it for fork evidence. Nor can it measure
its clock against the gateway's. So it asks, over the connection it already keeps to the gateway:

    node → gateway   one frame: AskListing {"t": "ask", "provider_id": str}
    gateway → node   one frame: Listing {"t": "listing", ...} or ListingRefused {"t": "refused", code, message}

The gateway answers only about the peer asking: ``provider_id`` must be the peer id the Noise handshake of the
connection authenticated, or the answer is ListingRefused ``not_yourself`` and says nothing of that provider.

A frame is an unsigned varint length, then that many bytes of canonical msgpack (the framing of /llorch/infer/1):
a request at most LISTING_REQUEST_FRAME_BYTES_MAX, an answer at most LISTING_ANSWER_FRAME_BYTES_MAX. Parsing is
strict: a key missing or extra, a value of the wrong type or out of range, or bytes after the frame raise
ProtocolError. Nothing here does I/O (node/listing.py and gateway/listing.py move the bytes).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from llorch.ledger.errors import EncodingError
from llorch.ledger.signing import public_key_of_peer_id
from llorch.node import limits
from llorch.node.errors import ProtocolError
from llorch.node.wire.frames import decode_small_frame, encode_small_frame

LISTING_PROTOCOL_ID = "/llorch/listing/1"
STATUSES = ("unregistered", "pending", "approved", "suspended")
REFUSAL_CODES = ("not_yourself", "malformed", "busy", "unavailable")
COUNTRY = re.compile(r"[A-Z]{2}")          # with fullmatch, as a registration's geo.country
TIME_MS_MAX = 2**63 - 1


def _peer_id(value: object, name: str) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= 64:
        raise ProtocolError(f"{name} must be a peer id (a str of at most 64 characters)")
    try:
        public_key_of_peer_id(value)
    except (EncodingError, ValueError):
        raise ProtocolError(f"{name} {value[:64]!r} is not the peer id of an Ed25519 key") from None
    return value


def _text(value: object, name: str, chars_max: int) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= chars_max:
        raise ProtocolError(f"{name} must be a non-empty str of at most {chars_max} characters")
    return value


def _time_ms(value: object, name: str) -> int:
    if type(value) is not int or not 0 <= value <= TIME_MS_MAX:
        raise ProtocolError(f"{name} must be an integer time in ms since the epoch, got {str(value)[:32]!r}")
    return value


@dataclass(frozen=True)
class AskListing:
    """node → gateway: what is the listing of ``provider_id`` (the asking node itself)?"""

    provider_id: str

    def __post_init__(self) -> None:
        _peer_id(self.provider_id, "provider_id")

    def to_bytes(self) -> bytes:
        return _frame({"t": "ask", "provider_id": self.provider_id})

    @classmethod
    def from_bytes(cls, frame: bytes) -> "AskListing":
        fields = _unframe(frame, limits.LISTING_REQUEST_FRAME_BYTES_MAX)
        _keys(fields, "ask", {"t", "provider_id"})
        return cls(fields["provider_id"])


@dataclass(frozen=True)
class Listing:
    """gateway → node: the operator's decisions about the asking provider, and the gateway's clock.

    ``status``: unregistered (no registration from this peer id), pending (registered, not yet approved), approved
    (placement may use it; its ledger is witnessed), suspended (the operator stopped placement on it).
    ``country``: the country its stored registration claims (None when unregistered); ``geo_certified``: the
    operator certified that claim. ``fork_detected_ms``/``fork_reason``: the witness excluded it for fork evidence
    at that time, for that reason (both None when not excluded). ``gateway_ms``: the gateway's clock as it answered.
    """

    provider_id: str
    status: str
    country: str | None
    geo_certified: bool
    fork_detected_ms: int | None
    fork_reason: str | None
    gateway_ms: int
    payouts: dict | None = None      # PAYOUT_KEYS: the provider's unpaid balance, minimum, next run, statements

    def __post_init__(self) -> None:
        _peer_id(self.provider_id, "provider_id")
        if self.status not in STATUSES:
            raise ProtocolError(f"status must be one of {', '.join(STATUSES)}, got {str(self.status)[:32]!r}")
        if (self.country is None) != (self.status == "unregistered"):
            raise ProtocolError("country is nil exactly when the status is unregistered")
        if self.country is not None and not (isinstance(self.country, str) and COUNTRY.fullmatch(self.country)):
            raise ProtocolError(f"country must be ISO 3166-1 alpha-2 ([A-Z]{{2}}), got {str(self.country)[:32]!r}")
        if type(self.geo_certified) is not bool or (self.geo_certified and self.country is None):
            raise ProtocolError("geo_certified must be a bool, and false when unregistered")
        if (self.fork_detected_ms is None) != (self.fork_reason is None):
            raise ProtocolError("fork_detected_ms and fork_reason are both nil or both set")
        if self.fork_detected_ms is not None:
            _time_ms(self.fork_detected_ms, "fork_detected_ms")
            _text(self.fork_reason, "fork_reason", limits.LISTING_FORK_REASON_CHARS_MAX)
        _time_ms(self.gateway_ms, "gateway_ms")
        if self.payouts is not None:
            _check_payouts(self.payouts)

    @property
    def excluded(self) -> bool:
        return self.fork_detected_ms is not None

    def to_bytes(self) -> bytes:
        fields = {"t": "listing", "provider_id": self.provider_id, "status": self.status, "country": self.country,
                  "geo_certified": self.geo_certified, "fork_detected_ms": self.fork_detected_ms,
                  "fork_reason": self.fork_reason, "gateway_ms": self.gateway_ms}
        return _frame(fields if self.payouts is None else {**fields, "payouts": self.payouts})


PAYOUT_KEYS = {"balance", "minimum", "next_run_ms", "account", "statements"}
STATEMENT_KEYS = {"run_id", "month", "paid", "carried", "state"}
PAYOUT_STATES = ("stated", "sent", "paid", "failed")
STATEMENTS_MAX = 12
MONEY_MAX = 10**18


def _money(value: object, name: str, signed: bool = False) -> None:
    if type(value) is not int or not (-MONEY_MAX if signed else 0) <= value <= MONEY_MAX:
        raise ProtocolError(f"{name} must be an integer amount in minor units, got {str(value)[:32]!r}")


def _check_payouts(payouts: object) -> None:
    """The optional ``payouts`` map of a listing (docs/protocol.md §5b)."""
    if not isinstance(payouts, dict) or set(payouts) != PAYOUT_KEYS:
        raise ProtocolError(f"payouts must be a map of exactly {', '.join(sorted(PAYOUT_KEYS))}")
    _money(payouts["balance"], "payouts.balance", signed=True)
    _money(payouts["minimum"], "payouts.minimum")
    _time_ms(payouts["next_run_ms"], "payouts.next_run_ms")
    if payouts["account"] is not None:
        _text(payouts["account"], "payouts.account", 64)
    statements = payouts["statements"]
    if not isinstance(statements, list) or len(statements) > STATEMENTS_MAX:
        raise ProtocolError(f"payouts.statements must be a list of at most {STATEMENTS_MAX}")
    for item in statements:
        if not isinstance(item, dict) or set(item) != STATEMENT_KEYS:
            raise ProtocolError(f"a payouts statement is a map of exactly {', '.join(sorted(STATEMENT_KEYS))}")
        _text(item["run_id"], "run_id", 35)
        _text(item["month"], "month", 7)
        _money(item["paid"], "paid")
        _money(item["carried"], "carried", signed=True)
        if item["state"] not in PAYOUT_STATES:
            raise ProtocolError(f"a payouts statement's state is one of {', '.join(PAYOUT_STATES)}")


@dataclass(frozen=True)
class ListingRefused:
    """gateway → node: no answer, and why (``code`` one of REFUSAL_CODES)."""

    code: str
    message: str

    def __post_init__(self) -> None:
        if self.code not in REFUSAL_CODES:
            raise ProtocolError(f"refusal code must be one of {', '.join(REFUSAL_CODES)}, got {str(self.code)[:32]!r}")
        _text(self.message, "message", limits.ERROR_MESSAGE_CHARS_MAX)

    def to_bytes(self) -> bytes:
        return _frame({"t": "refused", "code": self.code, "message": self.message})


LISTING_KEYS = {"t", "provider_id", "status", "country", "geo_certified", "fork_detected_ms", "fork_reason",
                 "gateway_ms"}


def decode_answer(frame: bytes) -> Listing | ListingRefused:
    """The gateway's answer in one complete frame (length prefix included); ProtocolError if it is not one."""
    fields = _unframe(frame, limits.LISTING_ANSWER_FRAME_BYTES_MAX)
    if fields.get("t") == "refused":
        _keys(fields, "refused", {"t", "code", "message"})
        return ListingRefused(fields["code"], fields["message"])
    _keys(fields, "listing", LISTING_KEYS | ({"payouts"} if "payouts" in fields else set()))
    return Listing(**{key: fields[key] for key in LISTING_KEYS - {"t"}}, payouts=fields.get("payouts"))


_frame = encode_small_frame


def _keys(fields: dict, kind: str, keys: set[str]) -> None:
    if fields.get("t") != kind:
        raise ProtocolError(f"expected a listing frame of t={kind!r}, got t={str(fields.get('t'))[:32]!r}")
    if set(fields) != keys:
        raise ProtocolError(f"a {kind!r} frame has exactly the keys {sorted(keys)}; got {sorted(fields)[:16]}")


def _unframe(frame: bytes, bytes_max: int) -> dict:
    return decode_small_frame(frame, bytes_max, "listing")
