"""Double-entry books in the gateway database. Each settled request is one atomic posting of two legs:

    tenant:<name>  →  provider:<peer id>   payout (tokens billed × the ticket's prices)
    tenant:<name>  →  platform:fees        fee    (charge − payout: the margin)

or, for a ticket the gateway lost before settling it live (GATEWAY_LOST), one leg platform:fees → provider:<peer id>;
for a run the platform pays (a spot-check re-run, a probe) one leg named after the payer ("spot_check", "probe"),
platform:fees → provider:<peer id>. Customers a provider caught cheating served since its last clean check are
credited with legs "correction:spot-check-payout" (provider → tenant) and "correction:spot-check-fee" (platform →
tenant), the payout and fee of each request reversed. Every leg is computed by gateway/books/settlement.py
(``settle``, ``credit``, ``correction``); this module only stores and reads them. Legs are keyed by (request_id,
leg): posting a request twice is impossible (the database refuses the second), and each leg names the ticket it
settles. Corrections are new legs of kind
"correction", never edits. Balances are derived from the legs: ``account_balances`` is a running sum that a trigger
keeps in the same transaction as every posting (so admission reads a tenant's spend in O(1) however long its
history); ``tests/test_settlement.py`` checks it against the legs."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from typing import Sequence

from llorch.gateway.books.settlement import (CREDIT_LEG_PREFIX, PLATFORM_ACCOUNT, Credit, Leg, PostedLeg, Settlement,
                                             correction, credit, provider_account, tenant_account)
from llorch.ledger.objects import Ticket
from llorch.ledger.signing import peer_id_of
from llorch.ledger.sqlite import Database

SCHEMA = """
CREATE TABLE IF NOT EXISTS postings (
    id          INTEGER PRIMARY KEY,
    request_id  TEXT NOT NULL,
    leg         TEXT NOT NULL,            -- payout | fee | correction
    debit       TEXT NOT NULL,
    credit      TEXT NOT NULL,
    amount      INTEGER NOT NULL CHECK (amount >= 0),
    currency    TEXT NOT NULL,
    period      TEXT NOT NULL,            -- YYYY-MM (UTC) of the settlement, on the gateway's clock
    tenant      TEXT NOT NULL,
    provider_id TEXT NOT NULL,
    model_id    TEXT NOT NULL,
    tokens_in   INTEGER NOT NULL,
    tokens_out  INTEGER NOT NULL,
    margin_bp   INTEGER NOT NULL,
    posted_ms   INTEGER NOT NULL,
    ticket_sha256 BLOB,                   -- the ticket this leg settles (NULL for corrections and older legs)
    UNIQUE (request_id, leg)
);
CREATE INDEX IF NOT EXISTS postings_debit ON postings (debit, period);
CREATE INDEX IF NOT EXISTS postings_credit ON postings (credit, period);
CREATE INDEX IF NOT EXISTS postings_posted ON postings (posted_ms);     -- the dashboards' per-day figures
CREATE TABLE IF NOT EXISTS account_balances (
    account     TEXT PRIMARY KEY,
    debits      INTEGER NOT NULL DEFAULT 0,
    credits     INTEGER NOT NULL DEFAULT 0
);
CREATE TRIGGER IF NOT EXISTS postings_balance AFTER INSERT ON postings BEGIN
    INSERT INTO account_balances (account, debits) VALUES (NEW.debit, NEW.amount)
        ON CONFLICT (account) DO UPDATE SET debits = debits + excluded.debits;
    INSERT INTO account_balances (account, credits) VALUES (NEW.credit, NEW.amount)
        ON CONFLICT (account) DO UPDATE SET credits = credits + excluded.credits;
END;
CREATE TRIGGER IF NOT EXISTS postings_no_update BEFORE UPDATE ON postings
    BEGIN SELECT RAISE(ABORT, 'postings are never edited: post a correction'); END;
CREATE TRIGGER IF NOT EXISTS postings_no_delete BEFORE DELETE ON postings
    BEGIN SELECT RAISE(ABORT, 'postings are never deleted: post a correction'); END;
