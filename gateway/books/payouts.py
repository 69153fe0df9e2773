"""Payout runs: from the books, what each provider is owed at a month's end, one signed statement per provider, and
the postings that move what is paid out of the provider's balance, recorded in one transaction (docs/billing.md,
"Payouts").

A run covers the postings up to a cut-off (``through_id``: the highest posting id inside the month, and on PostgreSQL
at least ``SETTLED_S`` old), and for each provider states the legs since its previous statement (``through_id`` of its last
item): the earnings credited to ``provider:<id>`` (one line per receipt, at its ledger index), and the spot-check
corrections debited from it. The balance brought forward is every earlier stated leg plus every payout and return;
what is paid is decided by gateway/books/settlement.py (``payable``: whole cents, at least the minimum, only to a
provider with a payout account); the rest is carried. Running the same month again states only what arrived since,
so nothing is paid twice. A provider whose newly stated receipts are not all witnessed yet (their ledger index under
the checkpoint the statement names) waits for a later run, paid nothing and stated nothing.

The run row, its items with their signed statements, the rail's files and the payout legs are written in one
transaction: a run happened whole or not at all. The files are kept in the database too, so a run killed before its
files reached the output directory is completed by writing them from there (``run_files``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Mapping, Sequence

from llorch.gateway.books.postings import Books, period_of
from llorch.gateway.books.settlement import (PAYOUT_LEG, PAYOUT_RETURNED_LEG, payable, payout_leg,
                                             payout_returned_leg, provider_account)
from llorch.ledger.objects import VERSION
from llorch.ledger.payout import PayoutStatement, month_bounds_ms
from llorch.ledger.signing import SigningKey, public_key_of_peer_id
from llorch.ledger.sqlite import Database, IntegrityError

SETTLED_S = {"sqlite": 0, "postgresql": 60}    # on PostgreSQL, replicas' transactions may commit out of id order:
#                                                  postings younger than this are left to the next run
CURRENCY = "EUR"          # the one currency the first rail pays; legs in others wait for a rail that pays them

SCHEMA = """
CREATE TABLE IF NOT EXISTS payout_runs (
    run_id      TEXT PRIMARY KEY,             -- YYYY-MM-N: the month, then the run's number in it
    month       TEXT NOT NULL,
    created_ms  INTEGER NOT NULL,
    through_id  INTEGER NOT NULL,             -- the highest posting id the run covers
    min_minor   INTEGER NOT NULL,
    rail        TEXT NOT NULL,
    total_minor INTEGER NOT NULL,             -- what the run pays, = its payout legs = its file's control sum
    state       TEXT NOT NULL,                -- sent | paid
    paid_ms     INTEGER
);
CREATE TABLE IF NOT EXISTS payout_items (
    run_id      TEXT NOT NULL,
    provider_id TEXT NOT NULL,
    amount      INTEGER NOT NULL,             -- paid in this run (0: stated, carried over)
    carried     INTEGER NOT NULL,
    account     TEXT NOT NULL,                -- masked; the full IBAN is only in the run's file
    state       TEXT NOT NULL,                -- stated (nothing paid) | sent | paid | failed
    through_id  INTEGER NOT NULL,
    statement   BLOB NOT NULL,                -- the signed payout statement
    PRIMARY KEY (run_id, provider_id)
);
CREATE INDEX IF NOT EXISTS payout_items_provider ON payout_items (provider_id, through_id);
CREATE TABLE IF NOT EXISTS payout_files (
    run_id      TEXT NOT NULL,
    name        TEXT NOT NULL,
    content     BLOB NOT NULL,
    PRIMARY KEY (run_id, name)
);
CREATE INDEX IF NOT EXISTS postings_credit_id ON postings (credit, id);
CREATE INDEX IF NOT EXISTS postings_debit_id ON postings (debit, id);
"""


class PayoutError(Exception):
    """A payout command that cannot be done (an unknown run, a month not begun, a state that does not allow it)."""


@dataclass(frozen=True)
class Account:
    """A provider's payout account as its newest registration signed it (gateway/market/providers.py)."""

    holder: str
    iban: str
    bic: str | None
    masked: str


@dataclass
class Item:
    """One provider's part of a run. Only the signed statement's bytes are kept (a run over a thousand providers
    holds a thousand of them until it is recorded); ``statement`` reads them back."""

    provider_id: str
    envelope: bytes
    receipts: int
    amount: int
    carried: int
    account: Account | None

    @property
    def statement(self) -> PayoutStatement:
        return PayoutStatement.from_envelope(self.envelope)


