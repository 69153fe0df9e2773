"""The auditor (`llorch ledger verify`): one named known-bad fixture per error code, each caught with that code at
the right entry or checkpoint; export bundles; the JSON report; trusted keys."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from llorch.ledger.errors import VerificationError
from llorch.ledger.signing import SigningKey
from llorch.ledger.store import LedgerStore
from llorch.ledger.verify import load_material, verify
from tests.helpers import receipt_fields

FIXTURES = Path(__file__).parent / "fixtures" / "ledgers"
MANIFEST = json.loads((FIXTURES / "manifest.json").read_text())
BAD = {name: case for name, case in MANIFEST.items() if name.startswith("LV")}


def run_verify(*args):
    return subprocess.run([sys.executable, "-m", "llorch.gateway", "ledger", "verify", *map(str, args)],
                          capture_output=True, text=True)


def held(case):
    return (FIXTURES / case["checkpoint"]).read_bytes() if case.get("checkpoint") else None


def test_every_error_code_has_a_fixture():
    assert sorted(case["code"] for case in BAD.values()) == [f"LV{n:02d}" for n in range(1, 12)]


@pytest.mark.parametrize("name", sorted(BAD))
def test_fixture_is_caught_with_its_code_and_place(name):
    case = BAD[name]
    with pytest.raises(VerificationError) as caught:
        verify(load_material(FIXTURES / case["bundle"]), held_checkpoint=held(case))
    error = caught.value
    assert error.code == case["code"]
    assert error.entry == case.get("entry")
    assert error.checkpoint_size == case.get("checkpoint_size")


def test_valid_fixture_passes_with_its_held_checkpoint():
    case = MANIFEST["valid"]
    report = verify(load_material(FIXTURES / case["bundle"]), held_checkpoint=held(case))
    assert report.entries == 6 and report.checkpoints == 2 and report.held_checkpoint_size == 4


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
    assert good["ok"] and good["entries"] == 6 and len(good["checks_passed"]) == 11


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
