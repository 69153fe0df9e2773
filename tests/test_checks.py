"""Pure checks at the trust boundaries: attestations (gateway), tickets (provider), receipts (gateway)."""

import pytest

from llorch.gateway.market.directory import ProviderDirectory
from llorch.gateway.errors import ReceiptRejected
from llorch.gateway.books.receipts import check_receipt
from llorch.ledger import canonical
from llorch.ledger.objects import VERSION, Receipt, amount_minor, prompt_commitment, sampling_sha256
from llorch.ledger.signing import SigningKey, open_envelope, sha256
from llorch.node.wire.attestation import parse_attestation
from llorch.node.errors import AttestationRejected, TicketRejected
from llorch.node.service import EnginePool, ProviderService
from tests.helpers import MODEL_ID, MODEL_SHA256, SAMPLING, make_ticket, receipt_fields
from tests.test_placement import attestation

NOW = 10_000_000


# --- attestations ----------------------------------------------------------------------------------------------

def sealed_attestation(key, **overrides):
    fields = attestation(key=key).to_payload()
    fields.update(overrides)
    return key.seal("attestation", fields)


def test_valid_attestation_parses():
    key = SigningKey.generate()
    assert parse_attestation(sealed_attestation(key), key.public_key, NOW).provider_key == key.public_key


def test_attestation_republished_by_another_peer_is_dropped():
    key = SigningKey.generate()
    with pytest.raises(AttestationRejected, match="other than its signer"):
        parse_attestation(sealed_attestation(key), SigningKey.generate().public_key, NOW)


def test_forged_attestation_is_dropped():
    key = SigningKey.generate()
    payload, payload_bytes, signature = open_envelope(sealed_attestation(key))
    forged = canonical.encode({"p": canonical.encode({**payload, "price_out": 1}), "s": signature})
    with pytest.raises(AttestationRejected, match="signature"):
        parse_attestation(forged, key.public_key, NOW)


@pytest.mark.parametrize("overrides, reason", [
    ({"expires_ms": NOW - 1, "issued_ms": NOW - 5000}, "expired"),
    ({"issued_ms": NOW + 60_000, "expires_ms": NOW + 70_000}, "future"),
    ({"slots_free": 5}, "slots_free"),
    ({"geo": {"country": "Germany", "region": "x"}}, "geo"),
    ({"addrs": [f"/ip4/192.0.2.{n}/tcp/4101" for n in range(1, 10)]}, "more than 8 addrs"),   # none is valid: NAT
    ({"addrs": ["/foo"]}, "not a multiaddr"),                               # once killed every gateway
    ({"addrs": ["/unix/tmp/llorch"]}, "transport"),
    ({"addrs": ["/tcp/4101"]}, "transport"),
    ({"addrs": ["/ip4/192.0.2.1/tcp/4101/p2p/" + SigningKey.generate().peer_id]}, "another peer"),
    ({"addrs": ["/ip4/192.0.2.1/tcp/" + "1" * 300]}, "at most 256 characters"),
    ({"expires_ms": 2**63 - 1}, "valid for at most"),                        # never expiring
])
def test_bad_attestations_are_dropped_with_a_reason(overrides, reason):
    key = SigningKey.generate()
    with pytest.raises(AttestationRejected, match=reason):
        parse_attestation(sealed_attestation(key, **overrides), key.public_key, NOW)


def test_oversized_attestation_is_dropped_before_parsing():
    with pytest.raises(AttestationRejected, match="limit"):
        parse_attestation(b"\x00" * 9000, None, NOW)


def test_directory_requires_increasing_seq():
    key = SigningKey.generate()
    directory = ProviderDirectory()
    first = parse_attestation(sealed_attestation(key, seq=5), key.public_key, NOW)
    directory.observe(first)
    with pytest.raises(AttestationRejected, match="replay"):
        directory.observe(parse_attestation(sealed_attestation(key, seq=5), key.public_key, NOW))
    directory.observe(parse_attestation(sealed_attestation(key, seq=6), key.public_key, NOW))
    assert directory.get(key.public_key).seq == 6
    assert directory.fresh(NOW + 10_000) == []


def test_a_departed_provider_is_out_until_a_newer_attestation_and_a_replay_does_not_bring_it_back():
    key, other = SigningKey.generate(), SigningKey.generate()
    directory = ProviderDirectory()
    told: list[bytes] = []
    directory.changed = told.append
    directory.observe(parse_attestation(sealed_attestation(key, seq=5), key.public_key, NOW))
    directory.departed(other.public_key)                 # a peer the directory does not know: nothing happens
    directory.departed(key.public_key)
    directory.departed(key.public_key)                   # told once
    assert directory.fresh(NOW) == [] and directory.placeable(key.public_key) is None
    assert told == [key.public_key, key.public_key]      # observed, departed
    with pytest.raises(AttestationRejected, match="replay"):   # its last attestation again: still out
        directory.observe(parse_attestation(sealed_attestation(key, seq=5), key.public_key, NOW))
    assert directory.fresh(NOW) == []
    directory.observe(parse_attestation(sealed_attestation(key, seq=6), key.public_key, NOW))
    assert [a.seq for a in directory.fresh(NOW)] == [6] and directory.placeable(key.public_key) is not None


