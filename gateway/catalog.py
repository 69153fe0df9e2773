"""The catalog the operator curates: the models this gateway places on, kept in its database, signed and published.

``CatalogBook`` is the database side (`llorch gateway models add|retire|list|show` and the running gateway use it):
every change is a row of ``catalog_changes`` numbered by version (1, 2, ...), never updated or deleted, so the
catalog at any version, and who retired what when, can be read back. An entry's id is never reused: a receipt
names its model by id and sha256, and a retired entry stays in the catalog (marked with ``retired_ms``) so its
receipts can still be re-executed. Migration 4 seeds a fresh database with the built-in entries
(inference/catalog.json).

``GatewayCatalog`` is the running gateway's copy: the newest version, signed (node/wire/catalog.py
``SignedCatalog``), re-read from the database every CATALOG_REFRESH_S (so a change made by the CLI, or by another
replica's operator, is placed on and published within seconds; replicas sign the same content). It answers
/llorch/catalog/1 and GET /v1/catalog, and is what placement asks for a model's pin.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace

import trio

from llorch.gateway import limits
from llorch.node.models import BUILTIN, Catalog, CatalogEntry, CatalogError, entry_map, entry_of
from llorch.ledger.signing import SigningKey
from llorch.ledger.sqlite import Database
from llorch.node import limits as node_limits
from llorch.node.errors import ProtocolError
from llorch.node.stream_io import answer_once, now_ms
from llorch.node.wire.catalog import (AskCatalog, CatalogAnswer, CatalogDocument, CatalogRefused, SignedCatalog,
                                      Unchanged)

log = logging.getLogger("llorch.gateway.catalog")

SCHEMA = """
CREATE TABLE IF NOT EXISTS catalog_changes (
    version  INTEGER NOT NULL PRIMARY KEY,
    model_id TEXT    NOT NULL,
    action   TEXT    NOT NULL CHECK (action IN ('add', 'retire')),
    entry    TEXT    NOT NULL,
    at_ms    INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS catalog_changes_model ON catalog_changes (model_id, version);
"""


@dataclass(frozen=True)
class Change:
    version: int
    model_id: str
    action: str                  # "add" or "retire"
    entry: CatalogEntry          # the entry as it stood after the change
    at_ms: int


@dataclass(frozen=True)
class Published:
    """One version of the catalog as the gateway serves it: the catalog, when it was made, and its signed bytes."""

    catalog: Catalog
    issued_ms: int
    document: bytes


class CatalogBook:
    """The catalog in the gateway's database (see the module docstring)."""

    def __init__(self, database: Database) -> None:
        self.database = database

    async def version(self) -> int:
        row = await self.database.fetchone("SELECT COALESCE(MAX(version), 0) FROM catalog_changes")
        return int(row[0]) if row else 0

    async def changes(self, model_id: str | None = None) -> list[Change]:
        rows = await self.database.fetchall(
            "SELECT version, model_id, action, entry, at_ms FROM catalog_changes"
            + (" WHERE model_id = ?" if model_id is not None else "") + " ORDER BY version",
            (model_id,) if model_id is not None else ())
        return [Change(int(version), str(mid), str(action), entry_of(json.loads(entry), f"catalog version {version}"),
                       int(at_ms)) for version, mid, action, entry, at_ms in rows]

    async def current(self) -> tuple[Catalog, int]:
        """The newest catalog, and when its version was made (0 for an empty one)."""
        entries: dict[str, CatalogEntry] = {}
        version, issued_ms = 0, 0
        for change in await self.changes():
            entries[change.model_id] = change.entry
            version, issued_ms = change.version, change.at_ms
        return Catalog(version, entries), issued_ms

    async def add(self, entry: CatalogEntry, at_ms: int) -> int:
        """Add a new entry; return the catalog's new version. An id already used (even retired) is refused."""
        if entry.retired_ms is not None:
            raise CatalogError(f"{entry.id}: a new entry cannot be retired already (drop retired_ms)")
        catalog, _ = await self.current()
        if entry.id in catalog.entries:
            state = "retired" if catalog.entries[entry.id].retired_ms is not None else "in the catalog"
            raise CatalogError(f"model {entry.id} is already {state}: ids are never reused, since receipts name "
                               f"a model by its id; add it under a new id (e.g. with a -v2 suffix)")
        if len(catalog.entries) >= node_limits.CATALOG_DOCUMENT_ENTRIES_MAX:
            raise CatalogError(f"the catalog holds {len(catalog.entries)} entries, the most one signed catalog "
                               f"may hold")
        return await self._write(catalog.version + 1, entry, "add", at_ms)

    async def retire(self, model_id: str, at_ms: int) -> int:
        """Retire a live entry: never placed or served again, kept for the receipts that cite it."""
        catalog, _ = await self.current()
        entry = catalog.lookup(model_id)
        if entry.retired_ms is not None:
            raise CatalogError(f"model {model_id} was already retired (at {entry.retired_ms} ms)")
        return await self._write(catalog.version + 1, replace(entry, retired_ms=at_ms), "retire", at_ms)

    async def _write(self, version: int, entry: CatalogEntry, action: str, at_ms: int) -> int:
        await self.database.transaction([(
            "INSERT INTO catalog_changes (version, model_id, action, entry, at_ms) VALUES (?, ?, ?, ?, ?)",
            [(version, entry.id, action, json.dumps(entry_map(entry), sort_keys=True), at_ms)])])
        return version


async def seed_builtin(database: Database) -> None:
    """Migration 4: a database without a catalog starts with the built-in entries (inference/catalog.json)."""
    await database.executescript(SCHEMA)
    if await CatalogBook(database).version():
        return
    at = now_ms()
    await database.transaction([(
        "INSERT INTO catalog_changes (version, model_id, action, entry, at_ms) VALUES (?, ?, 'add', ?, ?)",
        [(number, entry.id, json.dumps(entry_map(entry), sort_keys=True), at)
         for number, entry in enumerate(sorted(BUILTIN.entries.values(), key=lambda e: e.id), start=1)])])


class GatewayCatalog:
    """The running gateway's catalog: the newest version, signed. Placement and the API read ``catalog``."""

    def __init__(self, book: CatalogBook, key: SigningKey) -> None:
        self.book = book
        self.key = key
        self.published = Published(BUILTIN, 0, b"")
        self.changed = trio.Event()          # set (and replaced) each time a new version is loaded
        self.limiter = trio.CapacityLimiter(limits.CATALOG_ANSWERS_CONCURRENT_MAX)

    @property
    def catalog(self) -> Catalog:
        return self.published.catalog

    async def load(self) -> bool:
        """Read the newest version from the database and sign it, if it is not the one loaded; True if it was new."""
        if self.published.document and await self.book.version() == self.catalog.version:
            return False
        catalog, issued_ms = await self.book.current()
        entries = list(catalog.entries.values())
        document = SignedCatalog.of(self.key.public_key, catalog.version, issued_ms, entries).seal(self.key)
        if len(document) > node_limits.CATALOG_DOCUMENT_BYTES_MAX:
            log.error("catalog version %d is %d bytes signed, over the %d a node accepts: still publishing "
                      "version %d", catalog.version, len(document), node_limits.CATALOG_DOCUMENT_BYTES_MAX,
                      self.catalog.version)
            return False
        self.published = Published(catalog, issued_ms, document)
        self.changed.set()
        self.changed = trio.Event()
        log.info("catalog version %d: %s", catalog.version, ", ".join(catalog.live_ids()) or "(no live models)")
        return True

    async def keep_fresh(self) -> None:
        """Runs under ``supervise``: pick up a change made by the CLI or another replica."""
        while True:
            await self.load()
            await trio.sleep(limits.CATALOG_REFRESH_S)

    def answer(self, frame: bytes) -> CatalogAnswer:
        try:
            question = AskCatalog.from_bytes(frame)
        except ProtocolError as exc:
            return CatalogRefused("malformed", f"not a catalog question: {exc}"[:node_limits.ERROR_MESSAGE_CHARS_MAX])
        if not self.published.document:
            return CatalogRefused("unavailable", "the gateway has not loaded its catalog yet; ask again shortly")
        if question.have_version >= self.catalog.version:
            return Unchanged(self.catalog.version)
        return CatalogDocument(self.published.document)

    async def serve_catalog(self, stream) -> None:
        """The /llorch/catalog/1 stream handler: one question in, one answer out, under timeouts; never raises."""
        async def answer(frame: bytes) -> CatalogAnswer:
            return self.answer(frame)

        await answer_once(stream, self.limiter,
                          CatalogRefused("busy", "too many catalog questions at once; ask again in a minute"),
                          node_limits.CATALOG_REQUEST_FRAME_BYTES_MAX, limits.CATALOG_READ_TIMEOUT_S,
                          limits.CATALOG_WRITE_TIMEOUT_S, answer, "catalog")
