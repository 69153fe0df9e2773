"""Unmarked probes (gateway/probes.py, docs/verification.md §6) against a real in-process market (real libp2p,
real SQLite), echo engines: a probe's answer is established by two providers of the class and a provider that
answers otherwise is caught like by a spot-check; a probe cannot be told from a customer's request; and a provider
that does tell them apart (here: told the probe pseudonym) passes every probe and is caught by spot-checks."""

from __future__ import annotations

import dataclasses
import json
import random
import re

from llorch.gateway.spot_checks import evidence_document_of, evidence_list
from llorch.gateway.api.openai_api import request_of
from llorch.gateway.probes import Prober
from llorch.ledger import canonical
from llorch.ledger.evidence import verify_evidence
from llorch.ledger.objects import Ticket
from llorch.node.wire.frames import encode_frame, encode_uvarint
from tests.cheaters import HeldBackEngine, OtherModelEngine, ProbeAwareProvider, ProbeDodgingEngine
from tests.inprocess import market
from tests.test_spot_checks import CONSENTING, serve_until_suspended, time_period

PROBE_TENANT = "platform-probes"


def prober_for(gateway, tenant: str, seed: int) -> Prober:
    """A Prober wired as `llorch gateway start` wires it (gateway/run.py), with a seeded draw."""
    return Prober(gateway.runner, gateway.market, gateway.database, gateway.spot_checks, request_of, 60_000, tenant,
                  rng=random.Random(seed))


def prober_of(m, seed: int = 7) -> Prober:
    return prober_for(m.gateway, PROBE_TENANT, seed)


async def test_a_probe_answer_is_established_by_two_providers_and_a_provider_answering_otherwise_is_caught(tmp_path):
    providers = {"honest1": {}, "honest2": {}, "cheater": {"engine": OtherModelEngine, "price_out": 300_000}}
    async with market(tmp_path, providers, CONSENTING) as m:
        prober = prober_of(m)
        # a new input: the cheapest other provider of the class (honest2) runs it too
        first = await prober.probe(m.providers["honest1"].attestation)
        assert first.verdict == "clean"
        assert await m.rows("SELECT COUNT(*), MIN(verdict) FROM probe_runs") == [(2, "clean")]
        caught = await prober.probe(m.providers["cheater"].attestation)      # the known answer, never sent to it
        cheater = m.providers["cheater"].key
        assert (caught.input_id, caught.verdict, caught.suspect) == (first.input_id, "suspect", cheater.public_key)
        assert (await m.gateway.providers.get(cheater.peer_id)).status == "suspended"
        (listed,) = await evidence_list(m.database)
        document = json.loads(await evidence_document_of(m.database, listed["id"]))
        assert verify_evidence(document).suspect == cheater.public_key
        # three probe runs, each a platform cost; no tenant paid for any
        legs = await m.rows("SELECT debit, tenant FROM postings WHERE leg = 'probe'")
        assert len(legs) == 3 and all(row == ("platform:fees", PROBE_TENANT) for row in legs)
        assert await m.rows("SELECT COUNT(*) FROM postings WHERE debit LIKE 'tenant:%'") == [(0,)]


def frame_map(frame) -> dict:
    """The request frame's map as it goes on the wire (without its length prefix)."""
    return canonical.decode(strip_length(encode_frame(frame)))


def strip_length(encoded: bytes) -> bytes:
    for prefix in range(1, 6):
        if encode_uvarint(len(encoded) - prefix) == encoded[:prefix]:
            return encoded[prefix:]
    raise AssertionError("not a length-prefixed frame")


