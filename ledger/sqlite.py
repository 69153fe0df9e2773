"""The one place llorch talks to a SQL database from trio: SQLite (the node's ledger; the gateway's embedded default)
or, for the gateway, PostgreSQL (gateway/storage.py).

``open_database`` yields a ``Database`` whose methods are plain trio coroutines over one connection of an
``Engine``. Every statement runs in a worker thread (``trio.to_thread``), one call at a time, and is never
abandoned: a cancelled caller waits for its statement to finish or roll back, so the connection is never left
mid-transaction for the next task. On SQLite, point reads on the request path may run inline (``peek``): a WAL read
of one indexed row costs microseconds, less than the hop to a thread. Concurrent ``transaction`` calls are committed
together (group commit): each runs in its own savepoint, so one caller's constraint error rolls back only its own
statements, and every caller is answered only once the shared COMMIT is durable (SQLite: ``synchronous=FULL``).
On SQLite a small group commit also runs inline while commits are quick (an fsync of a fraction of a millisecond,
as on local SSDs): on a loaded 2-core machine the hops to and from a worker thread cost more than the commit itself
(about 0.9 ms of each of a request's two commits, measured by bench/gateway_overhead.py). Inline commits whose
median over the last INLINE_COMMIT_SAMPLES exceeds INLINE_COMMIT_S_MAX (a slow disk), or one beyond
INLINE_COMMIT_S_STALL (a stalled one), send commits back to worker threads for INLINE_RETRY_S; a group of more than
INLINE_COMMIT_ROWS_MAX rows (a witness round's entries) always commits in a thread.
Driver errors are translated into StoreError at this boundary, with the cause in the message; an integrity error
(a constraint, a trigger's refusal) reaches its own caller as ``IntegrityError``.

SQL is written once, in the dialect both engines accept (``?`` placeholders, ``ON CONFLICT``); an engine rewrites
what it must (gateway/storage.py: placeholders and column types for PostgreSQL).
"""

from __future__ import annotations

import logging
import sqlite3
from collections import deque
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Sequence

import trio

from llorch.ledger import limits
from llorch.ledger.errors import StoreError

log = logging.getLogger("llorch.store")

Statements = Sequence[tuple[str, Sequence[Sequence[Any]]]]

INLINE_COMMIT_ROWS_MAX = 64          # a larger group (a witness round's entries) always commits in a thread
INLINE_COMMIT_SAMPLES = 16           # inline commits whose median duration ...
INLINE_COMMIT_S_MAX = 0.005          # ... above this (a slow disk, not one preempted commit),
INLINE_COMMIT_S_STALL = 0.05         # or one inline commit slower than this (a stalled disk),
INLINE_RETRY_S = 60.0                # move commits to worker threads for this long


class IntegrityError(Exception):
    """A constraint or a trigger refused a write (a duplicate key, a settled ticket settled again); the message is
    the engine's. Raised to the caller whose statement it was; nothing of that caller's transaction is written."""


class Engine:
    """What ``Database`` needs of a driver. This one is SQLite (sqlite3); gateway/storage.py adds PostgreSQL."""

    name = "sqlite"
    inline_reads = True                     # peek() may run on trio's thread
    inline_commits = True                   # so may a group commit, while commits are quick
    begin = "BEGIN IMMEDIATE"
    integrity_errors: tuple[type[Exception], ...] = (sqlite3.IntegrityError,)
    errors: tuple[type[Exception], ...] = (sqlite3.Error,)

    def __init__(self, path: Path) -> None:
        self.path: Path | None = Path(path)         # None for a server database (gateway/storage.py)
        self.where = str(self.path)

    def connect(self):
        # check_same_thread=False: the connection moves between trio's worker threads, one call at a time (a lock).
        return sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False,
                               timeout=limits.SQLITE_BUSY_TIMEOUT_MS / 1000)

    def open_error(self, exc: BaseException) -> StoreError:
        return StoreError(f"cannot open SQLite database {self.path}: {exc} (does its directory exist, and may this "
                          f"user write there?)")

    def prepare(self, connection) -> None:
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=FULL")

    def sql(self, text: str) -> str:
        return text

    def params(self, values: Sequence[Any]) -> Sequence[Any]:
        return values

    def executescript(self, connection, script: str) -> None:
        connection.executescript(script)

    def in_transaction(self, connection) -> bool:
        return connection.in_transaction

    def broken(self, connection) -> bool:
        """Whether the connection is lost (a database server restarted or failed over): reconnect before use."""
        return False

    def error(self, exc: BaseException) -> StoreError:
        return StoreError(f"SQLite error on {self.path}: {exc}")