@dataclass
class Plan:
    run_id: str
    month: str
    created_ms: int
    through_id: int
    min_minor: int
    items: list[Item] = field(default_factory=list)
    waiting: dict[str, str] = field(default_factory=dict)     # provider → why it is not in this run

    @property
    def total(self) -> int:
        return sum(item.amount for item in self.items)

    @property
    def paying(self) -> list[Item]:
        return [item for item in self.items if item.amount > 0]


async def plan_run(database: Database, key: SigningKey, month: str, min_minor: int, accounts: Mapping[str, Account],
                   ticket_keys: Sequence[bytes], now_ms: int, settled_s: int | None = None) -> Plan:
    """What a run of ``month`` would pay, with each provider's signed statement; writes nothing. ``settled_s``: how
    old a posting must be to be covered (default ``SETTLED_S`` of the database's engine)."""
    start, end = month_bounds_ms(month)
    if now_ms < start:
        raise PayoutError(f"{month} has not begun")
    settled = SETTLED_S.get(database.engine.name, 60) if settled_s is None else settled_s
    cutoff = min(now_ms - settled * 1000, end - 1)
    row = await database.fetchone("SELECT COALESCE(MAX(id), 0) FROM postings WHERE posted_ms <= ?", (cutoff,))
    assert row is not None
    through = row[0]
    runs = await database.fetchone("SELECT COUNT(*) FROM payout_runs WHERE month = ?", (month,))
    assert runs is not None
    plan = Plan(f"{month}-{runs[0] + 1}", month, now_ms, through, min_minor)
    providers = [account.removeprefix("provider:") for account, in await database.fetchall(
        "SELECT account FROM account_balances WHERE account LIKE 'provider:%' ORDER BY account")]
    for provider_id in providers:
        item = await _item(database, key, plan, provider_id, accounts.get(provider_id), ticket_keys)
        if isinstance(item, str):
            plan.waiting[provider_id] = item
        elif item is not None:
            plan.items.append(item)
    return plan


async def _item(database: Database, key: SigningKey, plan: Plan, provider_id: str, account: Account | None,
                ticket_keys: Sequence[bytes]) -> Item | str | None:
    """One provider's statement in ``plan``; a reason it must wait; or None when there is nothing to state."""
    name = provider_account(provider_id)
    row = await database.fetchone("SELECT COALESCE(MAX(through_id), 0) FROM payout_items WHERE provider_id = ?",
                                  (provider_id,))
    assert row is not None
    since = row[0]
    if since >= plan.through_id:
        return None
    provider_key = public_key_of_peer_id(provider_id)
    earned = await database.fetchall(
        "SELECT p.request_id, SUM(p.amount), MIN(e.idx) FROM postings p LEFT JOIN provider_entries e "
        "ON e.provider_key = ? AND e.request_id = p.request_id WHERE p.credit = ? AND p.id > ? AND p.id <= ? "
        "AND p.currency = ? AND p.leg <> ? GROUP BY p.request_id", (provider_key, name, since, plan.through_id,
                                                                    CURRENCY, PAYOUT_RETURNED_LEG))
    corrected = await database.fetchall(
        "SELECT request_id, SUM(amount) FROM postings WHERE debit = ? AND id > ? AND id <= ? AND currency = ? "
        "AND leg <> ? GROUP BY request_id ORDER BY request_id", (name, since, plan.through_id, CURRENCY, PAYOUT_LEG))
    witnessed = await database.fetchone("SELECT size, root FROM witnessed WHERE provider_key = ?", (provider_key,))
    size, root = (witnessed[0], bytes(witnessed[1])) if witnessed else (0, b"")
    unwitnessed = [request_id for request_id, _, index in earned if index is None or index >= size]
    if unwitnessed:
        return (f"{len(unwitnessed)} receipt(s) credited since its last statement are not witnessed yet (e.g. "
                f"{unwitnessed[0]}): it is stated and paid in a later run, once the witness has them")
    brought = await _signed_sum(database, name, "(leg IN (?, ?) OR id <= ?)", (PAYOUT_LEG, PAYOUT_RETURNED_LEG, since))
    lines = sorted([index, request_id, amount] for request_id, amount, index in earned)
    gained = sum(line[2] for line in lines) - sum(amount for _, amount in corrected)
    amount = payable(brought + gained, plan.min_minor, account is not None)
    if not lines and not corrected and not amount:         # nothing new to state, nothing to pay
        return None
    totals = {"brought_forward": brought, "earned": sum(line[2] for line in lines),
              "corrected": sum(amount for _, amount in corrected), "paid": amount,
              "carried_forward": brought + gained - amount}
    statement = PayoutStatement(
        v=VERSION, gateway_key=key.public_key, provider_key=provider_key, run_id=plan.run_id, month=plan.month,
        currency=CURRENCY, issued_ms=plan.created_ms, ticket_keys=sorted(set(ticket_keys) | {key.public_key}),
        checkpoint_size=size, checkpoint_root=root or bytes(32), lines=lines,
        corrections=[[request_id, amount] for request_id, amount in corrected], totals=totals,
        account=account.masked if account and amount else None)
    return Item(provider_id, statement.seal(key), len(lines), amount, totals["carried_forward"], account)


