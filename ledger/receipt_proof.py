"""A customer's offline check of one bill: a receipt, the provider's checkpoint it is under, and the inclusion proof
(`GET /v2/receipts/{request_id}` returns exactly this; `llorch ledger verify-receipt` runs the checks).

  (1) the receipt is a canonical, well-typed receipt signed by the provider it names;
  (2) the checkpoint is signed by that provider (origin llorch/<peer id>); every cosignature on it is valid (the
      auditor's check 12, docs/ledger.md §8); and, if a witness key is given, one of them is that witness's;
  (3) the inclusion proof leads from the receipt (leaf index, tree size) to the checkpoint's root (RFC 9162);
  (4) the receipt's amount is tokens × prices.
"""

from __future__ import annotations

import base64
import json
import time
from dataclasses import dataclass

from llorch.ledger import merkle
from llorch.ledger.errors import LedgerError
from llorch.ledger.note import Cosignature, NoteError, check_cosignatures, open_checkpoint, parse_note, verify_cosignature
from llorch.ledger.objects import Receipt
from llorch.ledger.signing import peer_id_of


class ReceiptProofError(Exception):
    """The bill does not check out; the message names the step (1)-(4) and why."""


@dataclass(frozen=True)
class CheckedReceipt:
    receipt: Receipt
    tree_size: int
    cosigned_at_s: int | None
    cosignatures: list[Cosignature]             # every cosignature on the checkpoint, checked


def proof_document(request_id: str, receipt: bytes, index: int, size: int, proof: list[bytes],
                   checkpoint: bytes | None) -> dict:
    return {"request_id": request_id, "receipt": base64.b64encode(receipt).decode(), "leaf_index": index,
            "tree_size": size, "inclusion_proof": [base64.b64encode(h).decode() for h in proof],
            "checkpoint": checkpoint.decode() if checkpoint else None}


def verify_receipt_document(document: dict, witness_key: bytes | None = None,
                            witness_name: str | None = None, now_s: int | None = None) -> CheckedReceipt:
    receipt_bytes, proof, index, size, note = _fields(document)
    try:                                                                           # (1)
        receipt = Receipt.from_envelope(receipt_bytes)
    except LedgerError as exc:
        raise ReceiptProofError(f"(1) the receipt is not genuine: {exc}") from None
    if document.get("request_id") != receipt.request_id or receipt.index != index:
        raise ReceiptProofError("(1) the receipt's request_id or index differ from the document's")
    if note is None:
        raise ReceiptProofError("(2) no checkpoint covers this receipt yet: ask again after the next witness round")
    origin = f"llorch/{peer_id_of(receipt.provider_key)}"
    try:                                                                           # (2)
        checkpoint = open_checkpoint(note.encode(), origin, receipt.provider_key)
        cosignatures = check_cosignatures(note.encode(), origin, int(time.time()) if now_s is None else now_s) \
            if len(parse_note(note.encode()).signatures) > 1 else []
        cosigned_at = None
        if witness_key:
            assert witness_name is not None, "a witness_key comes with its witness_name"
            cosigned_at = verify_cosignature(note.encode(), witness_name, witness_key)
    except NoteError as exc:
        raise ReceiptProofError(f"(2) {exc}") from None
    if checkpoint.size != size:
        raise ReceiptProofError(f"(2) the checkpoint is for {checkpoint.size} entries, the proof for {size}")
    try:                                                                           # (3)
        merkle.verify_inclusion(merkle.leaf_hash(receipt_bytes), index, size, proof, checkpoint.root)
    except merkle.ProofError as exc:
        raise ReceiptProofError(f"(3) the receipt is not in the provider's checkpointed ledger: {exc}") from None
    if receipt.amount != receipt.expected_amount():                                # (4)
        raise ReceiptProofError(f"(4) amount {receipt.amount} is not tokens × prices ({receipt.expected_amount()})")
    return CheckedReceipt(receipt, size, cosigned_at, [c for c in cosignatures if c.public_key is not None])


def _fields(document: dict) -> tuple[bytes, list[bytes], int, int, str | None]:
    """(receipt bytes, inclusion proof, leaf index, tree size, checkpoint note) of a document of the right shape:
    ``receipt`` base64 str, ``inclusion_proof`` a list of base64 str, ``leaf_index`` and ``tree_size`` integers
    (not floats or booleans), ``checkpoint`` a str or null, ``request_id`` a str."""
    if not isinstance(document, dict):
        raise ReceiptProofError("not a receipt proof document: it is not a JSON object")
    missing = sorted({"request_id", "receipt", "leaf_index", "tree_size", "inclusion_proof", "checkpoint"}
                     - set(document))
    if missing:
        raise ReceiptProofError(f"not a receipt proof document: missing {', '.join(missing)}")
    proof_texts, note = document["inclusion_proof"], document["checkpoint"]
    if not isinstance(document["request_id"], str):
        raise ReceiptProofError("not a receipt proof document: request_id must be a string")
    if not isinstance(proof_texts, list) or len(proof_texts) > merkle.PROOF_HASHES_MAX:
        raise ReceiptProofError(f"not a receipt proof document: inclusion_proof must be a list of at most "
                                f"{merkle.PROOF_HASHES_MAX} base64 strings")
    index, size = document["leaf_index"], document["tree_size"]
    for name, value in (("leaf_index", index), ("tree_size", size)):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**63:
            raise ReceiptProofError(f"not a receipt proof document: {name} must be an integer in 0..2^63-1")
    if note is not None and not isinstance(note, str):
        raise ReceiptProofError("not a receipt proof document: checkpoint must be a string or null")
    try:
        receipt_bytes = _base64(document["receipt"])
        proof = [_base64(text) for text in proof_texts]
        if note is not None:
            note.encode("utf-8")
    except (TypeError, ValueError) as exc:     # binascii.Error and UnicodeEncodeError are ValueErrors
        raise ReceiptProofError(f"not a receipt proof document: {exc}") from None
    return receipt_bytes, proof, index, size, note


def _base64(text: object) -> bytes:
    if not isinstance(text, str):
        raise TypeError("receipt and inclusion_proof items must be base64 strings")
    return base64.b64decode(text.encode("ascii"), validate=True)


def _no_constants(name: str):
    raise ValueError(f"{name} is not JSON")


def load_document(text: str) -> dict:
    """Parse a receipt proof document (GET /v2/receipts/{id}); ReceiptProofError if it is not one."""
    try:
        document = json.loads(text, parse_constant=_no_constants)
    except RecursionError:
        raise ReceiptProofError("not JSON: nested too deeply") from None
    except ValueError as exc:             # JSONDecodeError, NaN/Infinity, a number with too many digits
        raise ReceiptProofError(f"not JSON: {exc}") from None
    _fields(document)
    return document
