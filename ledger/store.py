"""A provider's ledger: an append-only SQLite table of signed receipts, hash-chained and Merkle-tree'd (RFC 9162).

Appends (``append``) go through one writer task that commits whatever is waiting in one transaction under
``synchronous=FULL`` (group commit): every caller is answered only once its entry is durable. Appends are
idempotent by request_id: the same receipt content again returns the stored entry, different content is a
ConflictError, and nothing is written in either case. Entries, tree nodes and checkpoints are never updated or
deleted (triggers refuse it).

The Merkle tree is stored as the hashes of its complete subtrees (``tree``: level, index → hash), written in the same
transaction as the entries, so a root or a proof costs O(log n) node reads. Checkpoints are C2SP signed notes
(``ledger/note.py``); ``sign_checkpoint`` refuses to sign anything inconsistent with the last signed checkpoint.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import logging
import sqlite3
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator, Callable, Sequence, TypeVar

import trio

from llorch.ledger import limits, merkle
from llorch.ledger.chain import EntryFacts, check_continues
from llorch.ledger.errors import ChainBreak, ConflictError, EncodingError, LedgerError, StoreError
from llorch.ledger.note import Checkpoint, NoteError, open_checkpoint, parse_checkpoint_text, parse_note, sign_checkpoint
from llorch.ledger.objects import VERSION, ZERO_HASH, Receipt, ledger_origin, receipt_fields_of, with_chain
from llorch.ledger.signing import SigningKey, sha256
from llorch.ledger.sqlite import Database, IntegrityError, open_database

log = logging.getLogger("llorch.ledger")

SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    idx          INTEGER PRIMARY KEY,
    request_id   TEXT NOT NULL UNIQUE,
    entry        BLOB NOT NULL,
    entry_sha256 BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS tree (
    level INTEGER NOT NULL,
    idx   INTEGER NOT NULL,
    hash  BLOB NOT NULL,
    PRIMARY KEY (level, idx)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS checkpoints (
    size INTEGER PRIMARY KEY,
    note BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS cosigned (
    size    INTEGER NOT NULL,
    witness TEXT NOT NULL,
    note    BLOB NOT NULL,
    PRIMARY KEY (size, witness)
);
"""
APPEND_ONLY_TABLES = ("entries", "tree", "checkpoints")
TRIGGERS = "".join(f"""
CREATE TRIGGER IF NOT EXISTS {table}_no_update BEFORE UPDATE ON {table}
    BEGIN SELECT RAISE(ABORT, 'ledger {table} are append-only'); END;
CREATE TRIGGER IF NOT EXISTS {table}_no_delete BEFORE DELETE ON {table}
    BEGIN SELECT RAISE(ABORT, 'ledger {table} are append-only'); END;
""" for table in APPEND_ONLY_TABLES)

CHAIN_FIELDS = ("v", "origin", "index", "prev_hash")


@contextlib.contextmanager
def exclusive(path: Path, what: str):
    """Hold an exclusive lock on ``path`` (through ``<path>.lock``, which records the holder's pid) for the block.
    A ledger has one writer: two node processes on one config would each keep their own head, and the witness would
    see a fork. Raises StoreError naming the other process."""
    lock_path = path.with_name(path.name + ".lock")
    try:
        handle = open(lock_path, "a+")
    except OSError as exc:
        raise StoreError(f"cannot open the lock file {lock_path}: {exc}") from None
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "?"
            raise StoreError(f"the {what} {path} is in use by another process (pid {holder}): is this node already "
                             f"running? Stop it first; two processes on one ledger would fork it") from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        yield
    finally:
        handle.close()


T = TypeVar("T")


@dataclass
class _Pending:
    fields: dict
    done: trio.Event = field(default_factory=trio.Event)
    entry: bytes | None = None
    error: Exception | None = None


def needed_nodes(compute) -> list[tuple[int, int]]:
    """The (level, index) of every complete subtree a Merkle computation reads. The shape of a root or proof
    depends only on sizes, so a dry run with placeholder hashes lists them; the store then reads them in one query."""
    wanted: list[tuple[int, int]] = []

    def record(start: int, size: int) -> bytes:
        level = size.bit_length() - 1
        wanted.append((level, start >> level))
        return bytes(32)

    compute(record)
    return wanted