async def _signed_sum(database: Database, account: str, where: str, params: tuple) -> int:
    """Credits minus debits of ``account`` over the legs ``where`` selects (in EUR)."""
    row = await database.fetchone(
        f"SELECT COALESCE(SUM(CASE WHEN credit = ? THEN amount ELSE -amount END), 0) FROM postings "
        f"WHERE (credit = ? OR debit = ?) AND currency = ? AND {where}", (account, account, account, CURRENCY,
                                                                          *params))
    assert row is not None
    return int(row[0])


async def record_run(database: Database, plan: Plan, rail: str, files: Mapping[str, bytes]) -> None:
    """Write the run whole: its row, items, files and payout legs, in one transaction. A run of the same number
    recorded meanwhile (another operator, another replica) makes this one fail with nothing written."""
    statements: list = [
        ("INSERT INTO payout_runs (run_id, month, created_ms, through_id, min_minor, rail, total_minor, state) "
         "VALUES (?, ?, ?, ?, ?, ?, ?, 'sent')",
         [(plan.run_id, plan.month, plan.created_ms, plan.through_id, plan.min_minor, rail, plan.total)]),
        ("INSERT INTO payout_items (run_id, provider_id, amount, carried, account, state, through_id, statement) "
         "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
         [(plan.run_id, item.provider_id, item.amount, item.carried, item.account.masked if item.account else "",
           "sent" if item.amount else "stated", plan.through_id, item.envelope) for item in plan.items]),
        ("INSERT INTO payout_files (run_id, name, content) VALUES (?, ?, ?)",
         [(plan.run_id, name, content) for name, content in sorted(files.items())]),
    ]
    for item in plan.paying:
        statements += Books.leg_statements(_posting_id(plan.run_id, item.provider_id), None,
                                           [payout_leg(item.provider_id, item.amount)], CURRENCY,
                                           period_of(plan.created_ms), "", item.provider_id, "", (0, 0), 0,
                                           plan.created_ms)
    try:
        await database.transaction(statements)
    except IntegrityError:
        raise PayoutError(f"run {plan.run_id} was recorded meanwhile (another run of {plan.month} at the same "
                          f"time?): nothing of this one was written; run it again") from None


def _posting_id(run_id: str, provider_id: str) -> str:
    return f"payout:{run_id}:{provider_id}"


async def runs(database: Database) -> list[dict]:
    rows = await database.fetchall(
        "SELECT r.run_id, r.month, r.created_ms, r.total_minor, r.state, r.paid_ms, r.rail, COUNT(i.provider_id), "
        "SUM(CASE WHEN i.amount > 0 THEN 1 ELSE 0 END), SUM(CASE WHEN i.state = 'failed' THEN i.amount ELSE 0 END) "
        "FROM payout_runs r LEFT JOIN payout_items i ON i.run_id = r.run_id GROUP BY r.run_id, r.month, "
        "r.created_ms, r.total_minor, r.state, r.paid_ms, r.rail ORDER BY r.created_ms, r.run_id")
    return [{"run_id": r[0], "month": r[1], "created_ms": r[2], "total_minor": r[3], "state": r[4], "paid_ms": r[5],
             "rail": r[6], "statements": r[7], "paid_providers": r[8] or 0, "failed_minor": r[9] or 0}
            for r in rows]


async def run_items(database: Database, run_id: str) -> list[dict]:
    await _require_run(database, run_id)
    rows = await database.fetchall(
        "SELECT provider_id, amount, carried, account, state FROM payout_items WHERE run_id = ? ORDER BY provider_id",
        (run_id,))
    return [{"provider_id": r[0], "amount_minor": r[1], "carried_minor": r[2], "account": r[3], "state": r[4]}
            for r in rows]


async def run_files(database: Database, run_id: str) -> dict[str, bytes]:
    """The rail's files and every statement of a run, by file name, as the run wrote them."""
    await _require_run(database, run_id)
    files = {name: bytes(content) for name, content in await database.fetchall(
        "SELECT name, content FROM payout_files WHERE run_id = ?", (run_id,))}
    for provider_id, envelope in await database.fetchall(
            "SELECT provider_id, statement FROM payout_items WHERE run_id = ?", (run_id,)):
        files[f"statements/{provider_id}.statement"] = bytes(envelope)
    files["run.json"] = json.dumps({"run": (await _require_run(database, run_id)),
                                    "items": await run_items(database, run_id)}, indent=2,
                                   ensure_ascii=False).encode()
    return files


