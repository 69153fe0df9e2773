"""Per-day figures and the latest billed requests, read from the same postings the statements sum
(gateway/books/postings.py): a day's amount is the change of the account's balance that day (legs out minus legs
in, corrections included), so the days of a month add up to the month's statement and the running balance.

Days are UTC, on the gateway's clock (``posted_ms``). Read-only; the dashboards call these."""

from __future__ import annotations

from dataclasses import dataclass

from llorch.gateway.books.postings import PLATFORM_ACCOUNT, tenant_account
from llorch.ledger.sqlite import Database

DAY_MS = 86_400_000


@dataclass(frozen=True)
class Day:
    requests: int
    tokens_in: int
    tokens_out: int
    amount_minor: int


@dataclass(frozen=True)
class Market:
    """One day of the whole market: what tenants were charged, what providers earned, and the platform's fees."""

    revenue_minor: int
    payouts_minor: int
    fees_minor: int


@dataclass(frozen=True)
class BilledRequest:
    request_id: str
    posted_ms: int
    model_id: str
    provider_id: str
    tokens_in: int
    tokens_out: int
    amount_minor: int                    # what the tenant was charged: payout + fee
    currency: str
    cancelled: bool                      # the customer hung up before the answer ended (the ticket's outcome)


# Parameters: DAY_MS, DAY_MS, the account three times, the first day (ms). Reads the debit and credit indexes.
TENANT_DAYS_SQL = (
    "SELECT (posted_ms / ?) * ?, COUNT(DISTINCT CASE WHEN leg = 'payout' THEN request_id END), "
    "SUM(CASE WHEN leg = 'payout' THEN tokens_in ELSE 0 END), "
    "SUM(CASE WHEN leg = 'payout' THEN tokens_out ELSE 0 END), "
    "SUM(CASE WHEN debit = ? THEN amount ELSE -amount END) "
    "FROM postings WHERE (debit = ? OR credit = ?) AND posted_ms >= ? GROUP BY 1")
# Parameters: DAY_MS, DAY_MS, the platform account twice, the first day (ms). Reads postings_posted: the last
# DASHBOARD_DAYS of postings, not all of them.
MARKET_DAYS_SQL = (
    "SELECT (posted_ms / ?) * ?, "
    "SUM(CASE WHEN debit LIKE 'tenant:%' THEN amount ELSE 0 END - CASE WHEN credit LIKE 'tenant:%' THEN amount "
    "ELSE 0 END), "
    "SUM(CASE WHEN credit LIKE 'provider:%' THEN amount ELSE 0 END - CASE WHEN debit LIKE 'provider:%' THEN amount "
    "ELSE 0 END), "
    "SUM(CASE WHEN credit = ? THEN amount ELSE 0 END - CASE WHEN debit = ? THEN amount ELSE 0 END) "
    "FROM postings WHERE posted_ms >= ? GROUP BY 1")


async def tenant_days(database: Database, tenant: str, since_ms: int) -> dict[int, Day]:
    """Day start (ms) → the tenant's requests, billed tokens and net spend that day (negative on a day of
    refunds)."""
    account = tenant_account(tenant)
    rows = await database.fetchall(TENANT_DAYS_SQL, (DAY_MS, DAY_MS, account, account, account, since_ms))
    return {day: Day(requests, tokens_in, tokens_out, amount) for day, requests, tokens_in, tokens_out, amount in rows}


async def market_days(database: Database, since_ms: int) -> dict[int, Market]:
    """Day start (ms) → revenue (net charged to tenants), payouts (net credited to providers) and fees (net
    credited to the platform); each negative on a day whose corrections refunded more than was charged."""
    rows = await database.fetchall(MARKET_DAYS_SQL, (DAY_MS, DAY_MS, PLATFORM_ACCOUNT, PLATFORM_ACCOUNT, since_ms))
    return {day: Market(revenue, payouts, fees) for day, revenue, payouts, fees in rows}


# Parameters: the tenant's account, the count. A request is cancelled when the ticket its legs settle ended with
# the customer gone (gateway/books/settlement.py CUSTOMER_GONE); legs from before tickets were named count as not.
LATEST_BILLED_SQL = (
    "SELECT p.request_id, MAX(p.posted_ms), MAX(p.model_id), MAX(p.provider_id), MAX(p.tokens_in), "
    "MAX(p.tokens_out), SUM(p.amount), MAX(p.currency), "
    "MAX(CASE WHEN t.outcome = 'customer_gone' THEN 1 ELSE 0 END) "
    "FROM postings p LEFT JOIN tickets t ON t.ticket_sha256 = p.ticket_sha256 "
    "WHERE p.debit = ? AND p.leg IN ('payout', 'fee') GROUP BY p.request_id "
    "ORDER BY MAX(p.posted_ms) DESC, p.request_id LIMIT ?")


async def latest_billed(database: Database, tenant: str, count_max: int) -> list[BilledRequest]:
    """The tenant's latest billed requests, newest first: only its own (the legs it was debited)."""
    rows = await database.fetchall(LATEST_BILLED_SQL, (tenant_account(tenant), count_max))
    return [BilledRequest(request_id, posted_ms, model_id, provider_id, tokens_in, tokens_out, amount, currency,
                          bool(cancelled))
            for request_id, posted_ms, model_id, provider_id, tokens_in, tokens_out, amount, currency, cancelled
            in rows]
