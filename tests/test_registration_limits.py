"""Registration is open to anyone with a key, and keys are free: a flood of registrations must neither grow the
gateway's providers table without bound nor make every request re-check every stored registration.

The HTTP API runs in-process (the real FastAPI app over ASGI, a real SQLite database); the registrations are real
signed ones from fresh keys.
"""

from __future__ import annotations

import base64
import json

import httpx

from llorch.gateway import limits
from llorch.gateway.api.http_api import build_app
from llorch.ledger.signing import SigningKey
from llorch.node.config import NodeConfig
from llorch.node.register import build_registration
from llorch.node.wire import registration as registration_module
from tests.inprocess import market_gateway


def body(key: SigningKey) -> bytes:
    config = NodeConfig(key_file=None, ledger_path=None, bootstrap=(), trusted_gateways=("x",))
    envelope = build_registration(config, key, "/ip4/203.0.113.20/tcp/4101")
    return json.dumps({"registration": base64.b64encode(envelope).decode()}).encode()


async def register(app, key: SigningKey, source: str) -> httpx.Response:
    transport = httpx.ASGITransport(app=app, client=(source, 40000))
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
        return await client.post("/v2/platform/providers/register", content=body(key))


async def test_one_source_cannot_flood_registrations_and_others_still_register(tmp_path):
    async with market_gateway(tmp_path, SigningKey.generate()) as built:
        app = build_app(built.gateway)
        answers = [await register(app, SigningKey.generate(), "198.51.100.9") for _ in range(20)]
        statuses = [answer.status_code for answer in answers]
        allowed = limits.REGISTRATIONS_PENDING_PER_SOURCE_MAX
        assert statuses == [201] * allowed + [429] * (20 - allowed), statuses
        assert "awaiting the operator's review" in answers[-1].json()["error"]["message"]
        assert answers[-1].headers["retry-after"] == "3600"
        assert (await register(app, SigningKey.generate(), "203.0.113.7")).status_code == 201
        assert len(await built.gateway.providers.all()) == allowed + 1
        # an operator decision frees the source's quota: approved providers are not pending
        first = answers[0].json()["provider_id"]
        await built.gateway.providers.set_status(first, "approved")
        assert (await register(app, SigningKey.generate(), "198.51.100.9")).status_code == 201


async def test_the_pending_registrations_are_capped_across_sources(tmp_path, monkeypatch):
    monkeypatch.setattr(limits, "REGISTRATIONS_PENDING_MAX", 10)
    async with market_gateway(tmp_path, SigningKey.generate()) as built:
        app = build_app(built.gateway)
        statuses = [(await register(app, SigningKey.generate(), f"198.51.100.{n}")).status_code for n in range(15)]
        assert statuses == [201] * 10 + [429] * 5, statuses
        assert len(await built.gateway.providers.all()) == 10


async def test_a_registration_does_not_make_the_next_request_recheck_every_stored_one(tmp_path, monkeypatch):
    """Before, each registration marked the provider cache dirty, and the next request parsed and signature-checked
    every stored registration again: with n stored, each new registration cost n verifications."""
    async with market_gateway(tmp_path, SigningKey.generate()) as built:
        app = build_app(built.gateway)
        for n in range(3):
            assert (await register(app, SigningKey.generate(), f"198.51.100.{n}")).status_code == 201
        await built.gateway.providers.all()
        parsed = []
        original = registration_module.Registration.from_envelope.__func__

        def counting(cls, data):
            parsed.append(data)
            return original(cls, data)

        monkeypatch.setattr(registration_module.Registration, "from_envelope", classmethod(counting))
        assert (await register(app, SigningKey.generate(), "198.51.100.99")).status_code == 201
        assert len(await built.gateway.providers.all()) == 4
        assert len(parsed) == 1, f"{len(parsed)} registrations parsed for one new one"