async def provider_statements(database: Database, provider_id: str) -> list[dict]:
    """A provider's statements, newest first, with their state (for its dashboard and the listing answer)."""
    rows = await database.fetchall(
        "SELECT i.run_id, r.month, r.created_ms, i.amount, i.carried, i.state FROM payout_items i JOIN payout_runs r "
        "ON r.run_id = i.run_id WHERE i.provider_id = ? ORDER BY r.created_ms DESC, i.run_id DESC", (provider_id,))
    return [{"run_id": r[0], "month": r[1], "created_ms": r[2], "amount_minor": r[3], "carried_minor": r[4],
             "state": r[5]} for r in rows]


async def mark_paid(database: Database, run_id: str, now_ms: int) -> dict:
    """The bank confirmed the run: every item sent becomes paid."""
    run = await _require_run(database, run_id)
    if run["state"] == "paid":
        raise PayoutError(f"run {run_id} is marked paid already")
    await database.transaction([
        ("UPDATE payout_runs SET state = 'paid', paid_ms = ? WHERE run_id = ?", [(now_ms, run_id)]),
        ("UPDATE payout_items SET state = 'paid' WHERE run_id = ? AND state = 'sent'", [(run_id,)])])
    return await _require_run(database, run_id)


async def mark_failed(database: Database, run_id: str, provider_id: str, now_ms: int) -> dict:
    """The bank returned one transfer: the item fails and its amount goes back to the provider's balance (a
    returned-payout leg), so the next run pays it again."""
    await _require_run(database, run_id)
    row = await database.fetchone("SELECT amount, state FROM payout_items WHERE run_id = ? AND provider_id = ?",
                                  (run_id, provider_id))
    if row is None:
        raise PayoutError(f"run {run_id} has no statement for {provider_id}")
    amount, state = row
    if state not in ("sent", "paid"):
        raise PayoutError(f"the payout of run {run_id} to {provider_id} is {state}: nothing to return")
    statements = [("UPDATE payout_items SET state = 'failed' WHERE run_id = ? AND provider_id = ?",
                   [(run_id, provider_id)])]
    statements += Books.leg_statements(_posting_id(run_id, provider_id), None,
                                       [payout_returned_leg(provider_id, amount)], CURRENCY, period_of(now_ms), "",
                                       provider_id, "", (0, 0), 0, now_ms)
    await database.transaction(statements)
    return {"run_id": run_id, "provider_id": provider_id, "returned_minor": amount, "state": "failed"}


async def _require_run(database: Database, run_id: str) -> dict:
    row = await database.fetchone(
        "SELECT run_id, month, created_ms, through_id, min_minor, rail, total_minor, state, paid_ms FROM payout_runs "
        "WHERE run_id = ?", (run_id,))
    if row is None:
        raise PayoutError(f"there is no payout run {run_id} (`llorch billing payouts list` shows them)")
    return dict(zip(("run_id", "month", "created_ms", "through_id", "min_minor", "rail", "total_minor", "state",
                     "paid_ms"), row))



STATEMENTS_SHOWN = 12           # a provider's newest statements in its listing answer (a year of monthly runs)


def next_run_ms(payout_day: int, now_ms: int) -> int:
    """00:00 UTC of the next ``payout_day`` of a month after ``now_ms``: when the operator's next run is due."""
    import calendar
    import time
    year, month, day = time.gmtime(now_ms // 1000)[:3]
    if day >= payout_day:
        year, month = (year + 1, 1) if month == 12 else (year, month + 1)
    return calendar.timegm((year, month, payout_day, 0, 0, 0)) * 1000


async def provider_view(database: Database, provider_id: str, minimum: int, payout_day: int, account: str | None,
                        now_ms: int) -> dict:
    """What a provider is told about its payouts (the listing answer, its dashboard, `llorch node status`): its
    unpaid balance in the books now, the minimum a run pays, when the next run is due, the masked account, and its
    newest statements with their state."""
    balance = await Books(database).balance(provider_account(provider_id))
    statements = (await provider_statements(database, provider_id))[:STATEMENTS_SHOWN]
    return {"balance": balance, "minimum": minimum, "next_run_ms": next_run_ms(payout_day, now_ms),
            "account": account, "statements": [{"run_id": s["run_id"], "month": s["month"], "paid": s["amount_minor"],
                                                "carried": s["carried_minor"], "state": s["state"]}
                                               for s in statements]}
