"""What an auditor can have of one ledger, read without holding its entries in memory: the node's SQLite file (one
read snapshot, paged) or a bundle (ledger/bundle.py), told apart by their first bytes.

A bundle is checked whole (framing, counts, trailer hash) before anything in it is handed out, so an unreadable
bundle is refused (BundleError) before the auditor reports anything about it; the entries are then streamed from a
second pass that checks the same things again as it goes.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from llorch.ledger import bundle, limits
from llorch.ledger.errors import BundleError, StoreError

SQLITE_MAGIC = b"SQLite format 3\x00"
LEGACY_BUNDLE_FIRST_BYTE = 0x84   # a canonical msgpack map of four keys


@dataclass
class LedgerMaterial:
    """What an auditor can have of one ledger: its entries (an iterable read once, in order), its signed checkpoints
    and their cosigned copies, and how many entries there are when that is known before reading them."""

    entries: Iterable[bytes]
    checkpoints: list[bytes] = field(default_factory=list)
    cosigned: list[bytes] = field(default_factory=list)
    entry_count: int | None = None


def load_material(path: Path) -> LedgerMaterial:
    """Read a ledger SQLite file or a bundle (either format). Raises StoreError or BundleError if it cannot."""
    path = Path(path)
    if not path.is_file():
        raise StoreError(f"{path} is not a file")
    with open(path, "rb") as handle:
        start = handle.read(len(SQLITE_MAGIC))
    if start == SQLITE_MAGIC:
        return _sqlite_material(path)
    if start[:1] == bundle.HEADER:
        return _bundle_material(path)
    if start[:1] == bytes([LEGACY_BUNDLE_FIRST_BYTE]):
        return _legacy_bundle_material(path)
    raise BundleError(f"cannot read {path}: {'it is empty' if not start else 'not a ledger file or bundle'}")


# --- SQLite ------------------------------------------------------------------------------------------------------

def read_sqlite_entries(path: Path) -> Iterator[bytes]:
    """Yield the stored entry bytes of a ledger file in index order, opened read-only."""
    yield from _sqlite_material(Path(path)).entries


def _connect_read_only(path: Path) -> sqlite3.Connection:
    try:
        return sqlite3.connect(f"file:{path.resolve()}?mode=ro", uri=True, isolation_level=None)
    except sqlite3.Error as exc:
        raise StoreError(f"cannot open {path}: {exc}") from None


def _sqlite_material(path: Path) -> LedgerMaterial:
    """One read transaction: the count, the notes and every page of entries are the same snapshot, even while the
    node appends (so an export's header counts are exact)."""
    connection = _connect_read_only(path)
    try:
        connection.execute("BEGIN")
        (count,) = connection.execute("SELECT count(*) FROM entries").fetchone()
        checkpoints = _optional_table(connection, "SELECT note FROM checkpoints ORDER BY size")
        cosigned = _optional_table(connection, "SELECT note FROM cosigned ORDER BY size, witness")
    except sqlite3.Error as exc:
        connection.close()
        raise StoreError(f"cannot read ledger entries from {path}: {exc}") from None
    return LedgerMaterial(_paged_entries(connection, path), checkpoints, cosigned, count)


def _paged_entries(connection: sqlite3.Connection, path: Path) -> Iterator[bytes]:
    try:
        rows = connection.execute("SELECT idx, entry FROM entries ORDER BY idx LIMIT ?",
                                  (limits.EXPORT_PAGE_ENTRIES,)).fetchall()
        while rows:
            for _, entry in rows:
                yield entry if isinstance(entry, bytes) else b""   # a non-blob entry is malformed: check 1 names it
            rows = connection.execute("SELECT idx, entry FROM entries WHERE idx > ? ORDER BY idx LIMIT ?",
                                      (rows[-1][0], limits.EXPORT_PAGE_ENTRIES)).fetchall()
    except sqlite3.Error as exc:
        raise StoreError(f"cannot read ledger entries from {path}: {exc}") from None
    finally:
        connection.close()


def _optional_table(connection: sqlite3.Connection, sql: str) -> list[bytes]:
    try:
        return [row[0] for row in connection.execute(sql)]
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):   # a ledger written before checkpoints existed has no such table
            return []
        raise


# --- bundles -----------------------------------------------------------------------------------------------------

def _bundle_material(path: Path) -> LedgerMaterial:
    with open(path, "rb") as handle:                     # first pass: is the whole container sound?
        reader = bundle.BundleReader(handle, str(path))
        for _ in reader.records():
            pass
    handle = open(path, "rb")                             # second pass: hand out the records, checked again
    reader = bundle.BundleReader(handle, str(path))
    records = reader.records()
    checkpoints: list[bytes] = []
    cosigned: list[bytes] = []
    first_entry: list[bytes] = []
    for kind, payload in records:
        if kind == bundle.ENTRY:
            first_entry.append(payload)
            break
        (checkpoints if kind == bundle.CHECKPOINT else cosigned).append(payload)
    if reader.counts != bundle.Counts(len(checkpoints), len(cosigned), reader.counts.entries):
        handle.close()
        raise BundleError(f"cannot read {path}: it changed while being read")
    return LedgerMaterial(_streamed_entries(handle, first_entry, records), checkpoints, cosigned,
                          reader.counts.entries)


def _streamed_entries(handle, first_entry: list[bytes], records: Iterator[tuple[bytes, bytes]]) -> Iterator[bytes]:
    with handle:
        yield from first_entry
        for _, payload in records:
            yield payload


def _legacy_bundle_material(path: Path) -> LedgerMaterial:
    if path.stat().st_size > bundle.LEGACY_BUNDLE_BYTES_MAX:
        raise BundleError(f"cannot read {path}: not a ledger file or bundle (too big for a "
                          f"{bundle.LEGACY_FORMAT!r} bundle)")
    checkpoints, cosigned, entries = bundle.read_legacy_bundle(path.read_bytes(), str(path))
    return LedgerMaterial(entries, checkpoints, cosigned, len(entries))
