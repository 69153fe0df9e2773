"""The gateway as a witness of providers' ledgers (C2SP tlog-witness style), hop 10 of docs/architecture.md.

For each provider it uses, every interval: fetch the latest signed checkpoint over /llorch/ledger/1; check it is
consistent with the last checkpoint this gateway cosigned (RFC 9162 consistency proof); fetch the new entries,
verify each (signature, index, chain, amount) and that together they give the checkpoint's root; then cosign
(C2SP tlog-cosignature), keep the entries for reconciliation, and hand the cosigned note back to the provider.

A provider that shows a checkpoint inconsistent with one already cosigned (a different root at the same size, a
failing consistency proof, entries that do not give the signed root, a smaller tree) is **forked**: both views are
kept as evidence and the provider is excluded from placement.
"""

from __future__ import annotations

import heapq
import json
import logging
import math
from dataclasses import dataclass
from typing import Container

import trio

from llorch.ledger import canonical, merkle
from llorch.ledger.chain import check_continues, inspect_entry
from llorch.ledger.errors import ChainBreak, EncodingError, StoreError
from llorch.ledger.note import Checkpoint, Note, NoteError, cosign, open_checkpoint, parse_note
from llorch.ledger.objects import ZERO_HASH, ledger_origin
from llorch.ledger.signing import SigningKey, open_envelope, peer_id_of
from llorch.ledger.sqlite import Database
from llorch.ledger.store import needed_nodes
from llorch.node.ledger_client import LedgerRequestFailed, request_ledger
from llorch.node.wire.ledger_protocol import GetCheckpoint, GetConsistency, GetEntries, PutCosigned, witness_name
from llorch.node.p2p import P2P
from llorch.node.stream_io import now_ms

log = logging.getLogger("llorch.witness")

ENTRIES_PER_PAGE = 10_000       # entries fetched, verified and stored together (memory: about 10 MB a page)
PAGES_PER_ROUND = 10            # a catch-up verifies at most this many pages in one round, then resumes next round
PROVIDERS_AT_ONCE = 4           # witness rounds run side by side (each mostly waits on its provider), at least
WITNESS_AT_ONCE_MAX = 64        # ... and at most, however many providers there are
WITNESS_PERIOD_S = 300.0        # every provider is witnessed at least this often (while the gateway keeps up)
WITNESS_ROUNDS_PER_S = 20.0     # a large market's rounds are spread to about this many a second, within the period


class ForkDetected(Exception):
    """The provider showed two views of its log that cannot both be true; ``evidence`` holds both."""

    def __init__(self, reason: str, evidence: list[str]) -> None:
        super().__init__(reason)
        self.evidence = evidence


class BadView(Exception):
    """The provider's answer is unusable (bad signature, malformed entry) but proves no fork: try again later."""


@dataclass(frozen=True)
class WitnessedState:
    """What the witness knows of one provider's log: the last cosigned checkpoint and the tree behind it."""

    size: int
    root: bytes
    head_hash: bytes
    compact: merkle.CompactRange
    note: bytes | None

    @classmethod
    def empty(cls) -> "WitnessedState":
        return cls(0, merkle.EMPTY_ROOT, ZERO_HASH, merkle.CompactRange(), None)


def check_checkpoint(state: WitnessedState, note: bytes, provider_key: bytes) -> Checkpoint:
    """Parse a provider's signed checkpoint; raise ForkDetected if it contradicts what was cosigned."""
    try:
        checkpoint = open_checkpoint(note, ledger_origin(provider_key), provider_key)
    except NoteError as exc:
        raise BadView(f"checkpoint is invalid: {exc}") from None
    evidence = [state.note.decode() if state.note else "", note.decode()]
    if checkpoint.size < state.size:
        raise ForkDetected(f"the provider now shows {checkpoint.size} entries after {state.size} were cosigned "
                           f"(rollback)", evidence)
    if checkpoint.size == state.size and checkpoint.root != state.root:
        raise ForkDetected(f"two different roots for size {state.size}", evidence)
    return checkpoint


def check_consistency(state: WitnessedState, checkpoint: Checkpoint, note: bytes, proof: list[bytes]) -> None:
    try:
        merkle.verify_consistency(state.size, checkpoint.size, state.root, checkpoint.root, proof)
    except merkle.ProofError as exc:
        raise ForkDetected(f"checkpoint {checkpoint.size} is not consistent with cosigned checkpoint "
                           f"{state.size}: {exc}", [state.note.decode() if state.note else "", note.decode(),
                                                   json.dumps([h.hex() for h in proof])]) from None


