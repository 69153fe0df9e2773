"""The gateway's SQLite database: one file, one connection, every table the gateway keeps."""

from __future__ import annotations

from contextlib import asynccontextmanager
from pathlib import Path
from typing import AsyncIterator

from gateway import books, providers, receipts, tenants, witness
from ledger.sqlite import Database, open_database


@asynccontextmanager
async def open_gateway_db(path: Path) -> AsyncIterator[Database]:
    async with open_database(path) as database:
        await database.executescript(receipts.SCHEMA + witness.SCHEMA + tenants.SCHEMA + providers.SCHEMA +
                                     books.SCHEMA)
        yield database
