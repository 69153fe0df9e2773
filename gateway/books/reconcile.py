"""Reconciliation: every ticket this gateway issued against the receipts in its providers' witnessed ledgers (entries
pulled over /llorch/ledger/1 and covered by a checkpoint the gateway cosigned), keyed by **ticket hash**: each
receipt names the ticket it answers, and a request that failed over has one ticket per provider tried.

Incremental: a cursor per provider marks the witnessed entries already examined, so a run reads only what the
witness added since the last one (plus the tickets still waiting for their receipt). Findings are kept in the
database; a second run with nothing new reports the same and changes nothing. Findings, each naming the request:

  receipt_without_ticket   a receipt naming this gateway for a ticket it never issued (every ticket is written
                           durably before it is sent, so this is a forgery or a foreign ticket)
  outside_ticket           the receipt is outside its ticket (provider, request, model, prices, max_tokens)
  mismatch                 the amount is not tokens × prices, or the ticket's settlement is not what ``settle``
                           gives for this receipt (the books disagree with the evidence)
  ticket_without_receipt   a ticket the provider accepted, with no receipt in its ledger as witnessed at least
                           ``grace`` after the ticket was issued
  unbilled                 a receipt for a ticket that was never settled (the gateway stopped between ticket and
                           settlement): ``--post`` settles it (GATEWAY_LOST: the platform pays the provider)
  unpaid                   (informational) a receipt that arrived after its ticket was settled without it: the
                           provider failed, timed out, or did not send it when the customer went away
"""

from __future__ import annotations

import calendar
from dataclasses import dataclass, field

from llorch.gateway.books.postings import period_of
from llorch.gateway.books.settlement import Metered, Payer, State, Terms, settle
from llorch.gateway.books.tickets import TicketBook, metered_of_row
from llorch.ledger.errors import LedgerError
from llorch.ledger.objects import Receipt, Ticket
from llorch.ledger.signing import peer_id_of, public_key_of_peer_id, sha256
from llorch.ledger.sqlite import Database

GRACE_MS = 120_000          # a witness round this long after a ticket must find its receipt
ERRORS = frozenset({"receipt_without_ticket", "outside_ticket", "mismatch", "ticket_without_receipt", "unbilled"})

SCHEMA = """
CREATE TABLE IF NOT EXISTS reconcile_cursor (
    provider_key BLOB PRIMARY KEY,
    next_idx     INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS reconcile_findings (
    kind         TEXT NOT NULL,
    request_id   TEXT NOT NULL,
    provider_id  TEXT NOT NULL,
    period       TEXT NOT NULL,
    detail       TEXT NOT NULL,
    found_ms     INTEGER NOT NULL,
    resolved_ms  INTEGER,
    PRIMARY KEY (kind, provider_id, request_id)
);
CREATE INDEX IF NOT EXISTS provider_entries_request ON provider_entries (provider_key, request_id);
CREATE INDEX IF NOT EXISTS tickets_waiting ON tickets (provider_key, issued_ms) WHERE receipt_seen = 0;
"""

TICKET_ROW = ("ticket, state, outcome, tenant, margin_bp, customer_price_in, customer_price_out, reserved_minor, "
              "prompt_tokens_max, frames, text_bytes, accepted_ms, first_token_ms, ended_ms, tokens_in, tokens_out, "
              "payout, charge, receipt_sha256, issued_ms, payer")


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
    posted: int = 0
    findings: list[Finding] = field(default_factory=list)

    def as_json(self) -> dict:
        return {"period": self.period, "tickets": self.tickets, "receipts": self.receipts, "matched": self.matched,
                "posted": self.posted, "ok": not [f for f in self.findings if f.kind in ERRORS],
                "findings": [f.__dict__ for f in self.findings]}


@dataclass(frozen=True)
class _TicketRow:
    ticket: Ticket
    ticket_bytes: bytes
    state: str
    outcome: str | None
    terms: Terms | None
    metered: Metered | None
    billed: tuple                     # (tokens_in, tokens_out, payout, charge) as settled
    receipt_sha256: bytes | None
    issued_ms: int

    @classmethod
    def parse(cls, row: tuple) -> "_TicketRow":
        ticket_bytes, state, outcome = row[0], row[1], row[2]
        terms = (Terms(row[3], row[4], row[5], row[6], row[7], row[8], Payer(row[20]))
                 if row[3] is not None else None)           # None: a ticket from before settlement
        metered = metered_of_row(outcome, *row[9:14]) if outcome else None
        return cls(Ticket.from_envelope(ticket_bytes), ticket_bytes, state, outcome, terms, metered,
                   tuple(row[14:18]), row[18], row[19])


