"""/llorch/listing/1: a provider learns its listing from a gateway it trusts (docs/protocol.md §5b).

The attacks come first: a peer asking about another provider learns nothing of it; malformed, oversized or trailing
frames get a clear refusal and change nothing; a gateway's answer about someone else, or a malformed one, is not
taken by the node. Then the answers themselves, against the real gateway database, and over real libp2p on
loopback."""

from __future__ import annotations

import logging
import sqlite3

import pytest
import trio
from libp2p.custom_types import TProtocol
from libp2p.exceptions import BaseLibp2pError
from libp2p.peer.peerinfo import info_from_p2p_addr
from multiaddr import Multiaddr

from llorch.gateway import listing as gateway_listing
from llorch.gateway.db import open_gateway_db
from llorch.gateway.market.providers import ProviderBook
from llorch.gateway.listing import ListingDesk
from llorch.gateway.witness.witness import WitnessBook
from llorch.ledger import canonical
from llorch.ledger.errors import StoreError
from llorch.ledger.signing import SigningKey
from llorch.node.config import NodeConfig
from llorch.node.errors import ProtocolError
from llorch.node.p2p import running_host
from llorch.node.register import build_registration
from llorch.node.listing import Listings, ListingUnknown, ask_listing, keep_listing, observed
from llorch.node.stream_io import now_ms
from llorch.node.wire.frames import OneFrame, encode_uvarint
from llorch.node.wire.registration import Registration
from llorch.node.wire.listing import (LISTING_PROTOCOL_ID, AskListing, Listing, ListingRefused,
                                       decode_answer)

LOOPBACK = "/ip4/127.0.0.1/tcp/0"
GATEWAY_MS = 1_790_000_000_000


def frame(fields) -> bytes:
    body = canonical.encode(fields)
    return encode_uvarint(len(body)) + body


def tables(path) -> dict:
    """Every row of the tables a listing answer reads, to show it wrote nothing."""
    with sqlite3.connect(path) as connection:
        return {table: sorted(connection.execute(f"SELECT * FROM {table}").fetchall())
                for table in ("providers", "forks", "fork_history", "witnessed")}


class Gateway:
    def __init__(self, database, path) -> None:
        self.path = path
        self.providers = ProviderBook(database)
        self.witness_book = WitnessBook(database)
        self.desk = ListingDesk(self.providers, self.witness_book, clock=lambda: GATEWAY_MS)

    async def register(self, key: SigningKey, country: str = "DE") -> None:
        config = NodeConfig(key_file="k", ledger_path="l", bootstrap=(),
                            trusted_gateways=(SigningKey.generate().peer_id,), country=country, region="Berlin")
        envelope = build_registration(config, key, "/ip4/127.0.0.1/tcp/4101")
        await self.providers.register(Registration.from_envelope(envelope), envelope, now_ms())


@pytest.fixture
async def gateway(tmp_path):
    async with open_gateway_db(tmp_path / "gateway.sqlite") as database:
        yield Gateway(database, tmp_path / "gateway.sqlite")


async def ask(gateway: Gateway, asker: SigningKey, about: str | None = None) -> Listing | ListingRefused:
    answer = await gateway.desk.answer(AskListing(about or asker.peer_id).to_bytes(), asker.peer_id)
    return decode_answer(answer.to_bytes())           # as the node parses it


# -- attacks ------------------------------------------------------------------------------------------------------
async def test_a_peer_asking_about_another_provider_learns_nothing_of_it(gateway):
    victim, attacker = SigningKey.generate(), SigningKey.generate()
    await gateway.register(victim, country="IT")     # "I" is not in base58: no peer id in the answer can hold it
    await gateway.providers.set_status(victim.peer_id, "suspended")
    await gateway.witness_book.record_fork(victim.public_key, "two different roots for size 3", ["a", "b"])
    before = tables(gateway.path)
    answer = await ask(gateway, attacker, about=victim.peer_id)
    assert isinstance(answer, ListingRefused) and answer.code == "not_yourself"
    assert attacker.peer_id in answer.message                  # told whom it may ask about: itself
    leaked = answer.to_bytes()
    for secret in (b"IT", b"suspended", b"roots", victim.peer_id.encode()):
        assert secret not in leaked
    assert tables(gateway.path) == before
    own = await ask(gateway, attacker)                         # about itself it learns only its own listing
    assert own.provider_id == attacker.peer_id and own.status == "unregistered" and own.country is None