def extend(state: WitnessedState, checkpoint: Checkpoint, note: bytes, entries: list[bytes],
           provider_key: bytes, nodes: list | None = None,
           earlier_request_ids: Container[str] = frozenset()) -> WitnessedState:
    """Verify entries [state.size, checkpoint.size) and that they give the checkpoint's root; the new state.
    Each entry must continue the ledger exactly as the auditor checks it (ledger/chain.py: owner and origin,
    signature, index, chain, request_id not seen before, amount), so the witness never cosigns a ledger that
    ``llorch ledger verify`` rejects. ``earlier_request_ids``: those of these entries already witnessed.
    Every new complete subtree (level, index, hash) is appended to ``nodes`` when given."""
    if len(entries) != checkpoint.size - state.size:
        raise BadView(f"expected {checkpoint.size - state.size} entries, got {len(entries)}")
    head, compact = continue_with(state.size, state.head_hash, state.compact, entries, provider_key, nodes,
                                  earlier_request_ids)
    if compact.root() != checkpoint.root:
        raise ForkDetected(f"the entries up to {checkpoint.size} do not give the signed root",
                           [note.decode(), f"(entries give root {compact.root().hex()})"])
    return WitnessedState(checkpoint.size, checkpoint.root, head, compact, note)


def continue_with(size: int, head: bytes, compact: merkle.CompactRange, entries: list[bytes], provider_key: bytes,
                  nodes: list | None = None, earlier_request_ids: Container[str] = frozenset()
                  ) -> tuple[bytes, merkle.CompactRange]:
    """Check that ``entries`` continue a ledger of ``size`` entries whose last entry hashes to ``head`` (each as the
    auditor checks it); return the new head hash and the compact range extended by them (``compact`` unchanged).
    BadView names the first entry that does not."""
    compact = compact.copy()
    in_batch: set[str] = set()
    for offset, entry in enumerate(entries):
        index = size + offset
        facts = inspect_entry(entry)
        if facts.malformed is not None:
            raise BadView(f"entry {index} is invalid: {facts.malformed}")
        try:
            check_continues(facts, provider_key, index, head, _Either(earlier_request_ids, in_batch))
        except ChainBreak as exc:
            raise BadView(f"entry {index} does not continue the ledger (check {exc.check}): {exc}") from None
        in_batch.add(facts.request_id)
        compact.append(facts.leaf, None if nodes is None else
                       lambda level, at, hash_: nodes.append((level, at, hash_)))
        head = facts.entry_sha256
    return head, compact


@dataclass(frozen=True)
class CatchUp:
    """A witness far behind, part way: the provider-signed checkpoint it is catching up to, and the entries verified
    so far (staged in ``catchup_entries``, not yet covered by a cosigned checkpoint)."""

    target: Checkpoint
    note: bytes
    size: int
    head_hash: bytes
    compact: merkle.CompactRange


class _Either:
    """``x in _Either(a, b)``: in either container."""

    def __init__(self, first: Container[str], second: Container[str]) -> None:
        self.first, self.second = first, second

    def __contains__(self, item: object) -> bool:
        return item in self.first or item in self.second


def request_ids_of(entries: list[bytes]) -> list[str]:
    """The request_id each entry names, read without checking anything (extend checks every entry)."""
    ids = []
    for entry in entries:
        try:
            payload = open_envelope(entry)[0]
        except EncodingError:
            continue
        if isinstance(payload, dict) and isinstance(payload.get("request_id"), str):
            ids.append(payload["request_id"])
    return ids


CATCHUP_SCHEMA = """
CREATE TABLE IF NOT EXISTS witness_catchup (
    provider_key BLOB PRIMARY KEY,
    target_note  BLOB NOT NULL,               -- the provider-signed checkpoint being caught up to
    size         INTEGER NOT NULL,            -- entries verified so far (staged below)
    head_hash    BLOB NOT NULL,
    compact      BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS catchup_entries (
    provider_key BLOB NOT NULL,
    idx          INTEGER NOT NULL,
    request_id   TEXT NOT NULL,
    entry        BLOB NOT NULL,
    PRIMARY KEY (provider_key, idx)
);
CREATE INDEX IF NOT EXISTS catchup_entries_request ON catchup_entries (provider_key, request_id);
CREATE TABLE IF NOT EXISTS catchup_tree (
    provider_key BLOB NOT NULL,
    level        INTEGER NOT NULL,
    idx          INTEGER NOT NULL,
    hash         BLOB NOT NULL,
    PRIMARY KEY (provider_key, level, idx)
) WITHOUT ROWID;
"""

LEASE_SCHEMA = """
CREATE TABLE IF NOT EXISTS witness_leases (
    provider_key BLOB PRIMARY KEY,
    holder       TEXT NOT NULL,               -- the peer id of the gateway replica witnessing this provider
    expires_ms   INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS replica_cosigned (
    witness      TEXT NOT NULL,               -- llorch-witness/<peer id> of a replica
    provider_key BLOB NOT NULL,
    size         INTEGER NOT NULL,            -- the largest checkpoint this replica cosigned for the provider
    root         BLOB NOT NULL,
    PRIMARY KEY (witness, provider_key)
);
"""