"""


class BooksError(Exception):
    """A posting that the books refuse (unknown request, wrong accounts, non-positive amount)."""


def period_of(ms: int) -> str:
    import time
    return time.strftime("%Y-%m", time.gmtime(ms // 1000))


@dataclass(frozen=True)
class Line:
    group: tuple
    requests: int
    tokens_in: int
    tokens_out: int
    amount: int


class Books:
    def __init__(self, database: Database) -> None:
        self._database = database

    @property
    def database(self) -> Database:
        return self._database

    @staticmethod
    def leg_statements(request_id: str, ticket_sha256: bytes | None, legs: Sequence[Leg], currency: str,
                       period: str, tenant: str, provider_id: str, model_id: str, tokens: tuple[int, int],
                       margin_bp: int, now_ms: int) -> list:
        """Store ``legs`` (computed by gateway/books/settlement.py: the books compute no money) of one request, to
        run in the caller's transaction. A leg already stored (same request, same name) is refused by the database
        and aborts the transaction, unless it is a credit (``CREDIT_LEG_PREFIX``), which is idempotent."""
        if not legs:
            return []
        credits = all(leg.name.startswith(CREDIT_LEG_PREFIX) for leg in legs)
        return [(
            "INSERT INTO postings (request_id, leg, debit, credit, amount, currency, period, tenant, provider_id, "
            "model_id, tokens_in, tokens_out, margin_bp, posted_ms, ticket_sha256) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)" + (" ON CONFLICT DO NOTHING" if credits else ""),
            [(request_id, leg.name, leg.debit, leg.credit, leg.amount, currency, period, tenant, provider_id,
              model_id, *tokens, margin_bp, now_ms, ticket_sha256) for leg in legs])]

    @staticmethod
    def settlement_statements(tenant: str, ticket: Ticket, ticket_sha256: bytes, settlement: Settlement,
                              now_ms: int) -> list:
        """The legs of one settled ticket (to run in the caller's transaction); none when nothing is billed."""
        return Books.leg_statements(ticket.request_id, ticket_sha256, settlement.legs, ticket.currency,
                                    period_of(now_ms), tenant, peer_id_of(ticket.provider_key), ticket.model_id,
                                    (settlement.tokens_in, settlement.tokens_out), settlement.margin_bp, now_ms)

    async def posted_legs(self, request_id: str) -> list[PostedLeg]:
        rows = await self._database.fetchall(
            "SELECT request_id, leg, debit, credit, amount FROM postings WHERE request_id = ? ORDER BY id",
            (request_id,))
        return [PostedLeg(*row) for row in rows]

    async def post_correction(self, request_id: str, debit: str, credit: str, amount: int, now_ms: int) -> str:
        """A correction of a posted request: a new leg (never an edit), e.g. a refund provider → tenant."""
        rows = await self._database.fetchall(
            "SELECT currency, period, tenant, provider_id, model_id, margin_bp FROM postings "
            "WHERE request_id = ? AND leg = 'payout'", (request_id,))
        if not rows:
            raise BooksError(f"request {request_id} was never posted")
        try:
            leg = correction(request_id, await self.posted_legs(request_id), debit, credit, amount)
        except ValueError as exc:
            raise BooksError(str(exc)) from None
        currency, period, tenant, provider, model, margin = rows[0]
        await self._database.transaction(self.leg_statements(request_id, None, [leg], currency, period, tenant,
                                                             provider, model, (0, 0), margin, now_ms))
        return leg.name

    async def credits_since(self, provider_id: str, served_after_ms: int) -> list[tuple[Credit, tuple]]:
        """The credits owed to the customers of ``provider_id`` for its requests posted after ``served_after_ms``
        (each computed by settlement.credit from the request's legs), with what their legs are stored beside."""
        rows = await self._database.fetchall(
            "SELECT p.request_id, p.leg, p.debit, p.credit, p.amount, p.currency, p.tenant, p.model_id, p.margin_bp "
            "FROM postings p WHERE p.request_id IN (SELECT request_id FROM postings WHERE provider_id = ? "
            "AND posted_ms > ? AND leg = 'payout' AND debit LIKE 'tenant:%') ORDER BY p.request_id, p.id",
            (provider_id, served_after_ms))
        by_request: dict[str, list[tuple]] = {}
        for row in rows:
            by_request.setdefault(row[0], []).append(row)
        owed = []
        for request_id, legs in by_request.items():
            credited = credit(request_id, [PostedLeg(*row[:5]) for row in legs])
            if credited is not None:
                currency, tenant, model_id, margin_bp = legs[0][5:9]
                owed.append((credited, (currency, tenant, provider_id, model_id, margin_bp)))
        return owed

    @staticmethod
    def credit_statements(owed: Sequence[tuple[Credit, tuple]], now_ms: int) -> list:
        """The legs of ``owed`` credits (``credits_since``), to run in the caller's transaction; idempotent."""
        statements: list = []
        for credited, (currency, tenant, provider_id, model_id, margin_bp) in owed:
            statements += Books.leg_statements(credited.request_id, None, credited.legs, currency, period_of(now_ms),
                                               tenant, provider_id, model_id, (0, 0), margin_bp, now_ms)
        return statements

    async def balance(self, account: str) -> int:
        """Credits minus debits of an account (a tenant's balance is negative: what it owes)."""
        row = await self._database.peek("SELECT credits - debits FROM account_balances WHERE account = ?", (account,))
        return 0 if row is None else row[0]

    async def lines(self, where: str, params: tuple, group_by: tuple[str, ...]) -> list[Line]:
        columns = ", ".join(group_by)
        rows = await self._database.fetchall(
            f"SELECT {columns}, COUNT(DISTINCT request_id), "
            f"SUM(CASE WHEN leg = 'payout' THEN tokens_in ELSE 0 END), "
            f"SUM(CASE WHEN leg = 'payout' THEN tokens_out ELSE 0 END), SUM(amount) "
            f"FROM postings WHERE {where} GROUP BY {columns} ORDER BY {columns}", params)
        return [Line(tuple(row[:len(group_by)]), *row[len(group_by):]) for row in rows]

    async def statement(self, kind: str, subject: str | None, period: str) -> dict:
        """Invoice lines and totals: kind "tenant" (what it owes, by model and provider), "provider" (payouts, by
        model), or "platform" (fees, by tenant)."""
        header: tuple[str, ...]
        if kind == "tenant":
            lines = await self.lines("debit = ? AND period = ?", (tenant_account(subject or ""), period),
                                     ("currency", "model_id", "provider_id"))
            header = ("currency", "model", "provider")
        elif kind == "provider":
            lines = await self.lines("credit = ? AND period = ?", (provider_account(subject or ""), period),
                                     ("currency", "model_id"))
            header = ("currency", "model")
        else:
            lines = await self.lines("credit = ? AND period = ?", (PLATFORM_ACCOUNT, period),
                                     ("currency", "tenant"))
            header = ("currency", "tenant")
        account = {"tenant": tenant_account(subject or ""), "provider": provider_account(subject or ""),
                   "platform": PLATFORM_ACCOUNT}[kind]
        # Corrections that move money the other way (refunds to a tenant, clawbacks from a provider or the platform)
        reverse_side = "credit" if kind == "tenant" else "debit"
        corrections = await self._database.fetchall(
            f"SELECT request_id, leg, currency, amount FROM postings WHERE {reverse_side} = ? AND period = ? "
            f"ORDER BY request_id, leg", (account, period))
        totals: dict[str, int] = {}
        for line in lines:
            totals[line.group[0]] = totals.get(line.group[0], 0) + line.amount
        for _, _, currency, amount in corrections:
            totals[currency] = totals.get(currency, 0) - amount
        return {"kind": kind, "subject": subject, "period": period,
                "lines": [{**dict(zip(header, line.group)), "requests": line.requests, "tokens_in": line.tokens_in,
                           "tokens_out": line.tokens_out, "amount_minor": line.amount} for line in lines],
                "corrections": [{"request_id": r, "leg": leg, "currency": c, "amount_minor": -a}
                                for r, leg, c, a in corrections],
                "totals_minor": totals}

    async def tenant_spent(self, tenant: str) -> int:
        return -await self.balance(tenant_account(tenant))

    async def posted(self, request_id: str) -> list[tuple]:
        return await self._database.fetchall(
            "SELECT leg, debit, credit, amount, tokens_in, tokens_out FROM postings WHERE request_id = ? ORDER BY leg",
            (request_id,))


def statement_csv(statement: dict) -> str:
    out = io.StringIO()
    lines = statement["lines"]
    fields = list(lines[0]) if lines else ["currency", "requests", "tokens_in", "tokens_out", "amount_minor"]
    writer = csv.DictWriter(out, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(lines)
    for currency, total in sorted(statement["totals_minor"].items()):
        writer.writerow({fields[0]: f"TOTAL {currency}", "amount_minor": total})
    return out.getvalue()
