"""The offline auditor: check a provider's ledger (a SQLite file or an exported bundle), step by step.

Every failure raises VerificationError with the check number, a stable code, the entry (or checkpoint size) it is
about, and evidence where there is some. The numbers are the ones in docs/ledger.md.

  Per entry, in ledger order:
  (1)  LV01 malformed        canonical envelope of a well-typed receipt
  (2)  LV02 unknown key      signed by the ledger's owner: the key of entry 0, which must be a trusted key when
                             the auditor gives a list of them
  (3)  LV03 bad signature    Ed25519 under the owner's key with the receipt domain tag
  (4)  LV04 index gap        the entry's index is its position
  (5)  LV05 chain break      prev_hash is SHA-256 of the previous entry's bytes (zeros for entry 0)
  (10) LV10 duplicate        no request_id appears twice
  (11) LV11 amount           amount = ceil((tokens_in × price_in + tokens_out × price_out) / 1,000,000)
  Then the checkpoints (the ledger's own, its cosigned copies, and one the auditor holds); an empty ledger's owner
  is the key its checkpoints' origin names:
  (7)  LV07 bad checkpoint   a C2SP signed note with a valid signature by the ledger's owner
  (12) LV12 bad cosignature  every cosignature on a cosigned copy is a valid tlog-cosignature of its witness
  (9)  LV09 rollback         no checkpoint or cosigned copy is for a larger tree than the ledger holds
  (6)  LV06 root mismatch    each of them has the Merkle root of the entries at that size
  (8)  LV08 fork             the auditor's checkpoint agrees with the ledger at its size (both are printed if not)
  (13) LV13 witness quorum   with a quorum K: at least K of the auditor's trusted witnesses cosigned the ledger
"""

from __future__ import annotations

import base64
import collections
import itertools
import multiprocessing
import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from llorch.ledger import merkle
from llorch.ledger.chain import EntryFacts, check_continues, inspect_entry
from llorch.ledger.errors import ChainBreak, EncodingError, StoreError, VerificationError
# Reading ledgers lives in material.py; these names stay importable from here, where callers first found them.
from llorch.ledger.material import LedgerMaterial, load_material, read_sqlite_entries  # noqa: F401
from llorch.ledger.note import (Checkpoint, NoteError, check_cosignatures, open_checkpoint, parse_checkpoint_text,
                               parse_note)
from llorch.ledger.objects import ZERO_HASH, ledger_origin
from llorch.ledger.signing import peer_id_of, public_key_of_peer_id

CHECKS = {
    1: ("LV01", "malformed"),
    2: ("LV02", "unknown key"),
    3: ("LV03", "bad signature"),
    4: ("LV04", "index gap"),
    5: ("LV05", "chain break"),
    6: ("LV06", "Merkle root mismatch"),
    7: ("LV07", "bad checkpoint"),
    8: ("LV08", "fork"),
    9: ("LV09", "rollback"),
    10: ("LV10", "duplicate request_id"),
    11: ("LV11", "amount mismatch"),
    12: ("LV12", "bad cosignature"),
    13: ("LV13", "witness quorum"),
}
# Ledgers this big are inspected by worker processes (signature checks dominate and are independent per entry).
PARALLEL_THRESHOLD_ENTRIES = 20_000
PARALLEL_CHUNK_ENTRIES = 500      # a window of 2 × workers chunks is in flight: bounded memory
PARALLEL_WORKERS_MAX = 8


@dataclass(frozen=True)
class WitnessedSize:
    """One cosignature on one cosigned copy: who, for which size, when; ``checked`` if its key is known (a
    llorch-witness/<peer id> name) and so verified; ``trusted`` if that key is one the auditor named."""
    witness: str
    size: int
    timestamp_s: int | None
    checked: bool
    trusted: bool


@dataclass(frozen=True)
class VerifyReport:
    entries: int
    origin: str | None
    head_sha256: bytes
    root: bytes
    checkpoints: int
    held_checkpoint_size: int | None
    cosignatures: list[WitnessedSize]
    quorum_size: int | None = None      # with a quorum K: the largest size at least K trusted witnesses vouch for


