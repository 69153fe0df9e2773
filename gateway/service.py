"""The gateway's request flow, hop by hop (docs/architecture.md numbers the same steps):

  (1)-(2) authenticate the API key → tenant (one configured key for now);
  (3) place: rank fresh providers that offer the model (gateway/placement.py);
  (4) sign a ticket for the chosen provider;
  (5)-(7) relay over /llorch/infer/1 (gateway/node_client.py): busy or failure before the first token → next
      candidate; failure after it → a clean error (never a second provider's text spliced in);
  (8) check the receipt against the ticket and the relayed text (gateway/receipts.py) and store it.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
from dataclasses import dataclass
from typing import Awaitable, Callable

from gateway import limits
from gateway.config import GatewayConfig
from gateway.directory import ProviderDirectory
from gateway.errors import AuthError, BadRequest, ModelNotFound, NoProvider, ProviderFailed
from gateway.node_client import AttemptFailed, InferenceCall, request_inference
from gateway.openai_api import ChatRequest
from gateway.placement import rank_providers
from gateway.receipts import ReceiptBook, check_receipt
from ledger.objects import VERSION, Receipt, Ticket
from ledger.signing import SigningKey, peer_id_of
from node.attestation import Attestation
from node.errors import ProtocolError
from node.frames import Final, Request
from node.limits import SALT_BYTES
from node.models import catalog_model_ids, catalog_pin
from node.p2p import P2P
from node.stream_io import now_ms

log = logging.getLogger("llorch.gateway")

CURRENCY = "EUR"
CHARS_PER_TOKEN_ESTIMATE = 4


def new_request_id() -> str:
    return "chatcmpl-" + secrets.token_hex(12)


@dataclass(frozen=True)
class Completion:
    """What the customer gets back: the text, and the verified receipt that bills it."""

    request_id: str
    text: str
    receipt: Receipt
    provider_peer_id: str
    seed: int
    salt: bytes


class Gateway:
    def __init__(self, config: GatewayConfig, key: SigningKey, p2p: P2P, directory: ProviderDirectory,
                 receipts: ReceiptBook) -> None:
        self.config = config
        self.key = key
        self.p2p = p2p
        self.directory = directory
        self.receipts = receipts
        self._last_placed_ms: dict[bytes, int] = {}

    # (1)-(2) --------------------------------------------------------------------------------------------------
    def authenticate(self, authorization: str | None) -> str:
        """Return the tenant's pseudonym for a valid ``Authorization: Bearer <key>`` header; else AuthError."""
        if not authorization or not authorization.startswith("Bearer "):
            raise AuthError("missing API key: send the header `Authorization: Bearer <api key>`")
        presented = hashlib.sha256(authorization[len("Bearer "):].strip().encode()).hexdigest()
        if not hmac.compare_digest(presented, self.config.api_key_sha256):
            raise AuthError("incorrect API key")
        return self.tenant_pseudonym(self.config.tenant)

    def tenant_pseudonym(self, tenant: str) -> str:
        """A stable pseudonym for the ledger: nobody but this gateway can link it to the tenant's name."""
        return "t_" + hmac.new(self.key.seed, b"llorch/tenant/v1\x00" + tenant.encode(), "sha256").hexdigest()[:24]

    def offered_models(self) -> list[str]:
        fresh = self.directory.fresh(now_ms())
        return [m for m in catalog_model_ids() if any(a.offers(m, catalog_pin(m)) for a in fresh)]

    # (3)-(8) --------------------------------------------------------------------------------------------------
    async def complete(self, chat: ChatRequest, tenant: str, on_text: Callable[[str], Awaitable[None]],
                       request_id: str | None = None) -> Completion:
        """Serve one chat request, passing text to ``on_text`` as it arrives; return the verified completion."""
        pin = catalog_pin(chat.model)
        if pin is None:
            raise ModelNotFound(f"the model {chat.model!r} does not exist (known: {', '.join(catalog_model_ids())})",
                                param="model")
        prompt = chat.prompt()
        prompt_chars = sum(len(m["content"]) for m in prompt["messages"])
        now = now_ms()
        candidates = rank_providers(self.directory.fresh(now), chat.model, pin, CURRENCY, now, self._last_placed_ms,
                                    prompt_chars // CHARS_PER_TOKEN_ESTIMATE + 1, chat.max_tokens_effective)
        if not candidates:
            raise NoProvider(f"no provider offering {chat.model} has a free slot right now; retry shortly")
        request_id = request_id or new_request_id()
        seed = chat.seed if chat.seed is not None else secrets.randbelow(2**32)
        salt = secrets.token_bytes(SALT_BYTES)
        failures: list[str] = []
        for provider in candidates[:limits.PLACEMENT_ATTEMPTS_MAX]:
            ticket, ticket_bytes = self.issue_ticket(request_id, tenant, chat, pin, seed, provider)
            self._last_placed_ms[provider.provider_key] = now_ms()
            try:
                async with request_inference(self.p2p, provider, Request(ticket_bytes, salt, prompt)) as call:
                    return await self._relay(call, ticket, ticket_bytes, salt, prompt, on_text, provider)
            except AttemptFailed as exc:
                if exc.code == "bad_request":      # the request itself is unservable: no other provider would differ
                    raise BadRequest(f"the provider refused the request before any work: {exc}") from None
                log.info("provider %s did not take %s: %s", peer_id_of(provider.provider_key), request_id, exc)
                failures.append(f"{peer_id_of(provider.provider_key)[-8:]}: {exc}")
        if all("busy" in failure for failure in failures):
            raise NoProvider(f"every provider offering {chat.model} is busy; retry shortly")
        raise ProviderFailed(f"no provider could serve the request ({'; '.join(failures)})")

    def issue_ticket(self, request_id: str, tenant: str, chat: ChatRequest, pin: bytes, seed: int,
                     provider: Attestation) -> tuple[Ticket, bytes]:
        issued = now_ms()
        ticket = Ticket(
            v=VERSION, request_id=request_id, gateway_key=self.key.public_key, provider_key=provider.provider_key,
            tenant=tenant, model_id=chat.model, model_sha256=pin,
            sampling=chat.sampling(seed),
            price_in=provider.price_in, price_out=provider.price_out, currency=provider.currency,
            issued_ms=issued, expires_ms=issued + limits.TICKET_LIFETIME_MS)
        return ticket, ticket.seal(self.key)

    async def _relay(self, call: InferenceCall, ticket: Ticket, ticket_bytes: bytes, salt: bytes, prompt: dict,
                     on_text: Callable[[str], Awaitable[None]], provider: Attestation) -> Completion:
        pieces: list[str] = []
        while True:
            try:
                frame = await call.next_frame()
            except ProtocolError as exc:
                if not pieces:
                    raise AttemptFailed(str(exc)) from None
                raise ProviderFailed(f"the provider failed mid-stream after {len(pieces)} tokens: {exc}") from None
            if isinstance(frame, Final):
                text = "".join(pieces)
                receipt = check_receipt(frame.receipt, ticket, ticket_bytes, salt, prompt, text)
                await self.receipts.record(receipt, ticket_bytes, frame.receipt)
                return Completion(ticket.request_id, text, receipt, peer_id_of(provider.provider_key),
                                  ticket.sampling["seed"], salt)
            pieces.append(frame.text)
            await on_text(frame.text)
