"""The signed objects the ledger knows: tickets (gateway → provider) and receipts (provider → ledger).

Each is a frozen dataclass whose fields are checked when it is built (types, lengths, ranges), before any
cryptography. ``from_envelope`` parses strictly and verifies the signature; ``seal`` produces the envelope bytes.
Field tables and byte layouts: docs/protocol.md.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, ClassVar

from llorch.ledger import canonical, limits
from llorch.ledger.errors import EncodingError
from llorch.ledger.signing import SigningKey, open_envelope, peer_id_of, sha256, verify_signature

VERSION = 1
HASH_BYTES = 32
ZERO_HASH = bytes(HASH_BYTES)
# Whole-string grammars: always used with fullmatch ("$" would also match before a trailing newline).
REQUEST_ID_PATTERN = re.compile(r"[A-Za-z0-9_-]{8,64}")
CURRENCY_PATTERN = re.compile(r"[A-Z]{3}")
PROMPT_COMMITMENT_TAG = b"llorch/prompt/v1\x00"
FINISH_REASONS = ("stop", "length", "cancelled")

_UINT64_MAX = 2**64 - 1


def amount_minor(tokens_in: int, tokens_out: int, price_in: int, price_out: int) -> int:
    """Charge in minor units: ceil((tokens_in × price_in + tokens_out × price_out) / 1,000,000)."""
    total = tokens_in * price_in + tokens_out * price_out
    return -(-total // limits.PRICE_UNIT_TOKENS)


def prompt_commitment(salt: bytes, prompt: dict) -> bytes:
    """sha256(tag ‖ salt ‖ canonical(prompt)): binds a receipt to a prompt without revealing it."""
    return sha256(PROMPT_COMMITMENT_TAG + salt + canonical.encode(prompt))


def sampling_sha256(sampling: dict) -> bytes:
    return sha256(canonical.encode(sampling))


def ledger_origin(provider_key: bytes) -> str:
    return f"llorch/{peer_id_of(provider_key)}"


# --- field checking ---------------------------------------------------------------------------------------------

def check_field(name: str, kind: str, value: Any) -> None:
    if kind == "uint":
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _UINT64_MAX:
            raise EncodingError(f"field {name!r} must be an unsigned integer, got {value!r}")
    elif kind == "str":
        if not isinstance(value, str) or not 0 < len(value) <= 256:
            raise EncodingError(f"field {name!r} must be a non-empty str of at most 256 characters")
    elif kind == "hash":
        if not isinstance(value, bytes) or len(value) != HASH_BYTES:
            raise EncodingError(f"field {name!r} must be {HASH_BYTES} bytes of bin")
    elif kind == "key":
        if not isinstance(value, bytes) or len(value) != 32:
            raise EncodingError(f"field {name!r} must be a 32-byte Ed25519 public key (bin)")
    elif kind == "bin16":
        if not isinstance(value, bytes) or len(value) != 16:
            raise EncodingError(f"field {name!r} must be 16 bytes of bin")
    elif kind == "map":
        if not isinstance(value, dict):
            raise EncodingError(f"field {name!r} must be a map")
    elif kind == "list":
        if not isinstance(value, list):
            raise EncodingError(f"field {name!r} must be an array")
    else:
        raise AssertionError(f"unknown field kind {kind}")


class SignedObject:
    """Shared strict parsing for signed dataclasses. Subclasses set SIGNED_TYPE, FIELDS and SIGNER_FIELD."""

    SIGNED_TYPE: ClassVar[str]
    FIELDS: ClassVar[dict[str, str]]
    OPTIONAL_FIELDS: ClassVar[dict[str, str]] = {}    # absent from the payload when None (the dataclass default)
    SIGNER_FIELD: ClassVar[str]
    BYTES_MAX: ClassVar[int] = limits.SIGNED_OBJECT_BYTES_MAX     # the envelope's size limit
    v: int                                  # every subclass's first field (an annotation only: no field here)

    def __post_init__(self) -> None:
        for name, kind in self.FIELDS.items():
            check_field(name, kind, getattr(self, name))
        for name, kind in self.OPTIONAL_FIELDS.items():
            if getattr(self, name) is not None:
                check_field(name, kind, getattr(self, name))
        if self.v != VERSION:
            raise EncodingError(f"{self.SIGNED_TYPE} version {self.v} is not supported (this build speaks {VERSION})")
        self._validate()

    def _validate(self) -> None:
        """Cross-field invariants; subclasses override."""

    def to_payload(self) -> dict:
        optional = {name: value for name in self.OPTIONAL_FIELDS if (value := getattr(self, name)) is not None}
        return {**{name: getattr(self, name) for name in self.FIELDS}, **optional}

    def seal(self, key: SigningKey) -> bytes:
        if key.public_key != getattr(self, self.SIGNER_FIELD):
            raise AssertionError(f"{self.SIGNED_TYPE} must be signed by the key in {self.SIGNER_FIELD}")
        return key.seal(self.SIGNED_TYPE, self.to_payload())

    @classmethod
    def from_payload(cls, payload: dict):
        missing = set(cls.FIELDS) - set(payload)
        extra = set(payload) - set(cls.FIELDS) - set(cls.OPTIONAL_FIELDS)
        if missing or extra:
            raise EncodingError(f"{cls.SIGNED_TYPE} fields: missing {sorted(missing)}, unexpected {sorted(extra)}")
        return cls(**payload)

    @classmethod
    def from_envelope(cls, data: bytes):
        """Parse envelope bytes, check every field, then verify the signature by the signer the object names."""
        payload, payload_bytes, signature = open_envelope(data, cls.BYTES_MAX)
        obj = cls.from_payload(payload)
        verify_signature(cls.SIGNED_TYPE, getattr(obj, cls.SIGNER_FIELD), payload_bytes, signature)
        return obj


def _check_request_id(request_id: str) -> None:
    if not REQUEST_ID_PATTERN.fullmatch(request_id):
        raise EncodingError("request_id must be 8-64 characters of A-Z a-z 0-9 _ -")


def _check_prices(price_in: int, price_out: int, currency: str) -> None:
    if not CURRENCY_PATTERN.fullmatch(currency):
        raise EncodingError(f"currency {currency!r} is not an ISO 4217 code")
    if price_in > 10**12 or price_out > 10**12:
        raise EncodingError("price per 1M tokens above 10^12 minor units is not accepted")


SAMPLING_FIELDS = {"seed": "uint", "temperature_ppm": "uint", "top_p_ppm": "uint", "max_tokens": "uint"}


RESPONSE_FORMAT_SCHEMA_CHARS_MAX = 16 * 1024
# Optional sampling keys, absent when at their neutral value (so a plain ticket's map is the five keys above):
# OpenAI's frequency and presence penalties (-2..2) and llama.cpp's repeat penalty (OpenRouter's
# repetition_penalty, (0, 2]; 1 is none), each in parts per million.
PENALTY_RANGES = {"frequency_penalty_ppm": (-2_000_000, 2_000_000), "presence_penalty_ppm": (-2_000_000, 2_000_000),
                  "repeat_penalty_ppm": (1, 2_000_000)}
LOGPROBS_TOP_MAX = 20
SAMPLING_OPTIONAL = ("response_format", *PENALTY_RANGES, "logprobs")


def check_sampling(sampling: dict) -> None:
    """A ticket's sampling map: seed, temperature_ppm (0-2,000,000), top_p_ppm (1-1,000,000), max_tokens, stop, and
    when the customer asked for JSON, response_format (absent: plain text)."""
    expected = set(SAMPLING_FIELDS) | {"stop"}
    if set(sampling) - set(SAMPLING_OPTIONAL) != expected:
        raise EncodingError(f"sampling must have exactly the fields {sorted(expected)} (and may have "
                            f"{', '.join(sorted(SAMPLING_OPTIONAL))})")
    if "response_format" in sampling:
        check_response_format(sampling["response_format"])
    for name, (low, high) in PENALTY_RANGES.items():
        value = sampling.get(name, low)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise EncodingError(f"sampling.{name} must be an integer in {low}..{high}")
    top = sampling.get("logprobs", 0)
    if isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= LOGPROBS_TOP_MAX:
        raise EncodingError(f"sampling.logprobs must be an integer in 0..{LOGPROBS_TOP_MAX}")
    for name, kind in SAMPLING_FIELDS.items():
        check_field(f"sampling.{name}", kind, sampling[name])
    if sampling["temperature_ppm"] > 2_000_000:
        raise EncodingError("sampling.temperature_ppm must be at most 2,000,000 (temperature 2.0)")
    if not 0 < sampling["top_p_ppm"] <= 1_000_000:
        raise EncodingError("sampling.top_p_ppm must be in 1..1,000,000")
    if not 0 < sampling["max_tokens"] <= 1_000_000:
        raise EncodingError("sampling.max_tokens must be in 1..1,000,000")
    stop = sampling["stop"]
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and 0 < len(s) <= 64 for s in stop):
        raise EncodingError("sampling.stop must be a list of at most 4 non-empty str of at most 64 characters")


LOGPROB_MICRO_MIN = -9_999_000_000         # a log-probability of -9999 (OpenAI's floor for "never"), in millionths
LOGPROB_TOKEN_BYTES_MAX = 256


def check_logprobs_entry(entry: object, top: int | None = None) -> None:
    """A token frame's ``logprobs``: {"token": bin (the token's bytes), "logprob": int (its log-probability in
    millionths, LOGPROB_MICRO_MIN..0), "top": [[bin, int], ...] (the ``top`` most likely tokens, most likely first;
    ``top`` None: any number up to LOGPROBS_TOP_MAX)} (docs/protocol.md §6)."""
    if not isinstance(entry, dict) or set(entry) != {"token", "logprob", "top"}:
        raise EncodingError('logprobs must be a map {"token": bin, "logprob": int, "top": [[bin, int], ...]}')
    pairs = entry["top"]
    if not isinstance(pairs, list) or len(pairs) > LOGPROBS_TOP_MAX or top is not None and len(pairs) != top:
        raise EncodingError(f"logprobs.top must list exactly the ticket's sampling.logprobs alternatives (at most "
                            f"{LOGPROBS_TOP_MAX})")
    for token, logprob in [(entry["token"], entry["logprob"]), *[_pair(pair) for pair in pairs]]:
        if not isinstance(token, bytes) or len(token) > LOGPROB_TOKEN_BYTES_MAX:
            raise EncodingError(f"a logprobs token must be bin of at most {LOGPROB_TOKEN_BYTES_MAX} bytes")
        if isinstance(logprob, bool) or not isinstance(logprob, int) or not LOGPROB_MICRO_MIN <= logprob <= 0:
            raise EncodingError(f"a log-probability must be an integer in {LOGPROB_MICRO_MIN}..0 (millionths)")
    if any(_pair(a)[1] < _pair(b)[1] for a, b in zip(pairs, pairs[1:])):
        raise EncodingError("logprobs.top must be ordered most likely first")


def _pair(pair: object) -> tuple:
    if not isinstance(pair, list) or len(pair) != 2:
        raise EncodingError("each logprobs.top item must be a pair [bin, int]")
    return pair[0], pair[1]


def logprobs_sha256(entries: list[dict]) -> bytes:
    """The receipt's ``logprobs_sha256``: SHA-256 of the canonical encoding of the list of the token frames'
    logprobs entries, in order."""
    return sha256(canonical.encode(list(entries)))


def check_response_format(entry: object) -> None:
    """sampling.response_format: {"type": "json_object"}, or {"type": "json_schema", "schema": the schema object's
    compact JSON text (separators "," and ":", keys in the customer's order, non-ASCII as is), at most 16 KiB}
    (docs/protocol.md §3)."""
    if entry == {"type": "json_object"}:
        return
    if not isinstance(entry, dict) or set(entry) != {"type", "schema"} or entry.get("type") != "json_schema" \
            or not isinstance(entry["schema"], str) or not 0 < len(entry["schema"]) <= RESPONSE_FORMAT_SCHEMA_CHARS_MAX:
        raise EncodingError(f'sampling.response_format must be {{"type": "json_object"}} or {{"type": "json_schema", '
                            f'"schema": <JSON text of at most {RESPONSE_FORMAT_SCHEMA_CHARS_MAX} characters>}}')
    try:
        schema = json.loads(entry["schema"])
    except (ValueError, RecursionError):
        raise EncodingError("sampling.response_format.schema is not JSON text") from None
    if not isinstance(schema, dict) or json.dumps(schema, separators=(",", ":"), ensure_ascii=False) != entry["schema"]:
        raise EncodingError("sampling.response_format.schema must be a schema object in its compact JSON form")


@dataclass(frozen=True)
class Ticket(SignedObject):
    """The gateway's signed order to one provider: serve this request, under these parameters, at these prices."""

    SIGNED_TYPE: ClassVar[str] = "ticket"
    SIGNER_FIELD: ClassVar[str] = "gateway_key"
    FIELDS: ClassVar[dict[str, str]] = {
        "v": "uint", "request_id": "str", "gateway_key": "key", "provider_key": "key", "tenant": "str",
        "model_id": "str", "model_sha256": "hash", "sampling": "map",
        "price_in": "uint", "price_out": "uint", "currency": "str", "issued_ms": "uint", "expires_ms": "uint",
    }

    v: int
    request_id: str
    gateway_key: bytes
    provider_key: bytes
    tenant: str
    model_id: str
    model_sha256: bytes
    sampling: dict
    price_in: int
    price_out: int
    currency: str
    issued_ms: int
    expires_ms: int

    def _validate(self) -> None:
        _check_request_id(self.request_id)
        _check_prices(self.price_in, self.price_out, self.currency)
        check_sampling(self.sampling)
        if self.expires_ms <= self.issued_ms:
            raise EncodingError("ticket expires_ms must be after issued_ms")


@dataclass(frozen=True)
class Receipt(SignedObject):
    """The provider's signed account of one served request, and one entry of its hash-chained ledger."""

    SIGNED_TYPE: ClassVar[str] = "receipt"
    SIGNER_FIELD: ClassVar[str] = "provider_key"
    FIELDS: ClassVar[dict[str, str]] = {
        "v": "uint", "origin": "str", "index": "uint", "prev_hash": "hash", "request_id": "str",
        "ticket_sha256": "hash", "gateway_key": "key", "tenant": "str", "provider_key": "key",
        "model_id": "str", "model_sha256": "hash", "engine_build": "str", "seed": "uint", "sampling_sha256": "hash",
        "tokens_in": "uint", "tokens_out": "uint", "accepted_ms": "uint", "first_token_ms": "uint",
        "finished_ms": "uint", "price_in": "uint", "price_out": "uint", "currency": "str", "amount": "uint",
        "prompt_commitment": "hash", "output_sha256": "hash", "finish_reason": "str",
    }
    # present exactly when the ticket's sampling asks for logprobs: the hash of the token frames' logprobs entries
    OPTIONAL_FIELDS: ClassVar[dict[str, str]] = {"logprobs_sha256": "hash"}

    v: int
    origin: str
    index: int
    prev_hash: bytes
    request_id: str
    ticket_sha256: bytes
    gateway_key: bytes
    tenant: str
    provider_key: bytes
    model_id: str
    model_sha256: bytes
    engine_build: str
    seed: int
    sampling_sha256: bytes
    tokens_in: int
    tokens_out: int
    accepted_ms: int
    first_token_ms: int
    finished_ms: int
    price_in: int
    price_out: int
    currency: str
    amount: int
    prompt_commitment: bytes
    output_sha256: bytes
    finish_reason: str
    logprobs_sha256: bytes | None = None

    def _validate(self) -> None:
        _check_request_id(self.request_id)
        _check_prices(self.price_in, self.price_out, self.currency)
        if self.finish_reason not in FINISH_REASONS:
            raise EncodingError(f"finish_reason must be one of {FINISH_REASONS}")
        if not self.accepted_ms <= self.first_token_ms <= self.finished_ms:
            raise EncodingError("receipt times must satisfy accepted_ms <= first_token_ms <= finished_ms")

    def expected_amount(self) -> int:
        return amount_minor(self.tokens_in, self.tokens_out, self.price_in, self.price_out)


def with_chain(receipt_fields: dict, index: int, prev_hash: bytes) -> dict:
    """Return a copy of receipt fields placed at ``index`` after the entry hashing to ``prev_hash``."""
    return {**receipt_fields, "index": index, "prev_hash": prev_hash}


def receipt_fields_of(receipt: Receipt) -> dict:
    """The receipt's fields as its payload has them (an absent optional field is absent here too)."""
    return receipt.to_payload()
