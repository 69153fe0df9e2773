"""Idempotent group-committed appends, checkpoints, notes, /llorch/ledger/1 and the gateway witness."""

import json
import sqlite3
import subprocess
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
from libp2p.custom_types import TProtocol

from llorch.gateway.db import open_gateway_db
from llorch.gateway.witness.witness import (BadView, ForkDetected, Witness, WitnessBook, WitnessedState, check_checkpoint,
                             check_consistency, extend)
from llorch.ledger import merkle
from llorch.ledger.errors import ConflictError, StoreError
from llorch.ledger.note import (Checkpoint, NoteError, cosign, open_checkpoint, parse_note, sign_checkpoint,
                         verify_cosignature)
from llorch.ledger.objects import Receipt, ledger_origin
from llorch.gateway.localnet import llorch_command
from llorch.ledger.signing import SigningKey, write_key_file
from llorch.ledger.store import LedgerStore
from llorch.ledger.verify import load_material, verify
from llorch.node.errors import ProtocolError
from llorch.node.wire.frames import Error
from llorch.node.wire.infer_protocol import Role
from llorch.node.wire.ledger_protocol import (CheckpointReply, EntriesReply, GetCheckpoint, GetEntries, LedgerProtocol,
                                  ProofReply)
from llorch.node.ledger_service import LedgerService
from llorch.node.wire.ledger_protocol import LEDGER_PROTOCOL_ID, witness_name
from llorch.node.p2p import running_host
from tests.helpers import receipt_fields

FIXTURES = Path(__file__).parent / "fixtures" / "ledgers"

LOOPBACK = "/ip4/127.0.0.1/tcp/0"


# --- appends ---------------------------------------------------------------------------------------------------

async def test_same_receipt_again_returns_the_stored_entry_and_writes_nothing(tmp_path):
    key = SigningKey.generate()
    async with LedgerStore.open(tmp_path / "l.sqlite", key) as ledger:
        first = await ledger.append(receipt_fields(key, "req-00000001"))
        again = await ledger.append(receipt_fields(key, "req-00000001"))
        assert again == first and ledger.size == 1
        with pytest.raises(ConflictError, match="different content"):
            await ledger.append(receipt_fields(key, "req-00000001", tokens_out=1))
        assert ledger.size == 1


async def test_concurrent_appends_share_transactions(tmp_path):
    key = SigningKey.generate()
    async with LedgerStore.open(tmp_path / "l.sqlite", key) as ledger:
        results = {}

        async def one(i):
            results[i] = await ledger.append(receipt_fields(key, f"req-{i:08d}"))

        async with trio.open_nursery() as nursery:
            for i in range(64):
                nursery.start_soon(one, i)
        assert ledger.size == 64 and len(set(results.values())) == 64
        assert ledger.batches_committed < 64          # group commit: several appends per transaction
    report = verify(load_material(tmp_path / "l.sqlite"))
    assert report.entries == 64


async def test_duplicates_inside_one_batch(tmp_path):
    key = SigningKey.generate()
    same, other = receipt_fields(key, "req-samesame"), receipt_fields(key, "req-samesame", tokens_out=3)
    async with LedgerStore.open(tmp_path / "l.sqlite", key) as ledger:
        outcomes = []

        async def one(fields):
            try:
                outcomes.append((fields, await ledger.append(fields)))
            except ConflictError as exc:
                outcomes.append((fields, exc))

        async with trio.open_nursery() as nursery:
            for fields in (same, same, other):
                nursery.start_soon(one, fields)
        assert ledger.size == 1
        stored = await ledger.entry("req-samesame")
    winner = same if Receipt.from_envelope(stored).tokens_out == same["tokens_out"] else other
    for fields, outcome in outcomes:       # whichever came first is stored; the same content gets it back
        assert outcome == stored if fields == winner else isinstance(outcome, ConflictError)


async def test_a_malformed_receipt_fails_alone(tmp_path):
    key = SigningKey.generate()
    async with LedgerStore.open(tmp_path / "l.sqlite", key) as ledger:
        async with trio.open_nursery() as nursery:
            async def bad():
                with pytest.raises(Exception, match="malformed"):
                    await ledger.append(receipt_fields(key, "req-badbad01", currency="euro"))
            nursery.start_soon(bad)
            nursery.start_soon(ledger.append, receipt_fields(key, "req-goodgood"))
        assert ledger.size == 1


