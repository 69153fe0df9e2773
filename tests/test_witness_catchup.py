"""A witness that falls far behind catches up, in pages, across rounds and restarts, in bounded memory.
Before: a provider with more than 100,000 new entries was refused every round ("more than
one round takes"), so it was never cosigned again. Pages and rounds are made small here (monkeypatched) so the
mechanism runs on 1,000 entries; bench/witness_catchup.py runs 1,000,000."""

from __future__ import annotations

import trio
from libp2p.custom_types import TProtocol

from llorch.gateway.db import open_gateway_db
from llorch.gateway.witness import witness as witness_module
from llorch.gateway.witness.witness import Witness, WitnessBook, witness_forever
from llorch.ledger.signing import SigningKey
from llorch.ledger.store import LedgerStore
from llorch.node.ledger_service import LedgerService
from llorch.node.p2p import running_host
from llorch.node.wire.ledger_protocol import LEDGER_PROTOCOL_ID
from tests.helpers import receipt_fields
from tests.test_ledger_trust import fill

LOOPBACK = "/ip4/127.0.0.1/tcp/0"


async def test_a_witness_far_behind_catches_up_in_pages_across_rounds_and_restarts(tmp_path, monkeypatch):
    monkeypatch.setattr(witness_module, "ENTRIES_PER_PAGE", 100)
    monkeypatch.setattr(witness_module, "PAGES_PER_ROUND", 3)
    provider, gateway = SigningKey.generate(), SigningKey.generate()
    async with LedgerStore.open(tmp_path / "a.sqlite", provider) as ledger, \
            running_host(provider, LOOPBACK) as provider_p2p, running_host(gateway, LOOPBACK) as gateway_p2p:
        async with trio.open_nursery() as nursery:           # concurrent appends: group-committed, quick to fill
            for start in range(0, 1_000, 100):
                nursery.start_soon(fill, ledger, provider, start, 100)
        await ledger.sign_checkpoint()
        service = LedgerService(ledger, frozenset({gateway.public_key}))
        provider_p2p.host.set_stream_handler(TProtocol(LEDGER_PROTOCOL_ID), service.serve_ledger)
        addrs = provider_p2p.addrs()
        sizes = []
        for round_ in range(3):                      # a gateway restart between rounds: a new database handle
            async with open_gateway_db(tmp_path / "gateway.sqlite") as database:
                book = WitnessBook(database)
                state = await Witness(gateway_p2p, gateway, book, [].append).witness(provider.public_key, addrs)
                assert state is not None
                sizes.append(state.size)
                staged = (await database.fetchone("SELECT COUNT(*) FROM provider_entries"))[0]
                assert staged == state.size          # reconcile sees only what a cosigned checkpoint covers
        assert sizes == [0, 0, 0]                    # 900 of 1,000 verified, nothing cosigned yet
        await ledger.append(receipt_fields(provider, "req-late"))            # the ledger grows meanwhile
        await ledger.sign_checkpoint()
        async with open_gateway_db(tmp_path / "gateway.sqlite") as database:
            witness = Witness(gateway_p2p, gateway, WitnessBook(database), [].append)
            state = await witness.witness(provider.public_key, addrs)
            assert state is not None and state.size == 1_000              # the target it started on, cosigned
            assert (await ledger.cosigned())[-1]
            state = await witness.witness(provider.public_key, addrs)
            assert state is not None and state.size == 1_001              # then the rest, as any round
            assert (await database.fetchone("SELECT COUNT(*) FROM provider_entries"))[0] == 1_001
            assert (await database.fetchone("SELECT COUNT(*) FROM catchup_entries"))[0] == 0


async def test_witness_rounds_run_several_providers_at_once(tmp_path, monkeypatch):
    """Before: one provider at a time, so one slow provider delayed every other's round."""
    calls, running, most = [], [0], [0]

    class SlowWitness:
        async def witness(self, provider_key, addrs):
            running[0] += 1
            most[0] = max(most[0], running[0])
            await trio.sleep(0.2)
            running[0] -= 1
            calls.append(provider_key)

    async def providers():
        return [(bytes([n]) * 32, []) for n in range(8)]

    with trio.move_on_after(0.5):
        await witness_forever(SlowWitness(), providers, 10.0)
    assert len(calls) == 8 and most[0] == witness_module.PROVIDERS_AT_ONCE
