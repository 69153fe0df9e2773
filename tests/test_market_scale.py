"""The short version of bench/market_scale.py in the suite: the simulated market runs (a real gateway database,
real signed attestations through the gossip path's parsing, the real placement index under changing standings),
and every sampled placement decision equals the full sort's. Its timings are the bench's business, not this test's.
The relay section (real gateway and node processes under 32 streams for a minute) is left to the bench: the suite
checks flow control in tests/test_flow_control.py and many streams at once in tests/test_burst_e2e.py."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_simulated_market_runs_and_the_index_agrees_with_the_full_sort():
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "market_scale.py"), "--providers", "300",
                           "--requests", "300", "--relay-seconds", "0"], capture_output=True, text=True, timeout=300)
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert "PASS 0 placement disagreement(s) with the full sort" in lines, done.stdout
    placement = next(line for line in lines if line.startswith("placement at "))
    assert int(placement.split()[2]) == 300, placement        # every registered provider is approved and fresh
    assert any(line.startswith(("PASS attestation ingest", "FAIL attestation ingest")) for line in lines)
    assert done.returncode == (0 if all(line.startswith("PASS") for line in lines
                                        if line.startswith(("PASS", "FAIL"))) else 1)
