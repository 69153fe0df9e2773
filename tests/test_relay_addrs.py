"""Relayed addresses in attestations (docs/protocol.md §5): a node behind NAT announces
`/ip4/<relay>/tcp/<port>/p2p/<relay>/p2p-circuit/p2p/<node>`, and a gateway accepts exactly that shape, through a relay
it trusts. Before, any address ending in the signer's peer id passed: a circuit through an arbitrary peer (so the
gateway's witness, or an auditor, would dial a stranger and ask it to open circuits), nested circuits, and a bare
`/p2p/<someone>/p2p/<signer>` with no circuit at all."""

from __future__ import annotations

import pytest

from llorch.ledger.signing import SigningKey
from llorch.node.errors import AttestationRejected
from llorch.node.wire.attestation import parse_attestation
from tests.test_checks import NOW, sealed_attestation

NODE = SigningKey(bytes([7]) * 32)
RELAY = SigningKey(bytes([9]) * 32).peer_id           # the gateway the node reserved a slot on
STRANGER = SigningKey(bytes([11]) * 32).peer_id
RELAYS = frozenset({RELAY})
CIRCUIT = f"/ip4/203.0.113.10/tcp/4001/p2p/{RELAY}/p2p-circuit/p2p/{NODE.peer_id}"


def parse(addrs, relays=RELAYS):
    return parse_attestation(sealed_attestation(NODE, addrs=addrs), NODE.public_key, NOW, relays)


def test_a_circuit_through_a_trusted_relay_is_accepted():
    assert parse([CIRCUIT]).addrs == [CIRCUIT]
    dns = f"/dns4/gw.example.org/tcp/4001/p2p/{RELAY}/p2p-circuit/p2p/{NODE.peer_id}"
    assert parse([dns, f"/ip4/198.51.100.2/tcp/4101/p2p/{NODE.peer_id}"]).addrs[0] == dns


@pytest.mark.parametrize("addr, reason, match", [
    (CIRCUIT.replace(RELAY, STRANGER), "untrusted_relay", "relay .* this gateway does not trust"),
    (f"/ip4/203.0.113.10/tcp/4001/p2p/{RELAY}/p2p-circuit/p2p/{STRANGER}/p2p-circuit/p2p/{NODE.peer_id}",
     "bad_address", "one circuit"),                                              # nested circuits
    (f"/ip4/203.0.113.10/tcp/4001/p2p-circuit/p2p/{NODE.peer_id}", "bad_address", "relay's peer id"),
    (f"/p2p/{RELAY}/p2p-circuit/p2p/{NODE.peer_id}", "bad_address", "transport"),   # no way to reach the relay
    (f"/ip4/203.0.113.10/tcp/4001/p2p/{NODE.peer_id}/p2p-circuit/p2p/{NODE.peer_id}", "bad_address",
     "through itself"),
    (f"/ip4/203.0.113.10/tcp/4001/p2p/{RELAY}/p2p-circuit", "bad_address", "end in /p2p/"),
    (f"/ip4/203.0.113.10/udp/4001/quic-v1/p2p/{RELAY}/p2p-circuit/p2p/{NODE.peer_id}", "bad_address", "over tcp"),
    (f"/ip4/203.0.113.10/tcp/4001/p2p/{STRANGER}/p2p/{NODE.peer_id}", "bad_address", "one /p2p/"),  # no circuit
    (f"/ip4/203.0.113.10/tcp/4001/p2p-circuit/tcp/4002/p2p/{NODE.peer_id}", "bad_address", "relay's peer id"),
])
def test_hostile_relayed_addresses_are_dropped_with_a_reason(addr, reason, match):
    with pytest.raises(AttestationRejected, match=match) as caught:
        parse([addr])
    assert caught.value.reason == reason


def test_a_gateway_that_trusts_no_relay_drops_every_circuit():
    with pytest.raises(AttestationRejected, match="does not trust") as caught:
        parse([CIRCUIT], relays=frozenset())
    assert caught.value.reason == "untrusted_relay"


def test_the_address_cases_of_the_vector_get_their_verdict():
    from tests.fixtures.make_vectors import GATEWAY, PROVIDER
    from tests.test_vectors import load

    for case in load("attestation_vector.json")["address_cases"]:
        envelope = sealed_attestation(PROVIDER, addrs=[case["addr"]])
        if case["verdict"] == "accept":
            assert parse_attestation(envelope, PROVIDER.public_key, NOW, frozenset({GATEWAY.peer_id})).addrs
            continue
        with pytest.raises(AttestationRejected) as caught:
            parse_attestation(envelope, PROVIDER.public_key, NOW, frozenset({GATEWAY.peer_id}))
        assert caught.value.reason == case["reason"], case["addr"]
