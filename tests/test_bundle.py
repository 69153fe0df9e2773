"""The bundle format, llorch-ledger-bundle/2 (docs/ledger.md §7): the published vector read by an independent reader
written from the docs alone; the writer reproduces it byte for byte; a bundle truncated anywhere, extended, or
altered in any byte is refused as unreadable (BundleError; exit 2 "cannot read"), never audited as a shorter ledger;
the first format stays readable."""

import hashlib
import io
import json
import struct
import subprocess
import sys
from pathlib import Path

import msgpack
import pytest

from llorch.ledger import bundle
from llorch.ledger.bundle import BundleReader, Counts, bundle_bytes
from llorch.ledger.errors import BundleError
from llorch.ledger.export import export_ledger
from llorch.ledger.material import load_material
from llorch.ledger.note import cosign
from llorch.ledger.signing import SigningKey
from llorch.ledger.verify import verify
from tests.helpers import write_ledger_file

FIXTURES = Path(__file__).parent / "fixtures"
VECTOR = json.loads((FIXTURES / "bundle_vector.json").read_text())
VECTOR_BYTES = bytes.fromhex(VECTOR["bundle"])


def read_all(data: bytes) -> tuple[Counts, list[tuple[bytes, bytes]]]:
    reader = BundleReader(io.BytesIO(data), "test.bundle")
    return reader.counts, list(reader.records())


def record(kind: bytes, payload: bytes) -> bytes:
    return kind + struct.pack(">I", len(payload)) + payload


def independent_read(data: bytes) -> dict:
    """A reader written from docs/ledger.md §7 with msgpack, struct and hashlib only."""
    offset, records = 0, []
    while offset < len(data):
        kind, length = struct.unpack_from(">cI", data, offset)
        records.append((offset, kind, data[offset + 5:offset + 5 + length]))
        offset += 5 + length
    assert offset == len(data)
    (_, first, header), *body, (trailer_offset, last, trailer) = records
    assert (first, last) == (b"H", b"T")
    header, trailer = msgpack.unpackb(header), msgpack.unpackb(trailer)
    assert trailer == {"sha256": hashlib.sha256(data[:trailer_offset]).digest()}
    kinds = {"C": "checkpoints", "W": "cosigned", "E": "entries"}
    parts = {name: [payload for _, kind, payload in body if kind.decode() == letter] for letter, name in kinds.items()}
    assert [kind for _, kind, _ in body] == sorted((kind for _, kind, _ in body), key=b"CWE".index)
    assert header == {"format": "llorch-ledger-bundle/2", **{name: len(items) for name, items in parts.items()}}
    return parts


def test_the_vector_reads_as_documented_and_the_writer_reproduces_it():
    parts = independent_read(VECTOR_BYTES)
    assert [entry.hex() for entry in parts["entries"]] == VECTOR["entries"]
    assert [note.decode() for note in parts["checkpoints"]] == VECTOR["checkpoints"]
    assert [note.decode() for note in parts["cosigned"]] == VECTOR["cosigned"]
    assert hashlib.sha256(VECTOR_BYTES[:VECTOR["trailer_offset"]]).hexdigest() == VECTOR["sha256"]
    assert bundle_bytes(parts["checkpoints"], parts["cosigned"], parts["entries"]) == VECTOR_BYTES
    counts, records = read_all(VECTOR_BYTES)
    assert counts == Counts(1, 1, 2) and [kind for kind, _ in records] == [b"C", b"W", b"E", b"E"]


def test_the_vector_is_a_valid_ledger(tmp_path):
    path = tmp_path / "vector.bundle"
    path.write_bytes(VECTOR_BYTES)
    report = verify(load_material(path))
    assert (report.entries, report.checkpoints) == (2, 1)


def boundaries(data: bytes) -> list[int]:
    offsets, offset = [], 0
    while offset < len(data):
        offsets.append(offset)
        offset += 5 + struct.unpack_from(">I", data, offset + 1)[0]
    return offsets


