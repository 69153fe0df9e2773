"""Ledger bundles, ``llorch-ledger-bundle/2`` (docs/ledger.md §7): a ledger as a stream of length-prefixed records,
written and read one record at a time, so neither the exporter nor the auditor holds the ledger in memory.

    bundle   = header checkpoint* cosigned* entry* trailer        then the end of the file
    record   = kind (1 ASCII byte) ‖ length (u32 big-endian) ‖ payload (length bytes, at most 64 KiB)
    'H'  header    canonical map {"checkpoints": uint, "cosigned": uint, "entries": uint,
                                  "format": "llorch-ledger-bundle/2"}: how many records of each kind follow
    'C'  one of the ledger's signed checkpoints (note bytes)
    'W'  a witness-cosigned copy of one (note bytes)
    'E'  one entry (the receipt envelope bytes), in ledger order
    'T'  trailer   canonical map {"sha256": bin 32}: SHA-256 of every byte of the file before the trailer record

Checkpoints come before the entries so that an auditor knows, before it reads the entries, at which sizes it needs
the Merkle root, and can compute them in O(log n) memory as the entries stream past.

Reading (``BundleReader``) checks the container, and only the container: record order and kinds, each length
against its cap *before* reading the payload, the counts against the header, the trailer's hash, and that nothing
follows the trailer. Any fault raises BundleError naming the record and byte offset: a truncated, extended or
altered bundle is refused as unreadable, never read as a shorter ledger. What the records say is the auditor's
business (ledger/verify.py).

Bundles of the first format (``llorch-ledger-bundle/1``: one canonical msgpack map holding every entry, so at most
4096 of them) are still read, never written.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from typing import BinaryIO, Iterable, Iterator

from llorch.ledger import canonical, limits
from llorch.ledger.errors import BundleError, EncodingError

FORMAT = "llorch-ledger-bundle/2"
LEGACY_FORMAT = "llorch-ledger-bundle/1"
HEADER, CHECKPOINT, COSIGNED, ENTRY, TRAILER = b"H", b"C", b"W", b"E", b"T"
NAMES = {HEADER: "header", CHECKPOINT: "checkpoint", COSIGNED: "cosigned checkpoint", ENTRY: "entry",
         TRAILER: "trailer"}
# The kinds that may follow each kind (the header is first, the trailer last).
FOLLOWS = {HEADER: (CHECKPOINT, COSIGNED, ENTRY, TRAILER), CHECKPOINT: (CHECKPOINT, COSIGNED, ENTRY, TRAILER),
           COSIGNED: (COSIGNED, ENTRY, TRAILER), ENTRY: (ENTRY, TRAILER)}
PREFIX = struct.Struct(">cI")
SHA256_BYTES = 32
# A legacy bundle is read whole. The old exporter could not write one with more than 4096 entries (64 KiB at most)
# and as many checkpoints and cosigned notes (16 KiB at most), so nothing bigger is one.
LEGACY_BUNDLE_BYTES_MAX = limits.CANONICAL_ARRAY_LEN_MAX * (limits.SIGNED_OBJECT_BYTES_MAX + 2 * 16 * 1024)


@dataclass(frozen=True)
class Counts:
    """How many records of each kind a bundle holds (its header says so before they come)."""

    checkpoints: int
    cosigned: int
    entries: int

    def of(self, kind: bytes) -> int:
        return {CHECKPOINT: self.checkpoints, COSIGNED: self.cosigned, ENTRY: self.entries}[kind]


# --- writing -----------------------------------------------------------------------------------------------------

def encode_bundle(counts: Counts, checkpoints: Iterable[bytes], cosigned: Iterable[bytes],
                  entries: Iterable[bytes], name: str = "the bundle") -> Iterator[bytes]:
    """The bytes of a bundle, one record at a time. ``counts`` must be the exact lengths of the three iterables
    (the caller read them from one snapshot); a record too big for the format raises BundleError."""
    digest = hashlib.sha256()
    header = canonical.encode({"checkpoints": counts.checkpoints, "cosigned": counts.cosigned,
                               "entries": counts.entries, "format": FORMAT})
    for kind, payloads in ((HEADER, [header]), (CHECKPOINT, checkpoints), (COSIGNED, cosigned), (ENTRY, entries)):
        written = 0
        for payload in payloads:
            if len(payload) > limits.BUNDLE_RECORD_BYTES_MAX:
                raise BundleError(f"cannot write {name}: {NAMES[kind]} {written} is {len(payload)} bytes, more than "
                                  f"any valid one ({limits.BUNDLE_RECORD_BYTES_MAX}); audit the ledger file itself")
            record = PREFIX.pack(kind, len(payload)) + payload
            digest.update(record)
            written += 1
            yield record
        assert kind == HEADER or written == counts.of(kind), (NAMES[kind], written, counts)
    trailer = canonical.encode({"sha256": digest.digest()})
    yield PREFIX.pack(TRAILER, len(trailer)) + trailer


def bundle_bytes(checkpoints: list[bytes], cosigned: list[bytes], entries: list[bytes]) -> bytes:
    """A whole (small) bundle in memory: for fixtures and tests."""
    return b"".join(encode_bundle(Counts(len(checkpoints), len(cosigned), len(entries)), checkpoints, cosigned,
                                  entries))


# --- reading -----------------------------------------------------------------------------------------------------

class BundleReader:
    """Reads a bundle from a binary file, checking the container as it goes (see the module docstring).

    ``counts`` is the header's; ``records()`` yields (kind, payload) for every checkpoint, cosigned and entry record in
    file order and returns only after the trailer checked out and the file ended.
    """

    def __init__(self, handle: BinaryIO, name: str) -> None:
        self._handle = handle
        self._name = name
        self._digest = hashlib.sha256()
        self._offset = 0
        self._number = 0          # records read so far
        kind, payload = self._read_record()
        if kind != HEADER:
            raise self._error(f"it starts with a {NAMES.get(kind, repr(kind))} record, not a header")
        self.counts = self._parse_header(payload)

    def records(self) -> Iterator[tuple[bytes, bytes]]:
        seen = {CHECKPOINT: 0, COSIGNED: 0, ENTRY: 0}
        previous = HEADER
        while True:
            kind, payload = self._read_record(allow=FOLLOWS[previous], before=previous)
            if kind == TRAILER:
                self._check_trailer(payload, seen)
                return
            seen[kind] += 1
            if seen[kind] > self.counts.of(kind):
                raise self._error(f"it holds more {NAMES[kind]} records than the {self.counts.of(kind)} its header "
                                  f"announces: the bundle was extended or altered")
            previous = kind
            yield kind, payload

    def _read_record(self, allow: tuple[bytes, ...] = (HEADER,), before: bytes | None = None) -> tuple[bytes, bytes]:
        start = self._offset
        prefix = self._read_exactly(PREFIX.size, f"record {self._number}'s kind and length", boundary=True)
        kind, length = PREFIX.unpack(prefix)
        if kind not in NAMES:
            raise self._error(f"record {self._number} at byte {start} has unknown kind {kind!r}")
        if kind not in allow:
            raise self._error(f"record {self._number} at byte {start} is a {NAMES[kind]}, which cannot follow "
                              f"{'the start of the file' if before is None else 'a ' + NAMES[before]}")
        cap = limits.BUNDLE_HEADER_TRAILER_BYTES_MAX if kind in (HEADER, TRAILER) else limits.BUNDLE_RECORD_BYTES_MAX
        if length > cap:
            raise self._error(f"record {self._number} ({NAMES[kind]}) at byte {start} claims {length} bytes, more "
                              f"than {cap}")
        payload = self._read_exactly(length, f"record {self._number} ({NAMES[kind]})")
        if kind != TRAILER:
            self._digest.update(prefix)
            self._digest.update(payload)
        self._number += 1
        return kind, payload

    def _read_exactly(self, size: int, what: str, boundary: bool = False) -> bytes:
        data = self._handle.read(size)
        if len(data) != size:
            where = f"inside {what}"
            if boundary and not data:
                where = f"after record {self._number - 1}" if self._number else "before its header"
            raise self._error(f"it is truncated: the file ends at byte {self._offset + len(data)}, {where}, and a "
                              f"complete bundle ends with a trailer record")
        self._offset += size
        return data

    def _parse_header(self, payload: bytes) -> Counts:
        try:
            header = canonical.decode(payload)
        except EncodingError as exc:
            raise self._error(f"its header is not canonical msgpack: {exc}") from None
        if not isinstance(header, dict) or header.get("format") != FORMAT:
            found = header.get("format") if isinstance(header, dict) else None
            raise self._error(f"its header names format {found!r}; this reader knows {FORMAT!r} (and reads "
                              f"{LEGACY_FORMAT!r})")
        if set(header) != {"checkpoints", "cosigned", "entries", "format"}:
            raise self._error(f"its header has fields {sorted(header)}, expected checkpoints, cosigned, entries, "
                              f"format")
        for field in ("checkpoints", "cosigned", "entries"):
            if type(header[field]) is not int or header[field] < 0:
                raise self._error(f"its header's {field} is not an unsigned integer")
        return Counts(header["checkpoints"], header["cosigned"], header["entries"])

    def _check_trailer(self, payload: bytes, seen: dict[bytes, int]) -> None:
        for kind, count in seen.items():
            if count != self.counts.of(kind):
                raise self._error(f"it holds {count} {NAMES[kind]} records, its header announces "
                                  f"{self.counts.of(kind)}: the bundle is incomplete or altered")
        try:
            trailer = canonical.decode(payload)
        except EncodingError as exc:
            raise self._error(f"its trailer is not canonical msgpack: {exc}") from None
        if not isinstance(trailer, dict) or set(trailer) != {"sha256"} or not isinstance(trailer["sha256"], bytes) \
                or len(trailer["sha256"]) != SHA256_BYTES:
            raise self._error("its trailer is not {\"sha256\": bin 32}")
        if trailer["sha256"] != self._digest.digest():
            raise self._error("its bytes do not hash to the SHA-256 in its trailer: the bundle was altered or "
                              "damaged after it was written")
        if self._handle.read(1):
            raise self._error(f"bytes follow its trailer (at byte {self._offset}): the bundle was extended")

    def _error(self, message: str) -> BundleError:
        return BundleError(f"cannot read {self._name}: {message}")


def read_legacy_bundle(data: bytes, name: str) -> tuple[list[bytes], list[bytes], list[bytes]]:
    """(checkpoints, cosigned, entries) of a ``llorch-ledger-bundle/1`` file: one canonical map, read whole."""
    try:
        bundle = canonical.decode(data)
    except EncodingError as exc:
        raise BundleError(f"cannot read {name}: not a ledger file or bundle ({exc})") from None
    if not isinstance(bundle, dict) or bundle.get("format") != LEGACY_FORMAT:
        raise BundleError(f"cannot read {name}: not a ledger file or bundle (no {FORMAT!r} header, not a "
                          f"{LEGACY_FORMAT!r} map)")
    parts: list[list[bytes]] = []
    for field in ("checkpoints", "cosigned", "entries"):
        value = bundle.get(field)
        if not isinstance(value, list) or not all(isinstance(item, bytes) for item in value):
            raise BundleError(f"cannot read {name}: bundle field {field!r} must be a list of bin")
        parts.append(value)
    return parts[0], parts[1], parts[2]
