"""What a hole punch can achieve between the two home LANs of tests/small_internet.py, measured with plain sockets
(tests/hole_punch.py): both nodes listen, learn their public address from an observer on the public side, then
connect from their listen port to each other's, B 20 ms after A (bench/simultaneous_open.py sweeps the skew, the
link delay and the router's behaviour).

- Each router's masquerade keeps the source port, so a node's public address is its router's address and its own
  listen port.
- Routers that answer an unsolicited SYN with a reset (Linux with no rule, as the routers of the tests do): A's SYN
  reaches router 2 before B's SYN has left it, router 2 resets it, and router 1, seeing the reset, forgets A's
  mapping before B's SYN arrives; both sides are refused. This is why the nodes of tests/test_behind_nat.py stay
  relayed and a hole punch is not attempted there.
- Routers that drop unsolicited packets (as many home routers do): A's first SYN is dropped at router 2 but leaves
  A's mapping open on router 1; B's SYN passes it, and the simultaneous open completes both ways.

Needs root and iproute2 + nftables; skipped, with the reason, otherwise. About 2 s.
"""

from __future__ import annotations

import pytest

from tests.hole_punch import Observer, quiet_routers, simultaneous_open
from tests.small_internet import HOMES, SmallInternet, unavailable_reason

ATTEMPTS = 3
SKEW_S = 0.020            # B dials this long after A: more than the path takes, so A's SYN always arrives first
FIRST_PORT = 41_000


@pytest.fixture
def internet():
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    with SmallInternet() as topology, Observer(topology):
        yield topology


def attempts(internet: SmallInternet) -> list[dict]:
    return [simultaneous_open(internet, FIRST_PORT + n * len(HOMES), SKEW_S) for n in range(ATTEMPTS)]


def test_masquerade_keeps_the_source_port(internet):
    for sides in attempts(internet):
        for host, side in sides.items():
            home = next(home for home in HOMES if home.host == host)
            assert side.observed == (home.wan_ip, side.port), f"node {host} was seen as {side.observed}"


def test_routers_that_reset_unsolicited_syns_defeat_a_simultaneous_open(internet):
    for sides in attempts(internet):
        assert {host: side.outcome for host, side in sides.items()} == {"a": "refused", "b": "refused"}, sides


def test_routers_that_drop_unsolicited_packets_let_a_simultaneous_open_connect(internet):
    quiet_routers(internet)
    for sides in attempts(internet):
        assert all(side.outcome == "connected" and side.exchanged for side in sides.values()), sides
