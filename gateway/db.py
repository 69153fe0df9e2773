"""The gateway's database: every table the gateway keeps, in SQLite (one file) or PostgreSQL (gateway/storage.py).

Opening it creates what is missing and brings a database from an older gateway up to date (columns added, the
running balances rebuilt from the postings), so an upgrade keeps every ticket, receipt and posting.
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from pathlib import Path
from typing import AsyncIterator

from llorch.gateway.books import postings, receipts, reconcile, tickets
from llorch.gateway import probes
from llorch.gateway.market import providers, sla, spot_checks, tenants
from llorch.gateway.witness import witness
from llorch.gateway.storage import POSTGRES_TRIGGERS
from llorch.ledger.sqlite import Database, Engine, open_database

# table -> columns a database from an older gateway may lack, with their declarations
ADDED_COLUMNS = {
    "witnessed": {"checked_ms": "INTEGER NOT NULL DEFAULT 0"},     # witness rounds are timed
    "tickets": tickets.TICKET_COLUMNS,                             # settlement
    "postings": {"ticket_sha256": "BLOB"},
    "providers": providers.PROVIDER_COLUMNS,                       # registration caps by source
    "tenants": tenants.TENANT_COLUMNS,                             # spot-check consent
}


@asynccontextmanager
async def open_gateway_db(where: Path | Engine) -> AsyncIterator[Database]:
    """``where``: a SQLite file's path, or an engine (gateway/storage.py ``engine_for``)."""
    async with open_database(where) as database:
        await database.executescript(receipts.SCHEMA + tickets.SCHEMA + witness.SCHEMA + tenants.SCHEMA +
                                     providers.SCHEMA + postings.SCHEMA + spot_checks.SCHEMA +
                                     probes.SCHEMA + sla.SCHEMA)
        await add_missing_columns(database)
        await database.executescript(tickets.TRIGGERS + reconcile.SCHEMA +
                                     (POSTGRES_TRIGGERS if database.engine.name == "postgresql" else ""))
        await rebuild_balances_if_missing(database)
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
            " UNION ALL SELECT credit, 0, amount FROM postings) GROUP BY account", [()])])