# --- checkpoints and notes ----------------------------------------------------------------------------------------

async def test_checkpoints_are_signed_consistent_and_stored(tmp_path):
    key = SigningKey.generate()
    async with LedgerStore.open(tmp_path / "l.sqlite", key) as ledger:
        for i in range(5):
            await ledger.append(receipt_fields(key, f"req-{i:08d}"))
        first = await ledger.sign_checkpoint()
        assert await ledger.sign_checkpoint() == first        # nothing new: the same checkpoint
        await ledger.append(receipt_fields(key, "req-00000099"))
        second = await ledger.sign_checkpoint()
        a, b = (open_checkpoint(n, ledger.origin, key.public_key) for n in (first, second))
        assert (a.size, b.size) == (5, 6)
        merkle.verify_consistency(5, 6, a.root, b.root, await ledger.consistency_proof(5, 6))
        assert await ledger.checkpoints() == [first, second]
    assert verify(load_material(tmp_path / "l.sqlite")).checkpoints == 2


async def test_a_node_refuses_to_sign_a_checkpoint_inconsistent_with_its_last(tmp_path):
    key = SigningKey.generate()
    path = tmp_path / "l.sqlite"
    async with LedgerStore.open(path, key) as ledger:
        for i in range(4):
            await ledger.append(receipt_fields(key, f"req-{i:08d}"))
        await ledger.sign_checkpoint()
        await ledger.append(receipt_fields(key, "req-00000005"))
    connection = sqlite3.connect(path)          # someone rewrites history behind the node's back
    connection.execute("DROP TRIGGER tree_no_update")
    connection.execute("UPDATE tree SET hash = zeroblob(32) WHERE level = 2 AND idx = 0")
    connection.commit()
    connection.close()
    async with LedgerStore.open(path, key) as ledger:
        with pytest.raises(StoreError, match="refusing to sign"):
            await ledger.sign_checkpoint()


def test_note_format_and_cosignature():
    log_key, witness_key = SigningKey.generate(), SigningKey.generate()
    origin = f"llorch/{log_key.peer_id}"
    note = sign_checkpoint(Checkpoint(origin, 7, bytes(range(32))), log_key)
    text = note.decode()
    assert text.startswith(f"{origin}\n7\nAAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=\n\n\u2014 {origin} ")
    cosigned = cosign(note, "witness.example/w1", witness_key, 1_700_000_000)
    assert verify_cosignature(cosigned, "witness.example/w1", witness_key.public_key) == 1_700_000_000
    assert open_checkpoint(cosigned, origin, log_key.public_key).size == 7
    with pytest.raises(NoteError):
        verify_cosignature(cosigned, "witness.example/w1", log_key.public_key)
    with pytest.raises(NoteError):
        open_checkpoint(note.replace(b"\n7\n", b"\n8\n"), origin, log_key.public_key)
    with pytest.raises(NoteError):
        open_checkpoint(note, origin, witness_key.public_key)
    for bad in (b"no blank line\n", note + b"\x01", b"o\n07\nAAAA\n\n\xe2\x80\x94 o AAAAAA==\n"):
        with pytest.raises(NoteError):
            open_checkpoint(bad, origin, log_key.public_key)
    assert len(parse_note(cosigned).signatures) == 2


# --- /llorch/ledger/1 state machine --------------------------------------------------------------------------------

def test_ledger_protocol_pairs_requests_with_their_replies():
    client, server = LedgerProtocol(Role.CLIENT), LedgerProtocol(Role.SERVER)
    server.receive_data(client.send(GetEntries(0, 10)))
    assert server.next_frame() == GetEntries(0, 10)
    client.receive_data(server.send(EntriesReply(0, [b"x"])))
    assert client.next_frame() == EntriesReply(0, [b"x"]) and client.done
    client, server = LedgerProtocol(Role.CLIENT), LedgerProtocol(Role.SERVER)
    server.receive_data(client.send(GetCheckpoint()))
    server.next_frame()
    with pytest.raises(AssertionError):
        server.send(ProofReply([]))                       # not the reply to get_checkpoint
    with pytest.raises(ProtocolError):
        GetEntries(5, 5)
    with pytest.raises(ProtocolError):
        ProofReply([b"short"])