MALFORMED = {
    "not msgpack": (encode_uvarint(3) + b"\xc1\xc1\xc1", "not canonical msgpack"),
    "not a map": (frame(["ask"]), "must be a map"),
    "wrong type": (frame({"t": "listing", "provider_id": "x"}), "t='ask'"),
    "missing key": (frame({"t": "ask"}), "exactly the keys"),
    "extra key": (frame({"t": "ask", "provider_id": "P", "as": "admin"}), "exactly the keys"),
    "not a peer id": (frame({"t": "ask", "provider_id": "12D3KooWnotapeerid"}), "not the peer id"),
    "bytes as the id": (frame({"t": "ask", "provider_id": b"\x00" * 38}), "must be a peer id"),
    "trailing bytes": (None, "length prefix does not match"),
    "oversized": (encode_uvarint(10_000) + b"\x80", "limit 128"),
    "long varint": (b"\xff\xff\xff\xff\x01", "longer than 4 bytes"),
    "over-long varint": (b"\x83\x00" + b"\x80" * 3, "minimal varint"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
async def test_a_malformed_question_gets_a_clear_refusal_and_changes_nothing(gateway, case):
    asker = SigningKey.generate()
    await gateway.register(asker)
    data, expected = MALFORMED[case]
    if data is None:
        data = AskListing(asker.peer_id).to_bytes() + b"\x00"
    before = tables(gateway.path)
    answer = decode_answer((await gateway.desk.answer(data, asker.peer_id)).to_bytes())
    assert isinstance(answer, ListingRefused) and answer.code == "malformed", answer
    assert expected in answer.message, answer.message
    assert tables(gateway.path) == before


async def test_a_database_fault_while_answering_is_a_refusal_and_one_log_line_without_a_traceback(gateway, caplog):
    """Before: a listing question that met a dropped PostgreSQL connection logged the StoreError's whole traceback
    (a CI run of tests/test_cli_on_postgres.py failed on it). A database fault is expected and the node asks again:
    the answer is ``unavailable`` and the log has one warning line naming the fault; a bug keeps its traceback."""
    asker = SigningKey.generate()
    await gateway.register(asker)

    async def dropped(provider_id):
        raise StoreError("PostgreSQL error on postgresql://db/x: terminating connection due to administrator command")

    gateway.providers.get = dropped
    with caplog.at_level(logging.WARNING, logger=gateway_listing.log.name):
        answer = await ask(gateway, asker)
    assert isinstance(answer, ListingRefused) and answer.code == "unavailable", answer
    [record] = [r for r in caplog.records if r.name == gateway_listing.log.name]
    assert record.levelno == logging.WARNING and record.exc_info is None
    assert "terminating connection" in record.getMessage() and asker.peer_id in record.getMessage()

    async def bug(provider_id):
        raise KeyError("a bug")

    caplog.clear()
    gateway.providers.get = bug
    with caplog.at_level(logging.WARNING, logger=gateway_listing.log.name):
        answer = await ask(gateway, asker)
    assert isinstance(answer, ListingRefused) and answer.code == "unavailable", answer
    [record] = [r for r in caplog.records if r.name == gateway_listing.log.name]
    assert record.levelno == logging.ERROR and record.exc_info is not None


def test_unsorted_keys_are_refused_by_the_strict_parser():
    good = AskListing(SigningKey.generate().peer_id).to_bytes()
    prefix, body = good[:1], good[1:]                     # a 1-byte length: the body is under 128 bytes
    assert body[0] == 0x82 and body[-6:] == b"\xa1t\xa3ask"
    unsorted = prefix + body[:1] + body[-6:] + body[1:-6]     # {"t": ..., "provider_id": ...}
    assert len(unsorted) == len(good) and unsorted != good
    with pytest.raises(ProtocolError, match="not canonical"):
        AskListing.from_bytes(unsorted)


STATEMENT = {"run_id": "2026-11-1", "month": "2026-11", "paid": 120_000, "carried": 3_456, "state": "sent"}
PAYOUTS = {"balance": -5, "minimum": 10_000_000, "next_run_ms": GATEWAY_MS, "account": "DE89 •••• 3000",
           "statements": [STATEMENT]}


def test_a_listing_carries_the_providers_payouts_when_the_gateway_has_them():
    """docs/protocol.md §5b: ``payouts`` is optional (absent, the frame is as before) and round-trips exactly."""
    plain = decode_answer(frame(answer_fields()))
    assert plain.payouts is None and b"payouts" not in plain.to_bytes()
    told = decode_answer(frame(answer_fields(payouts=PAYOUTS)))
    assert told.payouts == PAYOUTS and decode_answer(told.to_bytes()) == told


def answer_fields(**changes) -> dict:
    fields = {"t": "listing", "provider_id": SigningKey.generate().peer_id, "status": "pending", "country": "DE",
              "geo_certified": False, "fork_detected_ms": None, "fork_reason": None, "gateway_ms": GATEWAY_MS}
    return {**fields, **changes}


@pytest.mark.parametrize("changes, expected", [
    ({"status": "admin"}, "status must be one of"),
    ({"country": "de"}, "ISO 3166-1"),
    ({"country": "DE\n"}, "ISO 3166-1"),
    ({"status": "unregistered"}, "nil exactly when"),
    ({"country": None}, "nil exactly when"),
    ({"geo_certified": 1}, "must be a bool"),
    ({"fork_detected_ms": 5}, "both nil or both set"),
    ({"fork_detected_ms": -5, "fork_reason": "x"}, "integer time"),
    ({"fork_detected_ms": 5, "fork_reason": "x" * 257}, "at most 256"),
    ({"gateway_ms": "now"}, "integer time"),
    ({"extra": 1}, "exactly the keys"),
    ({"t": "listings"}, "t='listing'"),
    ({"payouts": {"balance": 1}}, "payouts must be a map of exactly"),
    ({"payouts": {**PAYOUTS, "balance": "1.50"}}, "payouts.balance must be an integer"),
    ({"payouts": {**PAYOUTS, "minimum": -1}}, "payouts.minimum must be an integer"),
    ({"payouts": {**PAYOUTS, "statements": [{**STATEMENT, "state": "lost"}]}}, "state is one of"),
    ({"payouts": {**PAYOUTS, "statements": [STATEMENT] * 13}}, "at most 12"),
    ({"payouts": {**PAYOUTS, "account": ""}}, "payouts.account must be a non-empty"),
])
def test_the_node_refuses_a_malformed_answer(changes, expected):
    with pytest.raises(ProtocolError, match=expected):
        decode_answer(frame(answer_fields(**changes)))


def test_the_node_does_not_take_an_answer_about_another_peer_or_a_refusal():
    me, other = SigningKey.generate().peer_id, SigningKey.generate().peer_id
    about_other = decode_answer(frame(answer_fields(provider_id=other)))
    with pytest.raises(ListingUnknown, match=f"listing of {other}, not of this node"):
        observed(about_other, me, "gw", 0, 10)
    with pytest.raises(ListingUnknown, match="refused the listing question .busy"):
        observed(ListingRefused("busy", "later"), me, "gw", 0, 10)


def test_an_oversized_or_trailing_answer_is_refused_before_it_is_buffered():
    reader = OneFrame(1024, "listing")
    with pytest.raises(ProtocolError, match="5000 bytes announced, limit 1024"):
        reader.receive_data(encode_uvarint(4998) + b"\x00")
    reader = OneFrame(1024, "listing")
    good = ListingRefused("busy", "later").to_bytes()
    with pytest.raises(ProtocolError, match="bytes after"):
        reader.receive_data(good + b"\x00")
    reader = OneFrame(1024, "listing")
    for byte in good:                                      # one byte at a time is fine
        reader.receive_data(bytes([byte]))
    assert reader.frame == good


# -- answers ------------------------------------------------------------------------------------------------------
async def test_the_answer_follows_the_operators_decisions_and_the_witness(gateway):
    provider = SigningKey.generate()
    assert (await ask(gateway, provider)).status == "unregistered"
    await gateway.register(provider, country="FR")
    answer = await ask(gateway, provider)
    assert (answer.status, answer.country, answer.geo_certified, answer.excluded) == ("pending", "FR", False, False)
    assert answer.gateway_ms == GATEWAY_MS
    await gateway.providers.set_status(provider.peer_id, "approved")
    await gateway.providers.certify_geo(provider.peer_id)
    answer = await ask(gateway, provider)
    assert (answer.status, answer.country, answer.geo_certified) == ("approved", "FR", True)
    await gateway.witness_book.record_fork(provider.public_key, "r" * 1000, ["a", "b"])
    answer = await ask(gateway, provider)
    detected = (await gateway.witness_book.exclusion(provider.public_key))[0]
    assert answer.fork_detected_ms == detected and answer.fork_reason == "r" * 255 + "…"   # cut to fit the frame
    await gateway.witness_book.readmit(provider.public_key, "two processes on one ledger", now_ms())
    await gateway.providers.set_status(provider.peer_id, "suspended")
    answer = await ask(gateway, provider)
    assert (answer.status, answer.excluded, answer.fork_reason) == ("suspended", False, None)


async def test_over_libp2p_the_node_learns_its_own_listing_and_the_clock_offset(gateway):
    provider, stranger, gateway_key = SigningKey.generate(), SigningKey.generate(), SigningKey.generate()
    await gateway.register(provider)
    await gateway.providers.set_status(provider.peer_id, "approved")
    gateway.desk.clock = lambda: now_ms() + 42_000         # the gateway's clock is 42 s ahead
    async with running_host(gateway_key, LOOPBACK) as gateway_p2p, running_host(provider, LOOPBACK) as node_p2p, \
            running_host(stranger, LOOPBACK) as stranger_p2p:
        gateway_p2p.host.set_stream_handler(TProtocol(LISTING_PROTOCOL_ID), gateway.desk.serve_listing)
        gateway_id = gateway_p2p.host.get_id()
        with pytest.raises(ListingUnknown, match="not connected"):        # never dials on its own
            await ask_listing(node_p2p, gateway_id)
        for p2p in (node_p2p, stranger_p2p):
            with trio.fail_after(10):
                await p2p.host.connect(info_from_p2p_addr(Multiaddr(f"{gateway_p2p.addrs()[0]}/p2p/"
                                                                    f"{gateway_key.peer_id}")))
        seen = await ask_listing(node_p2p, gateway_id)
        assert seen.listing.provider_id == provider.peer_id and seen.listing.status == "approved"
        assert abs(seen.clock_offset_ms - 42_000) <= seen.round_trip_ms // 2 + 5 and seen.round_trip_ms < 5_000

        # A stranger asks about the provider over its own (Noise-authenticated) connection: refused, nothing said.
        stream = await stranger_p2p.host.new_stream(gateway_id, [TProtocol(LISTING_PROTOCOL_ID)])
        await stream.write(AskListing(provider.peer_id).to_bytes())
        reader = OneFrame(1024, "listing")
        with trio.fail_after(10):
            while reader.frame is None:
                reader.receive_data(await stream.read(1024))
        refused = decode_answer(reader.frame)
        assert isinstance(refused, ListingRefused) and refused.code == "not_yourself"

        # A node that keeps asking keeps the latest answer per gateway, and the reason it could not ask another.
        listings, absent = Listings(), SigningKey.generate().peer_id
        async with trio.open_nursery() as nursery:
            nursery.start_soon(keep_listing, node_p2p, (gateway_key.peer_id, absent), listings)
            with trio.fail_after(10):
                while gateway_key.peer_id not in listings.latest or absent not in listings.failures:
                    await trio.sleep(0.05)
            nursery.cancel_scope.cancel()
        document = listings.document(gateway_key.peer_id, now_ms())
        assert document["listing"]["status"] == "approved" and document["listing_error"] is None
        assert "not connected" in listings.document(absent, now_ms())["listing_error"]


async def test_a_question_that_never_arrives_is_dropped_after_the_timeout(gateway, monkeypatch):
    monkeypatch.setattr(gateway_listing.limits, "LISTING_READ_TIMEOUT_S", 0.3)
    provider, gateway_key = SigningKey.generate(), SigningKey.generate()
    async with running_host(gateway_key, LOOPBACK) as gateway_p2p, running_host(provider, LOOPBACK) as node_p2p:
        gateway_p2p.host.set_stream_handler(TProtocol(LISTING_PROTOCOL_ID), gateway.desk.serve_listing)
        with trio.fail_after(10):
            await node_p2p.host.connect(info_from_p2p_addr(Multiaddr(f"{gateway_p2p.addrs()[0]}/p2p/"
                                                                     f"{gateway_key.peer_id}")))
        stream = await node_p2p.host.new_stream(gateway_p2p.host.get_id(), [TProtocol(LISTING_PROTOCOL_ID)])
        await stream.write(AskListing(provider.peer_id).to_bytes()[:5])        # and then nothing
        with trio.fail_after(5):
            try:
                data = await stream.read(1024)
            except BaseLibp2pError:                          # reset by the gateway
                data = b""
        assert data == b""                                   # no answer; the slot is free again
        assert gateway.desk.limiter.borrowed_tokens == 0


async def test_a_gateway_without_the_protocol_is_reported_not_taken(gateway):
    provider, gateway_key = SigningKey.generate(), SigningKey.generate()
    async with running_host(gateway_key, LOOPBACK) as gateway_p2p, running_host(provider, LOOPBACK) as node_p2p:
        with trio.fail_after(10):
            await node_p2p.host.connect(info_from_p2p_addr(Multiaddr(f"{gateway_p2p.addrs()[0]}/p2p/"
                                                                     f"{gateway_key.peer_id}")))
        with pytest.raises(ListingUnknown, match="listing question to .* failed"):
            await ask_listing(node_p2p, gateway_p2p.host.get_id())
