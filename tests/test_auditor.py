"""The auditor (`llorch ledger verify`): one named known-bad fixture per error code, each caught with that code at
the right entry or checkpoint; export bundles; the JSON report; trusted keys."""

import base64
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from llorch.ledger.errors import VerificationError
from llorch.ledger.objects import Receipt
from llorch.ledger.signing import SigningKey, public_key_of_peer_id
from llorch.ledger.store import LedgerStore
from llorch.ledger.verify import CHECKS, load_material, verify
from tests.helpers import receipt_fields

FIXTURES = Path(__file__).parent / "fixtures" / "ledgers"
MANIFEST = json.loads((FIXTURES / "manifest.json").read_text())
BAD = {name: case for name, case in MANIFEST.items() if name.startswith("LV")}


def run_verify(*args):
    return subprocess.run([sys.executable, "-m", "llorch.gateway", "ledger", "verify", *map(str, args)],
                          capture_output=True, text=True)


def held(case):
    return (FIXTURES / case["checkpoint"]).read_bytes() if case.get("checkpoint") else None


def test_the_docs_the_code_and_the_fixtures_name_the_same_checks():
    """Every check in the code is in docs/ledger.md's table under its number, code and name, and has a fixture
    (each fixture is caught with exactly its code by the test below)."""
    docs = (Path(__file__).parent.parent / "docs" / "ledger.md").read_text()
    table = re.findall(r"^\| (\d+) \| (LV\d\d) ([^|]+?) \|", docs, re.M)
    assert {(int(n), code, name) for n, code, name in table} == {(n, code, name) for n, (code, name) in CHECKS.items()}
    assert sorted(case["code"] for case in BAD.values()) == sorted(code for code, _ in CHECKS.values())


@pytest.mark.parametrize("name", sorted(BAD))
def test_fixture_is_caught_with_its_code_and_place(name):
    case = BAD[name]
    witness_keys = {public_key_of_peer_id(peer) for peer in case["witness_keys"]} if "witness_keys" in case else None
    with pytest.raises(VerificationError) as caught:
        verify(load_material(FIXTURES / case["bundle"]), held_checkpoint=held(case), witness_keys=witness_keys,
               quorum=case.get("quorum"))
    error = caught.value
    assert error.code == case["code"]
    assert error.entry == case.get("entry")
    assert error.checkpoint_size == case.get("checkpoint_size")


def test_valid_fixture_passes_with_its_held_checkpoint():
    case = MANIFEST["valid"]
    report = verify(load_material(FIXTURES / case["bundle"]), held_checkpoint=held(case))
    assert report.entries == 6 and report.checkpoints == 2 and report.held_checkpoint_size == 4
    assert [(c.size, c.checked, c.trusted) for c in report.cosignatures] == [(3, True, False), (3, True, False)]


def test_fork_prints_both_checkpoints():
    case = BAD["LV08-fork"]
    result = run_verify(FIXTURES / case["bundle"], "--checkpoint", FIXTURES / case["checkpoint"])
    assert result.returncode == 1
    assert result.stderr.count("evidence") == 2 and result.stderr.count("\n6\n") == 2


def test_json_report(tmp_path):
    case = BAD["LV05-chain-break"]
    result = run_verify(FIXTURES / case["bundle"], "--json")
    report = json.loads(result.stdout)
    assert result.returncode == 1
    assert (report["ok"], report["check"], report["code"], report["entry"]) == (False, 5, "LV05", 2)
    good = json.loads(run_verify(FIXTURES / "valid.bundle", "--json").stdout)
    assert good["ok"] and good["entries"] == 6
    assert good["checks_passed"] == [code for n, (code, _) in sorted(CHECKS.items()) if n != 13]    # no quorum asked


def test_trusted_keys(tmp_path):
    keys = tmp_path / "trusted.txt"
    keys.write_text(f"# only a stranger\n{MANIFEST['trusted_keys_stranger']}\n")
    result = run_verify(FIXTURES / "valid.bundle", "--trusted-keys", keys)
    assert result.returncode == 1 and "LV02" in result.stderr and "entry 0" in result.stderr
    owner = verify(load_material(FIXTURES / "valid.bundle")).origin.removeprefix("llorch/")
    keys.write_text(owner + "\n")
    assert run_verify(FIXTURES / "valid.bundle", "--trusted-keys", keys).returncode == 0
    keys.write_text("not a key\n")
    assert run_verify(FIXTURES / "valid.bundle", "--trusted-keys", keys).returncode == 2