def test_a_flood_of_unapproved_keys_never_pushes_out_an_approved_provider():
    from llorch.gateway import limits as gateway_limits
    honest = SigningKey.generate()
    directory = ProviderDirectory()
    directory.observe(parse_attestation(sealed_attestation(honest), honest.public_key, NOW), approved=True)
    for _ in range(1_000):                              # 1,000 fresh keys, each validly self-signed
        key = SigningKey.generate()
        directory.observe(parse_attestation(sealed_attestation(key), key.public_key, NOW), approved=False)
    assert [a.provider_key for a in directory.fresh(NOW)] == [honest.public_key]   # only approved are placed on
    assert directory.pending() == gateway_limits.PENDING_ATTESTATIONS_MAX           # bounded


# --- tickets (provider side) -------------------------------------------------------------------------------------

@pytest.fixture
def keys():
    return SigningKey.generate(), SigningKey.generate()


def service_for(gateway, provider):
    return ProviderService(provider.public_key, frozenset({gateway.public_key}), EnginePool([]), ledger=None,
                           offered={MODEL_ID: MODEL_SHA256})


def test_good_ticket_is_accepted(keys):
    gateway, provider = keys
    ticket, envelope = make_ticket(gateway, provider.public_key, NOW)
    assert service_for(gateway, provider).check_ticket(envelope, NOW) == ticket


@pytest.mark.parametrize("case, code", [
    ("untrusted", "untrusted_gateway"),
    ("other_provider", "wrong_provider"),
    ("expired", "ticket_expired"),
    ("future", "ticket_from_future"),
    ("model", "model_not_offered"),
    ("tampered", "bad_ticket"),
])
def test_bad_tickets_are_rejected_with_a_code(keys, case, code):
    gateway, provider = keys
    signer, provider_key, now, overrides = gateway, provider.public_key, NOW, {}
    if case == "untrusted":
        signer = SigningKey.generate()
    elif case == "other_provider":
        provider_key = SigningKey.generate().public_key
    elif case == "expired":
        now = NOW + 61_000
    elif case == "future":
        overrides = {"issued_ms": NOW + 120_000, "expires_ms": NOW + 130_000}
    elif case == "model":
        overrides = {"model_sha256": bytes(32)}
    _, envelope = make_ticket(signer, provider_key, NOW, **overrides)
    if case == "tampered":
        envelope = envelope[:-1] + bytes([envelope[-1] ^ 1])
    with pytest.raises(TicketRejected) as caught:
        service_for(gateway, provider).check_ticket(envelope, now)
    assert caught.value.code == code


# --- receipts (gateway side) -------------------------------------------------------------------------------------

PROMPT = {"messages": [{"role": "user", "content": "hi"}]}
SALT = bytes(range(16))


def receipt_for(provider, ticket, ticket_bytes, text, **overrides):
    fields = receipt_fields(provider, ticket.request_id, ticket_sha256=sha256(ticket_bytes),
                            gateway_key=ticket.gateway_key, sampling_sha256=sampling_sha256(SAMPLING),
                            prompt_commitment=prompt_commitment(SALT, PROMPT),
                            output_sha256=sha256(text.encode()), tokens_out=10)
    fields["amount"] = amount_minor(fields["tokens_in"], 10, fields["price_in"], fields["price_out"])
    fields.update(overrides)
    fields.update(v=VERSION, origin=f"llorch/{provider.peer_id}", index=0, prev_hash=bytes(32))
    return Receipt(**fields).seal(provider)


def test_matching_receipt_is_accepted(keys):
    gateway, provider = keys
    ticket, ticket_bytes = make_ticket(gateway, provider.public_key, NOW)
    receipt = receipt_for(provider, ticket, ticket_bytes, "hello")
    assert check_receipt(receipt, ticket, ticket_bytes, SALT, PROMPT, "hello").tokens_out == 10


@pytest.mark.parametrize("relayed, overrides, message", [
    ("hellO", {}, "output_sha256"),
    ("hello", {"seed": 43}, "seed"),
    ("hello", {"price_out": 1}, "price_out"),
    ("hello", {"tokens_out": 999}, "output tokens"),
    ("hello", {"amount": 1}, "amount"),
    ("hello", {"prompt_commitment": bytes(32)}, "prompt_commitment"),
])
def test_mismatching_receipts_are_rejected(keys, relayed, overrides, message):
    gateway, provider = keys
    ticket, ticket_bytes = make_ticket(gateway, provider.public_key, NOW)
    receipt = receipt_for(provider, ticket, ticket_bytes, "hello", **overrides)
    with pytest.raises(ReceiptRejected, match=message):
        check_receipt(receipt, ticket, ticket_bytes, SALT, PROMPT, relayed)


def test_receipt_signed_by_someone_else_is_rejected(keys):
    gateway, provider = keys
    ticket, ticket_bytes = make_ticket(gateway, provider.public_key, NOW)
    impostor = SigningKey.generate()
    receipt = receipt_for(impostor, ticket, ticket_bytes, "hello")
    with pytest.raises(ReceiptRejected, match="provider_key"):
        check_receipt(receipt, ticket, ticket_bytes, SALT, PROMPT, "hello")


def test_an_attestation_waiting_in_the_pending_pool_counts_once_its_provider_is_approved():
    """With a 30 s heartbeat, the attestation a node sent before the operator approved it must not wait for the
    next one: approval takes it from the pending pool (gateway/market/view.py calls ``approved``)."""
    key = SigningKey.generate()
    directory = ProviderDirectory()
    directory.observe(parse_attestation(sealed_attestation(key, seq=5), key.public_key, NOW), approved=False)
    assert directory.fresh(NOW) == [] and directory.pending() == 1
    directory.approved(key.public_key)
    assert [a.seq for a in directory.fresh(NOW)] == [5] and directory.pending() == 0
    directory.approved(key.public_key)                   # nothing pending any more: no change
    assert [a.seq for a in directory.fresh(NOW)] == [5]
