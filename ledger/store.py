"""A provider's ledger: an append-only SQLite table of signed receipts, hash-chained by prev_hash.

``append`` assigns the next index and prev_hash, signs the receipt, and returns its envelope bytes only once the
row is committed under ``synchronous=FULL`` (durable). Appends are serialised by a lock, so the chain has no forks
within one store. Entries are never updated or deleted: triggers refuse both.
"""

from __future__ import annotations

import sqlite3
from contextlib import asynccontextmanager
from pathlib import Path
from typing import AsyncIterator

import trio

from ledger.errors import ConflictError, StoreError
from ledger.objects import VERSION, ZERO_HASH, Receipt, ledger_origin, with_chain
from ledger.signing import SigningKey, sha256
from ledger.sqlite import Database, open_database

SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    idx          INTEGER PRIMARY KEY,
    request_id   TEXT NOT NULL UNIQUE,
    entry        BLOB NOT NULL,
    entry_sha256 BLOB NOT NULL
);
CREATE TRIGGER IF NOT EXISTS entries_no_update BEFORE UPDATE ON entries
    BEGIN SELECT RAISE(ABORT, 'ledger entries are append-only'); END;
CREATE TRIGGER IF NOT EXISTS entries_no_delete BEFORE DELETE ON entries
    BEGIN SELECT RAISE(ABORT, 'ledger entries are append-only'); END;
"""


class LedgerStore:
    """The ledger of the node holding ``key``. Open with ``LedgerStore.open(path, key)``."""

    def __init__(self, database: Database, key: SigningKey, size: int, head_hash: bytes) -> None:
        self._database = database
        self._key = key
        self._size = size
        self._head_hash = head_hash
        self._lock = trio.Lock()
        self.origin = ledger_origin(key.public_key)

    @classmethod
    @asynccontextmanager
    async def open(cls, path: Path, key: SigningKey) -> AsyncIterator["LedgerStore"]:
        async with open_database(path) as database:
            await database.executescript(SCHEMA)
            row = await database.fetchone("SELECT idx, entry FROM entries ORDER BY idx DESC LIMIT 1")
            size, head = (0, ZERO_HASH) if row is None else (row[0] + 1, sha256(row[1]))
            if row is not None:
                last = Receipt.from_envelope(row[1])
                if last.provider_key != key.public_key:
                    raise StoreError(f"ledger {path} belongs to {last.origin}, not to this node's key")
            yield cls(database, key, size, head)

    @property
    def size(self) -> int:
        return self._size

    async def append(self, receipt_fields: dict) -> bytes:
        """Sign the receipt at the next index and store it durably; return the exact envelope bytes stored.

        ``receipt_fields`` holds every receipt field except origin, index and prev_hash.
        Raises ConflictError if the request_id is already in the ledger, StoreError if the write fails.
        """
        async with self._lock:
            fields = with_chain({**receipt_fields, "v": VERSION, "origin": self.origin}, self._size, self._head_hash)
            envelope = Receipt(**fields).seal(self._key)
            digest = sha256(envelope)
            try:
                await self._database.transaction([(
                    "INSERT INTO entries (idx, request_id, entry, entry_sha256) VALUES (?, ?, ?, ?)",
                    (self._size, fields["request_id"], envelope, digest))])
            except sqlite3.IntegrityError:
                raise ConflictError(f"request_id {fields['request_id']} is already in the ledger") from None
            self._size += 1
            self._head_hash = digest
            return envelope

    async def contains(self, request_id: str) -> bool:
        return await self._database.fetchone("SELECT 1 FROM entries WHERE request_id = ?", (request_id,)) is not None

    async def entry(self, request_id: str) -> bytes | None:
        row = await self._database.fetchone("SELECT entry FROM entries WHERE request_id = ?", (request_id,))
        return None if row is None else row[0]
