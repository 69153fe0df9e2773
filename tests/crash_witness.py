"""Helper process for tests/test_witness_crash.py (not a test module).

    python -m tests.crash_witness DIR      serve DIR/provider.sqlite's ledger on a libp2p host and witness it once
                                           into DIR/gateway.sqlite, as the gateway's witness does; print "done"

The test SIGKILLs it at chosen moments of the round. Keys: DIR/provider.key and DIR/gateway.key.
"""

from __future__ import annotations

import sys
from pathlib import Path

import trio
from libp2p.custom_types import TProtocol

from llorch.gateway.db import open_gateway_db
from llorch.gateway.witness.witness import Witness, WitnessBook
from llorch.ledger.signing import load_key_file
from llorch.ledger.store import LedgerStore
from llorch.node.ledger_service import LedgerService
from llorch.node.p2p import running_host
from llorch.node.wire.ledger_protocol import LEDGER_PROTOCOL_ID

LOOPBACK = "/ip4/127.0.0.1/tcp/0"


async def witness_once(workdir: Path) -> None:
    provider, gateway = load_key_file(workdir / "provider.key"), load_key_file(workdir / "gateway.key")
    async with LedgerStore.open(workdir / "provider.sqlite", provider) as ledger, \
            open_gateway_db(workdir / "gateway.sqlite") as database, \
            running_host(provider, LOOPBACK) as provider_p2p, running_host(gateway, LOOPBACK) as gateway_p2p:
        provider_p2p.host.set_stream_handler(TProtocol(LEDGER_PROTOCOL_ID),
                                             LedgerService(ledger, frozenset({gateway.public_key})).serve_ledger)
        print("witnessing", flush=True)
        state = await Witness(gateway_p2p, gateway, WitnessBook(database), lambda key: None).witness(
            provider.public_key, provider_p2p.addrs())
        print("done" if state is not None else "failed", flush=True)


if __name__ == "__main__":
    trio.run(witness_once, Path(sys.argv[1]))
