"""The gateway's gossip path parses and verifies each attestation once: the topic validator keeps what it checked
for the subscription's reader (gateway/run.py ``CheckedAttestations``). What it keeps is bounded, a kept attestation
that expired while it waited is refused like one that arrived expired, and bytes nobody checked are parsed (and
refused when bad) as before."""

from contextlib import asynccontextmanager
from dataclasses import replace

import pytest

from llorch.gateway.attestation_checks import AttestationChecks
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


async def checked_at_once(checks, datas, keys) -> dict:
    """Validations at once, as py-libp2p runs them (up to ten); each one's verdict: the key it carries, or its
    reason. ``checks.run`` runs beside."""
    import trio

    verdicts: dict[int, object] = {}

    async def one(number):
        try:
            verdicts[number] = (await checks.check(datas[number], keys[number].public_key, NOW)).provider_key
        except AttestationRejected as exc:
            verdicts[number] = exc.reason

    async with trio.open_nursery() as validators:
        for number in range(len(datas)):
            validators.start_soon(one, number)
    return verdicts


@asynccontextmanager
async def running(checks):
    import trio

    async with trio.open_nursery() as nursery:
        nursery.start_soon(checks.run)
        yield checks
        nursery.cancel_scope.cancel()


def ten_with_a_forgery():
    keys = [SigningKey.generate() for _ in range(10)]
    datas = [sealed_attestation(key) for key in keys]
    forged = bytearray(datas[4])
    forged[-1] ^= 1
    datas[4] = bytes(forged)
    expected = {number: "bad_signature" if number == 4 else keys[number].public_key for number in range(10)}
    return keys, datas, expected


async def test_attestations_arriving_in_numbers_are_checked_in_a_worker_process_each_with_its_own_verdict():
    """Once they come in numbers (here: from the first), ten validations at once take a few trips to the worker
    process, none is checked on the event loop; a forged one among them is refused with its reason and the others
    pass; each answer is its own."""
    keys, datas, expected = ten_with_a_forgery()
    async with running(AttestationChecks(NONE, rate_min=1)) as checks:
        assert await checked_at_once(checks, datas, keys) == expected
        assert 1 <= checks.batches_in_worker <= 10 and checks.checked_inline == 0
        assert len(checks.worker_pids()) == 1
    assert checks.worker_pids() == []                                    # stopped with the gateway


async def test_a_trickle_of_attestations_is_checked_inline_and_starts_no_process():
    """Fewer than ATTESTATION_WORKER_RATE_MIN a second (a small market, the tests, the demo): no process."""
    keys, datas, expected = ten_with_a_forgery()
    verdicts = {}
    async with running(AttestationChecks(NONE)) as checks:
        for number in range(10):
            verdicts.update({number: value for value in (await checked_at_once(checks, [datas[number]],
                                                                                  [keys[number]])).values()})
    assert verdicts == expected
    assert checks.batches_in_worker == 0 and checks.checked_inline == 10


async def test_a_worker_that_dies_is_replaced_and_its_batch_checked_inline():
    import os
    import signal

    async with running(AttestationChecks(NONE, rate_min=1)) as checks:
        keys, datas, expected = ten_with_a_forgery()
        assert await checked_at_once(checks, datas, keys) == expected
        [pid] = checks.worker_pids()
        os.kill(pid, signal.SIGKILL)
        inline_before = checks.checked_inline
        keys, datas, expected = ten_with_a_forgery()
        assert await checked_at_once(checks, datas, keys) == expected       # the dead worker's batch: inline
        assert checks.checked_inline > inline_before
        keys, datas, expected = ten_with_a_forgery()
        assert await checked_at_once(checks, datas, keys) == expected       # a new worker
        assert checks.worker_pids() and checks.worker_pids() != [pid]