SCHEMA = """
CREATE TABLE IF NOT EXISTS witnessed (
    provider_key BLOB PRIMARY KEY,
    size         INTEGER NOT NULL,
    root         BLOB NOT NULL,
    head_hash    BLOB NOT NULL,
    compact      BLOB NOT NULL,
    note         BLOB NOT NULL,
    checked_ms   INTEGER NOT NULL DEFAULT 0     -- last witness round that saw this ledger (changed or not)
);
CREATE TABLE IF NOT EXISTS provider_entries (
    provider_key BLOB NOT NULL,
    idx          INTEGER NOT NULL,
    request_id   TEXT NOT NULL,
    entry        BLOB NOT NULL,
    PRIMARY KEY (provider_key, idx)
);
CREATE TABLE IF NOT EXISTS provider_tree (
    provider_key BLOB NOT NULL,
    level        INTEGER NOT NULL,
    idx          INTEGER NOT NULL,
    hash         BLOB NOT NULL,
    PRIMARY KEY (provider_key, level, idx)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS forks (
    provider_key BLOB PRIMARY KEY,
    detected_ms  INTEGER NOT NULL,
    reason       TEXT NOT NULL,
    evidence     TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS fork_history (
    provider_key  BLOB NOT NULL,
    detected_ms   INTEGER NOT NULL,
    reason        TEXT NOT NULL,
    evidence      TEXT NOT NULL,
    readmitted_ms INTEGER NOT NULL,
    note          TEXT NOT NULL
);
"""


