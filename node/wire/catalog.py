"""The signed catalog (docs/protocol.md §5d): the models a gateway places on, signed by it, and /llorch/catalog/1,
over which a node asks a gateway for it.

The operator curates the catalog in the gateway's database (`llorch gateway models add|retire`); each change makes
the next ``version``. The gateway signs the whole catalog as one object of signed type ``catalog``:

    {"v": 1, "gateway_key": bin 32, "version": uint, "issued_ms": uint, "entries": [entry map, ...]}

Each entry map has exactly the fields of inference/catalog.py ``entry_map`` (the catalog file's fields, every one
present, ``null`` where unset), in the order of their ids; a retired entry stays, with its ``retired_ms``. Replicas
of one gateway sign the same content (version and entries come from the database they share; ``issued_ms`` is when
the version was made). A node serves only live entries of the newest catalog signed by a gateway it trusts.

/llorch/catalog/1 (node → gateway, one frame each way, on the connection the node keeps to the gateway):

    node → gateway   {"t": "ask", "have_version": uint}           (the version the node holds; 0: none yet)
    gateway → node   {"t": "catalog", "document": bin}            (the signed catalog, when newer than have_version)
                   | {"t": "unchanged", "version": uint}         (have_version is the newest)
                   | {"t": "refused", "code": str, "message": str}

Frames are an unsigned varint length, then canonical msgpack (as /llorch/listing/1): a question at most
CATALOG_REQUEST_FRAME_BYTES_MAX bytes, an answer at most CATALOG_ANSWER_FRAME_BYTES_MAX. Parsing is strict: a key
missing or extra, a value of the wrong type, or bytes after the frame raise ProtocolError. No I/O here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from llorch.inference.catalog import Catalog, CatalogEntry, entry_map, entry_of
from llorch.inference.errors import CatalogError
from llorch.ledger.errors import EncodingError
from llorch.ledger.objects import SignedObject
from llorch.node import limits
from llorch.node.errors import ProtocolError
from llorch.node.wire.frames import decode_small_frame, encode_small_frame

CATALOG_PROTOCOL_ID = "/llorch/catalog/1"
REFUSAL_CODES = ("malformed", "busy", "unavailable")


@dataclass(frozen=True)
class SignedCatalog(SignedObject):
    """One version of a gateway's catalog, signed by it."""

    SIGNED_TYPE: ClassVar[str] = "catalog"
    SIGNER_FIELD: ClassVar[str] = "gateway_key"
    BYTES_MAX: ClassVar[int] = limits.CATALOG_DOCUMENT_BYTES_MAX
    FIELDS: ClassVar[dict[str, str]] = {
        "v": "uint", "gateway_key": "key", "version": "uint", "issued_ms": "uint", "entries": "list"}

    v: int
    gateway_key: bytes
    version: int
    issued_ms: int
    entries: list

    def _validate(self) -> None:
        if len(self.entries) > limits.CATALOG_DOCUMENT_ENTRIES_MAX:
            raise EncodingError(f"a catalog holds at most {limits.CATALOG_DOCUMENT_ENTRIES_MAX} entries")
        ids: list[str] = []
        for number, item in enumerate(self.entries):
            try:
                entry = entry_of(item, f"catalog entry {number + 1}")
            except CatalogError as exc:
                raise EncodingError(str(exc)) from None
            if entry_map(entry) != item:
                raise EncodingError(f"catalog entry {number + 1} ({entry.id}) must have every field of an entry, "
                                    f"null where unset")
            ids.append(entry.id)
        if ids != sorted(set(ids)):
            raise EncodingError("catalog entries must be in ascending order of id, each id once")

    def catalog(self) -> Catalog:
        return Catalog(self.version, {item["id"]: entry_of(item, "catalog entry") for item in self.entries})

    @classmethod
    def of(cls, gateway_key: bytes, version: int, issued_ms: int, entries: list[CatalogEntry]) -> "SignedCatalog":
        return cls(1, gateway_key, version, issued_ms, [entry_map(e) for e in sorted(entries, key=lambda e: e.id)])