async def test_export_round_trip(tmp_path):
    key = SigningKey.generate()
    path = tmp_path / "ledger.sqlite"
    async with LedgerStore.open(path, key) as ledger:
        for i in range(7):
            await ledger.append(receipt_fields(key, f"req-{i:08d}"))
            if i in (2, 6):
                await ledger.sign_checkpoint()
    bundle, jsonl = tmp_path / "ledger.bundle", tmp_path / "ledger.jsonl"
    exported = subprocess.run([sys.executable, "-m", "llorch.gateway", "ledger", "export", str(path), "--out", str(bundle),
                               "--jsonl", str(jsonl)], capture_output=True, text=True)
    assert exported.returncode == 0, exported.stderr
    material = load_material(bundle)
    assert len(list(material.entries)) == 7 and len(material.checkpoints) == 2
    assert run_verify(bundle).returncode == 0 and run_verify(path).returncode == 0
    lines = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert [line["index"] for line in lines] == list(range(7))
    assert lines[3]["request_id"] == "req-00000003" and "prompt" not in json.dumps(lines[3]).replace(
        "prompt_commitment", "")


def test_unreadable_inputs_exit_2(tmp_path):
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"\x93\x01\x02\x03")
    assert run_verify(junk).returncode == 2
    assert run_verify(tmp_path / "missing").returncode == 2
    assert run_verify(FIXTURES / "valid.bundle", "--checkpoint", tmp_path / "missing").returncode == 2


@pytest.mark.parametrize("name", ["LV03-bad-signature", "LV05-chain-break", "LV11-amount", "LV02-unknown-key"])
def test_parallel_inspection_reports_the_same_first_failure(monkeypatch, name):
    import llorch.ledger.verify as verifier

    monkeypatch.setattr(verifier, "PARALLEL_THRESHOLD_ENTRIES", 2)
    monkeypatch.setattr(verifier, "PARALLEL_CHUNK_ENTRIES", 2)
    monkeypatch.setattr(verifier.os, "cpu_count", lambda: 2)
    case = BAD[name]
    with pytest.raises(VerificationError) as caught:
        verify(load_material(FIXTURES / case["bundle"]))
    assert (caught.value.code, caught.value.entry) == (case["code"], case["entry"])
    assert verify(load_material(FIXTURES / "valid.bundle")).entries == 6