def shape(value):
    """What a value looks like without what it says: its type, and the shape of its items."""
    if isinstance(value, dict):
        return {key: shape(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [shape(item) for item in value]
    if isinstance(value, str):
        return re.sub(r"[0-9a-f]", "x", value) if re.fullmatch(r"(chatcmpl-|t_)[0-9a-f]+", value) else "str"
    return type(value).__name__


async def test_a_probe_looks_exactly_like_a_customer_request(tmp_path):
    ProbeAwareProvider.seen.clear()
    providers = {"watched": {"cls": ProbeAwareProvider}, "other": {"price_out": 300_000}}   # the customer: watched
    async with market(tmp_path, providers, CONSENTING) as m:
        watched = m.providers["watched"]
        await m.complete("acme", {"messages": [{"role": "user", "content": "What is 2 plus 2?"}], "max_tokens": 16,
                                  "temperature": 0.7})
        customer = [seen for seen in ProbeAwareProvider.seen]
        assert len(customer) == 1, "the customer's request went to the other provider"
        await prober_of(m).probe(watched.attestation)
        (customer_ticket, customer_frame), (probe_ticket, probe_frame) = ProbeAwareProvider.seen[:2]
    # the tickets: the same fields, each value of the same shape; the request id and tenant pseudonym of the same
    # form; the same prices (the same demand multiplier); the same lifetime
    customer_fields, probe_fields = dataclasses.asdict(customer_ticket), dataclasses.asdict(probe_ticket)
    assert shape(customer_fields) == shape(probe_fields)
    assert set(customer_ticket.sampling) == set(probe_ticket.sampling)
    for name in ("v", "gateway_key", "provider_key", "model_id", "model_sha256", "price_in", "price_out",
                 "currency"):
        assert customer_fields[name] == probe_fields[name], name
    assert customer_ticket.expires_ms - customer_ticket.issued_ms == probe_ticket.expires_ms - probe_ticket.issued_ms
    assert customer_ticket.tenant != probe_ticket.tenant          # another tenant, but a pseudonym like any other
    # the request frames: the same keys, a salt of the same size, a prompt of the same form
    customer_map, probe_map = (frame_map(frame) for frame in (customer_frame, probe_frame))
    assert set(customer_map) == set(probe_map)
    assert len(customer_frame.salt) == len(probe_frame.salt)
    assert shape(customer_frame.prompt)["messages"][-1] == shape(probe_frame.prompt)["messages"][-1]
    assert Ticket.from_envelope(customer_frame.ticket) == customer_ticket
    assert Ticket.from_envelope(probe_frame.ticket) == probe_ticket


async def test_a_provider_that_recognises_probes_passes_them_and_is_caught_by_spot_checks(tmp_path):
    providers = {"honest1": {}, "honest2": {},
                 "dodger": {"cls": ProbeAwareProvider, "engine": ProbeDodgingEngine}}
    async with market(tmp_path, providers, CONSENTING, {"spot_check_rate_ppm": 1_000_000}) as m:
        dodger = m.providers["dodger"]
        dodger.service.probe_tenant = m.gateway.runner.tenant_pseudonym(PROBE_TENANT, dodger.key.public_key)
        prober = prober_of(m)
        await prober.probe(m.providers["honest1"].attestation)
        verdicts = [(await prober.probe(dodger.attestation)).verdict for _ in range(5)]
        assert verdicts == ["clean"] * 5 and prober.statistics.suspects == 0
        assert (await m.gateway.providers.get(dodger.key.peer_id)).status == "approved"
        sent, served, _ = await serve_until_suspended(m, dodger, 6)      # customers' requests: re-run, caught
        assert served <= 1 and sent <= 3, (sent, served)
        (listed,) = await evidence_list(m.database)
        assert listed["suspect"] == dodger.key.peer_id


def test_probe_settings_out_of_range_are_refused_with_the_setting_named(tmp_path):
    import pytest

    from llorch.gateway.config import GatewayConfig
    from llorch.node.errors import ConfigError
    paths = dict(key_file=tmp_path / "k", db_path=tmp_path / "d")
    for bad in ({"probe_interval_ms": 500}, {"probe_interval_ms": -1}, {"probe_interval_ms": 86_400_001},
                {"probe_tenant": "no spaces"}, {"probe_tenant": "bootstrap"}):
        with pytest.raises(ConfigError, match=f"gateway.{next(iter(bad))}"):
            GatewayConfig(**paths, **bad)
    assert GatewayConfig(**paths, probe_interval_ms=0).probe_interval_ms == 0


async def test_an_input_with_a_dispute_is_not_sent_again_so_nobody_is_accused_twice_for_it(tmp_path):
    providers = {"honest1": {}, "honest2": {}, "cheater": {"engine": OtherModelEngine, "price_out": 300_000},
                 "honest3": {"price_out": 250_000}}
    async with market(tmp_path, providers, CONSENTING) as m:
        prober = prober_of(m)
        first = await prober.probe(m.providers["honest1"].attestation)
        caught = await prober.probe(m.providers["cheater"].attestation)
        assert caught.verdict == "suspect" and caught.input_id == first.input_id
        later = await prober.probe(m.providers["honest3"].attestation)
        assert later.verdict == "clean" and later.input_id != first.input_id
        assert len(await evidence_list(m.database)) == 1
        statement = await m.gateway.books.statement("platform", None, time_period())
        assert {c["leg"] for c in statement["corrections"]} == {"probe"}     # the platform pays for its probes


async def test_an_honest_run_ending_in_held_back_text_passes_a_probe(tmp_path):
    """A run of max_tokens token frames plus the flush of held-back text (docs/protocol.md §6) is honest: the probe
    and its second run both pass and the answer is established."""
    providers = {"a": {"engine": HeldBackEngine}, "b": {"engine": HeldBackEngine}}
    async with market(tmp_path, providers, CONSENTING) as m:
        verdict = await prober_of(m).probe(m.providers["a"].attestation)
        assert verdict is not None and verdict.verdict == "clean", verdict
        assert await m.rows("SELECT COUNT(*), MIN(verdict) FROM probe_runs") == [(2, "clean")]
