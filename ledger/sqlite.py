"""The one place llorch talks to SQLite from trio: aiosqlite, bridged with trio-asyncio.

``open_database`` yields a ``Database`` whose methods are plain trio coroutines. sqlite3 errors are translated
into StoreError at this boundary, with the cause in the message.
"""

from __future__ import annotations

import sqlite3
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator, Sequence

import aiosqlite
import trio
import trio_asyncio

from llorch.ledger import limits
from llorch.ledger.errors import StoreError, sole_exception


class Database:
    """A single aiosqlite connection in autocommit mode; use ``transaction()`` for atomic writes."""

    def __init__(self, connection: aiosqlite.Connection, path: Path) -> None:
        self._connection = connection
        self.path = path
        # One connection serves every task: a transaction (BEGIN ... COMMIT, several awaits) and any read take turns,
        # so no read ever sees another task's uncommitted (and perhaps rolled back) writes.
        self._lock = trio.Lock()

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> None:
        async with self._lock:
            await self._call(self._connection.execute, sql, params)

    async def executescript(self, sql: str) -> None:
        async with self._lock:
            await self._call(self._connection.executescript, sql)

    async def fetchone(self, sql: str, params: Sequence[Any] = ()) -> tuple | None:
        async with self._lock:
            return await self._call(self._fetch, sql, params, True)

    async def fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        async with self._lock:
            return await self._call(self._fetch, sql, params, False)

    async def transaction(self, statements: Sequence[tuple[str, Sequence[Sequence[Any]]]]) -> None:
        """Run ``executemany`` for each (sql, rows) in one IMMEDIATE transaction; commit or roll back.

        Under synchronous=FULL the commit is durable when this returns.
        """
        async with self._lock:
            await self._call(self._transaction, statements)

    async def _transaction(self, statements: Sequence[tuple[str, Sequence[Sequence[Any]]]]) -> None:
        await self._connection.execute("BEGIN IMMEDIATE")
        try:
            for sql, rows in statements:
                await self._connection.executemany(sql, rows)
            await self._connection.execute("COMMIT")
        except BaseException:
            if self._connection.in_transaction:
                await self._connection.execute("ROLLBACK")
            raise

    async def _fetch(self, sql: str, params: Sequence[Any], one: bool) -> Any:
        # One hop to the connection's thread (execute, fetch and close the cursor there), not three: a point query
        # on the request path costs one thread round trip.
        rows = await self._connection.execute_fetchall(sql, params)
        if not one:
            return list(rows)
        return next(iter(rows), None)

    async def _call(self, function, *args) -> Any:
        try:
            return await trio_asyncio.aio_as_trio(function)(*args)
        except sqlite3.IntegrityError:
            raise
        except sqlite3.Error as exc:
            raise StoreError(f"SQLite error on {self.path}: {exc}") from None


@asynccontextmanager
async def open_database(path: Path) -> AsyncIterator[Database]:
    """Open (creating if needed) a SQLite file in WAL mode with synchronous=FULL: a commit is durable on return."""
    try:
        async with _open_database(path) as database:
            yield database
    except BaseExceptionGroup as group:
        # trio-asyncio's loop runs nested nurseries, which wrap whatever escapes the block; give callers the error.
        sole = sole_exception(group)
        if sole is group:
            raise
        raise sole from None


@asynccontextmanager
async def _open_database(path: Path) -> AsyncIterator[Database]:
    try:
        # Opened once on its own first: when aiosqlite's connect fails, its worker thread outlives the event loop and
        # prints a second traceback from a closed loop. This way the file's problem is the one error.
        await trio.to_thread.run_sync(_probe_open, path)
    except sqlite3.Error as exc:
        raise StoreError(f"cannot open SQLite database {path}: {exc} (does its directory exist, and may this user "
                         f"write there?)") from None
    async with trio_asyncio.open_loop():
        try:
            connection = await trio_asyncio.aio_as_trio(aiosqlite.connect)(
                str(path), isolation_level=None, timeout=limits.SQLITE_BUSY_TIMEOUT_MS / 1000)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open SQLite database {path}: {exc}") from None
        database = Database(connection, Path(path))
        try:
            await database.execute("PRAGMA journal_mode=WAL")
            await database.execute("PRAGMA synchronous=FULL")
            yield database
        finally:
            with trio.CancelScope(shield=True):  # on shutdown too: an unclosed connection's thread blocks exit
                await trio_asyncio.aio_as_trio(connection.close)()


def _probe_open(path: Path) -> None:
    sqlite3.connect(str(path), timeout=limits.SQLITE_BUSY_TIMEOUT_MS / 1000).close()
