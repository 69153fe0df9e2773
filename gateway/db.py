"""The gateway's database: every table the gateway keeps, in SQLite (one file) or PostgreSQL (gateway/storage.py),
and its versioned migrations.

``schema_version`` records each migration applied (version, when). Opening the database applies the pending ones,
in order (a gateway starts on the newest schema); `llorch gateway db status` lists them, `llorch gateway db upgrade`
applies them without starting the gateway. Every migration keeps the data: version 1 also brings a database from
before versioning up to date (columns added, the running balances rebuilt from the postings), so an upgrade keeps
every ticket, receipt and posting. On PostgreSQL, replicas starting together take turns (an advisory lock).
"""

from __future__ import annotations

import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator, Awaitable, Callable

from llorch.gateway.books import payouts, postings, receipts, reconcile, tickets
from llorch.gateway import catalog, probes, spot_checks
from llorch.gateway.market import providers, shared, sla, tenants
from llorch.gateway.witness import witness
from llorch.gateway.storage import POSTGRES_TRIGGERS
from llorch.ledger.errors import StoreError
from llorch.ledger.sqlite import Database, Engine, open_database

# table -> columns a database from an older gateway may lack, with their declarations
ADDED_COLUMNS = {
    "witnessed": {"checked_ms": "INTEGER NOT NULL DEFAULT 0"},     # witness rounds are timed
    "tickets": tickets.TICKET_COLUMNS,                             # settlement
    "postings": {"ticket_sha256": "BLOB"},
    "providers": providers.PROVIDER_COLUMNS,                       # registration caps by source
    "tenants": tenants.TENANT_COLUMNS,                             # spot-check consent
}


VERSION_SCHEMA = """
CREATE TABLE IF NOT EXISTS schema_version (
    version    INTEGER NOT NULL PRIMARY KEY,
    applied_ms INTEGER NOT NULL
);
"""
MIGRATION_LOCK = 7_164_771_001          # PostgreSQL advisory lock id: one replica migrates at a time


@dataclass(frozen=True)
class Migration:
    version: int
    description: str
    apply: Callable[[Database], Awaitable[None]]


async def _books(database: Database) -> None:
    """Every table of the first versioned schema; a database from before versioning gets what it lacks."""
    await database.executescript(receipts.SCHEMA + tickets.SCHEMA + witness.SCHEMA + tenants.SCHEMA +
                                 providers.SCHEMA + postings.SCHEMA + spot_checks.SCHEMA + probes.SCHEMA + sla.SCHEMA)
    await add_missing_columns(database)
    await database.executescript(tickets.TRIGGERS + reconcile.SCHEMA +
                                 (POSTGRES_TRIGGERS if database.engine.name == "postgresql" else ""))
    await rebuild_balances_if_missing(database)


async def _replicas(database: Database) -> None:
    await database.executescript(witness.LEASE_SCHEMA + shared.SCHEMA)


async def _open_tickets_index(database: Database) -> None:
    await database.executescript("CREATE INDEX IF NOT EXISTS tickets_open ON tickets (provider_key, issued_ms) "
                                 "WHERE state = 'issued';")


async def _payouts(database: Database) -> None:
    await database.executescript(payouts.SCHEMA)


async def _invites(database: Database) -> None:
    await database.executescript(providers.INVITES_SCHEMA)


async def _witness_catchup(database: Database) -> None:
    await database.executescript(witness.CATCHUP_SCHEMA)


async def _reread_for_replicas(database: Database) -> None:
    await database.transaction([("DELETE FROM reconcile_cursor", [()])])


async def _payers(database: Database) -> None:
    """Tickets name who pays them (gateway/books/settlement.py ``Payer``); the platform's older runs are found by
    their legs. Spot-check draws get a row each, so what became of every draw can be counted."""
    if "payer" not in await table_columns(database, "tickets"):
        await database.executescript(f"ALTER TABLE tickets ADD COLUMN payer {tickets.PAYER_COLUMN['payer']}")
    await database.transaction([(
        "UPDATE tickets SET payer = ? WHERE ticket_sha256 IN (SELECT ticket_sha256 FROM postings WHERE leg = ?)",
        [("spot_check", "spot_check"), ("probe", "probe")])])
    await database.executescript(spot_checks.DRAWS_SCHEMA)


