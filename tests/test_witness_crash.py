"""SIGKILL during a witness round: whatever moment the gateway dies at, its database holds either the previous
witnessed state or the new one whole (state, entries and tree together, one transaction), never a partial round;
and the next round completes. (A full disk during a round: tests/test_ledger_trust.py.)"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio

from llorch.gateway.db import open_gateway_db
from llorch.gateway.witness.witness import WitnessBook
from llorch.ledger.signing import SigningKey, write_key_file
from llorch.ledger.store import LedgerStore
from tests.helpers import receipt_fields

ROOT = Path(__file__).resolve().parent.parent
ENTRIES = 3_000
KILL_AFTER_S = (0.2, 0.5, 0.8, 1.1, 1.4, 1.8, 2.3)      # after the helper says it is witnessing


async def fill(path: Path, key: SigningKey) -> None:
    async with LedgerStore.open(path, key) as ledger:
        async with trio.open_nursery() as nursery:
            for lane in range(30):
                async def append(lane=lane):
                    for n in range(lane, ENTRIES, 30):
                        await ledger.append(receipt_fields(key, f"req-{n:08d}"))
                nursery.start_soon(append)


async def witnessed_view(path: Path, provider: bytes) -> tuple[int, int, int]:
    """(witnessed size, provider_entries rows, their highest index + 1) in the gateway database."""
    async with open_gateway_db(path) as database:
        size = (await WitnessBook(database).state(provider)).size
        count, top = await database.fetchone(
            "SELECT COUNT(*), COALESCE(MAX(idx) + 1, 0) FROM provider_entries WHERE provider_key = ?", (provider,))
    return size, count, top


def run_helper(workdir: Path, kill_after_s: float | None) -> str:
    process = subprocess.Popen([sys.executable, "-m", "tests.crash_witness", str(workdir)], cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().strip() == "witnessing", process.stderr.read()
        if kill_after_s is None:
            return process.communicate(timeout=120)[0].strip()
        time.sleep(kill_after_s)
        process.send_signal(signal.SIGKILL)
        process.wait(30)
        return "killed" if process.returncode == -signal.SIGKILL else "finished first"
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.mark.e2e
def test_a_witness_killed_at_any_moment_leaves_the_old_state_or_the_new_one_never_a_part(tmp_path):
    provider, gateway = SigningKey.generate(), SigningKey.generate()
    write_key_file(tmp_path / "provider.key", provider)
    write_key_file(tmp_path / "gateway.key", gateway)
    trio.run(fill, tmp_path / "provider.sqlite", provider)
    outcomes = []
    for delay in KILL_AFTER_S:
        outcome = run_helper(tmp_path, delay)
        size, count, top = trio.run(witnessed_view, tmp_path / "gateway.sqlite", provider.public_key)
        outcomes.append(f"{outcome} at {delay} s: witnessed {size}")
        assert (count, top) == (size, size) and size in (0, ENTRIES), (delay, size, count, top)
    print(f"\nkills: {outcomes}")
    assert any(outcome.startswith("killed") for outcome in outcomes)
    assert run_helper(tmp_path, None) == "done"
    assert trio.run(witnessed_view, tmp_path / "gateway.sqlite", provider.public_key) == (ENTRIES, ENTRIES, ENTRIES)
