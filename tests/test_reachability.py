"""What a node announces: only addresses others can dial. Before, a node listening on 0.0.0.0 gossiped
/ip4/0.0.0.0/... as if it were reachable, and a node behind NAT had nothing true to announce but had to announce
something (an attestation needed at least one address)."""

from __future__ import annotations

import pytest

from llorch.ledger.signing import SigningKey
from llorch.node.config import NodeConfig
from llorch.node.errors import ConfigError
from llorch.node.reachability import announced_addrs
from llorch.node.stream_io import now_ms
from llorch.node.wire.attestation import Attestation, parse_attestation
from tests.helpers import MODEL_ID, MODEL_SHA256

KEY = SigningKey(bytes([7]) * 32)
PUBLIC_GATEWAY = ("/ip4/203.0.113.1/tcp/4001/p2p/12D3KooWRndVhVZPCiQwHBBBdg769GyrPUW13zxwqQyf9r3ANaba",)
LOCAL_GATEWAY = ("/ip4/127.0.0.1/tcp/4001/p2p/12D3KooWRndVhVZPCiQwHBBBdg769GyrPUW13zxwqQyf9r3ANaba",)
LISTENING = ["/ip4/0.0.0.0/tcp/4101", "/ip4/127.0.0.1/tcp/4101", "/ip4/198.51.100.2/tcp/4101", "/ip6/::/tcp/4101",
             "/ip6/::1/tcp/4101"]


def config(**options) -> NodeConfig:
    return NodeConfig(key_file=None, ledger_path=None, trusted_gateways=("x",), **options)


def test_a_node_never_announces_an_unspecified_address_nor_loopback_to_a_remote_gateway():
    announced = announced_addrs(config(bootstrap=PUBLIC_GATEWAY), LISTENING, KEY.peer_id)
    assert announced == [f"/ip4/198.51.100.2/tcp/4101/p2p/{KEY.peer_id}"]


def test_on_a_local_network_loopback_is_dialable():
    announced = announced_addrs(config(bootstrap=LOCAL_GATEWAY), LISTENING, KEY.peer_id)
    assert announced == [f"/ip4/127.0.0.1/tcp/4101/p2p/{KEY.peer_id}", f"/ip4/198.51.100.2/tcp/4101/p2p/{KEY.peer_id}",
                         f"/ip6/::1/tcp/4101/p2p/{KEY.peer_id}"]


def test_configured_announce_addrs_are_announced_exactly():
    announced = announced_addrs(config(bootstrap=PUBLIC_GATEWAY, announce_addrs=("/dns4/lab.example.org/tcp/4101",)),
                                LISTENING, KEY.peer_id)
    assert announced == [f"/dns4/lab.example.org/tcp/4101/p2p/{KEY.peer_id}"]
    with pytest.raises(ConfigError, match="announce_addrs"):
        config(bootstrap=PUBLIC_GATEWAY, announce_addrs=("/ip4/0.0.0.0/tcp/4101",))
    with pytest.raises(ConfigError, match="announce_addrs"):
        config(bootstrap=PUBLIC_GATEWAY, announce_addrs=("/unix/tmp/x",))


def test_a_node_behind_nat_announces_nothing_and_its_attestation_is_valid():
    announced = announced_addrs(config(bootstrap=PUBLIC_GATEWAY), ["/ip4/0.0.0.0/tcp/4101"], KEY.peer_id)
    assert announced == []
    issued = now_ms()
    envelope = Attestation(v=1, provider_key=KEY.public_key, seq=1, issued_ms=issued, expires_ms=issued + 15_000,
                           addrs=announced, models=[{"id": MODEL_ID, "sha256": MODEL_SHA256, "context_tokens": 2048}],
                           engine_build="echo/1", slots_total=1, slots_free=1, queue_depth=0, wait_ms=0,
                           price_in=1, price_out=1, currency="EUR", geo={"country": "DE", "region": "x"},
                           sla={"ttft_ms": 0, "uptime_ppm": 1}).seal(KEY)
    assert parse_attestation(envelope, KEY.public_key, issued).addrs == []