def _fail(check: int, entry: int | None, message: str, evidence: list[str] | None = None) -> VerificationError:
    return VerificationError(check, CHECKS[check][0], entry, message, evidence=evidence)


def _fail_checkpoint(check: int, size: int | None, message: str, evidence: list[str] | None = None
                     ) -> VerificationError:
    return VerificationError(check, CHECKS[check][0], None, message, checkpoint_size=size, evidence=evidence)


def verify(material: LedgerMaterial, trusted_keys: set[bytes] | None = None,
           held_checkpoint: bytes | None = None, witness_keys: set[bytes] | None = None,
           now_s: int | None = None, quorum: int | None = None) -> VerifyReport:
    """Run every check; raise VerificationError at the first failure. ``witness_keys`` are the witnesses the
    auditor trusts (every cosignature is checked either way; the report says which are trusted); ``now_s`` is the
    auditor's clock for cosignature times (default: now). ``quorum`` K (needs ``witness_keys``): at least K distinct
    trusted witnesses must have cosigned a checkpoint of this ledger (check 13)."""
    now_s = int(time.time()) if now_s is None else now_s
    wanted = _claimed_sizes([*material.checkpoints, *material.cosigned,
                             *([held_checkpoint] if held_checkpoint else [])])
    owner, tree, head, roots = _verify_entries(material.entries, material.entry_count, trusted_keys, wanted)
    size = tree.size
    if owner is None:           # an empty ledger: its owner is the one its checkpoints name in their origin
        owner = _owner_of_empty_ledger([*material.checkpoints, *material.cosigned,
                                        *([held_checkpoint] if held_checkpoint else [])], trusted_keys)
    origin = ledger_origin(owner) if owner else None
    own = [_open_checkpoint(note, owner, origin, "ledger checkpoint") for note in material.checkpoints]
    copies = [_open_checkpoint(note, owner, origin, "cosigned checkpoint") for note in material.cosigned]
    held = _open_checkpoint(held_checkpoint, owner, origin, "the auditor's checkpoint") if held_checkpoint else None
    cosignatures = []
    for checkpoint, note in copies:                                                      # (12)
        assert origin is not None               # _open_checkpoint opened this copy, so the owner is known
        try:
            found = check_cosignatures(note, origin, now_s)
        except NoteError as exc:
            raise _fail_checkpoint(12, checkpoint.size, f"cosigned checkpoint of size {checkpoint.size}: {exc}",
                                   [note.decode("utf-8", "replace")]) from None
        cosignatures += [WitnessedSize(c.name, checkpoint.size, c.timestamp_s, c.public_key is not None,
                                       witness_keys is not None and c.public_key in witness_keys) for c in found]
    for checkpoint, note, what in [*((c, n, "the ledger signed") for c, n in own),       # (9) then (6)
                                   *((c, n, "a witness cosigned") for c, n in copies)]:
        if checkpoint.size > size:
            raise _fail_checkpoint(9, checkpoint.size, f"{what} a checkpoint of {checkpoint.size} entries but the "
                                                       f"ledger holds only {size}: entries were removed", [note.decode()])
        if roots[checkpoint.size] != checkpoint.root:
            raise _fail_checkpoint(6, checkpoint.size, f"{what} a checkpoint of size {checkpoint.size} with root "
                                                       f"{checkpoint.root.hex()}, the entries give "
                                                       f"{roots[checkpoint.size].hex()}", [note.decode()])
    if held is not None:
        checkpoint, note = held
        if checkpoint.size > size:                                                       # (9)
            raise _fail_checkpoint(9, checkpoint.size, f"the auditor holds a checkpoint of {checkpoint.size} entries, the "
                                            f"ledger has only {size}: it was rolled back", [note.decode()])
        ours = roots[checkpoint.size]
        if ours != checkpoint.root:                                                      # (8)
            same_size = [n for c, n in own if c.size == checkpoint.size]
            evidence = [note.decode(), same_size[0].decode() if same_size else
                        f"(the ledger's entries at size {checkpoint.size} give root "
                        f"{base64.b64encode(ours).decode()})"]
            raise _fail_checkpoint(8, checkpoint.size, f"two signed views of this log disagree at size {checkpoint.size}: "
                                            f"the provider forked its ledger", evidence)
    return VerifyReport(size, origin, head, tree.root(), len(own), held[0].size if held else None, cosignatures,
                        _quorum_size(cosignatures, quorum) if quorum else None)


