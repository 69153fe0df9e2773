"""Helper processes for tests/test_settlement_crash.py (not a test module).

    python -m tests.crash_gateway provider DIR        a provider (test-only echo engine, real libp2p host, real
                                                      SQLite ledger) that serves until killed
    python -m tests.crash_gateway gateway DIR STEP    a gateway that serves one request from that provider and
                                                      SIGKILLs itself at STEP, between signing the ticket and
                                                      settling it

Keys are DIR/gateway.key and DIR/provider.key (made by the test); the provider writes DIR/provider.json (its
attestation) once it listens.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import trio
from libp2p.custom_types import TProtocol

from llorch.gateway.books import tickets as tickets_module
from llorch.gateway.books.settlement import Event, Meter
from llorch.gateway.market.tenants import TenantBook
from llorch.ledger.signing import load_key_file
from llorch.ledger.store import LedgerStore
from llorch.node.config import NodeConfig
from llorch.node.ledger_service import LedgerService, sign_checkpoints
from llorch.node.p2p import running_host
from llorch.node.register import build_registration
from llorch.node.run import build_attestation
from llorch.node.service import EnginePool, ProviderService
from llorch.node.stream_io import now_ms
from llorch.node.wire.attestation import Attestation
from llorch.node.wire.infer_protocol import INFER_PROTOCOL_ID
from llorch.node.wire.ledger_protocol import LEDGER_PROTOCOL_ID
from llorch.node.wire.registration import Registration
from tests.fakes import FakeEngine

STEPS = ("issued", "accepted", "relaying", "final", "settled")
LOOPBACK = "/ip4/127.0.0.1/tcp/0"


def node_config(workdir: Path) -> NodeConfig:
    gateway = load_key_file(workdir / "gateway.key")
    return NodeConfig(key_file=workdir / "provider.key", ledger_path=workdir / "provider.sqlite", bootstrap=(),
                      trusted_gateways=(gateway.peer_id,), engine="echo")


async def provider(workdir: Path) -> None:
    config, key = node_config(workdir), load_key_file(workdir / "provider.key")
    trusted = frozenset({load_key_file(workdir / "gateway.key").public_key})
    pool = EnginePool([FakeEngine(0.05)])
    async with LedgerStore.open(config.ledger_path, key) as ledger, running_host(key, LOOPBACK) as p2p:
        service = ProviderService(key.public_key, trusted, pool, ledger,
                                  {e.entry.id: bytes.fromhex(e.entry.sha256) for e in pool.engines},
                                  (config.price_in_per_1m, config.price_out_per_1m, config.currency))
        p2p.host.set_stream_handler(TProtocol(INFER_PROTOCOL_ID), service.serve_inference)
        p2p.host.set_stream_handler(TProtocol(LEDGER_PROTOCOL_ID), LedgerService(ledger, trusted).serve_ledger)
        attestation = build_attestation(config, key, p2p, pool, 1, now_ms())
        registration = build_registration(config, key, p2p.addrs()[0])
        (workdir / "provider.json").write_text(json.dumps({"attestation": attestation.hex(),
                                                           "registration": registration.hex()}))
        await sign_checkpoints(ledger, 1, 0.1)


def crash_at(step: str) -> None:
    """Make this process SIGKILL itself at ``step``: the durable state is whatever was committed before it."""
    def die() -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    if step in ("issued", "settled"):
        name = "issue" if step == "issued" else "settle"
        original = getattr(tickets_module.TicketBook, name)

        async def then_die(self, *args, **kwargs):
            await original(self, *args, **kwargs)
            die()

        setattr(tickets_module.TicketBook, name, then_die)
        return
    event = {"accepted": Event.ACCEPTED, "relaying": Event.TOKEN, "final": Event.FINAL}[step]
    handle = Meter.handle

    def handle_then_die(self, name, now_ms, texts=None):
        state = handle(self, name, now_ms, texts)
        if name is event and (event is not Event.TOKEN or self.frames >= 2):
            die()
        return state

    Meter.handle = handle_then_die


async def gateway(workdir: Path, step: str) -> None:
    from tests.inprocess import market_gateway
    published = json.loads((workdir / "provider.json").read_text())
    attestation_bytes, registration = (bytes.fromhex(published[k]) for k in ("attestation", "registration"))
    async with market_gateway(workdir, load_key_file(workdir / "gateway.key")) as m:
        m.gateway.directory.observe(Attestation.from_envelope(attestation_bytes))
        await m.gateway.providers.register(Registration.from_envelope(registration), registration, now_ms())
        await m.gateway.providers.set_status(Registration.from_envelope(registration).provider_id, "approved")
        if await TenantBook(m.database).get("acme") is None:
            await m.gateway.tenants.add("acme", "hobby", None, False, False, None, None, None, now_ms())
        crash_at(step)
        await m.complete("acme", {"messages": [{"role": "user", "content": "one two three"}], "max_tokens": 8,
                                  "seed": 5})
        print("served without crashing", file=sys.stderr)


if __name__ == "__main__":
    role, directory = sys.argv[1], Path(sys.argv[2])
    trio.run(provider, directory) if role == "provider" else trio.run(gateway, directory, sys.argv[3])
