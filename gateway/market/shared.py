"""Admission across gateway replicas sharing one PostgreSQL database (docs/scaling.md).

A replica's own ``TenantQuota`` (gateway/market/quota.py) sees only its own requests; with several replicas a
tenant's concurrency limit and budget must hold over all of them. ``SharedReservations`` keeps each admitted
request's reservation in the database, written by a conditional insert under the tenant's row lock (PostgreSQL) or
the write lock (SQLite): admissions of one tenant take turns, and each sees every reservation committed before it.
A reservation counts while its replica is alive (``gateway_replicas``: each replica renews its heartbeat every
HEARTBEAT_S, for REPLICA_ALIVE_MS), so a replica killed mid-request holds its tenants' slots and budget for at most
that long. Released once the request is settled (its charge is in the books first: never counted as neither).

Rate limits stay per replica (a token bucket in memory): with N replicas behind a load balancer a tenant may get up
to N × its rate (the balancer spreads its requests, so close to 1 × in practice); concurrency and budget never
exceed their limits.
"""

from __future__ import annotations

import logging

import trio

from llorch.gateway.books.postings import tenant_account
from llorch.gateway.market.quota import QuotaExceeded
from llorch.ledger.errors import StoreError
from llorch.ledger.money import readable
from llorch.ledger.sqlite import Database, IntegrityError

log = logging.getLogger("llorch.gateway.replicas")

HEARTBEAT_S = 2.0
REPLICA_ALIVE_MS = 10_000                # a replica silent this long no longer holds its reservations
RESERVATION_AGE_MAX_MS = 3_600_000       # nor one older than this (longer than any request lasts): a release lost
                                         # to a database outage cannot hold a tenant's slot for ever
UNLIMITED = 2 ** 62

SCHEMA = """
CREATE TABLE IF NOT EXISTS reservations (
    request_id  TEXT PRIMARY KEY,
    tenant      TEXT NOT NULL,
    amount      INTEGER NOT NULL,         -- the worst case, minor units
    holder      TEXT NOT NULL,            -- the replica (peer id) serving the request
    reserved_ms INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS reservations_tenant ON reservations (tenant);
CREATE TABLE IF NOT EXISTS gateway_replicas (
    peer_id        TEXT PRIMARY KEY,
    alive_until_ms INTEGER NOT NULL
);
"""

# Live reservations of one tenant: held by a replica whose heartbeat has not lapsed, and not older than the longest
# request. Parameters: the tenant, now, the oldest reservation that counts (ms).
_LIVE = ("FROM reservations r JOIN gateway_replicas g ON g.peer_id = r.holder "
         "WHERE r.tenant = ? AND g.alive_until_ms > ? AND r.reserved_ms > ?")


class SharedReservations:
    def __init__(self, database: Database, holder: str) -> None:
        self.database = database
        self.holder = holder

    async def admit(self, tenant: str, max_concurrent: int | None, budget_minor: int | None, request_id: str,
                    amount: int, now_ms: int) -> None:
        """Reserve ``amount`` for ``request_id`` if the tenant's live reservations over every replica leave room
        under ``max_concurrent`` and its spend plus reservations stay within ``budget_minor``; QuotaExceeded
        ("concurrency" or "budget") otherwise."""
        limit = UNLIMITED if max_concurrent is None else max_concurrent
        budget = UNLIMITED if budget_minor is None else budget_minor
        account = tenant_account(tenant)
        live = (tenant, now_ms, now_ms - RESERVATION_AGE_MAX_MS)
        try:
            if await self._reserve(live, limit, budget, account, request_id, amount, now_ms):
                return
        except BaseException:          # cancelled (the customer left) or failed after the insert: take it back
            with trio.CancelScope(shield=True):
                await self.release(request_id)
            raise
        row = await self.database.fetchone(
            f"SELECT (SELECT COUNT(*) {_LIVE}), "
            "COALESCE((SELECT debits - credits FROM account_balances WHERE account = ?), 0), "
            f"COALESCE((SELECT SUM(r.amount) {_LIVE}), 0)", (*live, account, *live))
        assert row is not None                   # a select of aggregates answers one row
        count, spent, reserved = row
        if count >= limit:
            raise QuotaExceeded("concurrency", f"{count} requests already in flight over every gateway replica; the "
                                               f"limit is {limit}")
        raise QuotaExceeded("budget", f"this request may cost up to {readable(amount)}; "
                                      f"{readable(max(budget - spent - reserved, 0))} of the budget of "
                                      f"{readable(budget)} remain")

    async def _reserve(self, live: tuple, limit: int, budget: int, account: str, request_id: str, amount: int,
                       now_ms: int) -> bool:
        """The conditional insert; whether it reserved."""
        await self.database.transaction([
            ("UPDATE tenants SET max_concurrent = max_concurrent WHERE name = ?", [(live[0],)]),   # the row lock
            ("INSERT INTO reservations (request_id, tenant, amount, holder, reserved_ms) SELECT ?, ?, ?, ?, ? "
             f"WHERE (SELECT COUNT(*) {_LIVE}) < ? "
             "AND COALESCE((SELECT debits - credits FROM account_balances WHERE account = ?), 0) "
             f"+ COALESCE((SELECT SUM(r.amount) {_LIVE}), 0) + ? <= ?",
             [(request_id, live[0], amount, self.holder, now_ms, *live, limit, account, *live, amount, budget)])])
        return await self.database.peek("SELECT 1 FROM reservations WHERE request_id = ?", (request_id,)) is not None

    async def release(self, request_id: str) -> None:
        """Drop the request's reservation. A database error is logged, not raised: the request itself is done (the
        reservation stops counting when it is RESERVATION_AGE_MAX_MS old)."""
        try:
            await self.database.transaction([("DELETE FROM reservations WHERE request_id = ?", [(request_id,)])])
        except (StoreError, IntegrityError) as exc:
            log.warning("could not release the reservation of %s: %s", request_id, exc)

    async def heartbeat_forever(self, clock) -> None:
        """Runs until cancelled (supervised): renew this replica's heartbeat every HEARTBEAT_S."""
        while True:
            await self.beat(clock())
            await trio.sleep(HEARTBEAT_S)

    async def start(self, now_ms: int) -> None:
        """Before serving: drop what a previous life of this replica left (its requests ended with it), beat."""
        await self.database.transaction([("DELETE FROM reservations WHERE holder = ?", [(self.holder,)])])
        await self.beat(now_ms)

    async def beat(self, now_ms: int) -> None:
        await self.database.transaction([(
            "INSERT INTO gateway_replicas (peer_id, alive_until_ms) VALUES (?, ?) "
            "ON CONFLICT (peer_id) DO UPDATE SET alive_until_ms = excluded.alive_until_ms",
            [(self.holder, now_ms + REPLICA_ALIVE_MS)])])