class WitnessBook:
    """The witness's state in the gateway database."""

    def __init__(self, database: Database) -> None:
        self._database = database

    async def state(self, provider_key: bytes) -> WitnessedState:
        row = await self._database.fetchone(
            "SELECT size, root, head_hash, compact, note FROM witnessed WHERE provider_key = ?", (provider_key,))
        if row is None:
            return WitnessedState.empty()
        size, root, head, compact_bytes, note = row
        nodes = [(level, hash_) for level, hash_ in canonical.decode(compact_bytes)]
        return WitnessedState(size, root, head, merkle.CompactRange(size, nodes), note)

    async def advance(self, provider_key: bytes, old: WitnessedState, new: WitnessedState, entries: list[bytes],
                      request_ids: list[str], nodes: list | None = None, witness: str | None = None) -> None:
        """Keep ``entries`` (verified by ``extend``; ``request_ids``: theirs, in order) and the new state."""
        assert len(request_ids) == len(entries) == new.size - old.size
        compact = canonical.encode([[level, hash_] for level, hash_ in new.compact.nodes])
        rows = [(provider_key, old.size + offset, request_id, entry)
                for offset, (request_id, entry) in enumerate(zip(request_ids, entries))]
        await self._database.transaction([
            ("INSERT INTO provider_entries (provider_key, idx, request_id, entry) VALUES (?, ?, ?, ?)", rows),
            ("INSERT INTO provider_tree (provider_key, level, idx, hash) VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING",
             [(provider_key, level, at, hash_) for level, at, hash_ in nodes or []]),
            ("INSERT INTO witnessed (provider_key, size, root, head_hash, compact, note, checked_ms) "
             "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (provider_key) DO UPDATE SET size = excluded.size, "
             "root = excluded.root, head_hash = excluded.head_hash, compact = excluded.compact, "
             "note = excluded.note, checked_ms = excluded.checked_ms",
             [(provider_key, new.size, new.root, new.head_hash, compact, new.note, now_ms())]),
            *([self.cosigned_statement(witness, provider_key, new.size, new.root)] if witness else [])])

    async def catchup(self, provider_key: bytes) -> CatchUp | None:
        """The catch-up under way for this provider, if any."""
        row = await self._database.fetchone("SELECT target_note, size, head_hash, compact FROM witness_catchup "
                                            "WHERE provider_key = ?", (provider_key,))
        if row is None:
            return None
        note, size, head, compact_bytes = row
        target = open_checkpoint(note, ledger_origin(provider_key), provider_key)     # checked when it was kept
        nodes = [(level, hash_) for level, hash_ in canonical.decode(compact_bytes)]
        return CatchUp(target, note, size, head, merkle.CompactRange(size, nodes))

    async def stage_page(self, provider_key: bytes, old_size: int, progress: CatchUp, entries: list[bytes],
                         request_ids: list[str], nodes: list) -> None:
        """Keep one verified page of a catch-up and the progress past it, in one transaction (a restart resumes
        after the last page kept)."""
        compact = canonical.encode([[level, hash_] for level, hash_ in progress.compact.nodes])
        await self._database.transaction([
            ("INSERT INTO catchup_entries (provider_key, idx, request_id, entry) VALUES (?, ?, ?, ?)",
             [(provider_key, old_size + offset, request_id, entry)
              for offset, (request_id, entry) in enumerate(zip(request_ids, entries))]),
            ("INSERT INTO catchup_tree (provider_key, level, idx, hash) VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING",
             [(provider_key, level, at, hash_) for level, at, hash_ in nodes]),
            ("INSERT INTO witness_catchup (provider_key, target_note, size, head_hash, compact) VALUES (?, ?, ?, ?, ?) "
             "ON CONFLICT (provider_key) DO UPDATE SET target_note = excluded.target_note, size = excluded.size, "
             "head_hash = excluded.head_hash, compact = excluded.compact",
             [(provider_key, progress.note, progress.size, progress.head_hash, compact)])])

    async def finish_catchup(self, provider_key: bytes, new: WitnessedState, witness: str) -> None:
        """The catch-up reached its target and the root matched: its staged entries and subtrees become witnessed,
        with the new state and this witness's cosignature, in one transaction."""
        compact = canonical.encode([[level, hash_] for level, hash_ in new.compact.nodes])
        await self._database.transaction([
            ("INSERT INTO provider_entries (provider_key, idx, request_id, entry) SELECT provider_key, idx, "
             "request_id, entry FROM catchup_entries WHERE provider_key = ?", [(provider_key,)]),
            ("INSERT INTO provider_tree (provider_key, level, idx, hash) SELECT provider_key, level, idx, hash "
             "FROM catchup_tree WHERE provider_key = ? ON CONFLICT DO NOTHING", [(provider_key,)]),
            ("INSERT INTO witnessed (provider_key, size, root, head_hash, compact, note, checked_ms) "
             "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (provider_key) DO UPDATE SET size = excluded.size, "
             "root = excluded.root, head_hash = excluded.head_hash, compact = excluded.compact, "
             "note = excluded.note, checked_ms = excluded.checked_ms",
             [(provider_key, new.size, new.root, new.head_hash, compact, new.note, now_ms())]),
            self.cosigned_statement(witness, provider_key, new.size, new.root),
            *self.drop_catchup_statements(provider_key)])

    @staticmethod
    def drop_catchup_statements(provider_key: bytes) -> list[tuple]:
        return [(f"DELETE FROM {table} WHERE provider_key = ?", [(provider_key,)])
                for table in ("catchup_entries", "catchup_tree", "witness_catchup")]

    async def drop_catchup(self, provider_key: bytes) -> None:
        await self._database.transaction(self.drop_catchup_statements(provider_key))

    @staticmethod
    def cosigned_statement(witness: str, provider_key: bytes, size: int, root: bytes) -> tuple:
        return ("INSERT INTO replica_cosigned (witness, provider_key, size, root) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (witness, provider_key) DO UPDATE SET size = excluded.size, root = excluded.root",
                [(witness, provider_key, size, root)])

    async def record_cosigned(self, witness: str, provider_key: bytes, size: int, root: bytes) -> None:
        await self._database.transaction([self.cosigned_statement(witness, provider_key, size, root)])

    async def cosigned_by(self, witness: str, provider_key: bytes) -> tuple[int, bytes] | None:
        """The largest size (and its root) ``witness`` cosigned for the provider, if any."""
        return await self._database.fetchone(
            "SELECT size, root FROM replica_cosigned WHERE witness = ? AND provider_key = ?", (witness, provider_key))

    async def known_request_ids(self, provider_key: bytes, request_ids: list[str]) -> set[str]:
        """Which of ``request_ids`` this provider's witnessed ledger already holds (or a catch-up staged)."""
        known: set[str] = set()
        unique = sorted(set(request_ids))
        for table in ("provider_entries", "catchup_entries"):
            for start in range(0, len(unique), 500):
                chunk = unique[start:start + 500]
                known.update(row[0] for row in await self._database.fetchall(
                    f"SELECT request_id FROM {table} WHERE provider_key = ? AND request_id IN "
                    f"({','.join('?' * len(chunk))})", (provider_key, *chunk)))
        return known

    async def touch(self, provider_key: bytes, state: WitnessedState, note: bytes) -> None:
        """Record a round that found the ledger unchanged (reconciliation trusts receipts to be there by then), also
        for a ledger still empty: a provider that never wrote a receipt was seen to have none."""
        compact = canonical.encode([[level, hash_] for level, hash_ in state.compact.nodes])
        await self._database.transaction([(
            "INSERT INTO witnessed (provider_key, size, root, head_hash, compact, note, checked_ms) "
            "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (provider_key) DO UPDATE SET checked_ms = excluded.checked_ms",
            [(provider_key, state.size, state.root, state.head_hash, compact, state.note or note, now_ms())])])

    async def inclusion_proof(self, provider_key: bytes, index: int) -> tuple[int, bytes | None, list[bytes]]:
        """(cosigned size, cosigned note, RFC 9162 inclusion proof of entry ``index`` at that size), reading only the
        O(log n) stored subtree hashes the proof needs. Size 0 and no note when the entry is not covered yet."""
        state = await self.state(provider_key)
        if index >= state.size:
            return state.size, None, []
        compute = lambda subtree: merkle.inclusion_proof(subtree, index, state.size)  # noqa: E731
        wanted = sorted(set(needed_nodes(compute)))
        hashes = {}
        for level, at in wanted:
            row = await self._database.fetchone(
                "SELECT hash FROM provider_tree WHERE provider_key = ? AND level = ? AND idx = ?",
                (provider_key, level, at))
            if row is not None:
                hashes[(level, at)] = row[0]
        if len(hashes) < len(wanted):       # witnessed before subtrees were kept: rebuild from the entries
            rows = await self._database.fetchall(
                "SELECT entry FROM provider_entries WHERE provider_key = ? AND idx < ? ORDER BY idx",
                (provider_key, state.size))
            tree = merkle.MemoryTree([merkle.leaf_hash(row[0]) for row in rows])
            return state.size, state.note, merkle.inclusion_proof(tree.subtree, index, state.size)
        return state.size, state.note, compute(
            lambda start, size: hashes[(size.bit_length() - 1, start >> (size.bit_length() - 1))])

    async def record_fork(self, provider_key: bytes, reason: str, evidence: list[str]) -> None:
        await self._database.transaction([(
            "INSERT INTO forks (provider_key, detected_ms, reason, evidence) VALUES (?, ?, ?, ?) "
            "ON CONFLICT DO NOTHING",
            [(provider_key, now_ms(), reason, json.dumps(evidence))])])

    async def forked(self) -> set[bytes]:
        return {row[0] for row in await self._database.fetchall("SELECT provider_key FROM forks")}

    async def readmit(self, provider_key: bytes, note: str, now_ms: int) -> None:
        """The operator reviewed the fork evidence and lets the provider back (its own operator's mistake, e.g. two
        processes on one ledger). One transaction: the evidence moves to ``fork_history`` with the operator's
        note, and the witnessed state of the provider is dropped, so the next round starts a new epoch on the
        ledger it shows now and checks every later round against that, as before. Checkpoints the gateway
        cosigned in the old epoch stay valid evidence for any auditor holding one."""
        if await self.fork_evidence(provider_key) is None:
            raise StoreError(f"provider {peer_id_of(provider_key)} is not excluded for a fork")
        await self._database.transaction([
            ("INSERT INTO fork_history (provider_key, detected_ms, reason, evidence, readmitted_ms, note) "
             "SELECT provider_key, detected_ms, reason, evidence, ?, ? FROM forks WHERE provider_key = ?",
             [(now_ms, note, provider_key)]),
            ("DELETE FROM forks WHERE provider_key = ?", [(provider_key,)]),
            ("DELETE FROM witnessed WHERE provider_key = ?", [(provider_key,)]),
            ("DELETE FROM provider_entries WHERE provider_key = ?", [(provider_key,)]),
            ("DELETE FROM provider_tree WHERE provider_key = ?", [(provider_key,)]),
            *self.drop_catchup_statements(provider_key)])

    async def fork_history(self, provider_key: bytes | None = None) -> list[dict]:
        """Every fork ever recorded (current ones with readmitted_ms None), oldest first."""
        where, params = ("WHERE provider_key = ?", (provider_key,)) if provider_key else ("", ())
        rows = await self._database.fetchall(
            f"SELECT provider_key, detected_ms, reason, evidence, readmitted_ms, note FROM ("
            f" SELECT provider_key, detected_ms, reason, evidence, readmitted_ms, note FROM fork_history"
            f" UNION ALL SELECT provider_key, detected_ms, reason, evidence, NULL, NULL FROM forks) AS every_fork "
            f"{where} "
            f"ORDER BY detected_ms", params)
        return [{"provider_id": peer_id_of(key), "detected_ms": detected, "reason": reason,
                 "evidence": json.loads(evidence), "readmitted_ms": readmitted, "note": note}
                for key, detected, reason, evidence, readmitted, note in rows]

    async def exclusion(self, provider_key: bytes) -> tuple[int, str] | None:
        """(detected_ms, reason) of the fork evidence that excludes this provider now, or None."""
        row = await self._database.fetchone("SELECT detected_ms, reason FROM forks WHERE provider_key = ?",
                                            (provider_key,))
        return None if row is None else (row[0], row[1])

    async def fork_evidence(self, provider_key: bytes) -> tuple[str, list[str]] | None:
        row = await self._database.fetchone("SELECT reason, evidence FROM forks WHERE provider_key = ?",
                                            (provider_key,))
        return None if row is None else (row[0], json.loads(row[1]))


