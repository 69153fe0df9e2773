"""`llorch ledger export` → `verify` → receipt lookup on a big ledger, through the commands, in child processes:
the whole chain works at 20,000 entries with peak memory that does not grow with the ledger, and an export that is
killed (SIGKILL) or runs out of disk never leaves anything at `--out` that could pass for the bundle.

The 100,000-entry run with its figures is bench/bundle_stream.py.
"""

import os
import signal
import subprocess
import sys
import time

import pytest

from llorch.ledger.signing import SigningKey
from tests.helpers import peak_rss_kib, write_ledger_file

BIG_ENTRIES = 20_000
SMALL_ENTRIES = 2_000
# The stated bound: going from 2,000 to 20,000 entries may raise any command's peak RSS by at most this much.
# What still grows is the ledger's own checkpoint notes (one per 64 entries, ~200 bytes each) and the auditor's
# switch to worker processes above 20,000 entries (a bounded window of chunks); entries are never all held.
RSS_GROWTH_KIB_MAX = 8 * 1024


def llorch(*args: object) -> list[str]:
    return [sys.executable, "-m", "llorch.gateway", *map(str, args)]


@pytest.fixture(scope="module")
def big_ledger(tmp_path_factory):
    path = tmp_path_factory.mktemp("big") / "ledger.sqlite"
    return path, write_ledger_file(path, SigningKey(bytes([7]) * 32), BIG_ENTRIES)


@pytest.fixture(scope="module")
def small_ledger(tmp_path_factory):
    path = tmp_path_factory.mktemp("small") / "ledger.sqlite"
    return path, write_ledger_file(path, SigningKey(bytes([7]) * 32), SMALL_ENTRIES)


def export_verify_lookup(ledger, scratch) -> dict[str, int]:
    """Peak RSS (KiB) of each step; each step must succeed."""
    path, request_ids = ledger
    bundle = scratch / "ledger.bundle"
    peaks = {}
    done, peaks["export"] = peak_rss_kib(llorch("ledger", "export", path, "--out", bundle))
    assert done.returncode == 0, done.stderr
    done, peaks["verify"] = peak_rss_kib(llorch("ledger", "verify", bundle))
    assert done.returncode == 0, done.stderr
    assert f"OK: {len(request_ids)} entries" in done.stdout
    lookup = ("import sys; from pathlib import Path; from llorch.node.replay import find_receipt; "
              "print(find_receipt(Path(sys.argv[1]), sys.argv[2]).index)")
    done, peaks["lookup"] = peak_rss_kib([sys.executable, "-c", lookup, bundle, request_ids[-1]])
    assert done.returncode == 0 and done.stdout.strip() == str(len(request_ids) - 1), done.stderr
    return peaks


def test_export_verify_lookup_at_20000_entries_in_flat_memory(big_ledger, small_ledger, tmp_path):
    (tmp_path / "small").mkdir()
    (tmp_path / "big").mkdir()
    small = export_verify_lookup(small_ledger, tmp_path / "small")
    big = export_verify_lookup(big_ledger, tmp_path / "big")
    for step in small:
        assert big[step] - small[step] <= RSS_GROWTH_KIB_MAX, \
            f"{step}: peak RSS {small[step]} KiB at {SMALL_ENTRIES} entries, {big[step]} KiB at {BIG_ENTRIES}"


def partials(directory) -> list:
    return sorted(p for p in directory.iterdir() if p.name.endswith(".partial"))


def test_sigkill_during_export_leaves_nothing_at_out(big_ledger, tmp_path):
    out = tmp_path / "ledger.bundle"
    export = subprocess.Popen(llorch("ledger", "export", big_ledger[0], "--out", out), stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while export.poll() is None and time.monotonic() < deadline:
        stray = partials(tmp_path)
        if stray and stray[0].stat().st_size >= 512 * 1024:      # well into the entries
            export.send_signal(signal.SIGKILL)
            break
        time.sleep(0.001)
    export.wait(timeout=60)
    assert export.returncode == -signal.SIGKILL, "the export finished (or failed) before it could be killed"
    assert not out.exists()
    [stray] = partials(tmp_path)
    refused = subprocess.run(llorch("ledger", "verify", stray), capture_output=True, text=True)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "cannot read" in refused.stderr and "truncated" in refused.stderr, refused.stderr
    assert "Traceback" not in refused.stderr and len(refused.stderr.strip().splitlines()) == 1


def assert_full_disk_failure(result, out) -> None:
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "cannot write" in result.stderr, result.stderr
    assert not out.exists()
    assert partials(out.parent) == [], "a failed export must not leave its partial file filling the disk"


def test_full_disk_during_export(small_ledger, tmp_path):
    """A real ENOSPC: the bundle's directory is a tmpfs far smaller than the bundle."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root; test_file_size_limit_during_export covers EFBIG")
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(disk)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        out = disk / "ledger.bundle"
        result = subprocess.run(llorch("ledger", "export", small_ledger[0], "--out", out), capture_output=True,
                                text=True)
        assert_full_disk_failure(result, out)
        assert "No space left" in result.stderr
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_file_size_limit_during_export(small_ledger, tmp_path):
    """The same failure without root: RLIMIT_FSIZE makes the export's writes fail with EFBIG part way."""
    import resource

    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, 256 * 1024))

    out = tmp_path / "ledger.bundle"
    result = subprocess.run(llorch("ledger", "export", small_ledger[0], "--out", out), capture_output=True, text=True,
                            preexec_fn=limit_file_size)
    assert_full_disk_failure(result, out)
    assert "File too large" in result.stderr
