"""The provider ledger: durable hash-chained appends, and the auditor's numbered checks."""

import sqlite3
import subprocess
import sys

import pytest
import trio

from llorch.ledger import canonical
from llorch.ledger.errors import ConflictError, StoreError, VerificationError
from llorch.ledger.objects import Receipt
from llorch.ledger.signing import SigningKey, open_envelope, sha256
from llorch.ledger.store import LedgerStore
from llorch.ledger.verify import LedgerMaterial, read_sqlite_entries, verify, verify_ledger_file
from tests.helpers import receipt_fields


async def fill(path, key, count):
    async with LedgerStore.open(path, key) as ledger:
        return [await ledger.append(receipt_fields(key, f"req-{i:08d}")) for i in range(count)]


async def test_appends_are_chained_and_verify(tmp_path):
    key = SigningKey.generate()
    path = tmp_path / "ledger.sqlite"
    entries = await fill(path, key, 5)
    receipts = [Receipt.from_envelope(e) for e in entries]
    assert [r.index for r in receipts] == [0, 1, 2, 3, 4]
    assert receipts[0].prev_hash == bytes(32)
    assert all(receipts[i].prev_hash == sha256(entries[i - 1]) for i in range(1, 5))
    assert list(read_sqlite_entries(path)) == entries   # exact bytes stored
    report = verify_ledger_file(path)
    assert report.entries == 5 and report.head_sha256 == sha256(entries[-1])


async def test_reopen_continues_the_chain(tmp_path):
    key = SigningKey.generate()
    path = tmp_path / "ledger.sqlite"
    first = await fill(path, key, 2)
    async with LedgerStore.open(path, key) as ledger:
        assert ledger.size == 2
        third = Receipt.from_envelope(await ledger.append(receipt_fields(key, "req-later-1")))
    assert third.index == 2 and third.prev_hash == sha256(first[-1])
    assert verify_ledger_file(path).entries == 3


async def test_concurrent_appends_keep_one_chain(tmp_path):
    key = SigningKey.generate()
    path = tmp_path / "ledger.sqlite"
    async with LedgerStore.open(path, key) as ledger:
        async with trio.open_nursery() as nursery:
            for i in range(20):
                nursery.start_soon(ledger.append, receipt_fields(key, f"req-conc-{i:04d}"))
    assert verify_ledger_file(path).entries == 20


async def test_duplicate_request_id_is_a_conflict_and_writes_nothing(tmp_path):
    key = SigningKey.generate()
    path = tmp_path / "ledger.sqlite"
    async with LedgerStore.open(path, key) as ledger:
        await ledger.append(receipt_fields(key, "req-00000001"))
        with pytest.raises(ConflictError):
            await ledger.append(receipt_fields(key, "req-00000001", tokens_out=5))
        assert ledger.size == 1
        await ledger.append(receipt_fields(key, "req-00000002"))
    assert verify_ledger_file(path).entries == 2


async def test_entries_cannot_be_updated_or_deleted(tmp_path):
    key = SigningKey.generate()
    path = tmp_path / "ledger.sqlite"
    await fill(path, key, 1)
    connection = sqlite3.connect(path)
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        connection.execute("UPDATE entries SET entry = x'00'")
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        connection.execute("DELETE FROM entries")
    connection.close()


async def test_a_damaged_stored_entry_fails_the_repeat_that_meets_it_and_the_writer_keeps_writing(tmp_path):
    """A repeated request_id is compared with the stored entry; if that row is damaged (the disk, or a hand edit),
    the repeat gets a StoreError naming it, and every other append still goes in. Before, the parse error escaped
    the writer task and took the ledger down."""
    key = SigningKey.generate()
    path = tmp_path / "ledger.sqlite"
    async with LedgerStore.open(path, key) as ledger:
        for n in range(2):
            await ledger.append(receipt_fields(key, f"req-{n:08d}"))
    connection = sqlite3.connect(path)
    connection.execute("DROP TRIGGER entries_no_update")
    connection.execute("UPDATE entries SET entry = x'c0' WHERE idx = 0")
    connection.commit()
    connection.close()
    async with LedgerStore.open(path, key) as ledger:
        with pytest.raises(StoreError, match="stored entry for 'req-00000000' is damaged"):
            await ledger.append(receipt_fields(key, "req-00000000"))
        with trio.fail_after(10):
            await ledger.append(receipt_fields(key, "req-00000002"))
        assert ledger.size == 3


async def test_a_ledger_opened_with_another_key_is_refused(tmp_path):
    path = tmp_path / "ledger.sqlite"
    await fill(path, SigningKey.generate(), 1)
    with pytest.raises(StoreError, match="belongs to"):
        async with LedgerStore.open(path, SigningKey.generate()):
            pass


async def test_full_disk_fails_cleanly_and_leaves_nothing_partial(tmp_path):
    key = SigningKey.generate()
    path = tmp_path / "ledger.sqlite"
    await fill(path, key, 3)
    async with LedgerStore.open(path, key) as ledger:
        # SQLite's page limit makes the file "full" exactly like a full disk: SQLITE_FULL on the next write.
        pages = (await ledger._database.fetchone("PRAGMA page_count"))[0]
        await ledger._database.execute(f"PRAGMA max_page_count = {pages}")
        big = receipt_fields(key, "req-too-big1", engine_build="x" * 250)
        with pytest.raises(StoreError, match="full"):
            for i in range(50):
                await ledger.append({**big, "request_id": f"req-full-{i:04d}"})
        size_after_failure = ledger.size
    report = verify_ledger_file(path)
    assert report.entries == size_after_failure   # every acknowledged append is there, nothing else


