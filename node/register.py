"""`llorch node register`: sign this node's registration and POST it to a gateway (the seed's
`/v2/platform/providers/register`). The operator then approves it (and certifies its geo claim), unless it carries
a join token the operator made (`llorch gateway providers invite`): then it is approved at once."""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request

from llorch.ledger.objects import VERSION
from llorch.ledger.signing import SigningKey
from llorch.node.config import NodeConfig
from llorch.node.wire.registration import Registration
from llorch.node.stream_io import now_ms

REGISTER_TIMEOUT_S = 15


def build_registration(config: NodeConfig, key: SigningKey, endpoint: str) -> bytes:
    registration = Registration(
        v=VERSION, provider_key=key.public_key, provider_id=key.peer_id, endpoint=endpoint,
        pricing={"currency": config.currency, "input_per_1m": config.price_in_per_1m,
                 "output_per_1m": config.price_out_per_1m},
        capacity={"slots": config.slots, "gpus": config.gpus, "vram_gb": config.vram_gb},
        sla={"uptime_ppm": config.sla_uptime_ppm, "ttft_ms": config.sla_ttft_ms},
        geo={"country": config.country, "region": config.region}, issued_ms=now_ms(),
        payout={"holder": config.payout_holder, "iban": config.payout_iban.replace(" ", "").upper(),
                "bic": config.payout_bic.replace(" ", "").upper() or None, "currency": config.currency}
        if config.payout_iban else None)
    return registration.seal(key)


def register(config: NodeConfig, key: SigningKey, gateway_url: str, endpoint: str,
             token: str | None = None) -> tuple[int, dict]:
    """POST the registration (with a join token when given: approved at once); return (HTTP status, JSON answer)."""
    document = {"registration": base64.b64encode(build_registration(config, key, endpoint)).decode()}
    body = json.dumps({**document, "invitation": token.strip()} if token else document)
    request = urllib.request.Request(gateway_url.rstrip("/") + "/v2/platform/providers/register",
                                     data=body.encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=REGISTER_TIMEOUT_S) as response:
            return response.status, json.loads(response.read(1 << 20))
    except urllib.error.HTTPError as exc:
        try:
            return exc.code, json.loads(exc.read(1 << 20) or b"{}")
        except ValueError:                        # a proxy's HTML page, say
            return exc.code, {}


def refusal_text(answer: dict) -> str:
    error = answer.get("error") if isinstance(answer, dict) else None
    return str(error.get("message")) if isinstance(error, dict) else str(answer)[:300]
