"""Peak memory and time of `llorch ledger export` → `verify` → one receipt looked up (what `llorch ledger replay`
does before it loads a model) on a 100,000-entry ledger, against smaller ledgers measured in the same run. Each step
runs as its own command in a child process; peak RSS is getrusage's ru_maxrss of that child and every process it
waited for (the auditor's worker pool included).

    .venv/bin/python bench/bundle_stream.py [--entries 100000] [--baselines 10000 20000]

The auditor switches to worker processes at 20,000 entries (ledger/verify.py), so the 20,000 baseline is the one
to compare the big run with; 10,000 shows the single-process path.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.helpers import peak_rss_kib, write_ledger_file  # noqa: E402

from llorch.ledger.signing import SigningKey  # noqa: E402

LOOKUP = ("import sys; from pathlib import Path; from llorch.node.replay import find_receipt; "
          "print(find_receipt(Path(sys.argv[1]), sys.argv[2]).index)")


def measure(scratch: Path, entries: int) -> dict[str, tuple[float, float]]:
    """(peak RSS MiB, seconds) of each step on a fresh ledger of ``entries``."""
    ledger, bundle = scratch / f"ledger-{entries}.sqlite", scratch / f"ledger-{entries}.bundle"
    request_ids = write_ledger_file(ledger, SigningKey.generate(), entries)
    steps = {"export": [sys.executable, "-m", "llorch.gateway", "ledger", "export", ledger, "--out", bundle],
             "verify": [sys.executable, "-m", "llorch.gateway", "ledger", "verify", bundle],
             "lookup": [sys.executable, "-c", LOOKUP, bundle, request_ids[-1]]}
    results = {}
    for step, command in steps.items():
        start = time.perf_counter()
        done, peak_kib = peak_rss_kib(command)
        elapsed = time.perf_counter() - start
        assert done.returncode == 0, f"{step}: {done.stderr}"
        results[step] = (peak_kib / 1024, elapsed)
    assert done.stdout.strip() == str(entries - 1)
    results["bundle MiB"] = (bundle.stat().st_size / 2**20, 0.0)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=100_000)
    parser.add_argument("--baselines", type=int, nargs="*", default=[10_000, 20_000])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="llorch-bench-") as scratch:
        runs = {n: measure(Path(scratch), n) for n in [*args.baselines, args.entries]}
    print(f"{'entries':>8}  {'bundle':>9}  " + "  ".join(f"{step + ' peak RSS, time':>24}"
                                                       for step in ("export", "verify", "lookup")))
    for entries, results in runs.items():
        print(f"{entries:8d}  {results['bundle MiB'][0]:6.1f} MiB  " + "  ".join(
            f"{results[step][0]:11.1f} MiB {results[step][1]:7.2f} s" for step in ("export", "verify", "lookup")))
    reference = runs[max(args.baselines)] if args.baselines else None
    if reference is not None:
        growth = {step: runs[args.entries][step][0] - reference[step][0] for step in ("export", "verify", "lookup")}
        print(f"peak RSS growth from {max(args.baselines)} to {args.entries} entries: "
              + ", ".join(f"{step} {value:+.1f} MiB" for step, value in growth.items()))


if __name__ == "__main__":
    main()