# --- the auditor's checks, one per error code ------------------------------------------------------------------

def chain(key, count, mutate=None):
    """Build entries in memory the way the store does; ``mutate(i, fields)`` may change fields before signing."""
    entries, prev = [], bytes(32)
    for i in range(count):
        fields = receipt_fields(key, f"req-{i:08d}")
        fields.update(v=1, origin=f"llorch/{key.peer_id}", index=i, prev_hash=prev)
        if mutate:
            mutate(i, fields)
        entry = Receipt(**fields).seal(key) if fields["provider_key"] == key.public_key else None
        entries.append(entry)
        prev = sha256(entry)
    return entries


def expect(entries, code, entry):
    with pytest.raises(VerificationError) as caught:
        verify(LedgerMaterial(entries))
    assert (caught.value.code, caught.value.entry) == (code, entry), str(caught.value)
    return caught.value


def test_valid_chain_passes():
    assert verify(LedgerMaterial(chain(SigningKey.generate(), 4))).entries == 4


def test_lv01_malformed():
    entries = chain(SigningKey.generate(), 3)
    entries[1] = entries[1][:-3]
    expect(entries, "LV01", 1)


def test_lv02_entry_signed_by_another_key():
    key, other = SigningKey.generate(), SigningKey.generate()
    entries = chain(key, 3)
    fields = receipt_fields(other, "req-foreign1")
    fields.update(v=1, origin=f"llorch/{other.peer_id}", index=2, prev_hash=sha256(entries[1]))
    entries[2] = Receipt(**fields).seal(other)
    expect(entries, "LV02", 2)


def test_lv03_flipped_signature_byte():
    entries = chain(SigningKey.generate(), 3)
    payload, payload_bytes, signature = open_envelope(entries[2])
    entries[2] = canonical.encode({"p": payload_bytes, "s": bytes([signature[0] ^ 0x40]) + signature[1:]})
    error = expect(entries, "LV03", 2)
    assert error.check == 3


def test_lv04_index_gap():
    key = SigningKey.generate()
    entries = chain(key, 4, mutate=lambda i, f: f.update(index=i + 1) if i >= 2 else None)
    expect(entries, "LV04", 2)


def test_lv05_chain_break():
    key = SigningKey.generate()
    entries = chain(key, 4, mutate=lambda i, f: f.update(prev_hash=bytes(32)) if i == 3 else None)
    expect(entries, "LV05", 3)


def test_lv10_duplicate_request_id():
    key = SigningKey.generate()
    entries = chain(key, 3, mutate=lambda i, f: f.update(request_id="req-00000000") if i == 2 else None)
    expect(entries, "LV10", 2)


def test_lv11_amount_mismatch():
    key = SigningKey.generate()
    entries = chain(key, 3, mutate=lambda i, f: f.update(amount=f["amount"] + 1) if i == 1 else None)
    expect(entries, "LV11", 1)


async def test_cli_verify_names_the_entry_after_a_byte_flip_in_the_file(tmp_path):
    key = SigningKey.generate()
    path = tmp_path / "ledger.sqlite"
    entries = await fill(path, key, 3)
    command = [sys.executable, "-m", "llorch.gateway", "ledger", "verify", str(path)]
    ok = subprocess.run(command, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    raw = bytearray(path.read_bytes())
    target = entries[1][-20:]          # inside entry 1's signature
    position = raw.find(target)
    assert position > 0 and raw.count(target) == 1
    raw[position + 3] ^= 0x01
    path.write_bytes(bytes(raw))
    bad = subprocess.run(command, capture_output=True, text=True)
    assert bad.returncode == 1
    assert "LV03" in bad.stderr and "entry 1" in bad.stderr, bad.stderr


def test_cli_verify_on_a_missing_file_exits_2(tmp_path):
    result = subprocess.run([sys.executable, "-m", "llorch.gateway", "ledger", "verify", str(tmp_path / "nope.sqlite")],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "not a file" in result.stderr


async def test_concurrent_transactions_on_one_database_take_turns(tmp_path):
    from llorch.ledger.sqlite import open_database

    async with open_database(tmp_path / "db.sqlite") as database:
        await database.execute("CREATE TABLE t (x INTEGER)")
        async with trio.open_nursery() as nursery:
            for i in range(20):
                nursery.start_soon(database.transaction, [("INSERT INTO t VALUES (?)", [(i,), (i + 100,)])])
        assert (await database.fetchone("SELECT COUNT(*) FROM t"))[0] == 40


async def test_a_read_never_sees_another_tasks_uncommitted_transaction(tmp_path):
    """One connection serves every task: a read that slipped in between another task's BEGIN IMMEDIATE and its
    ROLLBACK saw rows that never existed (a spend, a ticket). Reads wait for the open transaction."""
    from llorch.ledger.sqlite import open_database
    async with open_database(tmp_path / "db.sqlite") as database:
        await database.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT NOT NULL)")
        seen = []

        async def doomed_writer() -> None:
            with pytest.raises(Exception):
                await database.transaction([
                    ("INSERT INTO t (id, v) VALUES (?, ?)", [(1, "phantom")]),
                    ("INSERT INTO t (id, v) VALUES (?, ?)", [(n, "x") for n in range(2, 3000)]),
                    ("INSERT INTO t (id, v) VALUES (?, ?)", [(5000, None)])])      # NOT NULL: rolls back

        async def reader() -> None:
            for _ in range(200):
                seen.append((await database.fetchone("SELECT COUNT(*) FROM t"))[0])
                await trio.sleep(0)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(doomed_writer)
            nursery.start_soon(reader)
        assert set(seen) == {0}, f"a read saw uncommitted rows: {sorted(set(seen))}"