def test_ledger_protocol_rejects_a_reply_that_does_not_match():
    client = LedgerProtocol(Role.CLIENT)
    client.send(GetCheckpoint())
    from llorch.node.wire.frames import encode_frame
    client.receive_data(encode_frame(ProofReply([])))
    with pytest.raises(ProtocolError, match="not allowed"):
        client.next_frame()
    other = LedgerProtocol(Role.CLIENT)
    other.send(GetCheckpoint())
    other.receive_data(encode_frame(Error("range_beyond_size", "no")))
    assert other.next_frame() == Error("range_beyond_size", "no")


# --- the witness, over real libp2p ---------------------------------------------------------------------------------

async def fill(ledger, key, start, count, **overrides):
    for i in range(start, start + count):
        await ledger.append(receipt_fields(key, f"req-{i:08d}", **overrides))


@dataclass
class TwoHistories:
    """A provider serving its ledger over libp2p, with a second ledger under the same key that rewrites history from
    entry 3 (``service.ledger = rewritten`` makes it show that one), and a gateway's witness of it."""
    provider: SigningKey
    gateway: SigningKey
    honest: LedgerStore
    rewritten: LedgerStore
    service: LedgerService
    database: object
    book: WitnessBook
    witness: Witness
    addrs: list
    forked: list


@asynccontextmanager
async def two_histories(tmp_path):
    provider, gateway = SigningKey.generate(), SigningKey.generate()
    forked = []
    async with LedgerStore.open(tmp_path / "a.sqlite", provider) as honest, \
            LedgerStore.open(tmp_path / "b.sqlite", provider) as rewritten, \
            open_gateway_db(tmp_path / "gateway.sqlite") as database, \
            running_host(provider, LOOPBACK) as provider_p2p, running_host(gateway, LOOPBACK) as gateway_p2p:
        await fill(honest, provider, 0, 6)
        await fill(rewritten, provider, 0, 3)
        await fill(rewritten, provider, 3, 5, tokens_out=1, amount=2)       # a different history from entry 3
        service = LedgerService(honest, frozenset({gateway.public_key}))
        provider_p2p.host.set_stream_handler(TProtocol(LEDGER_PROTOCOL_ID), lambda s: service.serve_ledger(s))
        book = WitnessBook(database)
        yield TwoHistories(provider, gateway, honest, rewritten, service, database, book,
                           Witness(gateway_p2p, gateway, book, forked.append), provider_p2p.addrs(), forked)


async def test_witness_cosigns_then_detects_a_fork_over_libp2p(tmp_path):
    async with two_histories(tmp_path) as t:
        provider, gateway, honest, rewritten, service = t.provider, t.gateway, t.honest, t.rewritten, t.service
        database, book, witness, addrs, forked = t.database, t.book, t.witness, t.addrs, t.forked

        state = await witness.witness(provider.public_key, addrs)
        assert state.size == 6 and not forked
        cosigned = await honest.cosigned()                  # the provider got the cosigned checkpoint back
        assert len(cosigned) == 1
        assert verify_cosignature(cosigned[0], witness_name(gateway.public_key), gateway.public_key) > 0
        await fill(honest, provider, 6, 2)
        assert (await witness.witness(provider.public_key, addrs)).size == 8
        reference = merkle.MemoryTree([merkle.leaf_hash(e) for e in await honest.entries(0, 8)])
        for index in (0, 3, 7):                 # proofs from the stored subtrees, and rebuilt from the entries
            size, note, proof = await book.inclusion_proof(provider.public_key, index)
            assert (size, proof) == (8, merkle.inclusion_proof(reference.subtree, index, 8)) and note
        await database.execute("DELETE FROM provider_tree")
        assert (await book.inclusion_proof(provider.public_key, 5))[2] == merkle.inclusion_proof(
            reference.subtree, 5, 8)
        assert (await book.inclusion_proof(provider.public_key, 8))[:2] == (8, None)

        service.ledger = rewritten                          # the provider now shows another history
        assert await witness.witness(provider.public_key, addrs) is None
        assert forked == [provider.public_key]
        reason, evidence = await book.fork_evidence(provider.public_key)
        assert "consistent" in reason or "roots" in reason
        assert len(evidence) >= 2 and all(e for e in evidence[:2])
        assert await book.forked() == {provider.public_key}