def test_truncated_at_any_byte_is_refused():
    cuts = set(range(len(VECTOR_BYTES)))          # every record boundary and every point inside a record
    assert set(boundaries(VECTOR_BYTES)) <= cuts
    for cut in sorted(cuts):
        with pytest.raises(BundleError, match="truncated"):
            read_all(VECTOR_BYTES[:cut])


def test_every_altered_byte_is_refused():
    for position in range(len(VECTOR_BYTES)):
        altered = bytearray(VECTOR_BYTES)
        altered[position] ^= 0x01
        with pytest.raises(BundleError):
            read_all(bytes(altered))


@pytest.mark.parametrize("extension", [b"\x00", record(b"T", b"\x80"), record(b"E", b"extra entry")])
def test_extended_is_refused(extension):
    with pytest.raises(BundleError, match="after|follow|cannot follow"):
        read_all(VECTOR_BYTES + extension)


def rebuilt(header: dict, records: list[bytes]) -> bytes:
    """A bundle with a valid trailer hash around whatever header and records: only the structure is wrong."""
    body = record(b"H", msgpack.packb(header)) + b"".join(records)
    return body + record(b"T", msgpack.packb({"sha256": hashlib.sha256(body).digest()}))


HEADER = {"checkpoints": 0, "cosigned": 0, "entries": 1, "format": "llorch-ledger-bundle/2"}


@pytest.mark.parametrize("header, records, message", [
    (HEADER, [record(b"E", b"one"), record(b"E", b"two")], "more entry records than the 1"),
    ({**HEADER, "entries": 2}, [record(b"E", b"one")], "holds 1 entry records, its header announces 2"),
    ({**HEADER, "checkpoints": 1}, [record(b"E", b"one"), record(b"C", b"note")], "cannot follow a entry"),
    (HEADER, [record(b"X", b"one")], "unknown kind"),
    (HEADER, [b"E" + struct.pack(">I", 64 * 1024 + 1)], "claims 65537 bytes, more than 65536"),
    ({**HEADER, "format": "llorch-ledger-bundle/3"}, [record(b"E", b"one")], "names format 'llorch-ledger-bundle/3'"),
    ({**HEADER, "version": 2}, [record(b"E", b"one")], "has fields"),
    ({**HEADER, "entries": -1}, [], "not an unsigned integer"),
    ({"entries": 1, "checkpoints": 0, "cosigned": 0, "format": "llorch-ledger-bundle/2"}, [record(b"E", b"one")],
     "not canonical"),
])
def test_structural_faults_are_refused_with_their_reason(header, records, message):
    with pytest.raises(BundleError, match=message):
        read_all(rebuilt(header, records))


def test_a_record_over_the_cap_is_refused_before_it_is_read():
    class Tripwire(io.BytesIO):
        def read(self, size=-1):
            assert size <= 64 * 1024, f"asked for {size} bytes"
            return super().read(size)

    data = record(b"H", msgpack.packb(HEADER)) + b"E" + struct.pack(">I", 2**32 - 1)
    with pytest.raises(BundleError, match="more than"):
        list(BundleReader(Tripwire(data), "tripwire").records())


def run_llorch(*args):
    return subprocess.run([sys.executable, "-m", "llorch.gateway", *map(str, args)], capture_output=True, text=True)


@pytest.mark.parametrize("damage", ["cut after the last entry", "cut inside the trailer", "extended",
                                    "entry altered"])
