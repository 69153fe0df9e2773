"""Two gateway replicas witnessing one provider through a shared database (gateway/witness/witness.py
``WitnessLeases``), over real libp2p hosts on loopback, on both engines (PostgreSQL skipped, saying why, where it is
not installed). The lease holder runs the full round; the other cosigns what the holder verified, after its own
consistency proof, so the provider's checkpoint carries two independent cosignatures. The attack: a provider that
shows each replica another history (a split view) is caught by the replica the lease does not make check entries.
"""

from __future__ import annotations

from contextlib import asynccontextmanager

from libp2p.custom_types import TProtocol

from llorch.gateway.db import open_gateway_db
from llorch.gateway.witness.witness import Witness, WitnessBook, WitnessLeases
from llorch.ledger.note import check_cosignatures
from llorch.ledger.objects import ledger_origin
from llorch.ledger.signing import SigningKey
from llorch.ledger.store import LedgerStore
from llorch.node.ledger_service import LedgerService
from llorch.node.p2p import running_host
from llorch.node.wire.ledger_protocol import LEDGER_PROTOCOL_ID, witness_name
from tests.test_ledger_trust import LOOPBACK, fill
from tests.test_storage import engine  # noqa: F401  (the fixture: SQLite, then PostgreSQL)

LEASE_MS = 60_000


@asynccontextmanager
async def provider_and_two_replicas(tmp_path, engine):  # noqa: F811
    provider, first, second = (SigningKey.generate() for _ in range(3))
    async with LedgerStore.open(tmp_path / "honest.sqlite", provider) as honest, \
            LedgerStore.open(tmp_path / "rewritten.sqlite", provider) as rewritten, \
            open_gateway_db(engine) as database, \
            running_host(provider, LOOPBACK) as provider_p2p, \
            running_host(first, LOOPBACK) as first_p2p, running_host(second, LOOPBACK) as second_p2p:
        await fill(honest, provider, 0, 6)
        await fill(rewritten, provider, 0, 3)
        await fill(rewritten, provider, 3, 7, tokens_out=1, amount=2)     # another history from entry 3, longer
        trusted = frozenset({first.public_key, second.public_key})
        views = {"honest": LedgerService(honest, trusted), "rewritten": LedgerService(rewritten, trusted)}
        shown = {first_p2p.peer_id: "honest", second_p2p.peer_id: "honest"}

        async def serve(stream) -> None:               # each replica gets the view ``shown`` names for it
            await views[shown[stream.muxed_conn.peer_id.to_base58()]].serve_ledger(stream)

        provider_p2p.host.set_stream_handler(TProtocol(LEDGER_PROTOCOL_ID), serve)
        book, forked = WitnessBook(database), []
        replicas = [Witness(p2p, key, book, forked.append, WitnessLeases(database, p2p.peer_id, LEASE_MS))
                    for p2p, key in ((first_p2p, first), (second_p2p, second))]
        yield provider, honest, replicas, shown, second_p2p.peer_id, book, forked, provider_p2p.addrs()


async def test_the_replica_without_the_lease_cosigns_what_the_holder_verified(tmp_path, engine):  # noqa: F811
    async with provider_and_two_replicas(tmp_path, engine) as (provider, honest, replicas, _, _, book, forked, addrs):
        holder, other = replicas
        assert (await holder.witness(provider.public_key, addrs)).size == 6           # takes the lease, full round
        assert (await other.witness(provider.public_key, addrs)).size == 6            # no lease: cosigns the same
        await fill(honest, provider, 6, 2)
        await holder.witness(provider.public_key, addrs)
        assert (await other.witness(provider.public_key, addrs)).size == 8            # after its own consistency proof
        names = {note_witness for note in await honest.cosigned()
                 for note_witness in [c.name for c in check_cosignatures(note, ledger_origin(provider.public_key),
                                                                         2_000_000_000)]}
        assert names == {witness_name(holder.key.public_key), witness_name(other.key.public_key)}
        assert await book.cosigned_by(other.name, provider.public_key) == \
            (8, (await book.state(provider.public_key)).root)
        assert not forked


async def test_a_split_view_shown_to_one_replica_only_is_caught_by_it(tmp_path, engine):  # noqa: F811
    async with provider_and_two_replicas(tmp_path, engine) as (provider, _, replicas, shown, second, book, forked, addrs):
        holder, other = replicas
        assert (await holder.witness(provider.public_key, addrs)).size == 6
        shown[second] = "rewritten"                  # the provider shows the second replica another history
        assert await other.witness(provider.public_key, addrs) is None
        assert forked == [provider.public_key]
        reason, evidence = await book.fork_evidence(provider.public_key)
        assert "consistent" in reason and len(evidence) >= 2
        assert await book.forked() == {provider.public_key}                       # every replica excludes it
        assert await book.cosigned_by(other.name, provider.public_key) is None    # and it cosigned nothing