def _quorum_size(cosignatures: list[WitnessedSize], quorum: int) -> int:
    """Check 13: the largest size that at least ``quorum`` distinct trusted witnesses cosigned (a witness that
    cosigned size S vouches for every size up to S: all the checkpoints were found consistent with the entries)."""
    largest: dict[str, int] = {}
    for cosignature in cosignatures:
        if cosignature.trusted:
            largest[cosignature.witness] = max(largest.get(cosignature.witness, 0), cosignature.size)
    if len(largest) < quorum:
        names = ", ".join(sorted(largest)) or "none"
        raise _fail_checkpoint(13, None, f"{len(largest)} of the trusted witnesses cosigned this ledger ({names}); "
                                         f"the quorum is {quorum}")
    return sorted(largest.values(), reverse=True)[quorum - 1]


def _owner_of_empty_ledger(notes: list[bytes], trusted_keys: set[bytes] | None) -> bytes | None:
    """The key named by the origin (llorch/<peer id>) of the first checkpoint of a ledger with no entries; None if
    it has no checkpoint either. The checkpoints' signatures are then checked under that key (check 7)."""
    if not notes:
        return None
    try:
        origin = parse_checkpoint_text(parse_note(notes[0]).text).origin
    except NoteError as exc:
        raise _fail_checkpoint(7, None, f"checkpoint is invalid: {exc}",
                               [notes[0].decode("utf-8", "replace")]) from None
    try:
        if not origin.startswith("llorch/"):
            raise EncodingError("not llorch/<peer id>")
        owner = public_key_of_peer_id(origin[len("llorch/"):])
    except EncodingError as exc:
        raise _fail_checkpoint(7, None, f"checkpoint origin {origin[:80]!r} names no ledger owner: {exc}") from None
    if trusted_keys is not None and owner not in trusted_keys:
        raise _fail(2, None, f"the ledger is signed by {peer_id_of(owner)}, which is not a trusted key")
    return owner


def _claimed_sizes(notes: list[bytes]) -> set[int]:
    """The tree sizes the checkpoints name, read before the entries so their roots can be taken as the entries
    stream past. Unsigned claims: a note that does not parse is named by check 7 later, after the entries."""
    sizes = {0}
    for note in notes:
        try:
            sizes.add(parse_checkpoint_text(parse_note(note).text).size)
        except NoteError:
            pass
    return sizes


def _inspect_chunk(chunk: list[bytes]) -> list[EntryFacts]:
    return [inspect_entry(data) for data in chunk]


def _inspected(entries: Iterable[bytes], count: int | None) -> Iterator[EntryFacts]:
    """EntryFacts in ledger order; on a multi-core machine, big ledgers are inspected by worker processes."""
    workers = min(os.cpu_count() or 1, PARALLEL_WORKERS_MAX)
    iterator = iter(entries)
    if count is None:     # not known in advance: look ahead (a bounded number of entries) to decide
        first = list(itertools.islice(iterator, PARALLEL_THRESHOLD_ENTRIES))
        iterator, count = itertools.chain(first, iterator), len(first)
    if workers < 2 or count < PARALLEL_THRESHOLD_ENTRIES:
        yield from (inspect_entry(data) for data in iterator)
        return
    window: collections.deque = collections.deque()
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        # Chunks are read here, in the caller's thread (a SQLite cursor must stay in its thread), and a bounded
        # window of them is in flight at a time.
        for chunk in _chunked(iterator, PARALLEL_CHUNK_ENTRIES):
            window.append(pool.apply_async(_inspect_chunk, (chunk,)))
            if len(window) > 2 * workers:
                yield from window.popleft().get()
        while window:
            yield from window.popleft().get()


