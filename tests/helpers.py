"""Builders shared by tests: valid tickets and receipt fields with sensible defaults."""

from __future__ import annotations

import secrets

from llorch.ledger.objects import VERSION, Ticket, amount_minor, sampling_sha256
from llorch.ledger.signing import SigningKey, sha256

MODEL_ID = "smollm2-135m-instruct-q4_1"
MODEL_SHA256 = bytes.fromhex("b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53")
SAMPLING = {"seed": 42, "temperature_ppm": 800_000, "top_p_ppm": 950_000, "max_tokens": 32, "stop": []}


def make_ticket(gateway: SigningKey, provider_key: bytes, now_ms: int, request_id: str | None = None,
                **overrides) -> tuple[Ticket, bytes]:
    fields = dict(v=VERSION, request_id=request_id or "req-" + secrets.token_hex(8), gateway_key=gateway.public_key,
                  provider_key=provider_key, tenant="t_test", model_id=MODEL_ID, model_sha256=MODEL_SHA256,
                  sampling=dict(SAMPLING), price_in=100_000, price_out=200_000, currency="EUR",
                  issued_ms=now_ms, expires_ms=now_ms + 60_000)
    fields.update(overrides)
    ticket = Ticket(**fields)
    return ticket, ticket.seal(gateway)


def receipt_fields(provider: SigningKey, request_id: str, tokens_in: int = 17, tokens_out: int = 38,
                   **overrides) -> dict:
    fields = dict(request_id=request_id, ticket_sha256=sha256(request_id.encode()), gateway_key=bytes(32),
                  tenant="t_test", provider_key=provider.public_key, model_id=MODEL_ID, model_sha256=MODEL_SHA256,
                  engine_build="test-build", seed=42, sampling_sha256=sampling_sha256(SAMPLING),
                  tokens_in=tokens_in, tokens_out=tokens_out, accepted_ms=1_000, first_token_ms=1_010,
                  finished_ms=1_200, price_in=100_000, price_out=200_000, currency="EUR",
                  amount=amount_minor(tokens_in, tokens_out, 100_000, 200_000), prompt_commitment=bytes(32),
                  output_sha256=sha256(b"output"), finish_reason="stop")
    fields.update(overrides)
    return fields