async def reconcile(database: Database, gateway_key: bytes, period: str | None, now_ms: int,
                    grace_ms: int = GRACE_MS, post: bool = False) -> Report:
    """Examine what the witness added since the last run, settle lost tickets when ``post``, and report. Run from
    any replica's config, it reconciles the whole deployment: ``gateway_key`` and every replica's key that has
    shared this database (the books, the tickets and the cursors are the deployment's, not one replica's)."""
    cursors = dict(await database.fetchall("SELECT provider_key, next_idx FROM reconcile_cursor"))
    ours = {gateway_key} | await replica_keys(database)
    for provider_key, in await database.fetchall("SELECT provider_key FROM witnessed"):
        await _examine_new_entries(database, ours, provider_key, cursors.get(provider_key, 0), now_ms)
    report = Report(period)
    if post:
        report.posted = await _post_lost_tickets(database, now_ms, grace_ms)
    await _find_tickets_without_receipts(database, now_ms, grace_ms)
    return await _report(database, report, period)


async def replica_keys(database: Database) -> set[bytes]:
    """The public keys of every replica that has run on this database (gateway/market/shared.py heartbeats)."""
    keys = set()
    for peer_id, in await database.fetchall("SELECT peer_id FROM gateway_replicas"):
        try:
            keys.add(public_key_of_peer_id(peer_id))
        except (ValueError, LedgerError):
            continue
    return keys


async def _examine_new_entries(database: Database, ours: set[bytes], provider_key: bytes, start: int,
                               now_ms: int) -> None:
    rows = await database.fetchall("SELECT idx, entry FROM provider_entries WHERE provider_key = ? AND idx >= ? "
                                   "ORDER BY idx", (provider_key, start))
    if not rows:
        return
    provider_id = peer_id_of(provider_key)
    findings, seen = [], []
    for _, entry in rows:
        try:
            receipt = Receipt.from_envelope(entry)
        except LedgerError as exc:      # the witness verified every entry; a bad one here means a damaged database
            findings.append(Finding("mismatch", "?", provider_id, f"unreadable entry: {exc}"))
            continue
        row = await database.fetchone(f"SELECT {TICKET_ROW} FROM tickets WHERE ticket_sha256 = ?",
                                      (receipt.ticket_sha256,))
        if row is None:                  # a ticket in these books was signed by this deployment, whichever replica
            if receipt.gateway_key in ours:
                findings.append(Finding("receipt_without_ticket", receipt.request_id, provider_id,
                                        "this gateway never issued the ticket this receipt answers"))
            continue                     # another market's receipt in the same ledger: not ours to reconcile
        seen.append((receipt.ticket_sha256,))
        finding = check_entry(_TicketRow.parse(row), receipt, sha256(entry))
        if finding is not None:
            findings.append(Finding(finding[0], receipt.request_id, provider_id, finding[1]))
    periods = await _periods(database, findings, now_ms)
    await database.transaction([
        ("UPDATE tickets SET receipt_seen = 1 WHERE ticket_sha256 = ?", seen),
        ("UPDATE reconcile_findings SET resolved_ms = ? WHERE kind = 'ticket_without_receipt' AND resolved_ms IS "
         "NULL AND request_id IN (SELECT request_id FROM tickets WHERE ticket_sha256 = ?)",     # it came late
         [(now_ms, sha) for sha, in seen]),
        ("INSERT INTO reconcile_findings (kind, request_id, provider_id, period, detail, found_ms) "
         "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING", [(f.kind, f.request_id, f.provider_id, periods[f.request_id], f.detail, now_ms)
                                       for f in findings]),
        ("INSERT INTO reconcile_cursor (provider_key, next_idx) VALUES (?, ?) "
         "ON CONFLICT (provider_key) DO UPDATE SET next_idx = excluded.next_idx",
         [(provider_key, rows[-1][0] + 1)])])


def check_entry(row: _TicketRow, receipt: Receipt, entry_sha256: bytes) -> tuple[str, str] | None:
    """(kind, detail) of what is wrong with one witnessed receipt of one of our tickets, or None. Pure."""
    problem = _outside(receipt, row.ticket)
    if problem:
        return "outside_ticket", problem
    if receipt.amount != receipt.expected_amount():
        return "mismatch", f"amount {receipt.amount} is not tokens × prices"
    if row.state == "issued":
        return "unbilled", f"receipt ({receipt.finish_reason}) for a ticket that was never settled: " \
                           f"`llorch billing reconcile --post` settles it"
    if row.terms is None or row.metered is None:          # settled before settlement kept its meter: legacy check
        return None
    if row.receipt_sha256 != entry_sha256:
        return "unpaid", f"receipt ({receipt.finish_reason}) arrived after its ticket was settled " \
                         f"{row.outcome} without it; not paid"
    expected = settle(row.ticket, row.terms, receipt, row.metered)
    billed = (expected.tokens_in, expected.tokens_out, expected.payout, expected.charge)
    if billed != row.billed:
        return "mismatch", f"settled (tokens_in, tokens_out, payout, charge) {row.billed}, but this receipt " \
                           f"settles to {billed}"
    return None


