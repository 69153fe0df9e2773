"""Crash safety: a writer appending concurrently is killed with SIGKILL at random moments, 20 times. After every
restart the ledger verifies and every append that had been acknowledged is present."""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from llorch.ledger.objects import Receipt
from llorch.ledger.signing import SigningKey
from llorch.ledger.verify import load_material, read_sqlite_entries, verify

ROOT = Path(__file__).resolve().parent.parent
KILLS = 10           # writers killed at random moments (each a new process: about 3 s)


def test_sigkill_never_loses_an_acknowledged_append(tmp_path):
    path = tmp_path / "ledger.sqlite"
    key = SigningKey.generate()
    rng = random.Random(20261126)
    acknowledged: set[str] = set()
    sizes = []
    for run in range(KILLS):
        writer = subprocess.Popen([sys.executable, str(ROOT / "tests" / "crash_writer.py"), str(path), key.seed.hex(),
                                   str(run)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT,
                                  env={**os.environ, "PYTHONPATH": str(ROOT)})
        first = writer.stdout.readline()          # appending has started
        assert first, writer.stderr.read().decode()[-2000:]
        time.sleep(rng.uniform(0.0, 0.4))
        writer.send_signal(signal.SIGKILL)
        out, _ = writer.communicate()
        acknowledged |= set((first + out).decode().split("\n")[:-1])   # only whole lines were acknowledged
        report = verify(load_material(path))       # raises, naming the entry, if anything is broken
        stored = {Receipt.from_envelope(e).request_id for e in read_sqlite_entries(path)}
        missing = acknowledged - stored
        assert not missing, f"run {run}: {len(missing)} acknowledged appends lost, e.g. {sorted(missing)[:3]}"
        sizes.append(report.entries)
    assert sizes == sorted(sizes) and sizes[-1] > KILLS * 8
