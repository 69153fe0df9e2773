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

import json
import logging
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

ENTRIES_PER_ROUND_MAX = 100_000


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
    compact, head = state.compact.copy(), state.head_hash
    in_batch: set[str] = set()
    for offset, entry in enumerate(entries):
        index = state.size + offset
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
    if compact.root() != checkpoint.root:
        raise ForkDetected(f"the entries up to {checkpoint.size} do not give the signed root",
                           [note.decode(), f"(entries give root {compact.root().hex()})"])
    return WitnessedState(checkpoint.size, checkpoint.root, head, compact, note)


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
        """Which of ``request_ids`` this provider's witnessed ledger already holds."""
        known: set[str] = set()
        unique = sorted(set(request_ids))
        for start in range(0, len(unique), 500):
            chunk = unique[start:start + 500]
            known.update(row[0] for row in await self._database.fetchall(
                f"SELECT request_id FROM provider_entries WHERE provider_key = ? AND request_id IN "
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
            ("DELETE FROM provider_tree WHERE provider_key = ?", [(provider_key,)])])

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
        if checkpoint.size == state.size:
            await self.book.touch(provider_key, state, reply.note)
            return state
        if checkpoint.size - state.size > ENTRIES_PER_ROUND_MAX:
            raise BadView(f"{checkpoint.size - state.size} new entries: more than one round takes")
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


async def witness_forever(witness: Witness, providers, interval_s: float) -> None:
    """Every ``interval_s``, witness each provider ``await providers()`` returns as (key, addrs). A fault while
    witnessing one provider is logged and skips that provider for the round; it never ends the loop."""
    while True:
        for provider_key, addrs in await providers():
            with trio.move_on_after(max(interval_s, 30.0)):
                try:
                    await witness.witness(provider_key, addrs)
                except Exception as exc:   # a bad address, a damaged row: this provider, this round only
                    log.error("witnessing %s failed: %s: %s", peer_id_of(provider_key), type(exc).__name__, exc)
        await trio.sleep(interval_s)