async def _post_lost_tickets(database: Database, now_ms: int, grace_ms: int) -> int:
    """Settle tickets the gateway never settled live: with the witnessed receipt (GATEWAY_LOST), or with nothing
    once a witness round well after the ticket found no receipt. Each in its own transaction, exactly once."""
    book = TicketBook(database)
    witnessed = dict(await database.fetchall("SELECT provider_key, checked_ms FROM witnessed"))
    posted = 0
    for open_ticket in await book.open_tickets():
        ticket = open_ticket.ticket
        row = await database.fetchone("SELECT entry FROM provider_entries WHERE provider_key = ? AND request_id = ?",
                                      (ticket.provider_key, ticket.request_id))
        receipt = Receipt.from_envelope(row[0]) if row else None
        if receipt is not None and receipt.ticket_sha256 != open_ticket.ticket_sha256:
            receipt = None
        if receipt is None and witnessed.get(ticket.provider_key, 0) < ticket.issued_ms + grace_ms:
            continue                                    # its receipt may still come
        metered = Metered(State.GATEWAY_LOST, ended_ms=now_ms)
        settlement = settle(ticket, open_ticket.terms, receipt, metered)
        await database.transaction(book.settlement_statements(   # the settlement and its finding, together
            ticket, open_ticket.ticket_bytes, metered, settlement, receipt, row[0] if row else None,
            open_ticket.terms.tenant, now_ms) + [
            ("UPDATE reconcile_findings SET resolved_ms = ? WHERE kind = 'unbilled' AND request_id = ? AND "
             "resolved_ms IS NULL", [(now_ms, ticket.request_id)])])
        posted += 1
    return posted


async def _find_tickets_without_receipts(database: Database, now_ms: int, grace_ms: int) -> None:
    """Settled tickets the provider accepted (or tickets from before settlement, which were kept only once
    accepted) with no receipt witnessed ``grace_ms`` after them. Open tickets are --post's to settle."""
    rows = await database.fetchall(
        "SELECT t.request_id, t.provider_key, t.issued_ms FROM tickets t JOIN witnessed w "
        "ON w.provider_key = t.provider_key WHERE t.receipt_seen = 0 AND t.issued_ms + ? <= w.checked_ms "
        "AND t.state = 'settled' AND (t.tenant IS NULL OR t.accepted_ms IS NOT NULL)", (grace_ms,))
    await database.transaction([(
        "INSERT INTO reconcile_findings (kind, request_id, provider_id, period, detail, found_ms) "
        "VALUES ('ticket_without_receipt', ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
        [(request_id, peer_id_of(provider_key), period_of(issued_ms),
          "the provider accepted this ticket but its witnessed ledger has no receipt", now_ms)
         for request_id, provider_key, issued_ms in rows])])


async def _periods(database: Database, findings: list[Finding], now_ms: int) -> dict[str, str]:
    """The period of each finding: its ticket's (on the gateway's clock), else the month it was found."""
    periods = {}
    for finding in findings:
        row = await database.fetchone("SELECT MIN(issued_ms) FROM tickets WHERE request_id = ?",
                                      (finding.request_id,))
        periods[finding.request_id] = period_of(row[0] if row and row[0] else now_ms)
    return periods


async def _report(database: Database, report: Report, period: str | None) -> Report:
    where, params = ("WHERE period = ?", (period,)) if period else ("", ())
    report.findings = [Finding(*row) for row in await database.fetchall(
        f"SELECT kind, request_id, provider_id, detail FROM reconcile_findings {where} "
        f"{'AND' if where else 'WHERE'} resolved_ms IS NULL ORDER BY kind, request_id", params)]
    in_period = ("WHERE issued_ms >= ? AND issued_ms < ?", _period_bounds(period)) if period else ("", ())
    tickets = await database.fetchone(f"SELECT COUNT(*) FROM tickets {in_period[0]}", in_period[1])
    seen_where = f"{in_period[0]} {'AND' if in_period[0] else 'WHERE'} receipt_seen = 1"
    seen = await database.fetchone(f"SELECT COUNT(*) FROM tickets {seen_where}", in_period[1])
    assert tickets is not None and seen is not None              # an aggregate answers one row
    report.tickets = tickets[0]
    report.matched = seen[0] - \
        sum(1 for f in report.findings if f.kind in ERRORS - {"receipt_without_ticket", "ticket_without_receipt"})
    report.receipts = report.matched + sum(1 for f in report.findings if f.kind != "ticket_without_receipt")
    return report


def _period_bounds(period: str) -> tuple[int, int]:
    year, month = map(int, period.split("-"))
    start = calendar.timegm((year, month, 1, 0, 0, 0)) * 1000
    end = calendar.timegm((year + month // 12, month % 12 + 1, 1, 0, 0, 0)) * 1000
    return start, end


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


async def open_findings(database: Database, period: str | None = None) -> Report:
    """What the last `llorch billing reconcile` left open, without examining anything new (read-only: the
    operator console shows it)."""
    return await _report(database, Report(period), period)
