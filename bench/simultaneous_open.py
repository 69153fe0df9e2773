"""Can two hosts, each behind its own masquerading home router, open one TCP connection to each other?

The ground truth under any hole punch, with plain sockets (tests/hole_punch.py says how an attempt goes): in the
small internet of tests/small_internet.py (as root), node A and node B listen on a port with SO_REUSEADDR and
SO_REUSEPORT, learn their public address from an observer on the public side, then connect from that port to each
other's observed address, B ``--skew-ms`` after A. For each skew it prints how often the router kept the source
port and what the two connect() calls did (connected, refused, timed out; "bytes crossed" when a byte went each way).

``--quiet-routers`` makes both routers drop unsolicited packets from the public side (as many home routers do)
instead of answering with a reset (what a Linux router does with no rule, and the topology of the tests does).
``--delay-ms`` delays each direction of both routers' public links (A to B crosses two of them).

    sudo .venv/bin/python bench/simultaneous_open.py [--attempts 10] [--skew-ms 0,1,5,20] [--quiet-routers]
        [--delay-ms 0] [--timeout-ms 2000]
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.hole_punch import Observer, quiet_routers, simultaneous_open  # noqa: E402
from tests.small_internet import HOMES, SmallInternet, slow_links_unavailable_reason, unavailable_reason  # noqa: E402

FIRST_PORT = 40_000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--attempts", type=int, default=10, help="attempts per skew")
    parser.add_argument("--skew-ms", default="0,1,5,20", help="B dials this long after A (comma-separated)")
    parser.add_argument("--timeout-ms", type=int, default=2000, help="each connect()'s timeout")
    parser.add_argument("--delay-ms", type=int, default=0, help="one-way delay on each router's public link")
    parser.add_argument("--quiet-routers", action="store_true",
                        help="routers drop unsolicited packets instead of answering with a reset")
    args = parser.parse_args()
    reason = unavailable_reason() or (args.delay_ms and slow_links_unavailable_reason())
    if reason:
        print(f"cannot run: {reason}", file=sys.stderr)
        return 2
    port = FIRST_PORT
    with SmallInternet(delay_ms=args.delay_ms) as internet, Observer(internet):
        if args.quiet_routers:
            quiet_routers(internet)
        print(f"routers {'drop' if args.quiet_routers else 'reset'} unsolicited packets; public links "
              f"{args.delay_ms} ms each way; connect timeout {args.timeout_ms} ms")
        for skew_ms in (int(value) for value in args.skew_ms.split(",")):
            outcomes, kept = Counter(), Counter()
            for _ in range(args.attempts):
                sides = simultaneous_open(internet, port, skew_ms / 1000, args.timeout_ms / 1000)
                port += len(HOMES)
                kept.update(side.port_kept for side in sides.values())
                a, b = sides["a"], sides["b"]
                outcomes[(a.outcome, b.outcome, a.exchanged and b.exchanged)] += 1
            print(f"skew {skew_ms:3d} ms: source port kept {kept[True]}/{sum(kept.values())}; "
                  + "; ".join(f"A {a}, B {b}{' (bytes crossed)' if crossed else ''} x{n}"
                              for (a, b, crossed), n in outcomes.most_common()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