def test_witness_core_rules():
    provider = SigningKey.generate()
    origin = f"llorch/{provider.peer_id}"
    tree = merkle.MemoryTree([merkle.leaf_hash(bytes([i])) for i in range(4)])
    note = sign_checkpoint(Checkpoint(origin, 4, tree.root()), provider)
    state = WitnessedState(4, tree.root(), bytes(32), merkle.CompactRange(), note)
    smaller = sign_checkpoint(Checkpoint(origin, 3, tree.root(3)), provider)
    with pytest.raises(ForkDetected, match="rollback"):
        check_checkpoint(state, smaller, provider.public_key)
    other_root = sign_checkpoint(Checkpoint(origin, 4, bytes(32)), provider)
    with pytest.raises(ForkDetected, match="two different roots"):
        check_checkpoint(state, other_root, provider.public_key)
    forged = sign_checkpoint(Checkpoint(origin, 9, bytes(32)), SigningKey.generate())
    with pytest.raises(BadView):
        check_checkpoint(state, forged, provider.public_key)
    bigger = Checkpoint(origin, 5, bytes(32))
    with pytest.raises(ForkDetected):
        check_consistency(state, bigger, sign_checkpoint(bigger, provider), [bytes(32)] * 3)
    with pytest.raises(BadView, match="expected 1 entries"):
        extend(state, bigger, b"", [], provider.public_key)


