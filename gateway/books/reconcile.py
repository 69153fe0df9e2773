"""Reconciliation: every ticket a provider accepted must have exactly one verified receipt in that provider's
witnessed ledger (entries pulled over /llorch/ledger/1 and covered by a checkpoint the gateway cosigned), and every
receipt naming this gateway must answer one of its tickets, with tokens and amounts as billed.

Read-only: running it any number of times changes nothing. Findings, each naming the request_id:
  ticket_without_receipt   an accepted ticket with no receipt in the provider's ledger as witnessed at least
                           ``grace`` after the ticket was issued
  receipt_without_ticket   a receipt in a provider's ledger for a ticket this gateway never issued
  mismatch                 tokens or amount of the ledger's receipt differ from what was billed, or the amount
                           is not tokens × prices
  outside_ticket           the receipt is outside its ticket's limits (max_tokens, prices, model, provider)
  unbilled                 a receipt for one of our tickets that the books never posted (e.g. a stream whose
                           provider died; informational)
"""

from __future__ import annotations

from dataclasses import dataclass, field

from llorch.gateway.books.postings import period_of
from llorch.ledger.errors import LedgerError
from llorch.ledger.objects import Receipt, Ticket
from llorch.ledger.signing import peer_id_of, sha256
from llorch.ledger.sqlite import Database

GRACE_MS = 120_000          # a witness round this long after a ticket must find its receipt


@dataclass(frozen=True)
class Finding:
    kind: str
    request_id: str
    provider_id: str
    detail: str


@dataclass
class Report:
    period: str | None
    tickets: int = 0
    receipts: int = 0
    matched: int = 0
    findings: list[Finding] = field(default_factory=list)

    def as_json(self) -> dict:
        return {"period": self.period, "tickets": self.tickets, "receipts": self.receipts, "matched": self.matched,
                "ok": not [f for f in self.findings if f.kind != "unbilled"],
                "findings": [f.__dict__ for f in self.findings]}


async def reconcile(database: Database, gateway_key: bytes, period: str | None, grace_ms: int = GRACE_MS) -> Report:
    report = Report(period)
    tickets = {row[0]: Ticket.from_envelope(row[1]) for row in await database.fetchall(
        "SELECT ticket_sha256, ticket FROM tickets")}
    witnessed = {row[0]: row[1] for row in await database.fetchall(
        "SELECT provider_key, checked_ms FROM witnessed")}
    billed = {}
    for request_id, tokens_in, tokens_out, amount in await database.fetchall(
            "SELECT request_id, tokens_in, tokens_out, amount FROM postings WHERE leg = 'payout'"):
        billed[request_id] = (tokens_in, tokens_out, amount)
    seen_tickets = set()
    for provider_key, entry in await database.fetchall("SELECT provider_key, entry FROM provider_entries"):
        try:
            receipt = Receipt.from_envelope(entry)
        except LedgerError as exc:      # the witness verified every entry; a bad one here means a damaged database
            report.findings.append(Finding("mismatch", "?", peer_id_of(provider_key), f"unreadable entry: {exc}"))
            continue
        if receipt.gateway_key != gateway_key or (period and period_of(receipt.finished_ms) != period):
            continue
        report.receipts += 1
        provider_id = peer_id_of(provider_key)
        ticket = tickets.get(receipt.ticket_sha256)
        if ticket is None:
            report.findings.append(Finding("receipt_without_ticket", receipt.request_id, provider_id,
                                           "this gateway never issued the ticket this receipt answers"))
            continue
        seen_tickets.add(receipt.ticket_sha256)
        problem = _outside(receipt, ticket)
        if problem:
            report.findings.append(Finding("outside_ticket", receipt.request_id, provider_id, problem))
            continue
        if receipt.amount != receipt.expected_amount():
            report.findings.append(Finding("mismatch", receipt.request_id, provider_id,
                                           f"amount {receipt.amount} is not tokens × prices"))
            continue
        posted = billed.get(receipt.request_id)
        if posted is None:
            report.findings.append(Finding("unbilled", receipt.request_id, provider_id,
                                           f"receipt ({receipt.finish_reason}) was never billed"))
        elif posted != (receipt.tokens_in, receipt.tokens_out, receipt.amount):
            report.findings.append(Finding("mismatch", receipt.request_id, provider_id,
                                           f"billed tokens/amount {posted} but the ledger says "
                                           f"{(receipt.tokens_in, receipt.tokens_out, receipt.amount)}"))
        else:
            report.matched += 1
    for ticket_hash, ticket in tickets.items():
        if period and period_of(ticket.issued_ms) != period:
            continue
        report.tickets += 1
        if ticket_hash in seen_tickets or ticket.provider_key not in witnessed:
            continue
        if ticket.issued_ms + grace_ms <= witnessed[ticket.provider_key]:
            report.findings.append(Finding("ticket_without_receipt", ticket.request_id,
                                           peer_id_of(ticket.provider_key),
                                           "the provider accepted this ticket but its witnessed ledger has no receipt"))
    report.findings.sort(key=lambda f: (f.kind, f.request_id))
    return report


def _outside(receipt: Receipt, ticket: Ticket) -> str | None:
    if receipt.provider_key != ticket.provider_key:
        return "signed by another provider than the ticket's"
    if receipt.request_id != ticket.request_id or receipt.model_id != ticket.model_id \
            or receipt.model_sha256 != ticket.model_sha256:
        return "request or model differ from the ticket"
    if (receipt.price_in, receipt.price_out, receipt.currency) != (ticket.price_in, ticket.price_out, ticket.currency):
        return "prices differ from the ticket's"
    if receipt.tokens_out > ticket.sampling["max_tokens"]:
        return f"{receipt.tokens_out} output tokens, the ticket allowed {ticket.sampling['max_tokens']}"
    return None
