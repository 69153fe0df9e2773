"""Does an entry continue a ledger? One check, run by the auditor (ledger/verify.py), by the ledger's own writer
before it stores an entry (ledger/store.py), and by the gateway's witness before it cosigns
(gateway/witness/witness.py), with the auditor's check numbers (docs/ledger.md §8):

  (2)  LV02  signed by the ledger's owner, under the owner's origin
  (3)  LV03  the signature is valid (learned when the entry was parsed)
  (4)  LV04  its index is its position
  (5)  LV05  prev_hash is the SHA-256 of the previous entry (zeros for entry 0)
  (10) LV10  its request_id appears nowhere earlier in the ledger
  (11) LV11  amount = ceil((tokens_in × price_in + tokens_out × price_out) / 1,000,000)

``inspect_entry`` parses one entry and checks (1) and (3); it is pure, so big ledgers are inspected in parallel.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Container

from llorch.ledger import merkle
from llorch.ledger.errors import ChainBreak, EncodingError, SignatureError
from llorch.ledger.objects import Receipt, ledger_origin
from llorch.ledger.signing import open_envelope, peer_id_of, sha256, verify_signature


@dataclass(frozen=True)
class EntryFacts:
    """What the order-independent checks learned about one entry (computed in parallel for big ledgers)."""

    malformed: str | None            # check 1 failure, or None
    provider_key: bytes = b""
    origin: str = ""
    signature_valid: bool = False    # under the entry's own provider_key; check 2 compares that key to the owner's
    signature_error: str = ""
    index: int = 0
    prev_hash: bytes = b""
    request_id: str = ""
    amount: int = 0
    expected_amount: int = 0
    entry_sha256: bytes = b""
    leaf: bytes = b""

    @classmethod
    def of_receipt(cls, receipt: Receipt, envelope: bytes, signature_valid: bool) -> "EntryFacts":
        return cls(None, receipt.provider_key, receipt.origin, signature_valid, "", receipt.index, receipt.prev_hash,
                   receipt.request_id, receipt.amount, receipt.expected_amount(), sha256(envelope),
                   merkle.leaf_hash(envelope))


def inspect_entry(data: bytes) -> EntryFacts:
    """Checks 1 and 3 and the inputs of the others, for one entry; pure, so it can run in a worker process."""
    try:
        payload, payload_bytes, signature = open_envelope(data)
        receipt = Receipt.from_payload(payload)
    except EncodingError as exc:
        return EntryFacts(malformed=str(exc))
    try:
        verify_signature("receipt", receipt.provider_key, payload_bytes, signature)
        valid, error = True, ""
    except SignatureError as exc:
        valid, error = False, str(exc)
    return dataclasses.replace(EntryFacts.of_receipt(receipt, data, valid), signature_error=error)


def check_continues(facts: EntryFacts, owner: bytes, position: int, previous_hash: bytes,
                    earlier_request_ids: Container[str]) -> None:
    """Raise ChainBreak (with the auditor's check number) unless the entry continues the owner's ledger at
    ``position`` after the entry hashing to ``previous_hash``. Check 1 (malformed) is the caller's."""
    origin = ledger_origin(owner)
    if facts.provider_key != owner or facts.origin != origin:                                 # (2)
        raise ChainBreak(2, f"signed by {ledger_origin(facts.provider_key)} with origin {facts.origin!r}, but "
                            f"this ledger is {origin}")
    if not facts.signature_valid:                                                             # (3)
        raise ChainBreak(3, facts.signature_error or "bad signature")
    if facts.index != position:                                                               # (4)
        raise ChainBreak(4, f"entry claims index {facts.index} at position {position}")
    if facts.prev_hash != previous_hash:                                                      # (5)
        raise ChainBreak(5, f"prev_hash {facts.prev_hash.hex()} is not the hash of entry {position - 1} "
                            f"({previous_hash.hex()})")
    if facts.request_id in earlier_request_ids:                                               # (10)
        raise ChainBreak(10, f"request_id {facts.request_id} already appears earlier in the ledger of "
                             f"{peer_id_of(owner)}")
    if facts.amount != facts.expected_amount:                                                 # (11)
        raise ChainBreak(11, f"amount {facts.amount} but tokens × prices give {facts.expected_amount}")
