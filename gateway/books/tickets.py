"""Tickets and their settlement in the gateway database: the shell around gateway/books/settlement.py.

A ticket is written (state ``issued``) in its own durable transaction **before** it is sent to the provider, so a
receipt for it can never look forged, whatever happens to the gateway afterwards. Its settlement is one transaction:
the ticket's meter, outcome and amounts, the receipt (if any), the postings and the findings. A trigger refuses a
second settlement of the same ticket, so settling twice aborts the whole transaction: settlement happens exactly
once, whichever path (live, or ``llorch billing reconcile --post``) gets there first.
"""

from __future__ import annotations

from dataclasses import dataclass

from llorch.gateway.books.postings import Books
from llorch.gateway.books.receipts import ReceiptBook
from llorch.gateway.books.settlement import Credit, Metered, Payer, Settlement, State, Terms
from llorch.ledger.objects import Receipt, Ticket
from llorch.ledger.signing import peer_id_of, sha256
from llorch.ledger.sqlite import Database

SCHEMA = """
CREATE TABLE IF NOT EXISTS tickets (
    ticket_sha256 BLOB PRIMARY KEY,
    request_id    TEXT NOT NULL,
    provider_key  BLOB NOT NULL,
    issued_ms     INTEGER NOT NULL,
    ticket        BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS findings (
    id            INTEGER PRIMARY KEY,
    kind          TEXT NOT NULL,
    provider_key  BLOB NOT NULL,
    ticket_sha256 BLOB NOT NULL,
    request_id    TEXT NOT NULL,
    detail        TEXT NOT NULL,
    found_ms      INTEGER NOT NULL,
    UNIQUE (kind, ticket_sha256)
);
CREATE INDEX IF NOT EXISTS findings_provider ON findings (provider_key);
"""

# Columns added to tickets by settlement (databases from before it get them with ALTER TABLE, see gateway/db.py).
TICKET_COLUMNS = {
    "state": "TEXT NOT NULL DEFAULT 'settled'",    # issued | settled (older tickets count as settled)
    "tenant": "TEXT",
    "margin_bp": "INTEGER",
    "customer_price_in": "INTEGER",
    "customer_price_out": "INTEGER",
    "reserved_minor": "INTEGER",
    "prompt_tokens_max": "INTEGER",
    "outcome": "TEXT",
    "frames": "INTEGER",
    "text_bytes": "INTEGER",
    "accepted_ms": "INTEGER",                      # the gateway's clock, like every *_ms below
    "first_token_ms": "INTEGER",
    "ended_ms": "INTEGER",
    "settled_ms": "INTEGER",
    "tokens_in": "INTEGER",
    "tokens_out": "INTEGER",
    "payout": "INTEGER",
    "fee": "INTEGER",
    "charge": "INTEGER",
    "receipt_sha256": "BLOB",                      # the receipt the settlement used (NULL: settled without one)
    "receipt_seen": "INTEGER NOT NULL DEFAULT 0",  # reconciliation found this ticket's receipt in the ledger
}
PAYER_COLUMN = {"payer": "TEXT NOT NULL DEFAULT 'customer'"}   # customer | spot_check | probe (schema version 3)

TRIGGERS = """
CREATE INDEX IF NOT EXISTS tickets_request ON tickets (request_id);
CREATE INDEX IF NOT EXISTS tickets_open ON tickets (state, issued_ms) WHERE state = 'issued';
CREATE TRIGGER IF NOT EXISTS tickets_settle_once BEFORE UPDATE OF state ON tickets WHEN OLD.state = 'settled'
    BEGIN SELECT RAISE(ABORT, 'ticket already settled'); END;
"""


@dataclass(frozen=True)
class OpenTicket:
    """A ticket written but not settled (after a gateway crash, for reconciliation to settle)."""

    ticket_sha256: bytes
    ticket: Ticket
    ticket_bytes: bytes
    terms: Terms