def provider_signed(note: bytes) -> bytes:
    """A cosigned checkpoint note with only its first signature, the provider's own (cosignatures dropped)."""
    parsed = parse_note(note)
    return Note(parsed.text, parsed.signatures[:1]).to_bytes()


class WitnessLeases:
    """Gateway replicas sharing a database share out the witnessing: one replica at a time holds a provider's lease
    (``witness_leases``) and runs the full round (entries fetched and verified, the shared state advanced); it renews
    the lease every round, and a lease not renewed for ``lease_ms`` (its replica died) is taken by the next replica
    that tries. The others cosign what the holder verified, after their own checks (``Witness._cosign_verified``)."""

    def __init__(self, database: Database, holder: str, lease_ms: int) -> None:
        self.database, self.holder, self.lease_ms = database, holder, lease_ms

    async def hold(self, provider_key: bytes, now: int) -> bool:
        """Take or renew the provider's lease if it is free, lapsed or ours; whether this replica holds it."""
        await self.database.transaction([(
            "INSERT INTO witness_leases (provider_key, holder, expires_ms) VALUES (?, ?, ?) "
            "ON CONFLICT (provider_key) DO UPDATE SET holder = excluded.holder, expires_ms = excluded.expires_ms "
            "WHERE witness_leases.holder = excluded.holder OR witness_leases.expires_ms < ?",
            [(provider_key, self.holder, now + self.lease_ms, now)])])
        row = await self.database.fetchone("SELECT holder FROM witness_leases WHERE provider_key = ?", (provider_key,))
        return row is not None and row[0] == self.holder


