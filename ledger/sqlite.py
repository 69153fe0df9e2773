"""The one place llorch talks to SQLite from trio.

``open_database`` yields a ``Database`` whose methods are plain trio coroutines over one sqlite3 connection. Every
statement runs in a worker thread (``trio.to_thread``), one call at a time, and is never abandoned: a cancelled
caller waits for its statement to finish or roll back, so the connection is never left mid-transaction for the next
task. Point reads on the request path may run inline (``peek``): a WAL read of one indexed row costs microseconds,
less than the hop to a thread. Concurrent ``transaction`` calls are committed together (group commit): each runs in
its own savepoint, so one caller's constraint error rolls back only its own statements, and every caller is
answered only once the shared COMMIT is durable (``synchronous=FULL``). sqlite3 errors are translated into
StoreError at this boundary, with the cause in the message; IntegrityError reaches its own caller unchanged.
"""

from __future__ import annotations

import sqlite3
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Sequence

import trio

from llorch.ledger import limits
from llorch.ledger.errors import StoreError

Statements = Sequence[tuple[str, Sequence[Sequence[Any]]]]


@dataclass
class _Waiting:
    """A transaction waiting for the next group commit, and, once it ran, what it ended in."""

    statements: Statements
    done: trio.Event = field(default_factory=trio.Event)
    error: BaseException | None = None


class Database:
    """One sqlite3 connection in autocommit mode; use ``transaction()`` for atomic, durable writes."""

    def __init__(self, connection: sqlite3.Connection, path: Path) -> None:
        self._connection = connection
        self.path = path
        # One connection serves every task: a transaction and any read take turns, so no read ever sees another
        # task's uncommitted (and perhaps rolled back) writes.
        self._lock = trio.Lock()
        self._waiting: list[_Waiting] = []

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> None:
        await self._run(self._connection.execute, sql, params)

    async def executescript(self, sql: str) -> None:
        await self._run(self._connection.executescript, sql)

    async def fetchone(self, sql: str, params: Sequence[Any] = ()) -> tuple | None:
        return await self._run(self._fetchone, sql, params)

    async def fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        return await self._run(self._fetchall, sql, params)

    async def peek(self, sql: str, params: Sequence[Any] = ()) -> tuple | None:
        """``fetchone`` run inline on trio's thread, for a read of a few rows by an index (never a scan): the
        request path's reads, where the hop to a worker thread would cost more than the read."""
        async with self._lock:
            return self._translated(self._fetchone, sql, params)

    async def transaction(self, statements: Statements) -> None:
        """Run ``executemany`` for each (sql, rows) atomically; commit or roll back. Durable when this returns.

        Transactions that arrive while a commit is under way are committed together by the next one. Cancelled
        before its commit began, a transaction never happens; once it began, it finishes and reports its outcome
        (the cancellation reaches the caller at its next checkpoint), so a caller never mistakes a written row for
        an unwritten one."""
        waiting = _Waiting(statements)
        self._waiting.append(waiting)
        try:
            await self._lock.acquire()
        except trio.Cancelled:
            if waiting in self._waiting:                 # no commit took it: it never happens
                self._waiting.remove(waiting)
                raise
            with trio.CancelScope(shield=True):          # another task's commit is writing it right now
                await waiting.done.wait()
        else:
            try:
                if not waiting.done.is_set():            # nobody committed it while this task waited for the lock
                    batch, self._waiting = self._waiting, []
                    with trio.CancelScope(shield=True):
                        try:
                            await trio.to_thread.run_sync(self._commit_group, batch)
                        finally:
                            for each in batch:
                                each.done.set()
            finally:
                self._lock.release()
        if waiting.error is not None:
            raise waiting.error

    def _commit_group(self, batch: list[_Waiting]) -> None:
        """In the worker thread: one IMMEDIATE transaction, a savepoint per waiting transaction, one COMMIT."""
        connection = self._connection
        try:
            connection.execute("BEGIN IMMEDIATE")
            try:
                for waiting in batch:
                    connection.execute("SAVEPOINT one")
                    try:
                        for sql, rows in waiting.statements:
                            connection.executemany(sql, rows)
                    except sqlite3.Error as exc:         # this caller's statements only
                        connection.execute("ROLLBACK TO one")
                        waiting.error = exc if isinstance(exc, sqlite3.IntegrityError) else self._store_error(exc)
                    connection.execute("RELEASE one")
                connection.execute("COMMIT")
            except BaseException:
                if connection.in_transaction:
                    connection.execute("ROLLBACK")
                raise
        except Exception as exc:   # BEGIN, a rollback or COMMIT failed (disk full, I/O): nothing of it is durable
            for waiting in batch:
                waiting.error = self._store_error(exc) if isinstance(exc, sqlite3.Error) else exc

    async def _run(self, function: Callable, *args) -> Any:
        async with self._lock:
            # Not abandoned on cancellation: the statement finishes (or rolls back) before the lock is released.
            return await trio.to_thread.run_sync(self._translated, function, *args)

    def _translated(self, function: Callable, *args) -> Any:
        try:
            return function(*args)
        except sqlite3.IntegrityError:
            raise
        except sqlite3.Error as exc:
            raise self._store_error(exc) from None

    def _store_error(self, exc: BaseException) -> StoreError:
        return StoreError(f"SQLite error on {self.path}: {exc}")

    def _fetchone(self, sql: str, params: Sequence[Any]) -> tuple | None:
        return self._connection.execute(sql, params).fetchone()

    def _fetchall(self, sql: str, params: Sequence[Any]) -> list[tuple]:
        return self._connection.execute(sql, params).fetchall()


@asynccontextmanager
async def open_database(path: Path) -> AsyncIterator[Database]:
    """Open (creating if needed) a SQLite file in WAL mode with synchronous=FULL: a commit is durable on return."""
    try:
        connection = await trio.to_thread.run_sync(_connect, Path(path))
    except sqlite3.Error as exc:
        raise StoreError(f"cannot open SQLite database {path}: {exc} (does its directory exist, and may this user "
                         f"write there?)") from None
    database = Database(connection, Path(path))
    try:
        await database.execute("PRAGMA journal_mode=WAL")
        await database.execute("PRAGMA synchronous=FULL")
        yield database
    finally:
        with trio.CancelScope(shield=True):     # on shutdown too, after any statement still running
            async with database._lock:
                await trio.to_thread.run_sync(connection.close)


def _connect(path: Path) -> sqlite3.Connection:
    # check_same_thread=False: the connection moves between trio's worker threads, one call at a time (the lock).
    return sqlite3.connect(str(path), isolation_level=None, check_same_thread=False,
                           timeout=limits.SQLITE_BUSY_TIMEOUT_MS / 1000)