MIGRATIONS = (
    Migration(1, "the books: tickets, receipts, postings and balances, tenants, providers, witness, spot checks, "
                 "probes, SLA", _books),
    Migration(2, "replicas: witness leases, each replica's cosigned sizes, shared reservations, replica heartbeats",
              _replicas),
    Migration(3, "tickets name their payer (customer, spot_check, probe); every spot-check draw and its outcome",
              _payers),
    Migration(4, "the model catalog the operator curates, seeded with the built-in entries", catalog.seed_builtin),
    Migration(5, "reconciliation reads every witnessed entry again, once: earlier builds skipped the receipts of "
                 "other replicas' tickets while moving the shared cursor past them", _reread_for_replicas),
    Migration(6, "a witness far behind catches up in pages: its progress and the entries it verified so far, "
                 "staged until the checkpoint they lead to is cosigned", _witness_catchup),
    Migration(7, "an index of open tickets per provider: replicas count each other's every 200 ms",
              _open_tickets_index),
    Migration(8, "invitations: the join tokens the operator made, and which provider spent each", _invites),
    Migration(9, "payout runs: each run, its signed statements and files, and indexes of postings by account and id",
              _payouts),
)
SCHEMA_VERSION = MIGRATIONS[-1].version


async def applied_versions(database: Database) -> dict[int, int]:
    """Version → when it was applied (ms), for each migration this database has had."""
    await database.executescript(VERSION_SCHEMA)
    return {version: at for version, at in await database.fetchall("SELECT version, applied_ms FROM schema_version")}


async def upgrade(database: Database) -> list[Migration]:
    """Apply the pending migrations in order; return them. A database newer than this build is refused."""
    postgres = database.engine.name == "postgresql"
    if postgres:
        await database.execute("SELECT pg_advisory_lock(?)", (MIGRATION_LOCK,))
    try:
        applied = await applied_versions(database)
        if applied and max(applied) > SCHEMA_VERSION:
            raise StoreError(f"the database is at schema version {max(applied)}, newer than this gateway's "
                             f"{SCHEMA_VERSION}: upgrade the gateway")
        done = []
        for migration in MIGRATIONS:
            if migration.version in applied:
                continue
            await migration.apply(database)
            await database.transaction([("INSERT INTO schema_version (version, applied_ms) VALUES (?, ?)",
                                         [(migration.version, int(time.time() * 1000))])])
            done.append(migration)
        return done
    finally:
        if postgres:
            await database.execute("SELECT pg_advisory_unlock(?)", (MIGRATION_LOCK,))


@asynccontextmanager
async def open_gateway_db(where: Path | Engine, migrate: bool = True) -> AsyncIterator[Database]:
    """``where``: a SQLite file's path, or an engine (gateway/storage.py ``engine_for``). Pending migrations are
    applied first unless ``migrate`` is false (`llorch gateway db status` looks without changing anything)."""
    async with open_database(where) as database:
        if migrate:
            await upgrade(database)
        yield database


async def table_columns(database: Database, table: str) -> set[str]:
    if database.engine.name == "postgresql":
        return {row[0] for row in await database.fetchall(
            "SELECT column_name FROM information_schema.columns WHERE table_schema = current_schema() "
            "AND table_name = ?", (table,))}
    return {row[1] for row in await database.fetchall(f"PRAGMA table_info({table})")}


async def add_missing_columns(database: Database) -> None:
    for table, columns in ADDED_COLUMNS.items():
        present = await table_columns(database, table)
        for name, declaration in columns.items():
            if name not in present:
                await database.executescript(f"ALTER TABLE {table} ADD COLUMN {name} {declaration}")


async def rebuild_balances_if_missing(database: Database) -> None:
    """A database from before running balances: sum every account's legs once."""
    has_balances = await database.fetchone("SELECT 1 FROM account_balances LIMIT 1")
    has_postings = await database.fetchone("SELECT 1 FROM postings LIMIT 1")
    if has_postings and not has_balances:
        await database.transaction([(
            "INSERT INTO account_balances (account, debits, credits) "
            "SELECT account, SUM(debits), SUM(credits) FROM ("
            " SELECT debit AS account, amount AS debits, 0 AS credits FROM postings"
            " UNION ALL SELECT credit, 0, amount FROM postings) AS legs GROUP BY account", [()])])