class Witness:
    """Runs witness rounds for providers; forked providers are reported to ``on_fork``. With ``leases`` (replicas
    sharing a database), the full round only for providers whose lease this replica holds."""

    def __init__(self, p2p: P2P, key: SigningKey, book: WitnessBook, on_fork,
                 leases: WitnessLeases | None = None) -> None:
        self.p2p = p2p
        self.key = key
        self.book = book
        self.on_fork = on_fork
        self.leases = leases
        self.name = witness_name(key.public_key)

    async def witness(self, provider_key: bytes, addrs: list[str]) -> WitnessedState | None:
        """One round for one provider. Returns the new state, or None if the provider could not be witnessed."""
        if self.leases is not None and not await self.leases.hold(provider_key, now_ms()):
            return await self._unless_forked(provider_key, "cosign", self._cosign_verified(provider_key, addrs))
        return await self._unless_forked(provider_key, "witness", self._full_round(provider_key, addrs))

    async def _unless_forked(self, provider_key: bytes, what: str, round_) -> WitnessedState | None:
        """Run a round: a fork it finds is recorded and reported (``on_fork``); a view it cannot use is logged and
        left for the next round. None in both cases."""
        try:
            return await round_
        except ForkDetected as fork:
            log.error("provider %s FORKED its ledger: %s", peer_id_of(provider_key), fork)
            await self.book.record_fork(provider_key, str(fork), fork.evidence)
            self.on_fork(provider_key)
        except (BadView, LedgerRequestFailed) as exc:
            log.warning("could not %s %s this round: %s", what, peer_id_of(provider_key), exc)
        return None

    async def _full_round(self, provider_key: bytes, addrs: list[str]) -> WitnessedState:
        """Fetch the checkpoint, check it against what was witnessed, fetch and verify the new entries, advance the
        witnessed state, cosign and hand the cosigned note back. ForkDetected, BadView or LedgerRequestFailed."""
        state = await self.book.state(provider_key)
        reply = await request_ledger(self.p2p, provider_key, addrs, GetCheckpoint())
        checkpoint = check_checkpoint(state, reply.note, provider_key)
        progress = await self.book.catchup(provider_key)
        if progress is not None or checkpoint.size - state.size > ENTRIES_PER_PAGE:
            return await self._catch_up(provider_key, addrs, state, progress, checkpoint, reply.note)
        if checkpoint.size == state.size:
            await self.book.touch(provider_key, state, reply.note)
            return state
        if state.size:
            proof = await request_ledger(self.p2p, provider_key, addrs, GetConsistency(state.size, checkpoint.size))
            check_consistency(state, checkpoint, reply.note, proof.hashes)
        entries = await self._fetch_entries(provider_key, addrs, state.size, checkpoint.size)
        nodes: list = []
        # Checked in a worker thread, at about 0.2 ms an entry: trio's thread serves customers' requests meanwhile
        # (Ed25519 verification, most of the work, releases the GIL).
        request_ids = await trio.to_thread.run_sync(request_ids_of, entries)
        earlier = await self.book.known_request_ids(provider_key, request_ids)
        new_state = await trio.to_thread.run_sync(extend, state, checkpoint, reply.note, entries, provider_key, nodes,
                                                  earlier)
        cosigned = cosign(reply.note, self.name, self.key, now_ms() // 1000)       # the note ``extend`` checked
        new_state = WitnessedState(new_state.size, new_state.root, new_state.head_hash, new_state.compact, cosigned)
        await self.book.advance(provider_key, state, new_state, entries, request_ids, nodes, self.name)
        await self._hand_back(provider_key, addrs, cosigned)
        return new_state

    async def _catch_up(self, provider_key: bytes, addrs: list[str], state: WitnessedState,
                        progress: CatchUp | None, checkpoint: Checkpoint, note: bytes) -> WitnessedState:
        """More new entries than a page: verify up to PAGES_PER_ROUND pages toward a fixed target (the checkpoint
        the catch-up started on), staging each page with the progress past it, so memory holds one page and a
        restart resumes. At the target, the root must match: then everything staged becomes witnessed and the
        target is cosigned. Returns the witnessed state (unchanged until the target is reached)."""
        if progress is None:
            if state.size:
                proof = await request_ledger(self.p2p, provider_key, addrs, GetConsistency(state.size,
                                                                                           checkpoint.size))
                check_consistency(state, checkpoint, note, proof.hashes)
            progress = CatchUp(checkpoint, note, state.size, state.head_hash, state.compact.copy())
            log.info("witness of %s is %d entries behind: catching up in pages of %d", peer_id_of(provider_key),
                     checkpoint.size - state.size, ENTRIES_PER_PAGE)
        target = progress.target
        for _ in range(PAGES_PER_ROUND):
            if progress.size == target.size:
                break
            end = min(target.size, progress.size + ENTRIES_PER_PAGE)
            entries = await self._fetch_entries(provider_key, addrs, progress.size, end)
            request_ids = await trio.to_thread.run_sync(request_ids_of, entries)
            earlier = await self.book.known_request_ids(provider_key, request_ids)
            nodes: list = []
            try:
                head, compact = await trio.to_thread.run_sync(continue_with, progress.size, progress.head_hash,
                                                              progress.compact, entries, provider_key, nodes,
                                                              earlier)
            except BadView:
                await self.book.drop_catchup(provider_key)     # next round starts over on what it shows then
                raise
            old_size = progress.size
            progress = CatchUp(target, progress.note, end, head, compact)
            await self.book.stage_page(provider_key, old_size, progress, entries, request_ids, nodes)
        if progress.size < target.size:
            log.info("witness of %s: %d of %d entries verified; continuing next round", peer_id_of(provider_key),
                     progress.size, target.size)
            return state
        if progress.compact.root() != target.root:
            await self.book.drop_catchup(provider_key)
            raise ForkDetected(f"the entries up to {target.size} do not give the signed root",
                               [progress.note.decode(), f"(entries give root {progress.compact.root().hex()})"])
        cosigned = cosign(progress.note, self.name, self.key, now_ms() // 1000)
        new_state = WitnessedState(target.size, target.root, progress.head_hash, progress.compact, cosigned)
        await self.book.finish_catchup(provider_key, new_state, self.name)
        log.info("witness of %s caught up: %d entries cosigned", peer_id_of(provider_key), target.size)
        await self._hand_back(provider_key, addrs, cosigned)
        return new_state

    async def _cosign_verified(self, provider_key: bytes, addrs: list[str]) -> WitnessedState:
        """A replica without the lease: check the provider's current checkpoint against the shared state (a second
        view of a witnessed size, or one not consistent with it, is a fork: a split view shown to two replicas is
        caught here), then cosign the checkpoint the lease holder verified, once it is consistent with the last one
        this replica cosigned (a proof from the provider, checked here). ForkDetected, BadView or
        LedgerRequestFailed."""
        state = await self.book.state(provider_key)
        mine = await self.book.cosigned_by(self.name, provider_key)
        reply = await request_ledger(self.p2p, provider_key, addrs, GetCheckpoint())
        checkpoint = check_checkpoint(state, reply.note, provider_key)
        if state.size and checkpoint.size > state.size:
            proof = await request_ledger(self.p2p, provider_key, addrs, GetConsistency(state.size, checkpoint.size))
            check_consistency(state, checkpoint, reply.note, proof.hashes)
        if not state.size or (mine is not None and mine[0] >= state.size):
            return state
        assert state.note is not None                  # a witnessed size has its cosigned note
        verified = check_checkpoint(state, provider_signed(state.note), provider_key)
        if mine is not None and mine[0]:
            earlier = WitnessedState(mine[0], mine[1], ZERO_HASH, merkle.CompactRange(), None)
            proof = await request_ledger(self.p2p, provider_key, addrs, GetConsistency(mine[0], state.size))
            check_consistency(earlier, verified, state.note, proof.hashes)
        cosigned = cosign(provider_signed(state.note), self.name, self.key, now_ms() // 1000)
        await self.book.record_cosigned(self.name, provider_key, state.size, state.root)
        await self._hand_back(provider_key, addrs, cosigned)
        return state

    async def _hand_back(self, provider_key: bytes, addrs: list[str], cosigned: bytes) -> None:
        try:
            await request_ledger(self.p2p, provider_key, addrs, PutCosigned(cosigned))
        except LedgerRequestFailed as exc:
            log.info("provider %s did not take the cosigned checkpoint: %s", peer_id_of(provider_key), exc)

    async def _fetch_entries(self, provider_key: bytes, addrs: list[str], start: int, end: int) -> list[bytes]:
        entries: list[bytes] = []
        while start + len(entries) < end:
            reply = await request_ledger(self.p2p, provider_key, addrs, GetEntries(start + len(entries), end))
            if reply.start != start + len(entries):
                raise BadView("entries reply starts at the wrong index")
            entries.extend(reply.entries)
        return entries[:end - start]


class WitnessSchedule:
    """When each provider is next due, and how the witness keeps up. A provider is due ``spacing()`` after its last
    round began (a new one at once): ``interval_s`` in a small market; in a large one the rounds are spread so that
    there are about WITNESS_ROUNDS_PER_S a second (each costs CPU: bench/market_scale.py measures it), but never
    further apart than 80% of ``period_s``, the stated period: every listed provider is witnessed at least once per
    period while the gateway keeps up. Due rounds run most overdue first, ``at_once()`` side by side: twice what
    that rate needs at the mean round's wall time (a round mostly waits on its provider), WITNESS_AT_ONCE_MAX at
    most."""

    def __init__(self, interval_s: float, period_s: float, at_once: int = PROVIDERS_AT_ONCE) -> None:
        self.interval_s, self.period_s, self.least_at_once = interval_s, max(period_s, interval_s), at_once
        self.addrs: dict[bytes, list[str]] = {}
        self.began: dict[bytes, float] = {}           # provider → when its last round began (trio's clock)
        self.listed_at: dict[bytes, float] = {}       # provider → when it was first listed
        self._due: list[tuple[float, bytes]] = []
        self._queued: set[bytes] = set()
        self._running: set[bytes] = set()             # a provider whose round runs is queued again when it ends
        self.round_s = 0.0                            # mean wall time of a round (EWMA)
        self.rounds = 0

    def relist(self, providers: list[tuple[bytes, list[str]]], now: float) -> None:
        """The providers to witness now (new ones are due at once; those no longer listed are forgotten)."""
        self.addrs = {key: addrs for key, addrs in providers}
        for key in [key for key in self.began if key not in self.addrs]:
            del self.began[key]
        for key in [key for key in self.listed_at if key not in self.addrs]:
            del self.listed_at[key]
        for key in self.addrs:
            self.listed_at.setdefault(key, now)
            if key not in self._queued and key not in self._running:
                self._queued.add(key)
                began = self.began.get(key)
                heapq.heappush(self._due, (now if began is None else began + self.spacing(), key))

    def next_due(self) -> tuple[float, bytes] | None:
        while self._due and self._due[0][1] not in self.addrs:
            self._queued.discard(heapq.heappop(self._due)[1])
        return self._due[0] if self._due else None

    def take(self, now: float) -> bytes:
        _, key = heapq.heappop(self._due)
        self._queued.discard(key)
        self._running.add(key)
        self.began[key] = now
        return key

    def done(self, key: bytes, began: float, now: float) -> None:
        self.round_s = (now - began) if self.rounds == 0 else 0.9 * self.round_s + 0.1 * (now - began)
        self.rounds += 1
        self._running.discard(key)
        if key in self.addrs and key not in self._queued:
            self._queued.add(key)
            heapq.heappush(self._due, (began + self.spacing(), key))

    def spacing(self) -> float:
        """How long after a provider's round began it is due again."""
        return max(self.interval_s, min(0.8 * self.period_s, len(self.addrs) / WITNESS_ROUNDS_PER_S))

    def at_once(self) -> int:
        needed = math.ceil(2 * len(self.addrs) / self.spacing() * self.round_s)   # twice: a backlog clears too
        return max(self.least_at_once, min(WITNESS_AT_ONCE_MAX, needed))

    def behind(self, now: float) -> list[bytes]:
        """Listed providers not witnessed (begun) within the period."""
        return [key for key in self.addrs if now - self.began.get(key, self.listed_at[key]) > self.period_s]


async def witness_forever(witness, providers, interval_s: float, period_s: float = WITNESS_PERIOD_S,
                          schedule: WitnessSchedule | None = None) -> None:
    """Witness each provider ``await providers()`` returns as (key, addrs) as ``WitnessSchedule`` says: every
    ``interval_s`` at most, every ``period_s`` at least while the gateway keeps up, several side by side (a round
    mostly waits on its provider; one slow provider delays nobody else's). The list is read again every interval.
    A fault while witnessing one provider is logged and skips that provider for the round; it never ends the loop.
    Falling behind the period is said once a minute at most."""
    schedule = schedule or WitnessSchedule(interval_s, period_s)
    limiter = trio.CapacityLimiter(schedule.least_at_once)
    wake = trio.Event()
    said_ms = [0.0]

    async def one(provider_key: bytes, addrs: list[str], began: float, borrower: object) -> None:
        try:
            with trio.move_on_after(max(interval_s, 30.0)):
                try:
                    await witness.witness(provider_key, addrs)
                except Exception as exc:   # a bad address, a damaged row: this provider, this round only
                    log.error("witnessing %s failed: %s: %s", peer_id_of(provider_key), type(exc).__name__, exc)
        finally:
            schedule.done(provider_key, began, trio.current_time())
            limiter.release_on_behalf_of(borrower)
            wake.set()

    async def lister() -> None:
        while True:
            schedule.relist(await providers(), trio.current_time())
            wake.set()
            now = trio.current_time()
            behind = schedule.behind(now)
            if behind and now - said_ms[0] >= 60:
                said_ms[0] = now
                log.warning("witness behind: %d of %d providers not witnessed within %.0f s (rounds take %.2f s, "
                            "%d at once)", len(behind), len(schedule.addrs), schedule.period_s, schedule.round_s,
                            limiter.total_tokens)
            await trio.sleep(interval_s)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(lister)
        while True:
            limiter.total_tokens = schedule.at_once()
            due = schedule.next_due()
            now = trio.current_time()
            if due is None or due[0] > now:
                wake = trio.Event()
                with trio.move_on_after(1.0 if due is None else due[0] - now):
                    await wake.wait()
                continue
            borrower = object()
            await limiter.acquire_on_behalf_of(borrower)
            now = trio.current_time()
            if schedule.next_due() != due:           # the list changed while waiting for room
                limiter.release_on_behalf_of(borrower)
                continue
            key = schedule.take(now)
            nursery.start_soon(one, key, schedule.addrs[key], now, borrower)