class LedgerStore:
    """The ledger of the node holding ``key``. Open with ``LedgerStore.open(path, key)``."""

    def __init__(self, database: Database, key: SigningKey, size: int, head_hash: bytes,
                 compact: merkle.CompactRange, latest_checkpoint: tuple[Checkpoint, bytes] | None,
                 send: trio.MemorySendChannel) -> None:
        self._database = database
        self._key = key
        self._size = size
        self._head_hash = head_hash
        self._compact = compact
        self._latest_checkpoint = latest_checkpoint
        self._send = send
        self._checkpoint_lock = trio.Lock()
        self.origin = ledger_origin(key.public_key)
        self.provider_key = key.public_key
        self.batches_committed = 0

    @classmethod
    @asynccontextmanager
    async def open(cls, path: Path, key: SigningKey) -> AsyncIterator["LedgerStore"]:
        """Open the ledger as its only writer: a second process opening the same file is refused (StoreError)."""
        with exclusive(Path(path), "ledger"):
            async with cls._open(path, key) as store:
                yield store

    @classmethod
    @asynccontextmanager
    async def _open(cls, path: Path, key: SigningKey) -> AsyncIterator["LedgerStore"]:
        async with open_database(path) as database:
            await database.executescript(SCHEMA + TRIGGERS)
            size, head = await cls._load_head(database, key, path)
            compact = await cls._load_compact(database, size)
            latest = await cls._load_latest_checkpoint(database, key)
            send, receive = trio.open_memory_channel[_Pending](limits.APPEND_QUEUE_MAX)
            store = cls(database, key, size, head, compact, latest, send)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(store._writer, receive)
                try:
                    yield store
                finally:
                    nursery.cancel_scope.cancel()

    @staticmethod
    async def _load_head(database: Database, key: SigningKey, path: Path) -> tuple[int, bytes]:
        row = await database.fetchone("SELECT idx, entry FROM entries ORDER BY idx DESC LIMIT 1")
        if row is None:
            return 0, ZERO_HASH
        try:
            last = Receipt.from_envelope(row[1])
        except LedgerError as exc:
            raise StoreError(f"ledger {path}: the last entry is unreadable ({exc}); run `llorch ledger verify`") \
                from None
        if last.provider_key != key.public_key:
            raise StoreError(f"ledger {path} belongs to {last.origin}, not to this node's key")
        return row[0] + 1, sha256(row[1])

    @staticmethod
    async def _load_compact(database: Database, size: int) -> merkle.CompactRange:
        levels = [b for b in range(size.bit_length()) if size >> b & 1][::-1]
        nodes, start = [], 0
        for level in levels:
            row = await database.fetchone("SELECT hash FROM tree WHERE level = ? AND idx = ?", (level, start >> level))
            if row is None:
                raise StoreError(f"ledger tree is missing node ({level}, {start >> level}); the file is damaged")
            nodes.append((level, row[0]))
            start += 1 << level
        return merkle.CompactRange(size, nodes)

    @staticmethod
    async def _load_latest_checkpoint(database: Database, key: SigningKey) -> tuple[Checkpoint, bytes] | None:
        row = await database.fetchone("SELECT note FROM checkpoints ORDER BY size DESC LIMIT 1")
        if row is None:
            return None
        try:
            return open_checkpoint(row[0], ledger_origin(key.public_key), key.public_key), row[0]
        except NoteError as exc:
            raise StoreError(f"the latest stored checkpoint is invalid ({exc}); the file is damaged") from None

    # -- appends ----------------------------------------------------------------------------------------------------
    @property
    def size(self) -> int:
        return self._size

    async def append(self, receipt_fields: dict) -> bytes:
        """Sign the receipt at the next index and store it durably; return the exact envelope bytes stored.

        ``receipt_fields`` holds every receipt field except v, origin, index and prev_hash. Raises ConflictError if
        the request_id is stored with other content, StoreError if the write fails (nothing is then stored).
        """
        pending = _Pending(dict(receipt_fields))
        await self._send.send(pending)
        await pending.done.wait()
        if pending.error is not None:
            raise pending.error
        assert pending.entry is not None
        return pending.entry

    async def _writer(self, receive: trio.MemoryReceiveChannel) -> None:
        async with receive:
            async for first in receive:
                batch = [first]
                while len(batch) < limits.APPEND_BATCH_MAX:
                    try:
                        batch.append(receive.receive_nowait())
                    except trio.WouldBlock:
                        break
                with trio.CancelScope(shield=True):   # a started transaction always finishes and answers
                    await self._commit(batch)

    async def _commit(self, batch: list[_Pending]) -> None:
        try:
            stored = await self._stored_entries([p.fields.get("request_id") for p in batch])
            size, head, compact = self._size, self._head_hash, self._compact.copy()
            rows, nodes, written = [], [], []
            for pending in batch:
                request_id = pending.fields.get("request_id")
                prior = stored.get(request_id) if isinstance(request_id, str) else None    # else malformed, below
                if prior is not None:
                    self._answer_repeat(pending, prior)
                    continue
                fields = with_chain({**pending.fields, "v": VERSION, "origin": self.origin}, size, head)
                try:
                    receipt = Receipt(**fields)
                    envelope = receipt.seal(self._key)
                    # the auditor's own continuation check, before writing (ledger/chain.py)
                    facts = EntryFacts.of_receipt(receipt, envelope, True)
                    check_continues(facts, self._key.public_key, size, head, stored)
                except (EncodingError, TypeError, ChainBreak) as exc:   # malformed; the others still go in
                    pending.error = EncodingError(f"receipt for {request_id!r} is malformed: {exc}")
                    continue
                compact.append(facts.leaf, lambda level, index, hash_: nodes.append((level, index, hash_)))
                head = facts.entry_sha256
                rows.append((size, request_id, envelope, head))
                stored[receipt.request_id] = envelope
                pending.entry = envelope
                written.append(pending)
                size += 1
            if rows:
                await self._database.transaction([
                    ("INSERT INTO entries (idx, request_id, entry, entry_sha256) VALUES (?, ?, ?, ?)", rows),
                    ("INSERT INTO tree (level, idx, hash) VALUES (?, ?, ?)", nodes)])
                self._size, self._head_hash, self._compact = size, head, compact
                self.batches_committed += 1
        except Exception as exc:   # the batch fails with a reason; the writer task, and the ledger, live on
            error = exc if isinstance(exc, StoreError) else StoreError(f"append failed: {type(exc).__name__}: {exc}")
            if not isinstance(exc, (StoreError, sqlite3.Error, IntegrityError)):
                log.error("ledger append batch failed unexpectedly", exc_info=exc)
            for pending in batch:
                if pending.error is None:
                    pending.entry, pending.error = None, error
        finally:
            for pending in batch:
                pending.done.set()

    @staticmethod
    def _answer_repeat(pending: _Pending, prior: bytes) -> None:
        try:
            stored_fields = {k: v for k, v in receipt_fields_of(Receipt.from_envelope(prior)).items()
                             if k not in CHAIN_FIELDS}
        except LedgerError as exc:        # a damaged row fails this repeat, never the writer
            pending.error = StoreError(f"the stored entry for {pending.fields['request_id']!r} is damaged ({exc}); "
                                       f"run `llorch ledger verify` on this ledger")
            return
        if stored_fields == {k: v for k, v in pending.fields.items() if k not in CHAIN_FIELDS}:
            pending.entry = prior
        else:
            pending.error = ConflictError(f"request_id {pending.fields['request_id']} is already in the ledger "
                                          f"with different content")

    async def _stored_entries(self, request_ids: Sequence[object]) -> dict[str, bytes]:
        unique = sorted({r for r in request_ids if isinstance(r, str)})
        found: dict[str, bytes] = {}
        for chunk_start in range(0, len(unique), 500):
            chunk = unique[chunk_start:chunk_start + 500]
            marks = ",".join("?" * len(chunk))
            found.update(await self._database.fetchall(
                f"SELECT request_id, entry FROM entries WHERE request_id IN ({marks})", chunk))
        return found

    # -- reads --------------------------------------------------------------------------------------------------------
    async def contains(self, request_id: str) -> bool:
        return await self._database.fetchone("SELECT 1 FROM entries WHERE request_id = ?", (request_id,)) is not None

    async def entry(self, request_id: str) -> bytes | None:
        row = await self._database.fetchone("SELECT entry FROM entries WHERE request_id = ?", (request_id,))
        return None if row is None else row[0]

    async def entries(self, start: int, end: int) -> list[bytes]:
        """Entries [start, end) in order (the caller bounds the range)."""
        rows = await self._database.fetchall("SELECT entry FROM entries WHERE idx >= ? AND idx < ? ORDER BY idx",
                                             (start, end))
        return [row[0] for row in rows]

    async def index_of(self, request_id: str) -> int | None:
        row = await self._database.fetchone("SELECT idx FROM entries WHERE request_id = ?", (request_id,))
        return None if row is None else row[0]

    async def _merkle(self, compute: Callable[[merkle.Subtree], T]) -> T:
        """Run a Merkle computation against the stored tree, reading every node it needs in one query."""
        wanted = sorted(set(needed_nodes(compute)))
        hashes: dict[tuple[int, int], bytes] = {}
        for chunk_start in range(0, len(wanted), 200):
            chunk = wanted[chunk_start:chunk_start + 200]
            where = " OR ".join("(level = ? AND idx = ?)" for _ in chunk)
            params = [value for pair in chunk for value in pair]
            for level, idx, hash_ in await self._database.fetchall(
                    f"SELECT level, idx, hash FROM tree WHERE {where}", params):
                hashes[(level, idx)] = hash_
        missing = [node for node in wanted if node not in hashes]
        if missing:
            raise StoreError(f"ledger tree is missing nodes {missing[:3]}; the file is damaged")
        return compute(lambda start, size: hashes[(size.bit_length() - 1, start >> (size.bit_length() - 1))])

    async def root(self, size: int) -> bytes:
        self._check_size(size)
        return await self._merkle(lambda subtree: merkle.root(subtree, size))

    async def inclusion_proof(self, index: int, size: int) -> list[bytes]:
        self._check_size(size)
        return await self._merkle(lambda subtree: merkle.inclusion_proof(subtree, index, size))

    async def consistency_proof(self, old_size: int, new_size: int) -> list[bytes]:
        self._check_size(new_size)
        return await self._merkle(lambda subtree: merkle.consistency_proof(subtree, old_size, new_size))

    def _check_size(self, size: int) -> None:
        if not 0 <= size <= self._size:
            raise StoreError(f"tree size {size} is beyond this ledger's size {self._size}")

    # -- checkpoints --------------------------------------------------------------------------------------------------
    @property
    def latest_checkpoint(self) -> tuple[Checkpoint, bytes] | None:
        return self._latest_checkpoint

    async def sign_checkpoint(self) -> bytes:
        """Sign and store a checkpoint of the current tree if it grew since the last one; return the latest note.

        Refuses (StoreError) if the stored tree is not consistent with the last signed checkpoint: a log must never
        sign two inconsistent checkpoints.
        """
        async with self._checkpoint_lock:
            size, current_root = self._size, self._compact.root()
            latest = self._latest_checkpoint
            if latest is not None and latest[0].size == size:
                return latest[1]
            if latest is not None:
                old = latest[0]
                proof = await self.consistency_proof(old.size, size)
                try:
                    merkle.verify_consistency(old.size, size, old.root, current_root, proof)
                except merkle.ProofError as exc:
                    raise StoreError(f"refusing to sign: the ledger is not consistent with checkpoint {old.size} "
                                     f"({exc}); the file was modified") from None
            checkpoint = Checkpoint(self.origin, size, current_root)
            note = sign_checkpoint(checkpoint, self._key)
            await self._database.transaction([("INSERT INTO checkpoints (size, note) VALUES (?, ?)",
                                               [(size, note)])])
            self._latest_checkpoint = (checkpoint, note)
            return note

    async def checkpoints(self) -> list[bytes]:
        return [row[0] for row in await self._database.fetchall("SELECT note FROM checkpoints ORDER BY size")]

    async def add_cosigned(self, note_bytes: bytes, witness: str) -> None:
        """Keep a witness's cosigned copy of one of our checkpoints (the caller verified the cosignature)."""
        note = parse_note(note_bytes)
        checkpoint = parse_checkpoint_text(note.text)
        row = await self._database.fetchone("SELECT note FROM checkpoints WHERE size = ?", (checkpoint.size,))
        if row is None or parse_note(row[0]).text != note.text:
            raise StoreError(f"cosigned note is not one of this ledger's checkpoints (size {checkpoint.size})")
        await self._database.transaction([("INSERT OR REPLACE INTO cosigned (size, witness, note) VALUES (?, ?, ?)",
                                           [(checkpoint.size, witness, note_bytes)])])

    async def cosigned(self) -> list[bytes]:
        return [row[0] for row in await self._database.fetchall("SELECT note FROM cosigned ORDER BY size, witness")]
