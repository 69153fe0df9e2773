"""A witness 1,000,000 entries behind one provider: time to catch up and the witness process's peak RSS.

The provider's ledger is written directly (tests/helpers.py ``write_ledger_file``: real signed receipts, one
checkpoint at the end) and served by the node's LedgerService over real libp2p on loopback, in this process; the
gateway's witness runs in a child process on its own SQLite database, round after round (each at most
PAGES_PER_ROUND pages of ENTRIES_PER_PAGE entries) until the checkpoint is cosigned; its peak RSS is read from
getrusage. Both share this machine's 2 cores (the witness checks signatures in one worker thread). Prints the
figures and PASS/FAIL: caught up, and peak RSS under 512 MiB (one page at a time, whatever the gap; the floor
compares with what holding every entry in memory would take, about 1 GiB here).

    .venv/bin/python bench/witness_catchup.py [--entries 1000000]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from libp2p.custom_types import TProtocol  # noqa: E402

from llorch.ledger.signing import SigningKey, load_key_file, write_key_file  # noqa: E402
from llorch.ledger.store import LedgerStore  # noqa: E402
from llorch.node.ledger_service import LedgerService  # noqa: E402
from llorch.node.p2p import running_host  # noqa: E402
from llorch.node.wire.ledger_protocol import LEDGER_PROTOCOL_ID  # noqa: E402
from tests.helpers import write_ledger_file  # noqa: E402

RSS_FLOOR_MIB = 512


async def witness_child(gateway_key_path: str, provider_key_hex: str, addrs: list[str], database: str) -> None:
    """The gateway side: rounds until the provider's checkpoint is cosigned; prints JSON (seconds, rounds)."""
    from llorch.gateway.db import open_gateway_db
    from llorch.gateway.witness.witness import Witness, WitnessBook

    gateway, provider_key = load_key_file(gateway_key_path), bytes.fromhex(provider_key_hex)
    started, rounds, size = time.monotonic(), 0, 0
    async with open_gateway_db(Path(database)) as db, running_host(gateway, "/ip4/127.0.0.1/tcp/0") as p2p:
        witness = Witness(p2p, gateway, WitnessBook(db), lambda key: None)
        while True:
            rounds += 1
            state = await witness.witness(provider_key, addrs)
            size = state.size if state is not None else size
            done = (await db.fetchone("SELECT COUNT(*) FROM witness_catchup"))[0] == 0 and size > 0
            if done:
                break
    print(json.dumps({"seconds": time.monotonic() - started, "rounds": rounds, "size": size}))


async def provider_side(workdir: Path, entries: int) -> dict:
    provider, gateway = SigningKey.generate(), SigningKey.generate()
    write_key_file(workdir / "gateway.key", gateway)
    started = time.monotonic()
    write_ledger_file(workdir / "ledger.sqlite", provider, entries, checkpoint_every=entries, tree=True)
    print(f"wrote a ledger of {entries} signed receipts in {time.monotonic() - started:.0f} s", flush=True)
    async with LedgerStore.open(workdir / "ledger.sqlite", provider) as ledger, \
            running_host(provider, "/ip4/127.0.0.1/tcp/0") as p2p:
        p2p.host.set_stream_handler(TProtocol(LEDGER_PROTOCOL_ID),
                                    LedgerService(ledger, frozenset({gateway.public_key})).serve_ledger)
        child = await trio.run_process(
            [sys.executable, __file__, "--child", str(workdir / "gateway.key"), provider.public_key.hex(),
             json.dumps(p2p.addrs()), str(workdir / "gateway.sqlite")], capture_stdout=True, check=True)
        report = json.loads(child.stdout.decode().strip().splitlines()[-1])
        report["cosigned"] = bool(await ledger.cosigned())
    report["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return report


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        trio.run(witness_child, sys.argv[2], sys.argv[3], json.loads(sys.argv[4]), sys.argv[5])
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entries", type=int, default=1_000_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        report = trio.run(provider_side, Path(workdir), args.entries)
    print(f"witness caught up {report['size']} entries in {report['seconds']:.0f} s over {report['rounds']} rounds "
          f"({report['seconds'] / max(1, report['size']) * 1e6:.0f} µs an entry); witness peak RSS "
          f"{report['peak_rss_mib']:.0f} MiB; the provider holds the cosignature: {report['cosigned']}")
    ok = report["size"] == args.entries and report["cosigned"] and report["peak_rss_mib"] < RSS_FLOOR_MIB
    print(f"{'PASS' if ok else 'FAIL'} caught up {report['size']}/{args.entries}, peak RSS "
          f"{report['peak_rss_mib']:.0f} MiB < {RSS_FLOOR_MIB} MiB")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
