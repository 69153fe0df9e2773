"""Seconds from a restarted gateway being up to every provider placed on again, over ``--restarts`` restarts.

One gateway (SQLite) and ``--nodes`` echo-engine nodes (a test-only fake: this measures connections, not
inference), all on this machine's cores. Each round SIGKILLs the gateway, starts it again on the same key, database
and ports (LocalNetwork.restart_gateway), and times from its state file appearing (it listens) to /healthz ready
with every provider and one chat completion answered 200. Prints p50 and max, and PASS/FAIL against the 5 s floor
(issue: nodes back "within seconds"; before this build, 41-60 s: py-libp2p's 60 s negative dial cache).

    .venv/bin/python bench/gateway_restart.py [--restarts 10] [--nodes 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llorch.gateway.localnet import LocalNetwork  # noqa: E402
from tests.test_gateway_restart import BACK_WITHIN_S, ready_and_served  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--restarts", type=int, default=10)
    parser.add_argument("--nodes", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        net = LocalNetwork(Path(workdir))
        try:
            net.start_gateway()
            for n in range(args.nodes):
                net.start_node(f"n{n}", extra='engine = "echo"\n')
            net.wait_for_providers(args.nodes)
            seconds = []
            for _ in range(args.restarts):
                net.restart_gateway()
                seconds.append(ready_and_served(net, args.nodes, 120))
        finally:
            net.stop()
    p50, worst = statistics.median(seconds), max(seconds)
    print(f"{args.restarts} SIGKILL restarts, {args.nodes} echo nodes (2 shared cores): gateway up → every provider "
          f"placed on and a request served: p50 {p50:.2f} s, max {worst:.2f} s ({[round(s, 2) for s in seconds]})")
    verdict = "PASS" if worst <= BACK_WITHIN_S else "FAIL"
    print(f"{verdict} max {worst:.2f} s <= {BACK_WITHIN_S:g} s")
    return 0 if verdict == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
