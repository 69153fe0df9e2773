"""The gateway's gossip path parses and verifies each attestation once: the topic validator keeps what it checked
for the subscription's reader (gateway/run.py ``CheckedAttestations``). What it keeps is bounded, a kept attestation
that expired while it waited is refused like one that arrived expired, and bytes nobody checked are parsed (and
refused when bad) as before."""

from dataclasses import replace

import pytest

from llorch.gateway.run import CheckedAttestations
from llorch.ledger.signing import SigningKey
from llorch.node.errors import AttestationRejected
from llorch.node.wire import attestation as wire
from tests.test_checks import NOW, sealed_attestation

NONE: frozenset[str] = frozenset()


def test_the_reader_takes_what_the_validator_checked_without_verifying_it_again(monkeypatch):
    key = SigningKey.generate()
    data = sealed_attestation(key)
    checked = CheckedAttestations()
    kept = wire.parse_attestation(data, key.public_key, NOW)
    checked.keep(data, kept)

    def never(*args, **kwargs):
        raise AssertionError("parsed a second time")
    monkeypatch.setattr("llorch.gateway.run.parse_attestation", never)
    assert checked.take(data, key.public_key, NOW, NONE) is kept


def test_a_kept_attestation_that_expired_while_it_waited_is_refused():
    key = SigningKey.generate()
    data = sealed_attestation(key)
    checked = CheckedAttestations()
    kept = wire.parse_attestation(data, key.public_key, NOW)
    checked.keep(data, kept)
    with pytest.raises(AttestationRejected) as refused:
        checked.take(data, key.public_key, kept.expires_ms, NONE)
    assert refused.value.reason == "expired"


def test_what_is_kept_is_bounded_and_the_forgotten_are_parsed_again():
    keys = [SigningKey.generate() for _ in range(3)]
    checked = CheckedAttestations(size=2)
    datas = [sealed_attestation(key) for key in keys]
    parsed = [wire.parse_attestation(data, key.public_key, NOW) for data, key in zip(datas, keys)]
    for data, attestation in zip(datas, parsed):
        checked.keep(data, attestation)
    again = checked.take(datas[0], keys[0].public_key, NOW, NONE)
    assert again is not parsed[0] and again == parsed[0]          # forgotten: parsed anew
    assert checked.take(datas[2], keys[2].public_key, NOW, NONE) is parsed[2]


def test_unchecked_bytes_are_parsed_and_a_forged_signature_refused():
    key = SigningKey.generate()
    data = bytearray(sealed_attestation(key))
    data[-1] ^= 1
    with pytest.raises(AttestationRejected) as refused:
        CheckedAttestations().take(bytes(data), key.public_key, NOW, NONE)
    assert refused.value.reason == "bad_signature"


def test_kept_address_parses_never_keep_a_refusal():
    """A bad address is refused each time it comes (the parse cache holds only successes), and a good one that is
    kept still names its own peer only."""
    key, other = SigningKey.generate(), SigningKey.generate()
    for _ in range(2):
        with pytest.raises(wire.RuleBroken):
            wire.check_multiaddr("/ip4/not-an-address/tcp/1", key.peer_id)
    good = f"/ip4/127.0.0.1/tcp/4001/p2p/{key.peer_id}"
    wire.check_multiaddr(good, key.peer_id)
    with pytest.raises(wire.RuleBroken):
        wire.check_multiaddr(good, other.peer_id)


def test_a_reread_of_the_provider_book_checks_only_changed_registrations(tmp_path, monkeypatch):
    """An operator command (another connection) moves SQLite's data_version and PostgreSQL replicas re-read every
    second: the book reads every row again, but parses and signature-checks only registrations whose bytes changed
    (it checked all 10,000 on every re-read before)."""
    import random
    import sqlite3

    import trio

    from bench.market_scale import register
    from llorch.gateway.db import open_gateway_db
    from llorch.gateway.market import providers as book_module
    from llorch.gateway.market.providers import ProviderBook

    parsed = []
    real = book_module.Registration.from_envelope

    def counted(envelope):
        parsed.append(envelope)
        return real(envelope)

    async def main():
        keys = [SigningKey.generate() for _ in range(20)]
        async with open_gateway_db(tmp_path / "gateway.sqlite") as database:
            await register(database, keys, random.Random(1), NOW)
            book = ProviderBook(database)
            monkeypatch.setattr(book_module.Registration, "from_envelope", staticmethod(counted))
            assert len(await book.all()) == 20 and len(parsed) == 20
            other = sqlite3.connect(tmp_path / "gateway.sqlite")       # the operator suspends one
            other.execute("UPDATE providers SET status = 'suspended' WHERE provider_id = ?", (keys[3].peer_id,))
            other.commit()
            records = {record.provider_id: record for record in await book.all()}
            assert len(parsed) == 20                                      # nothing checked again
            assert records[keys[3].peer_id].status == "suspended" and records[keys[4].peer_id].approved
            newer = replace(records[keys[6].peer_id].registration, issued_ms=NOW + 1).seal(keys[6])
            other.execute("UPDATE providers SET registration = ? WHERE provider_id = ?", (newer, keys[6].peer_id))
            other.commit()
            other.close()
            records = {record.provider_id: record for record in await book.all()}
            assert records[keys[6].peer_id].registration.issued_ms == NOW + 1
            assert len(parsed) == 21                                      # the changed one, and only it
    trio.run(main)
