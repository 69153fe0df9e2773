"""The gateway's SQLite database: one file, one connection, every table the gateway keeps."""

from __future__ import annotations

from contextlib import asynccontextmanager
from pathlib import Path
from typing import AsyncIterator

from llorch.gateway.books import postings, receipts
from llorch.gateway.market import providers, tenants
from llorch.gateway.witness import witness
from llorch.ledger.sqlite import Database, open_database


@asynccontextmanager
async def open_gateway_db(path: Path) -> AsyncIterator[Database]:
    async with open_database(path) as database:
        await database.executescript(receipts.SCHEMA + witness.SCHEMA + tenants.SCHEMA + providers.SCHEMA +
                                     postings.SCHEMA)
        columns = {row[1] for row in await database.fetchall("PRAGMA table_info(witnessed)")}
        if "checked_ms" not in columns:       # a database from before witness rounds were timed
            await database.execute("ALTER TABLE witnessed ADD COLUMN checked_ms INTEGER NOT NULL DEFAULT 0")
        yield database