@dataclass(frozen=True)
class AskCatalog:
    """node → gateway: the catalog, if newer than ``have_version``."""

    have_version: int

    def __post_init__(self) -> None:
        _uint(self.have_version, "have_version")

    def to_bytes(self) -> bytes:
        return encode_small_frame({"t": "ask", "have_version": self.have_version})

    @classmethod
    def from_bytes(cls, frame: bytes) -> "AskCatalog":
        fields = decode_small_frame(frame, limits.CATALOG_REQUEST_FRAME_BYTES_MAX, "catalog")
        _keys(fields, "ask", {"t", "have_version"})
        return cls(fields["have_version"])


@dataclass(frozen=True)
class CatalogDocument:
    """gateway → node: the signed catalog (envelope bytes, checked by the node: ``SignedCatalog.from_envelope``)."""

    document: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.document, bytes) or not 0 < len(self.document) <= limits.CATALOG_DOCUMENT_BYTES_MAX:
            raise ProtocolError(f"document must be the signed catalog's bytes (at most "
                                f"{limits.CATALOG_DOCUMENT_BYTES_MAX})")

    def to_bytes(self) -> bytes:
        return encode_small_frame({"t": "catalog", "document": self.document})


@dataclass(frozen=True)
class Unchanged:
    """gateway → node: the node's version is the newest."""

    version: int

    def __post_init__(self) -> None:
        _uint(self.version, "version")

    def to_bytes(self) -> bytes:
        return encode_small_frame({"t": "unchanged", "version": self.version})


@dataclass(frozen=True)
class CatalogRefused:
    """gateway → node: no answer now, and why (``code`` one of REFUSAL_CODES)."""

    code: str
    message: str

    def __post_init__(self) -> None:
        if self.code not in REFUSAL_CODES:
            raise ProtocolError(f"refusal code must be one of {', '.join(REFUSAL_CODES)}, got {str(self.code)[:32]!r}")
        if not isinstance(self.message, str) or not 0 < len(self.message) <= limits.ERROR_MESSAGE_CHARS_MAX:
            raise ProtocolError(f"message must be a str of 1..{limits.ERROR_MESSAGE_CHARS_MAX} characters")

    def to_bytes(self) -> bytes:
        return encode_small_frame({"t": "refused", "code": self.code, "message": self.message})


CatalogAnswer = CatalogDocument | Unchanged | CatalogRefused
ANSWER_KEYS = {"catalog": {"t", "document"}, "unchanged": {"t", "version"}, "refused": {"t", "code", "message"}}


def decode_answer(frame: bytes) -> CatalogAnswer:
    """The gateway's answer in one complete frame (length prefix included); ProtocolError if it is not one."""
    fields = decode_small_frame(frame, limits.CATALOG_ANSWER_FRAME_BYTES_MAX, "catalog")
    kind = fields.get("t")
    if kind not in ANSWER_KEYS:
        raise ProtocolError(f"a catalog answer has t in {sorted(ANSWER_KEYS)}, got {str(kind)[:32]!r}")
    _keys(fields, str(kind), ANSWER_KEYS[str(kind)])
    if kind == "catalog":
        return CatalogDocument(fields["document"])
    if kind == "unchanged":
        return Unchanged(fields["version"])
    return CatalogRefused(fields["code"], fields["message"])


def _uint(value: object, name: str) -> None:
    if type(value) is not int or not 0 <= value < 2**63:
        raise ProtocolError(f"{name} must be an unsigned integer, got {str(value)[:32]!r}")


def _keys(fields: dict, kind: str, keys: set[str]) -> None:
    if fields.get("t") != kind:
        raise ProtocolError(f"expected a catalog frame of t={kind!r}, got t={str(fields.get('t'))[:32]!r}")
    if set(fields) != keys:
        raise ProtocolError(f"a {kind!r} frame has exactly the keys {sorted(keys)}; got {sorted(fields)[:16]}")
