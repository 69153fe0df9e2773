"""Step (8) of a request: check the provider's receipt against the ticket and what was relayed, then keep it.

``check_receipt`` is pure and raises ReceiptRejected naming the first mismatch. ``ReceiptBook`` stores accepted
receipts (exact bytes) in the gateway's SQLite database, keyed by request_id (one billed receipt per request).
"""

from __future__ import annotations

from llorch.gateway.errors import ReceiptRejected
from llorch.ledger.errors import EncodingError, SignatureError
from llorch.ledger.objects import Receipt, Ticket, logprobs_sha256, prompt_commitment, sampling_sha256
from llorch.ledger.signing import sha256
from llorch.ledger.sqlite import Database


def check_receipt(receipt_bytes: bytes, ticket: Ticket, ticket_bytes: bytes, salt: bytes, prompt: dict,
                  relayed_text: str, cancelled_by_gateway: bool = False, expected: dict | None = None,
                  logprobs: list[dict] | None = None) -> Receipt:
    """Return the receipt if it is signed by the ticket's provider and matches the ticket and the text the provider
    sent. Its counts and times are claims: gateway/books/settlement.py bounds them by the gateway's measurements.
    ``cancelled_by_gateway``: the gateway sent a cancel frame, so the receipt may say "cancelled" (or finish
    normally, when the provider was done before the cancel arrived); otherwise it must not say "cancelled".
    ``expected``: ``receipt_expectations`` of the same ticket, salt and prompt, when the caller computed them
    ahead (while the provider was generating). ``logprobs``: the logprobs entries of the tokens relayed, when the
    ticket asks for logprobs: the receipt must commit to exactly them, one per output token."""
    try:
        receipt = Receipt.from_envelope(receipt_bytes)
    except (EncodingError, SignatureError) as exc:
        raise ReceiptRejected(f"receipt is invalid: {exc}") from None
    asked = "logprobs" in ticket.sampling
    expected = {**(expected or receipt_expectations(ticket, ticket_bytes, salt, prompt)),
                "output_sha256": sha256(relayed_text.encode("utf-8")),
                "logprobs_sha256": logprobs_sha256(logprobs or []) if asked else None}
    for name, value in expected.items():
        if getattr(receipt, name) != value:
            raise ReceiptRejected(f"receipt {name} does not match the ticket or the relayed output")
    if receipt.tokens_out > ticket.sampling["max_tokens"]:
        raise ReceiptRejected(f"receipt bills {receipt.tokens_out} output tokens, the ticket allowed "
                              f"{ticket.sampling['max_tokens']}")
    if asked and receipt.tokens_out != len(logprobs or []):
        raise ReceiptRejected(f"receipt bills {receipt.tokens_out} output tokens, the provider sent logprobs for "
                              f"{len(logprobs or [])}")
    if receipt.amount != receipt.expected_amount():
        raise ReceiptRejected(f"receipt amount {receipt.amount} is not tokens × prices ({receipt.expected_amount()})")
    if receipt.finish_reason == "cancelled" and not cancelled_by_gateway:
        raise ReceiptRejected("receipt says the request was cancelled, but the gateway relayed it to the end")
    return receipt


def receipt_expectations(ticket: Ticket, ticket_bytes: bytes, salt: bytes, prompt: dict) -> dict:
    """What a receipt for ``ticket`` must say, but for its output: field name → value."""
    return {
        "provider_key": ticket.provider_key, "request_id": ticket.request_id, "ticket_sha256": sha256(ticket_bytes),
        "gateway_key": ticket.gateway_key, "tenant": ticket.tenant, "model_id": ticket.model_id,
        "model_sha256": ticket.model_sha256, "seed": ticket.sampling["seed"],
        "sampling_sha256": sampling_sha256(ticket.sampling), "price_in": ticket.price_in,
        "price_out": ticket.price_out, "currency": ticket.currency,
        "prompt_commitment": prompt_commitment(salt, prompt),
    }


SCHEMA = """
CREATE TABLE IF NOT EXISTS receipts (
    request_id   TEXT PRIMARY KEY,
    provider_key BLOB NOT NULL,
    tenant       TEXT NOT NULL,
    amount       INTEGER NOT NULL,
    currency     TEXT NOT NULL,
    ticket       BLOB NOT NULL,
    receipt      BLOB NOT NULL
);
"""


class ReceiptBook:
    """Receipts the gateway accepted, with the ticket each answers, in the gateway's database."""

    def __init__(self, database: Database) -> None:
        self._database = database

    @staticmethod
    def statements(receipt: Receipt, ticket_bytes: bytes, receipt_bytes: bytes) -> list:
        """The write that keeps an accepted receipt (to run in the caller's transaction)."""
        return [("INSERT INTO receipts (request_id, provider_key, tenant, amount, currency, ticket, receipt) "
                 "VALUES (?, ?, ?, ?, ?, ?, ?)",
                 [(receipt.request_id, receipt.provider_key, receipt.tenant, receipt.amount, receipt.currency,
                   ticket_bytes, receipt_bytes)])]

    async def receipt_of(self, request_id: str) -> tuple[str, bytes] | None:
        """(tenant pseudonym, receipt bytes) of a billed request."""
        row = await self._database.fetchone("SELECT tenant, receipt FROM receipts WHERE request_id = ?",
                                            (request_id,))
        return None if row is None else (row[0], row[1])

    async def count(self) -> int:
        row = await self._database.fetchone("SELECT COUNT(*) FROM receipts")
        assert row is not None                   # an aggregate answers one row
        return row[0]