class TicketBook:
    def __init__(self, database: Database) -> None:
        self._database = database

    async def open_per_provider(self, since_ms: int) -> dict[bytes, int]:
        """Tickets issued since ``since_ms`` and not settled yet (in flight, on any replica), per provider."""
        return dict(await self._database.fetchall(
            "SELECT provider_key, COUNT(*) FROM tickets WHERE state = 'issued' AND issued_ms >= ? "
            "GROUP BY provider_key", (since_ms,)))

    async def open_for(self, provider_key: bytes, since_ms: int) -> int:
        """One provider's tickets issued since ``since_ms`` and not settled yet, on any replica."""
        row = await self._database.fetchone(
            "SELECT COUNT(*) FROM tickets WHERE provider_key = ? AND state = 'issued' AND issued_ms >= ?",
            (provider_key, since_ms))
        return row[0] if row else 0

    async def issue(self, ticket: Ticket, ticket_bytes: bytes, terms: Terms) -> None:
        """Write the ticket durably, before it is sent."""
        await self._database.transaction([(
            "INSERT INTO tickets (ticket_sha256, request_id, provider_key, issued_ms, ticket, state, tenant, margin_bp,"
            " customer_price_in, customer_price_out, reserved_minor, prompt_tokens_max, payer) "
            "VALUES (?, ?, ?, ?, ?, 'issued', ?, ?, ?, ?, ?, ?, ?)",
            [(sha256(ticket_bytes), ticket.request_id, ticket.provider_key, ticket.issued_ms, ticket_bytes,
              terms.tenant, terms.margin_bp, terms.customer_price_in, terms.customer_price_out, terms.reserved_minor,
              terms.prompt_tokens_max, terms.payer.value)])])

    async def settle(self, ticket: Ticket, ticket_bytes: bytes, metered: Metered, settlement: Settlement,
                     receipt: Receipt | None, receipt_bytes: bytes | None, tenant: str, now_ms: int,
                     credit: Credit | None = None) -> None:
        """One transaction: the settlement, the receipt it used, its postings and findings, and ``credit`` (the
        request served by a provider suspended meanwhile, repaid at once). Raises StoreError (and writes nothing)
        if the ticket was already settled."""
        statements = self.settlement_statements(ticket, ticket_bytes, metered, settlement, receipt, receipt_bytes,
                                                tenant, now_ms)
        if credit is not None:
            statements += self._credit_statements(ticket, credit, tenant, settlement.margin_bp, now_ms)
        await self._database.transaction(statements)

    async def credit(self, ticket: Ticket, credit: Credit, tenant: str, margin_bp: int, now_ms: int) -> None:
        """A settled ticket's credit on its own (idempotent: a request is never credited twice)."""
        await self._database.transaction(self._credit_statements(ticket, credit, tenant, margin_bp, now_ms))

    @staticmethod
    def _credit_statements(ticket: Ticket, credit: Credit, tenant: str, margin_bp: int, now_ms: int) -> list:
        return Books.credit_statements([(credit, (ticket.currency, tenant, peer_id_of(ticket.provider_key),
                                                  ticket.model_id, margin_bp))], now_ms)

    @staticmethod
    def settlement_statements(ticket: Ticket, ticket_bytes: bytes, metered: Metered, settlement: Settlement,
                              receipt: Receipt | None, receipt_bytes: bytes | None, tenant: str, now_ms: int) -> list:
        ticket_hash = sha256(ticket_bytes)
        statements: list = [(
            "UPDATE tickets SET state = 'settled', outcome = ?, frames = ?, text_bytes = ?, accepted_ms = ?, "
            "first_token_ms = ?, ended_ms = ?, settled_ms = ?, tokens_in = ?, tokens_out = ?, payout = ?, fee = ?, "
            "charge = ?, receipt_sha256 = ? WHERE ticket_sha256 = ?",
            [(settlement.outcome.value, metered.frames, metered.text_bytes, metered.accepted_ms,
              metered.first_token_ms, metered.ended_ms, now_ms, settlement.tokens_in, settlement.tokens_out,
              settlement.payout, settlement.fee, settlement.charge,
              sha256(receipt_bytes) if receipt_bytes and settlement.receipt_used else None, ticket_hash)])]
        if receipt is not None and receipt_bytes is not None:
            statements += ReceiptBook.statements(receipt, ticket_bytes, receipt_bytes)
        statements += Books.settlement_statements(tenant, ticket, ticket_hash, settlement, now_ms)
        if settlement.findings:
            statements.append((
                "INSERT INTO findings (kind, provider_key, ticket_sha256, request_id, detail, found_ms) "
                "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                [(finding.kind, ticket.provider_key, ticket_hash, ticket.request_id, finding.detail, now_ms)
                 for finding in settlement.findings]))
        return statements

    async def open_tickets(self) -> list[OpenTicket]:
        rows = await self._database.fetchall(
            "SELECT ticket_sha256, ticket, tenant, margin_bp, customer_price_in, customer_price_out, reserved_minor, "
            "prompt_tokens_max, payer FROM tickets WHERE state = 'issued' ORDER BY issued_ms")
        return [OpenTicket(row[0], Ticket.from_envelope(row[1]), row[1], Terms(row[2], row[3], row[4], row[5], row[6], row[7], Payer(row[8])))
                for row in rows]


def metered_of_row(outcome: str, frames, text_bytes, accepted_ms, first_token_ms, ended_ms) -> Metered:
    return Metered(State(outcome), frames or 0, text_bytes or 0, accepted_ms, first_token_ms, ended_ms or 0)
