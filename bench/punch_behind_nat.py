"""This project's hole punch (/llorch/punch/1, node/hole_punch.py) between two hosts behind NAT, round after round.

In the small internet of tests/small_internet.py (as root): a gateway on the public side (Circuit Relay v2 for
approved providers, the dial-back service that signs observations), node A behind router 1 with a reservation on
it, and a peer B behind router 2 (an auditor) that reaches A through the relay and asks for a hole punch. Each
``--rounds`` round builds a fresh topology and fresh processes and prints whether B ended with a direct connection
to A, at which address, how long the punch took, and the addresses node A dialled (only B's router's address).

``--quiet-routers``: routers drop unsolicited packets from the public side (most home routers) instead of answering
them with a reset (Linux with no rule, the topology's default). ``--delay-ms``: each direction of each public link.

    sudo .venv/bin/python bench/punch_behind_nat.py [--rounds 5] [--quiet-routers] [--delay-ms 0]
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

GATEWAY_ADDR = "/ip4/203.0.113.10/tcp/4001"
LISTEN = {"gateway": GATEWAY_ADDR, "a": "/ip4/0.0.0.0/tcp/4101", "b": "/ip4/0.0.0.0/tcp/4102"}
WAIT_S = 60


async def run_role(role: str, workdir: Path) -> None:
    """One process: the gateway, node A or peer B. Writes ``<role>.id`` and, for A and B, ``<role>.json``."""
    import trio
    from libp2p.custom_types import TProtocol
    from libp2p.peer.id import ID
    from libp2p.peer.peerinfo import info_from_p2p_addr
    from libp2p.tools.anyio_service import background_trio_service
    from multiaddr import Multiaddr

    from llorch.gateway.relay import DialbackProbes, ProviderRelay
    from llorch.ledger.signing import SigningKey
    from llorch.node.hole_punch import Punches, PunchFailed, punch
    from llorch.node.p2p import connect_relayed, running_host
    from llorch.node.relay import Reach, TrustedStop, relayed_addr, reserve
    from llorch.node.wire.dialback import DIALBACK_PROTOCOL_ID
    from llorch.node.wire.punch import PUNCH_PROTOCOL_ID

    async def wait_for(name: str) -> str:
        with trio.fail_after(WAIT_S):
            while not (workdir / name).exists():
                await trio.sleep(0.1)
        return (workdir / name).read_text()

    key = SigningKey.generate()
    async with running_host(key, LISTEN[role]) as p2p:
        (workdir / f"{role}.id").write_text(p2p.peer_id)
        if role == "gateway":
            approved = ID.from_base58(await wait_for("a.id"))

            async def may_reserve(peer) -> bool:
                return peer == approved
            p2p.host.set_stream_handler(TProtocol(DIALBACK_PROTOCOL_ID), DialbackProbes(key).serve)
            async with background_trio_service(ProviderRelay(p2p.host, may_reserve)):
                await wait_for("done")
            return
        gateway = await wait_for("gateway.id")
        gateway_addr = f"{GATEWAY_ADDR}/p2p/{gateway}"
        await p2p.host.connect(info_from_p2p_addr(Multiaddr(gateway_addr)))
        result: dict = {}
        if role == "a":
            reach = Reach()
            p2p.host.set_stream_handler(TProtocol(PUNCH_PROTOCOL_ID), Punches(p2p, reach, frozenset({gateway})).serve)
            network = p2p.host.get_network()
            dialled: list[str] = []
            real = network.dial_addr

            async def recording(addr, peer, source=None):
                dialled.append(str(addr))
                return await real(addr, peer, source)
            network.dial_addr = recording
            async with background_trio_service(TrustedStop(p2p.host, frozenset({gateway}))):
                while True:
                    try:
                        await reserve(p2p, ID.from_base58(gateway))
                        break
                    except Exception:              # the gateway has not read a.id yet
                        await trio.sleep(0.2)
                (workdir / "a.ready").write_text(relayed_addr(gateway_addr, p2p.peer_id))
                await wait_for("b.json")
            result = {"dialled": sorted(set(dialled)), "punched": {peer: addr for peer, (addr, _) in
                                                                   reach.punched.items()}}
        else:
            circuit = await wait_for("a.ready")
            a = ID.from_base58((workdir / "a.id").read_text())
            result["relayed"] = await connect_relayed(p2p, a, [circuit])
            started = time.monotonic()
            try:
                result["direct"] = await punch(p2p, a)
            except PunchFailed as exc:
                result["failed"] = str(exc)
            result["seconds"] = round(time.monotonic() - started, 2)
        (workdir / f"{role}.json").write_text(json.dumps(result))


def one_round(quiet: bool, delay_ms: int) -> dict:
    from tests.hole_punch import three_process_round
    return three_process_round(__file__, "gateway", quiet, delay_ms, 2 * WAIT_S)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
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
    direct = 0
    for n in range(args.rounds):
        result = one_round(args.quiet_routers, args.delay_ms)
        a, b = result.get("a", {}), result.get("b", {})
        direct += bool(b.get("direct"))
        print(f"round {n + 1}: relayed {b.get('relayed')}, direct {b.get('direct') or 'no: ' + str(b.get('failed'))}"
              f" in {b.get('seconds')} s; A dialled {a.get('dialled')}")
    print(f"direct in {direct} of {args.rounds} rounds")
    return 0


if __name__ == "__main__":
    sys.exit(main())