@pytest.mark.parametrize("content", [None, "not json", '{"receipt": 1}'])
def test_verify_receipt_on_an_unusable_file_exits_2_with_one_line(tmp_path, content):
    path = tmp_path / "bill.json"
    if content is not None:
        path.write_text(content)
    result = subprocess.run([sys.executable, "-m", "llorch.gateway", "ledger", "verify-receipt", str(path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


# --- empty ledgers and cosignatures ----------------------------------------------------------------------------

async def test_a_fresh_nodes_empty_ledger_verifies_with_its_owner_from_the_origin(tmp_path):
    key = SigningKey.generate()
    async with LedgerStore.open(tmp_path / "fresh.sqlite", key) as ledger:
        await ledger.sign_checkpoint()                     # what a fresh node serves: a size-0 checkpoint
    report = verify(load_material(tmp_path / "fresh.sqlite"))
    assert (report.entries, report.origin, report.checkpoints) == (0, f"llorch/{key.peer_id}", 1)
    with pytest.raises(VerificationError) as caught:
        verify(load_material(tmp_path / "fresh.sqlite"), trusted_keys={SigningKey.generate().public_key})
    assert caught.value.code == "LV02"


def cosigned_ledger(witness_lines):
    """A two-entry ledger's checkpoint cosigned by each (name, key, timestamp) in turn."""
    from llorch.ledger import merkle
    from llorch.ledger.note import Checkpoint, cosign, sign_checkpoint
    from llorch.ledger.material import LedgerMaterial
    from tests.fixtures.make_ledger_fixtures import OWNER, chain

    entries = chain(2)
    tree = merkle.MemoryTree([merkle.leaf_hash(e) for e in entries])
    note = sign_checkpoint(Checkpoint(f"llorch/{OWNER.peer_id}", 2, tree.root()), OWNER)
    for name, key, timestamp in witness_lines:
        note = cosign(note, name, key, timestamp)
    return LedgerMaterial(entries, [], [note], 2)


NOW_S = 1_800_000_000


def test_every_cosignature_is_checked_and_the_trusted_ones_are_named():
    good, other = SigningKey(bytes([3]) * 32), SigningKey(bytes([4]) * 32)
    lines = [(f"llorch-witness/{good.peer_id}", good, NOW_S - 60), (f"llorch-witness/{other.peer_id}", other, NOW_S),
             ("some-other-witness", other, NOW_S)]
    report = verify(cosigned_ledger(lines), witness_keys={good.public_key}, now_s=NOW_S)
    assert [(c.witness.split("/")[-1][:12], c.checked, c.trusted) for c in report.cosignatures] == [
        (good.peer_id[:12], True, True), (other.peer_id[:12], True, False), ("some-other-w", False, False)]


@pytest.mark.parametrize("fault", ["signature", "key_id", "future", "none"])
def test_a_bad_cosignature_fails_lv12(fault):
    """Before, the auditor never looked at cosignatures: all four passed."""
    witness, impostor = SigningKey(bytes([3]) * 32), SigningKey(bytes([5]) * 32)
    name = f"llorch-witness/{witness.peer_id}"
    lines = {"signature": [(name, witness, NOW_S)], "key_id": [(name, impostor, NOW_S)],
             "future": [(name, witness, NOW_S + 3600)], "none": []}[fault]
    material = cosigned_ledger(lines)
    if fault == "signature":
        note = material.cosigned[0].decode()
        head, line = note.rsplit("\n", 2)[0], note.rsplit("\n", 2)[1]
        prefix, encoded = line.rsplit(" ", 1)
        raw = bytearray(base64.b64decode(encoded))
        raw[-1] ^= 1
        material.cosigned[0] = f"{head}\n{prefix} {base64.b64encode(bytes(raw)).decode()}\n".encode()
    with pytest.raises(VerificationError) as caught:
        verify(material, now_s=NOW_S)
    assert (caught.value.code, caught.value.checkpoint_size) == ("LV12", 2), caught.value


def test_verify_receipt_checks_every_cosignature_on_the_bills_checkpoint_even_without_witness():
    from llorch.ledger import merkle
    from llorch.ledger.receipt_proof import ReceiptProofError, proof_document, verify_receipt_document

    witness = SigningKey(bytes([3]) * 32)
    material = cosigned_ledger([(f"llorch-witness/{witness.peer_id}", witness, NOW_S)])
    tree = merkle.MemoryTree([merkle.leaf_hash(e) for e in material.entries])
    document = proof_document(Receipt.from_envelope(material.entries[1]).request_id, material.entries[1], 1, 2,
                              merkle.inclusion_proof(tree.subtree, 1, 2), material.cosigned[0])
    assert verify_receipt_document(document, now_s=NOW_S).tree_size == 2
    note = document["checkpoint"]
    damaged = note[:-3] + ("A" if note[-3] != "A" else "B") + note[-2:]      # one base64 digit of the cosignature
    with pytest.raises(ReceiptProofError, match=r"\(2\) cosignature by llorch-witness/"):
        verify_receipt_document({**document, "checkpoint": damaged}, now_s=NOW_S)


def test_verify_receipt_reports_which_cosignatures_are_by_trusted_witnesses(tmp_path):
    vectors = FIXTURES.parent
    bill = json.loads((vectors / "bill_vector.json").read_text())
    (tmp_path / "bill.json").write_text(json.dumps(bill["document"]))
    first = SigningKey(bytes.fromhex(bill["witness_seeds_hex"][0]))
    (tmp_path / "witnesses").write_text(f"# the gateway we trust\n{first.peer_id}\n")
    result = subprocess.run([sys.executable, "-m", "llorch.gateway", "ledger", "verify-receipt",
                             str(tmp_path / "bill.json"), "--witness-keys", str(tmp_path / "witnesses")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("trusted") == 1 and "not a key in --witness-keys" in result.stdout


def test_witness_quorum(tmp_path):
    """LV13: with --quorum K, at least K distinct witnesses of --witness-keys must have cosigned the ledger (the
    connected test vector's checkpoint carries two cosignatures)."""
    from llorch.ledger.export import write_bundle_file
    from llorch.ledger.signing import SigningKey

    vector = json.loads((FIXTURES.parent / "checkpoint_vector.json").read_text())
    witnesses = [SigningKey(bytes.fromhex(seed)) for seed in vector["witness_seeds_hex"]]
    bundle = tmp_path / "cosigned.bundle"
    write_bundle_file(bundle, [bytes.fromhex(e) for e in vector["entries_hex"]], [], [vector["note"].encode()])
    both, one = tmp_path / "both.txt", tmp_path / "one.txt"
    both.write_text("".join(f"{w.peer_id}\n" for w in witnesses))
    one.write_text(f"{witnesses[0].peer_id}\n{SigningKey.generate().peer_id}\n")

    passed = run_verify(bundle, "--witness-keys", both, "--quorum", "2", "--json")
    report = json.loads(passed.stdout)
    assert passed.returncode == 0 and report["quorum_size"] == 3 and "LV13" in report["checks_passed"], passed
    short = run_verify(bundle, "--witness-keys", one, "--quorum", "2")
    assert short.returncode == 1 and "LV13" in short.stderr and "1 of the trusted witnesses" in short.stderr
    assert run_verify(bundle, "--witness-keys", both, "--quorum", "3").returncode == 1
    assert run_verify(bundle, "--quorum", "1").returncode == 2            # a quorum of whom: needs --witness-keys