def test_the_auditor_refuses_a_damaged_bundle_as_unreadable(tmp_path, damage):
    """A bad entry in a damaged bundle is not reported as an audit failure: the bundle cannot be read (exit 2)."""
    trailer = VECTOR["trailer_offset"]
    data = {"cut after the last entry": VECTOR_BYTES[:trailer], "cut inside the trailer": VECTOR_BYTES[:-3],
            "extended": VECTOR_BYTES + VECTOR_BYTES[boundaries(VECTOR_BYTES)[-2]:trailer],
            "entry altered": VECTOR_BYTES[:trailer - 80] + b"\xff" + VECTOR_BYTES[trailer - 79:]}[damage]
    path = tmp_path / "damaged.bundle"
    path.write_bytes(data)
    result = run_llorch("ledger", "verify", path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.startswith(f"error: cannot read {path}: ") and "FAIL" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_the_first_format_is_still_read():
    legacy = FIXTURES / "ledgers" / "valid-format1.bundle"
    assert legacy.read_bytes()[:1] == b"\x84"
    report = verify(load_material(legacy))
    assert (report.entries, report.checkpoints) == (6, 2)
    assert report.root == verify(load_material(FIXTURES / "ledgers" / "valid.bundle")).root


def test_export_converts_the_first_format(tmp_path):
    out = tmp_path / "converted.bundle"
    assert export_ledger(FIXTURES / "ledgers" / "valid-format1.bundle", out) == 6
    assert out.read_bytes() == (FIXTURES / "ledgers" / "valid.bundle").read_bytes()


def test_export_round_trip_keeps_every_record_and_is_reproducible(tmp_path):
    key, witness = SigningKey(bytes([5]) * 32), SigningKey(bytes([6]) * 32)
    path = tmp_path / "ledger.sqlite"
    write_ledger_file(path, key, 200, checkpoint_every=50)
    import sqlite3
    with sqlite3.connect(path) as connection:
        notes = [note for (note,) in connection.execute("SELECT note FROM checkpoints ORDER BY size")]
        connection.execute("INSERT INTO cosigned VALUES (?, ?, ?)",
                           (100, "w", cosign(notes[1], f"llorch-witness/{witness.peer_id}", witness, 1_000)))
    connection.close()
    first, second = tmp_path / "a.bundle", tmp_path / "b.bundle"
    assert export_ledger(path, first) == 200 and export_ledger(path, second) == 200
    assert first.read_bytes() == second.read_bytes()
    source, exported = load_material(path), load_material(first)
    assert exported.checkpoints == source.checkpoints == notes and len(exported.cosigned) == 1
    assert exported.cosigned == source.cosigned and list(exported.entries) == list(source.entries)
    assert verify(load_material(first)).root == verify(load_material(path)).root


def test_export_refuses_to_overwrite_the_ledger(tmp_path):
    path = tmp_path / "ledger.sqlite"
    write_ledger_file(path, SigningKey(bytes([5]) * 32), 3)
    before = path.read_bytes()
    result = run_llorch("ledger", "export", path, "--out", path)
    assert result.returncode == 2 and "it is the ledger being exported" in result.stderr
    assert path.read_bytes() == before


def test_a_record_too_big_for_the_format_is_not_exported(tmp_path):
    with pytest.raises(BundleError, match="entry 1 is 65537 bytes"):
        bundle_bytes([], [], [b"fine", b"x" * (64 * 1024 + 1)])
    assert bundle.FORMAT == "llorch-ledger-bundle/2"


def test_replay_finds_a_receipt_in_a_bundle_and_refuses_a_damaged_one(tmp_path):
    from llorch.node.replay import ReplayInputError, find_receipt

    path, out = tmp_path / "ledger.sqlite", tmp_path / "ledger.bundle"
    request_ids = write_ledger_file(path, SigningKey(bytes([5]) * 32), 12)
    export_ledger(path, out)
    assert find_receipt(out, request_ids[11]).index == 11 and find_receipt(path, request_ids[1]).index == 1
    with pytest.raises(ReplayInputError, match="no receipt for req-none"):
        find_receipt(out, "req-none")
    data = out.read_bytes()
    out.write_bytes(data[:-1])
    with pytest.raises(ReplayInputError, match=f"cannot read {out}: it is truncated"):
        find_receipt(out, request_ids[0])
