"""py-libp2p's own DCUtR between two nodes behind NAT, as it ships (libp2p.relay.circuit_v2.dcutr, py-libp2p 0.8.1).

In the small internet of tests/small_internet.py (as root): a plain Circuit Relay v2 hop on the public side, node A
behind router 1 reserving a slot on it, node B behind router 2 opening a circuit to A through it, then B asks for a
hole punch (``DCUtRProtocol.initiate_hole_punch``); both run py-libp2p's DCUtR service unmodified, with this
project's host (Noise, Yamux) listening on 0.0.0.0 as a node does. Each ``--rounds`` round builds a fresh topology and
fresh processes, and prints whether B ended with a direct connection to A, how long the punch took, and every address
DCUtR dialled on each side (the unsafe ones are what a project-owned hole punch must not dial).

``--quiet-routers`` and ``--delay-ms`` as in bench/simultaneous_open.py.

    sudo .venv/bin/python bench/dcutr_behind_nat.py [--rounds 3] [--quiet-routers] [--delay-ms 0]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

RELAY_ADDR = "/ip4/203.0.113.10/tcp/4001"
LISTEN = {"relay": RELAY_ADDR, "a": "/ip4/0.0.0.0/tcp/4101", "b": "/ip4/0.0.0.0/tcp/4102"}
WAIT_S = 60
HOLD_S = 15


async def run_role(role: str, workdir: Path) -> None:
    """One process: the relay, node A or node B. Writes ``<role>.id`` and, for A and B, ``<role>.json``."""
    import trio
    from libp2p.peer.id import ID
    from libp2p.peer.peerinfo import info_from_p2p_addr
    from libp2p.relay.circuit_v2.dcutr import DCUtRProtocol
    from libp2p.relay.circuit_v2.protocol import CircuitV2Protocol
    from libp2p.tools.anyio_service import background_trio_service
    from multiaddr import Multiaddr

    from llorch.ledger.signing import SigningKey
    from llorch.node.p2p import connect_relayed, running_host
    from llorch.node.relay import reserve

    class RecordingDCUtR(DCUtRProtocol):
        dialled: list[str] = []

        async def _dial_peer(self, peer_id, addr, source=None, as_responder=False):
            self.dialled.append(str(addr))
            await super()._dial_peer(peer_id, addr, source, as_responder)

    async def wait_for(name: str) -> str:
        with trio.fail_after(WAIT_S):
            while not (workdir / name).exists():
                await trio.sleep(0.1)
        return (workdir / name).read_text()

    def links(p2p, peer: ID) -> list[str]:
        found = p2p.host.get_network().connections.get(peer) or []
        return [str(addr) for conn in (found if isinstance(found, list) else [found])
                for addr in conn.get_transport_addresses()]

    async with running_host(SigningKey.generate(), LISTEN[role]) as p2p:
        (workdir / f"{role}.id").write_text(p2p.peer_id)
        if role == "relay":
            async with background_trio_service(CircuitV2Protocol(p2p.host, allow_hop=True)):
                await wait_for("done")
            return
        relay = await wait_for("relay.id")
        relay_addr = f"{RELAY_ADDR}/p2p/{relay}"
        dcutr = RecordingDCUtR(p2p.host)
        async with background_trio_service(CircuitV2Protocol(p2p.host, allow_hop=False)), \
                background_trio_service(dcutr):
            await p2p.host.connect(info_from_p2p_addr(Multiaddr(relay_addr)))
            result = {}
            if role == "a":
                await reserve(p2p, ID.from_base58(relay))
                (workdir / "a.ready").write_text("")
                await wait_for("b.json")
                result["links_to_b"] = links(p2p, ID.from_base58((workdir / "b.id").read_text()))
            else:
                await wait_for("a.ready")
                a = ID.from_base58((workdir / "a.id").read_text())
                result["relayed"] = await connect_relayed(p2p, a, [f"{relay_addr}/p2p-circuit/p2p/{a}"])
                started = time.monotonic()
                result["punched"] = await dcutr.initiate_hole_punch(a)
                result["seconds"] = round(time.monotonic() - started, 2)
                result["links_to_a"] = links(p2p, a)
                await trio.sleep(2)       # A's auto-drive loop (every 2 s) also tries, towards B
            result["dialled"] = dcutr.dialled
            (workdir / f"{role}.json").write_text(json.dumps(result))


def one_round(quiet: bool, delay_ms: int) -> dict:
    from tests.hole_punch import three_process_round
    return three_process_round(__file__, "relay", quiet, delay_ms, WAIT_S + HOLD_S)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quiet-routers", action="store_true")
    parser.add_argument("--delay-ms", type=int, default=0)
    parser.add_argument("--role", choices=sorted(LISTEN), help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role:
        import trio
        logging.basicConfig(level=logging.WARNING)
        trio.run(run_role, args.role, args.workdir)
        return 0
    from tests.small_internet import slow_links_unavailable_reason, unavailable_reason
    reason = unavailable_reason() or (args.delay_ms and slow_links_unavailable_reason())
    if reason:
        print(f"cannot run: {reason}", file=sys.stderr)
        return 2
    print(f"routers {'drop' if args.quiet_routers else 'reset'} unsolicited packets; public links "
          f"{args.delay_ms} ms each way")
    for n in range(args.rounds):
        result = one_round(args.quiet_routers, args.delay_ms)
        a, b = result.get("a", {}), result.get("b", {})
        direct = [addr for addr in b.get("links_to_a", []) if "/p2p-circuit" not in addr]
        print(f"round {n + 1}: relayed {b.get('relayed')}, punched {b.get('punched')} in {b.get('seconds')} s, "
              f"B's direct links to A {direct}")
        print(f"  B dialled {sorted(set(b.get('dialled', [])))}")
        print(f"  A dialled {sorted(set(a.get('dialled', [])))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
