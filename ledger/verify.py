"""The offline auditor: check every entry of a provider's ledger, in order, and stop at the first bad one.

The checks are numbered as in docs/protocol.md ("Auditor checks"); each failure raises VerificationError with the
check number, a stable code and the entry index.

  (1) LV01 malformed       the entry is canonical msgpack, a well-formed envelope and a well-typed receipt
  (2) LV02 unknown key     the entry is signed by the ledger's owner (the key of entry 0, or of ``expected_key``)
  (3) LV03 bad signature   the Ed25519 signature verifies under that key with the receipt domain tag
  (4) LV04 index gap       the entry's index equals its position (0, 1, 2, ...)
  (5) LV05 chain break     prev_hash is sha256 of the previous entry's exact bytes (zeros for entry 0)
  (10) LV10 duplicate      no request_id appears twice
  (11) LV11 amount         amount = ceil((tokens_in × price_in + tokens_out × price_out) / 1,000,000)

Checks 6-9 (Merkle root, checkpoint signature, fork, rollback) belong to checkpoints and are reserved.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from ledger.errors import EncodingError, SignatureError, StoreError, VerificationError
from ledger.objects import ZERO_HASH, Receipt, ledger_origin
from ledger.signing import open_envelope, sha256, verify_signature

CHECKS = {
    1: ("LV01", "malformed"),
    2: ("LV02", "unknown key"),
    3: ("LV03", "bad signature"),
    4: ("LV04", "index gap"),
    5: ("LV05", "chain break"),
    10: ("LV10", "duplicate request_id"),
    11: ("LV11", "amount mismatch"),
}


@dataclass(frozen=True)
class VerifyReport:
    entries: int
    origin: str | None
    head_sha256: bytes


def _fail(check: int, entry: int | None, message: str) -> VerificationError:
    return VerificationError(check, CHECKS[check][0], entry, message)


def verify_entries(entries: Iterable[bytes], expected_key: bytes | None = None) -> VerifyReport:
    """Run checks 1-5, 10, 11 over entries in ledger order; raise VerificationError at the first failure."""
    owner = expected_key
    previous_hash = ZERO_HASH
    seen_request_ids: dict[str, int] = {}
    count = 0
    for position, data in enumerate(entries):
        # (1) malformed
        try:
            payload, payload_bytes, signature = open_envelope(data)
            receipt = Receipt.from_payload(payload)
        except EncodingError as exc:
            raise _fail(1, position, str(exc)) from None
        # (2) unknown key
        if owner is None:
            owner = receipt.provider_key
        if receipt.provider_key != owner or receipt.origin != ledger_origin(owner):
            raise _fail(2, position, f"signed by {ledger_origin(receipt.provider_key)} with origin "
                                     f"{receipt.origin!r}, but this ledger is {ledger_origin(owner)}")
        # (3) bad signature
        try:
            verify_signature("receipt", receipt.provider_key, payload_bytes, signature)
        except SignatureError as exc:
            raise _fail(3, position, str(exc)) from None
        # (4) index gap
        if receipt.index != position:
            raise _fail(4, position, f"entry claims index {receipt.index} at position {position}")
        # (5) chain break
        if receipt.prev_hash != previous_hash:
            raise _fail(5, position, f"prev_hash {receipt.prev_hash.hex()} is not the hash of entry "
                                     f"{position - 1} ({previous_hash.hex()})")
        # (10) duplicate request_id
        if receipt.request_id in seen_request_ids:
            raise _fail(10, position, f"request_id {receipt.request_id} already at entry "
                                      f"{seen_request_ids[receipt.request_id]}")
        seen_request_ids[receipt.request_id] = position
        # (11) amount
        if receipt.amount != receipt.expected_amount():
            raise _fail(11, position, f"amount {receipt.amount} but tokens × prices give {receipt.expected_amount()}")
        previous_hash = sha256(data)
        count += 1
    return VerifyReport(count, ledger_origin(owner) if owner else None, previous_hash)


def read_sqlite_entries(path: Path) -> Iterator[bytes]:
    """Yield the stored entry bytes of a ledger file in index order, opened read-only."""
    if not Path(path).is_file():
        raise StoreError(f"{path} is not a file")
    try:
        connection = sqlite3.connect(f"file:{Path(path).resolve()}?mode=ro", uri=True)
    except sqlite3.Error as exc:
        raise StoreError(f"cannot open {path}: {exc}") from None
    try:
        cursor = connection.execute("SELECT idx, entry FROM entries ORDER BY idx")
        for idx, entry in cursor:
            if not isinstance(entry, bytes):
                entry = b""  # a non-blob entry is malformed; check 1 names it
            yield entry
    except sqlite3.Error as exc:
        raise StoreError(f"cannot read ledger entries from {path}: {exc}") from None
    finally:
        connection.close()


def verify_ledger_file(path: Path) -> VerifyReport:
    return verify_entries(read_sqlite_entries(path))