@dataclass
class _Waiting:
    """A transaction waiting for the next group commit, and, once it ran, what it ended in."""

    statements: Statements
    done: trio.Event = field(default_factory=trio.Event)
    error: BaseException | None = None


class Database:
    """One connection in autocommit mode; use ``transaction()`` for atomic, durable writes. ``engine.name`` says
    which engine ("sqlite", "postgresql"), for the few places that must differ (DDL, see gateway/storage.py)."""

    def __init__(self, connection, engine: Engine) -> None:
        self._connection = connection
        self.engine = engine
        self.path = getattr(engine, "path", None)
        # One connection serves every task: a transaction and any read take turns, so no read ever sees another
        # task's uncommitted (and perhaps rolled back) writes.
        self._lock = trio.Lock()
        self._waiting: list[_Waiting] = []
        self._threaded_until = 0.0          # trio.current_time() before which commits run in worker threads
        self._inline_took: deque[float] = deque(maxlen=INLINE_COMMIT_SAMPLES)   # the last inline commits' seconds

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> None:
        await self._run(self._execute, sql, params)

    async def executescript(self, sql: str) -> None:
        await self._run(self._executescript, sql)

    async def fetchone(self, sql: str, params: Sequence[Any] = ()) -> tuple | None:
        return await self._run(self._fetchone, sql, params)

    async def fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        return await self._run(self._fetchall, sql, params)

    async def peek(self, sql: str, params: Sequence[Any] = ()) -> tuple | None:
        """``fetchone`` run inline on trio's thread, for a read of a few rows by an index (never a scan): the
        request path's reads, where the hop to a worker thread would cost more than the read."""
        if not self.engine.inline_reads:             # a network round trip: never on trio's thread
            return await self.fetchone(sql, params)
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
                    with trio.CancelScope(shield=True):
                        await self._commit_waiting()
            finally:
                self._lock.release()
        if waiting.error is not None:
            raise waiting.error

    async def _commit_waiting(self) -> None:
        """Commit every waiting transaction as one group (holding the lock), inline or in a worker thread."""
        inline = self.engine.inline_commits and trio.current_time() >= self._threaded_until
        if inline:
            await trio.lowlevel.cancel_shielded_checkpoint()   # tasks ready to write join this group
        batch, self._waiting = self._waiting, []
        inline = inline and sum(len(rows) for each in batch for _, rows in each.statements) <= INLINE_COMMIT_ROWS_MAX
        try:
            if inline:
                started = trio.current_time()
                self._commit_group(batch)
                self._inline_took.append(trio.current_time() - started)
                typical = sorted(self._inline_took)[len(self._inline_took) // 2]
                if self._inline_took[-1] > INLINE_COMMIT_S_STALL or \
                        len(self._inline_took) == INLINE_COMMIT_SAMPLES and typical > INLINE_COMMIT_S_MAX:
                    self._threaded_until = trio.current_time() + INLINE_RETRY_S
                    log.info("commits on trio's thread took %.1f ms (median of the last %d), the last %.1f ms: they "
                             "run in worker threads for the next %g s", typical * 1000, len(self._inline_took),
                             self._inline_took[-1] * 1000, INLINE_RETRY_S)
                    self._inline_took.clear()
            else:
                await trio.to_thread.run_sync(self._commit_group, batch)
        finally:
            for each in batch:
                each.done.set()

    def _commit_group(self, batch: list[_Waiting]) -> None:
        """In the worker thread: one IMMEDIATE transaction, a savepoint per waiting transaction, one COMMIT."""
        try:
            self._reconnect_if_lost()
            connection, engine = self._connection, self.engine
            connection.execute(engine.begin)
            try:
                for waiting in batch:
                    connection.execute("SAVEPOINT one")
                    try:
                        for sql, rows in waiting.statements:
                            self._executemany(sql, rows)
                    except engine.errors as exc:         # this caller's statements only
                        connection.execute("ROLLBACK TO SAVEPOINT one")
                        waiting.error = self._caller_error(exc)
                    connection.execute("RELEASE SAVEPOINT one")
                connection.execute("COMMIT")
            except BaseException:
                if engine.in_transaction(connection):
                    connection.execute("ROLLBACK")
                raise
        except Exception as exc:   # BEGIN, a rollback or COMMIT failed (disk full, I/O): nothing of it is durable
            for waiting in batch:
                waiting.error = self._caller_error(exc) if isinstance(exc, self.engine.errors) else exc

    async def _run(self, function: Callable, *args) -> Any:
        async with self._lock:
            # Not abandoned on cancellation: the statement finishes (or rolls back) before the lock is released.
            return await trio.to_thread.run_sync(self._translated, function, *args)

    def _translated(self, function: Callable, *args) -> Any:
        try:
            self._reconnect_if_lost()
            return function(*args)
        except self.engine.errors as exc:
            raise self._caller_error(exc) from None

    def _caller_error(self, exc: BaseException) -> Exception:
        if isinstance(exc, self.engine.integrity_errors):
            return IntegrityError(str(exc))
        return self.engine.error(exc)

    def _reconnect_if_lost(self) -> None:
        """In the worker thread, before a statement: a lost connection (PostgreSQL restarted or failed over) is
        replaced. The statement that met the loss failed with its error; nothing is retried behind a caller."""
        if not self.engine.broken(self._connection):
            return
        try:
            self._connection.close()
        except self.engine.errors:
            pass
        connection = self.engine.connect()
        self.engine.prepare(connection)
        self._connection = connection

    def _executescript(self, sql: str) -> None:
        self.engine.executescript(self._connection, sql)

    def _execute(self, sql: str, params: Sequence[Any]) -> None:
        self._connection.execute(self.engine.sql(sql), self.engine.params(params))

    def _executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        text = self.engine.sql(sql)
        if self.engine.name == "sqlite":
            self._connection.executemany(text, rows)
        else:
            with self._connection.cursor() as cursor:
                cursor.executemany(text, [self.engine.params(row) for row in rows])

    def _fetchone(self, sql: str, params: Sequence[Any]) -> tuple | None:
        return self._connection.execute(self.engine.sql(sql), self.engine.params(params)).fetchone()

    def _fetchall(self, sql: str, params: Sequence[Any]) -> list[tuple]:
        return self._connection.execute(self.engine.sql(sql), self.engine.params(params)).fetchall()


@asynccontextmanager
async def open_database(path_or_engine) -> AsyncIterator[Database]:
    """Open a database: a path is a SQLite file (created if needed, WAL mode, synchronous=FULL: a commit is durable
    on return); an ``Engine`` is whatever it connects to."""
    engine = path_or_engine if isinstance(path_or_engine, Engine) else Engine(Path(path_or_engine))
    try:
        connection = await trio.to_thread.run_sync(engine.connect)
    except engine.errors as exc:
        raise engine.open_error(exc) from None
    database = Database(connection, engine)
    try:
        await database._run(engine.prepare, connection)
        yield database
    finally:
        with trio.CancelScope(shield=True):     # on shutdown too, after any statement still running
            async with database._lock:
                await trio.to_thread.run_sync(database._connection.close)