async def test_fork_of_two_internally_valid_copies_is_caught_by_the_auditor(tmp_path):
    key = SigningKey.generate()
    copies = {}
    for name, tokens in (("a", 38), ("b", 5)):
        async with LedgerStore.open(tmp_path / f"{name}.sqlite", key) as ledger:
            await fill(ledger, key, 0, 4)
            await fill(ledger, key, 4, 4, tokens_out=tokens, amount=-(-(17 * 100_000 + tokens * 200_000) // 10**6))
            copies[name] = await ledger.sign_checkpoint()
    for name in copies:
        assert verify(load_material(tmp_path / f"{name}.sqlite")).entries == 8        # each is valid alone
    with pytest.raises(Exception) as caught:
        verify(load_material(tmp_path / "a.sqlite"), held_checkpoint=copies["b"])
    assert caught.value.code == "LV08" and len(caught.value.evidence) == 2


async def test_ledger_service_pages_and_refuses_unknown_ranges(tmp_path, monkeypatch):
    import llorch.ledger.limits as ledger_limits

    key, gateway = SigningKey.generate(), SigningKey.generate()
    async with LedgerStore.open(tmp_path / "l.sqlite", key) as ledger:
        await fill(ledger, key, 0, 10)
        service = LedgerService(ledger, frozenset({gateway.public_key}))
        monkeypatch.setattr(ledger_limits, "ENTRIES_PAGE_MAX", 4)
        page = await service.answer(GetEntries(2, 10), gateway.public_key)
        assert page.start == 2 and len(page.entries) == 4
        assert Receipt.from_envelope(page.entries[0]).index == 2
        beyond = await service.answer(GetEntries(5, 11), gateway.public_key)
        assert isinstance(beyond, Error) and beyond.code == "range_beyond_size"
        from llorch.node.wire.ledger_protocol import GetConsistency, GetInclusion, PutCosigned
        assert (await service.answer(GetConsistency(3, 20), None)).code == "range_beyond_size"
        proof = await service.answer(GetInclusion(3, 10), None)
        assert isinstance(proof, ProofReply) and len(proof.hashes) == 4
        checkpoint = await service.answer(GetCheckpoint(), None)
        assert isinstance(checkpoint, CheckpointReply)
        stranger = SigningKey.generate()
        refused = await service.answer(PutCosigned(cosign(checkpoint.note, witness_name(stranger.public_key),
                                                          stranger, 1)), stranger.public_key)
        assert refused.code == "untrusted_witness" and await ledger.cosigned() == []
        accepted = await service.answer(PutCosigned(cosign(checkpoint.note, witness_name(gateway.public_key),
                                                           gateway, 1)), None)
        assert accepted.TYPE == "ack" and len(await ledger.cosigned()) == 1


@pytest.mark.parametrize("fixture", ["LV02-unknown-key", "LV03-bad-signature", "LV04-index-gap", "LV05-chain-break",
                                     "LV10-duplicate", "LV11-amount"])
def test_the_witness_refuses_every_entry_the_auditor_refuses(fixture):
    """The witness runs the auditor's own continuation check (ledger/chain.py) before it cosigns: no ledger it
    cosigns can fail `llorch ledger verify` on an entry (the duplicate request_id and origin checks were missing)."""
    manifest = json.loads((FIXTURES / "manifest.json").read_text())[fixture]
    entries = list(load_material(FIXTURES / manifest["bundle"]).entries)
    owner = Receipt.from_envelope(entries[0]).provider_key
    leaves = [merkle.leaf_hash(entry) for entry in entries]
    checkpoint = Checkpoint(ledger_origin(owner), len(entries), merkle.MemoryTree(leaves).root())
    with pytest.raises(BadView, match=f"entry {manifest['entry']} "):
        extend(WitnessedState.empty(), checkpoint, b"", entries, owner)
    # a request_id the witness saw in an earlier round counts too (it asks its own database for them)
    valid = list(load_material(FIXTURES / "valid.bundle").entries)
    owner = Receipt.from_envelope(valid[0]).provider_key
    tree = merkle.MemoryTree([merkle.leaf_hash(entry) for entry in valid])
    whole = Checkpoint(ledger_origin(owner), len(valid), tree.root())
    assert extend(WitnessedState.empty(), whole, b"", valid, owner).size == len(valid)
    with pytest.raises(BadView, match="check 10"):
        extend(WitnessedState.empty(), whole, b"", valid, owner,
               earlier_request_ids={Receipt.from_envelope(valid[-1]).request_id})


async def test_an_operator_readmits_a_forked_provider_after_review_and_a_new_fork_is_caught_again(tmp_path):
    """A fork the provider's own operator caused (two processes on one ledger) excludes it for good unless the
    gateway's operator reviews the evidence and readmits it: the evidence moves to the fork history, the witness
    starts a new epoch on the ledger the provider shows now, and a fork after that is caught like the first."""
    async with two_histories(tmp_path) as t:
        provider, gateway, honest, rewritten, service = t.provider, t.gateway, t.honest, t.rewritten, t.service
        book, witness, addrs, forked = t.book, t.witness, t.addrs, t.forked
        assert (await witness.witness(provider.public_key, addrs)).size == 6
        service.ledger = rewritten
        assert await witness.witness(provider.public_key, addrs) is None and forked
        with pytest.raises(StoreError, match="not excluded"):
            await book.readmit(gateway.public_key, "no such fork", 1)

        await book.readmit(provider.public_key, "two node processes shared one ledger; fixed by the node's lock", 7)
        assert await book.forked() == set()
        history = await book.fork_history(provider.public_key)
        assert len(history) == 1 and history[0]["readmitted_ms"] == 7 and "lock" in history[0]["note"]
        assert history[0]["evidence"] and history[0]["reason"]
        state = await witness.witness(provider.public_key, addrs)        # a new epoch on the ledger shown now
        assert state is not None and state.size == 8
        service.ledger = honest                                          # and back again: a fork, caught
        assert await witness.witness(provider.public_key, addrs) is None
        assert await book.forked() == {provider.public_key} and len(forked) == 2


def test_the_operator_commands_list_forks_and_readmit(tmp_path):
    provider, gateway = SigningKey.generate(), SigningKey.generate()
    write_key_file(tmp_path / "gateway.key", gateway)
    (tmp_path / "gateway.toml").write_text('[gateway]\nkey_file = "gateway.key"\ndb_path = "gateway.sqlite"\n')

    async def record():
        async with open_gateway_db(tmp_path / "gateway.sqlite") as database:
            await WitnessBook(database).record_fork(provider.public_key, "two different roots for size 4",
                                                    ["note a", "note b"])
    trio.run(record)

    def llorch(*args):
        return subprocess.run(llorch_command() + list(args) + ["--config", "gateway.toml"], cwd=tmp_path,
                              capture_output=True, text=True, timeout=60)

    listed = json.loads(llorch("gateway", "providers", "forks").stdout)
    assert [(f["provider_id"], f["readmitted_ms"]) for f in listed] == [(provider.peer_id, None)]
    refused = llorch("gateway", "providers", "readmit", gateway.peer_id, "--note", "x")
    assert refused.returncode == 2 and "not excluded" in refused.stderr and "Traceback" not in refused.stderr
    done = llorch("gateway", "providers", "readmit", provider.peer_id, "--note", "reviewed: one ledger, two processes")
    assert done.returncode == 0, done.stderr
    listed = json.loads(llorch("gateway", "providers", "forks").stdout)
    assert listed[0]["readmitted_ms"] and listed[0]["note"] == "reviewed: one ledger, two processes"


async def test_a_full_disk_during_a_witness_round_writes_nothing_and_the_next_round_catches_up(tmp_path):
    """SQLite's page limit makes the gateway database "full" exactly like a full disk (SQLITE_FULL)."""
    provider, gateway = SigningKey.generate(), SigningKey.generate()
    async with LedgerStore.open(tmp_path / "a.sqlite", provider) as ledger, \
            open_gateway_db(tmp_path / "gateway.sqlite") as database, \
            running_host(provider, LOOPBACK) as provider_p2p, running_host(gateway, LOOPBACK) as gateway_p2p:
        await fill(ledger, provider, 0, 300, engine_build="x" * 250)
        service = LedgerService(ledger, frozenset({gateway.public_key}))
        provider_p2p.host.set_stream_handler(TProtocol(LEDGER_PROTOCOL_ID), service.serve_ledger)
        book = WitnessBook(database)
        witness = Witness(gateway_p2p, gateway, book, [].append)
        pages = (await database.fetchone("PRAGMA page_count"))[0]
        await database.execute(f"PRAGMA max_page_count = {pages}")
        with pytest.raises(StoreError, match="full"):
            await witness.witness(provider.public_key, provider_p2p.addrs())
        assert (await book.state(provider.public_key)).size == 0
        assert await database.fetchone("SELECT COUNT(*) FROM provider_entries") == (0,)
        assert await ledger.cosigned() == []                 # nothing was cosigned that is not stored
        await database.execute("PRAGMA max_page_count = 1073741823")
        assert (await witness.witness(provider.public_key, provider_p2p.addrs())).size == 300


class LongestStep(trio.abc.Instrument):
    """The longest run of one task between two of its awaits (wall time): how long it held trio's thread."""

    def __init__(self, task_name: str) -> None:
        self.task_name, self.longest_s, self._started = task_name, 0.0, 0.0

    def before_task_step(self, task) -> None:
        self._started = time.perf_counter()

    def after_task_step(self, task) -> None:
        if task.name == self.task_name:
            self.longest_s = max(self.longest_s, time.perf_counter() - self._started)


async def test_a_witness_round_of_many_entries_never_holds_the_event_loop(tmp_path):
    """The gateway's witness shares one trio thread with every customer's request: a round verifying hundreds of
    entries (about 0.2 ms each, twice over before: once to check them, once more to store them) held it for the
    whole round, and each request waiting behind it. Now the checks run in a worker thread (Ed25519 releases the
    GIL) and what is stored reuses what was checked."""
    provider, gateway = SigningKey.generate(), SigningKey.generate()
    async with LedgerStore.open(tmp_path / "a.sqlite", provider) as ledger, \
            open_gateway_db(tmp_path / "gateway.sqlite") as database, \
            running_host(provider, LOOPBACK) as provider_p2p, running_host(gateway, LOOPBACK) as gateway_p2p:
        async with trio.open_nursery() as nursery:           # concurrent appends: group-committed, quick to fill
            for start in range(0, 600, 60):
                nursery.start_soon(fill, ledger, provider, start, 60)
        service = LedgerService(ledger, frozenset({gateway.public_key}))
        provider_p2p.host.set_stream_handler(TProtocol(LEDGER_PROTOCOL_ID), service.serve_ledger)
        witness = Witness(gateway_p2p, gateway, WitnessBook(database), lambda key: None)
        watch = LongestStep("witness-round")
        states = []

        async def round_() -> None:
            states.append(await witness.witness(provider.public_key, provider_p2p.addrs()))

        trio.lowlevel.add_instrument(watch)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(round_, name="witness-round")
        finally:
            trio.lowlevel.remove_instrument(watch)
        assert states[0] is not None and states[0].size == 600
        assert watch.longest_s < 0.025, f"the witness held the event loop for {watch.longest_s * 1000:.0f} ms"