def _chunked(iterator: Iterator[bytes], size: int) -> Iterator[list[bytes]]:
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


class _SeenRequestIds:
    """The request ids met so far and where, in a private temporary SQLite database (spilled to a temporary file
    once it outgrows SQLite's page cache), so that the auditor's memory does not grow with the ledger."""

    def __init__(self) -> None:
        self._database = sqlite3.connect("", isolation_level=None)
        self._database.execute("CREATE TABLE seen (request_id TEXT PRIMARY KEY, position INTEGER) WITHOUT ROWID")
        self._database.execute("BEGIN")

    def add(self, request_id: str, position: int) -> int | None:
        """Remember ``request_id`` at ``position``; return the position it was first seen at if it was."""
        try:
            self._database.execute("INSERT INTO seen VALUES (?, ?)", (request_id, position))
            return None
        except sqlite3.IntegrityError:
            return self._database.execute("SELECT position FROM seen WHERE request_id = ?", (request_id,)).fetchone()[0]

    def close(self) -> None:
        self._database.close()


def _verify_entries(entries: Iterable[bytes], count: int | None, trusted_keys: set[bytes] | None,
                    wanted_sizes: set[int]) -> tuple[bytes | None, merkle.CompactRange, bytes, dict[int, bytes]]:
    """Checks 1-5, 10 and 11 on every entry, in order; returns the owner, the tree, the head hash, and the root
    at each of ``wanted_sizes`` the ledger reaches. Memory: O(log n) for the tree, the rest on disk."""
    owner: bytes | None = None
    previous_hash = ZERO_HASH
    seen = _SeenRequestIds()
    tree = merkle.CompactRange()
    roots = {0: merkle.EMPTY_ROOT} if 0 in wanted_sizes else {}
    try:
        for position, facts in enumerate(_inspected(entries, count)):
            if facts.malformed is not None:                                              # (1)
                raise _fail(1, position, facts.malformed)
            if owner is None:                                                            # (2)
                owner = facts.provider_key
                if trusted_keys is not None and owner not in trusted_keys:
                    raise _fail(2, position, f"the ledger is signed by {peer_id_of(owner)}, which is not a trusted "
                                             f"key")
            first_seen = seen.add(facts.request_id, position)
            try:                                                                         # (2)-(5), (10), (11)
                check_continues(facts, owner, position, previous_hash, () if first_seen is None else
                                (facts.request_id,))
            except ChainBreak as exc:
                if exc.check == 10:
                    raise _fail(10, position, f"request_id {facts.request_id} already at entry {first_seen}")
                raise _fail(exc.check, position, str(exc)) from None
            previous_hash = facts.entry_sha256
            tree.append(facts.leaf)
            if tree.size in wanted_sizes:
                roots[tree.size] = tree.root()
    finally:
        seen.close()
    return owner, tree, previous_hash, roots


def _open_checkpoint(note: bytes, owner: bytes | None, origin: str | None, what: str) -> tuple[Checkpoint, bytes]:
    if owner is None or origin is None:
        raise AssertionError("an owner (so an origin) is known whenever there is a checkpoint to open")
    try:                                                                                 # (7)
        return open_checkpoint(note, origin, owner), note
    except NoteError as exc:
        raise _fail_checkpoint(7, None, f"{what} is invalid: {exc}", [note.decode("utf-8", "replace")]) from None


# --- inputs ------------------------------------------------------------------------------------------------------

def load_trusted_keys(path: Path) -> set[bytes]:
    """A trusted-keys file: one peer id (12D3KooW...) or 64-hex Ed25519 public key per line; # comments."""
    keys = set()
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        try:
            keys.add(bytes.fromhex(line) if len(line) == 64 else public_key_of_peer_id(line))
        except (ValueError, EncodingError):
            raise StoreError(f"{path}:{number}: not a peer id or a 64-hex public key: {line!r}") from None
    return keys


def verify_ledger_file(path: Path) -> VerifyReport:
    return verify(load_material(path))
