"""Who may read a provider's ledger over /llorch/ledger/1, over real libp2p hosts.

Checkpoints and proofs are public (anyone may check a receipt's inclusion); full entries go only to the node's
trusted gateways and to the holder of an auditor grant the provider signed. Before this, any peer could download
every entry of every provider.
"""

from __future__ import annotations

import hmac
import re
import subprocess

import openai
import pytest
from llorch.gateway.localnet import LocalNetwork, llorch_command
from llorch.ledger.objects import Receipt
from llorch.ledger.signing import SigningKey
from llorch.ledger.store import LedgerStore
from llorch.ledger.verify import verify
from llorch.node.ledger_client import LedgerRequestFailed, fetch_ledger, request_ledger
from llorch.node.ledger_service import LedgerService
from llorch.node.p2p import running_host
from llorch.node.stream_io import now_ms
from llorch.node.wire.auditor_grant import AuditorGrant
from llorch.node.wire.ledger_protocol import (LEDGER_PROTOCOL_ID, CheckpointReply, EntriesReply, GetCheckpoint,
                                              GetEntries, GetInclusion, ProofReply)
from libp2p.custom_types import TProtocol
from tests.helpers import MODEL_ID, receipt_fields
from tests.inprocess import market

LOOPBACK = "/ip4/127.0.0.1/tcp/0"
DAY_MS = 86_400_000


def grant(provider: SigningKey, auditor: SigningKey, issued_ms: int | None = None, days: int = 30) -> bytes:
    issued = now_ms() if issued_ms is None else issued_ms
    return AuditorGrant(v=1, provider_key=provider.public_key, auditor_key=auditor.public_key, issued_ms=issued,
                        expires_ms=issued + days * DAY_MS).seal(provider)


async def test_entries_only_to_trusted_gateways_and_grant_holders_checkpoints_and_proofs_to_anyone(tmp_path):
    provider, gateway, auditor, stranger = (SigningKey.generate() for _ in range(4))
    async with LedgerStore.open(tmp_path / "l.sqlite", provider) as ledger, \
            running_host(provider, LOOPBACK) as provider_p2p:
        for i in range(5):
            await ledger.append(receipt_fields(provider, f"req-{i:08d}"))
        service = LedgerService(ledger, frozenset({gateway.public_key}))
        provider_p2p.host.set_stream_handler(TProtocol(LEDGER_PROTOCOL_ID), service.serve_ledger)
        addrs = provider_p2p.addrs()

        async def ask(key: SigningKey, request):
            """The reply, or the refusal as a LedgerRequestFailed (returned, not raised)."""
            async with running_host(key, LOOPBACK) as p2p:
                try:
                    return await request_ledger(p2p, provider.public_key, addrs, request)
                except LedgerRequestFailed as refused:
                    return refused

        refused = await ask(stranger, GetEntries(0, 5))                # the attack: a stranger downloads it all
        assert isinstance(refused, LedgerRequestFailed) and refused.code == "not_authorized"
        assert isinstance(await ask(stranger, GetCheckpoint()), CheckpointReply)
        assert isinstance(await ask(stranger, GetInclusion(2, 5)), ProofReply)
        assert len((await ask(gateway, GetEntries(0, 5))).entries) == 5

        reply = await ask(auditor, GetEntries(0, 5, grant(provider, auditor)))
        assert isinstance(reply, EntriesReply) and len(reply.entries) == 5
        for who, bad_grant, why in [
                (stranger, grant(provider, auditor), "another peer's grant"),
                (auditor, grant(provider, auditor, issued_ms=now_ms() - 40 * DAY_MS), "an expired grant"),
                (auditor, AuditorGrant(
                    v=1, provider_key=stranger.public_key, auditor_key=auditor.public_key, issued_ms=now_ms(),
                    expires_ms=now_ms() + DAY_MS).seal(stranger), "a grant signed by someone else"),
                (auditor, b"\x81\xa1p\xc4\x00", "garbage")]:
            refused = await ask(who, GetEntries(0, 5, bad_grant))
            assert isinstance(refused, LedgerRequestFailed) and refused.code == "not_authorized", (why, refused)


