"""No false positives (docs/verification.md §3): two honest nodes running the real default model (one llama.cpp thread
each) behind a gateway that spot-checks every request of a consenting tenant, over varied prompts, seeds and sampling
(tests/test_spot_checks_e2e.py ``request_of``). Prints the mismatch count, which must be 0, and the time.

    .venv/bin/python bench/spot_checks_honest.py [--requests 300]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.test_spot_checks_e2e import honest_summary, run_honest_requests, start_honest_network  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=300)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        net, api_key = start_honest_network(Path(workdir))
        try:
            started = time.monotonic()
            results = run_honest_requests(net, api_key, args.requests)
            elapsed_s = time.monotonic() - started
            summary = honest_summary(net)
        finally:
            net.stop()
    mismatches = sum(verdict != "clean" for _, verdict in results) + summary["evidence"]
    print(f"{len(results)} requests, each re-run on the other node: {mismatches} mismatches; "
          f"verdicts {summary['verdicts']}, evidence {summary['evidence']}, providers {summary['statuses']}; "
          f"{elapsed_s:.0f} s ({elapsed_s / len(results):.2f} s per request and its re-run)")
    return 0 if mismatches == 0 and summary["statuses"] == ["approved", "approved"] else 1


if __name__ == "__main__":
    sys.exit(main())