async def test_an_auditor_fetches_a_whole_ledger_with_a_grant_and_it_verifies(tmp_path):
    provider, gateway, auditor = (SigningKey.generate() for _ in range(3))
    async with LedgerStore.open(tmp_path / "l.sqlite", provider) as ledger, \
            running_host(provider, LOOPBACK) as provider_p2p:
        for i in range(12):
            await ledger.append(receipt_fields(provider, f"req-{i:08d}"))
        service = LedgerService(ledger, frozenset({gateway.public_key}))
        provider_p2p.host.set_stream_handler(TProtocol(LEDGER_PROTOCOL_ID), service.serve_ledger)
        address = f"{provider_p2p.addrs()[0]}/p2p/{provider_p2p.peer_id}"
        async with running_host(auditor, LOOPBACK) as p2p:
            material = await fetch_ledger(p2p, address, grant(provider, auditor), page_entries=5)
        assert len(material.entries) == 12 and len(material.checkpoints) == 1
        assert verify(material).entries == 12


@pytest.mark.e2e
def test_grant_auditor_then_ledger_fetch_then_verify_on_a_running_node(tmp_path, model_path):
    """The commands a provider and an auditor run, against a real node process."""
    net = LocalNetwork(tmp_path)
    try:
        net.start_gateway()
        node = net.start_node("audited", extra='engine = "echo"\n')
        net.wait_for_providers(1)
        client = openai.OpenAI(base_url=net.base_url, api_key=net.api_key, max_retries=0, timeout=60)
        for seed in range(3):
            client.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": "hi"}],
                                           max_tokens=4, seed=seed)
        auditor = net.key("auditor")
        address = node["addrs"][0] if "/p2p/" in node["addrs"][0] else f"{node['addrs'][0]}/p2p/{node['peer_id']}"
        refused = subprocess.run(llorch_command() + ["ledger", "fetch", address, "--key", "auditor.key", "--out",
                                                     "no.bundle"], cwd=tmp_path, capture_output=True, text=True,
                                 timeout=60)
        assert refused.returncode == 2 and "not_authorized" in refused.stderr and "Traceback" not in refused.stderr
        assert not (tmp_path / "no.bundle").exists()
        net.cli("node", "grant-auditor", auditor.peer_id, "--config", "audited.toml", "--days", "7",
                "--out", "auditor.grant")
        fetched = net.cli("ledger", "fetch", address, "--key", "auditor.key", "--grant", "auditor.grant",
                          "--out", "audited.bundle")
        assert "fetched 3 entries" in fetched
        assert "OK" in net.cli("ledger", "verify", "audited.bundle")
    finally:
        net.stop()


async def test_a_tenants_pseudonym_differs_at_every_provider_and_is_not_keyed_with_the_signing_seed(tmp_path):
    """Ledgers are read by auditors and witnesses: the same tenant must not be linkable across providers, and the
    pseudonym key is derived (HKDF) rather than the gateway's Ed25519 seed itself."""
    async with market(tmp_path, {"a": {}, "b": {}}) as built:
        await built.complete("acme", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "seed": 1})
        served = [p for p in built.providers.values() if p.ledger.size == 1]
        assert len(served) == 1
        await built.gateway.providers.set_status(served[0].key.peer_id, "suspended")
        await built.complete("acme", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "seed": 1})
        pseudonyms = {name: Receipt.from_envelope((await p.ledger.entries(0, 1))[0]).tenant
                      for name, p in built.providers.items()}
        assert pseudonyms["a"] != pseudonyms["b"], pseudonyms
        assert all(re.fullmatch(r"t_[0-9a-f]{24}", value) for value in pseudonyms.values())
        seed_keyed = "t_" + hmac.new(built.key.seed, b"llorch/tenant/v1\x00acme", "sha256").hexdigest()[:24]
        assert seed_keyed not in pseudonyms.values()
