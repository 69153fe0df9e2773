"""The gateway's request flow, hop by hop (docs/architecture.md numbers the same steps):

  (1)-(2) authenticate the API key → tenant; admission: model allowed, rate, concurrency, and a budget reservation
          for the request's worst case (gateway/market/quota.py);
  (3) place: rank eligible providers (gateway/market/placement.py): approved, fresh, offering the pinned model, EU-only
      tenants on certified EU providers only (fails closed), determinism-required tenants on the pinned class;
  (4) sign a ticket for the chosen provider;
  (5)-(7) relay over /llorch/infer/1 (gateway/market/node_client.py): busy or failure before the first token → the next
      candidate; failure mid-stream → the same ticket parameters on another provider of the same determinism
      class, skipping the text already delivered (checked to be identical), so the customer sees one answer;
  (8) check the receipt against the ticket and everything the customer received, store it, settle the
      reservation to the receipt's amount. Exactly one receipt is billed per customer request.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
from dataclasses import dataclass

import trio
from typing import Awaitable, Callable

from llorch.gateway import limits
from llorch.gateway.books.postings import Books, tenant_account
from llorch.gateway.witness.witness import WitnessBook
from llorch.ledger.receipt_proof import proof_document
from llorch.gateway.config import GatewayConfig, margin_bp
from llorch.gateway.market.directory import ProviderDirectory
from llorch.gateway.errors import (AuthError, BadRequest, Forbidden, ModelNotFound, NoProvider, PaymentRequired,
                            ProviderFailed, RateLimited)
from llorch.gateway.api.metrics import Metrics
from llorch.gateway.market.node_client import AttemptFailed, InferenceCall, request_inference
from llorch.gateway.api.openai_api import ChatRequest
from llorch.gateway.market.placement import ProviderView, Requirements, Standing, after_failure, after_success, rank_providers, \
    why_not
from llorch.gateway.books.pricing import Charge, customer_charge, demand_multiplier_bp, ticket_price, utilisation_ppm
from llorch.gateway.market.providers import ProviderBook
from llorch.gateway.market.quota import QuotaExceeded, TenantQuota, TokenBucket, prompt_tokens_upper_bound, worst_case_minor
from llorch.gateway.books.receipts import ReceiptBook, check_receipt
from llorch.gateway.market.tenants import Tenant, TenantBook
from llorch.ledger.objects import VERSION, Receipt, Ticket
from llorch.ledger.signing import SigningKey, peer_id_of
from llorch.node.wire.attestation import Attestation
from llorch.node.errors import ProtocolError
from llorch.node.wire.frames import Final, Request, prompt_chars, prompt_parts
from llorch.node.limits import SALT_BYTES
from llorch.node.models import catalog_model_ids, catalog_pin
from llorch.node.p2p import P2P
from llorch.node.stream_io import now_ms

log = logging.getLogger("llorch.gateway")

CURRENCY = "EUR"
CHARS_PER_TOKEN_ESTIMATE = 4
BOOTSTRAP_TENANT = Tenant("default", "enterprise", None, 0, False, False, None, None, None, False)


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
    charge: Charge                   # what the tenant pays: the provider's payout plus the platform fee


class MidStreamFailure(Exception):
    """A provider failed after text was delivered; the stream may be resumed on a provider of the same class."""


@dataclass
class _Job:
    """One customer request while it is being served."""

    request_id: str
    tenant: Tenant
    chat: ChatRequest
    pin: bytes
    seed: int
    salt: bytes
    prompt: dict
    on_text: Callable[[str], Awaitable[None]]
    delivered: str = ""
    provider_peer_id: str = ""       # the provider serving right now (changes when a stream is resumed)
    multiplier_bp: int = 10_000      # demand multiplier on provider prices
    margin_bp: int = 4_000           # the tenant's tier margin


class Gateway:
    def __init__(self, config: GatewayConfig, key: SigningKey, p2p: P2P, directory: ProviderDirectory,
                 receipts: ReceiptBook, tenants: TenantBook, providers: ProviderBook, books: Books,
                 witness_book: WitnessBook) -> None:
        self.config = config
        self.key = key
        self.p2p = p2p
        self.directory = directory
        self.receipts = receipts
        self.tenants = tenants
        self.providers = providers
        self.books = books
        self.witness_book = witness_book
        self.database = books.database
        self.metrics = Metrics()
        self.standings: dict[bytes, Standing] = {}
        self._quotas: dict[str, TenantQuota] = {}

    # (1)-(2) --------------------------------------------------------------------------------------------------
    async def authenticate(self, authorization: str | None) -> Tenant:
        """The tenant of a valid ``Authorization: Bearer <key>`` header; AuthError otherwise (revoked included)."""
        if not authorization or not authorization.startswith("Bearer "):
            raise AuthError("missing API key: send the header `Authorization: Bearer <api key>`")
        presented = hashlib.sha256(authorization[len("Bearer "):].strip().encode()).hexdigest()
        if self.config.api_key_sha256 and hmac.compare_digest(presented, self.config.api_key_sha256):
            return BOOTSTRAP_TENANT
        tenant = await self.tenants.by_key_hash(presented)
        if tenant is None:
            raise AuthError("incorrect API key")
        if tenant.revoked:
            raise AuthError(f"the API key of tenant {tenant.name} has been revoked")
        return tenant

    def tenant_pseudonym(self, tenant: str) -> str:
        """A stable pseudonym for the ledger: nobody but this gateway can link it to the tenant's name."""
        return "t_" + hmac.new(self.key.seed, b"llorch/tenant/v1\x00" + tenant.encode(), "sha256").hexdigest()[:24]

    def _quota(self, tenant: Tenant) -> TenantQuota:
        quota = self._quotas.get(tenant.name)
        if quota is None:
            quota = self._quotas[tenant.name] = TenantQuota(tenant.max_concurrent, tenant.budget_minor,
                                                            tenant.spent_minor)
        quota.max_concurrent, quota.budget_minor = tenant.max_concurrent, tenant.budget_minor   # may be updated
        quota.spent_minor = max(quota.spent_minor, tenant.spent_minor)
        if tenant.rps is None:
            quota.bucket = None
        elif quota.bucket is None or quota.bucket.rate_per_s != tenant.rps:
            quota.bucket = TokenBucket(tenant.rps, tenant.rps)
        return quota

    # (3) ---------------------------------------------------------------------------------------------------------
    async def provider_views(self) -> list[ProviderView]:
        records = {record.provider_key: record for record in await self.providers.all()}
        views = []
        for attestation in self.directory.fresh(now_ms()):
            record = records.get(attestation.provider_key)
            certified = record.registration.geo["country"] if record and record.geo_certified else None
            views.append(ProviderView(attestation, bool(record and record.approved), certified,
                                      self.standings.get(attestation.provider_key, Standing())))
        return views

    def requirements(self, job: _Job, **overrides) -> Requirements:
        extension = job.chat.llorch
        fields = dict(model_id=job.chat.model, model_sha256=job.pin, currency=CURRENCY,
                      prompt_tokens_estimate=prompt_chars(job.prompt) // CHARS_PER_TOKEN_ESTIMATE + 1,
                      max_tokens=job.chat.max_tokens_effective, eu_only=job.tenant.eu_only,
                      engine_build=(self.config.determinism_pin or "(no pinned class)")
                      if job.tenant.require_determinism else None,
                      max_price_in=extension.max_price_in_per_1m if extension else None,
                      max_price_out=extension.max_price_out_per_1m if extension else None)
        fields.update(overrides)
        return Requirements(**fields)

    def no_provider(self, job: _Job, views: list[ProviderView], need: Requirements) -> NoProvider:
        reasons = sorted({why_not(v, need, now_ms()) for v in views} - {None})
        if need.eu_only:
            reason, message = "eu_only", f"no certified EU provider has capacity for {job.chat.model} right now"
        elif job.tenant.require_determinism:
            reason, message = "determinism", f"no provider in the pinned determinism class offers {job.chat.model}"
        else:
            reason, message = "none_eligible", f"no provider offering {job.chat.model} has a free slot right now"
        self.metrics.placement_failures[reason] += 1
        detail = f" ({'; '.join(reasons)})" if reasons else ""
        return NoProvider(f"{message}; retry shortly{detail}")

    def offered_models(self) -> list[str]:
        fresh = self.directory.fresh(now_ms())
        return [m for m in catalog_model_ids() if any(a.offers(m, catalog_pin(m)) for a in fresh)]

    # (1)-(8) -----------------------------------------------------------------------------------------------------
    async def complete(self, chat: ChatRequest, tenant: Tenant, on_text: Callable[[str, str], Awaitable[None]],
                       request_id: str | None = None) -> Completion:
        """Serve one chat request, passing (text, provider peer id) to ``on_text`` as text arrives; return the
        verified completion."""
        pin = catalog_pin(chat.model)
        if pin is None:
            raise ModelNotFound(f"the model {chat.model!r} does not exist (known: {', '.join(catalog_model_ids())})",
                                param="model")
        if not tenant.allows(chat.model):
            raise Forbidden(f"tenant {tenant.name} may not use {chat.model} (allowed: {', '.join(tenant.models)})",
                            param="model")
        job = _Job(request_id or new_request_id(), tenant, chat, pin,
                   chat.seed if chat.seed is not None else secrets.randbelow(2**32),
                   secrets.token_bytes(SALT_BYTES), chat.prompt(), on_text)
        views = await self.provider_views()
        need = self.requirements(job)
        candidates = rank_providers(views, need, now_ms())
        if not candidates:
            raise self.no_provider(job, views, need)
        quota = self._quota(tenant)
        job.multiplier_bp = self.demand_multiplier(job.chat.model, pin)
        job.margin_bp = margin_bp(self.config, tenant.tier)
        prompt_bound = prompt_tokens_upper_bound(len(str(job.prompt).encode()), prompt_parts(job.prompt))
        worst = max(customer_charge(worst_case_minor(prompt_bound, need.max_tokens,
                                                     ticket_price(c.attestation.price_in, job.multiplier_bp),
                                                     ticket_price(c.attestation.price_out, job.multiplier_bp)),
                                    job.margin_bp).charge
                    for c in candidates)
        try:
            quota.admit(job.request_id, worst, now_ms())
        except QuotaExceeded as exc:
            raise (PaymentRequired(str(exc)) if exc.kind == "budget" else
                   RateLimited(str(exc), "rate_limit_exceeded" if exc.kind == "rate" else "too_many_concurrent",
                               max(1, -(-(exc.retry_after_ms or 1000) // 1000)))) from None
        completion = None
        try:
            completion = await self._serve(job, candidates)
            return completion
        finally:
            quota.settle(job.request_id, completion.charge.charge if completion else None)

    def demand_multiplier(self, model_id: str, pin: bytes) -> int:
        """The demand multiplier from the utilisation of every fresh provider offering the model."""
        offering = [a for a in self.directory.fresh(now_ms()) if a.offers(model_id, pin)]
        return demand_multiplier_bp(utilisation_ppm(sum(a.slots_total for a in offering),
                                                    sum(a.slots_free for a in offering)))

    async def _serve(self, job: _Job, candidates: list[ProviderView]) -> Completion:
        """Try candidates in order. Before any text was delivered, any failure moves on to the next candidate; after,
        only providers of the failed one's determinism class may resume the stream."""
        tried: set[bytes] = set()
        failures: list[str] = []
        resume_class: str | None = None
        while candidates and len(tried) < limits.PLACEMENT_ATTEMPTS_MAX:
            view = candidates[0]
            tried.add(view.key)
            try:
                return await self._attempt(job, view.attestation)
            except AttemptFailed as exc:
                if exc.code == "bad_request":      # the request itself is unservable: no provider would differ
                    raise BadRequest(f"the provider refused the request before any work: {exc}") from None
                failures.append(f"{peer_id_of(view.key)[-8:]}: {exc}")
                log.info("provider %s did not take %s: %s", peer_id_of(view.key), job.request_id, exc)
            except MidStreamFailure as exc:
                failures.append(f"{peer_id_of(view.key)[-8:]}: {exc}")
                log.warning("provider %s failed mid-stream on %s: %s", peer_id_of(view.key), job.request_id, exc)
                resume_class = resume_class or view.attestation.engine_build
                self.metrics.failovers += 1
            self._failed(view.key)
            if job.delivered:
                need = self.requirements(job, engine_build=resume_class, exclude=frozenset(tried))
                candidates = rank_providers(await self.provider_views(), need, now_ms())
            else:
                candidates = [c for c in candidates[1:] if c.key not in tried]
        if job.delivered:
            self.metrics.placement_failures["resume"] += 1
            raise ProviderFailed(f"the provider failed mid-stream and no other provider of its determinism class "
                                 f"could resume it ({'; '.join(failures)})")
        if failures and all("busy" in failure for failure in failures):
            self.metrics.placement_failures["busy"] += 1
            where = "certified EU provider" if job.tenant.eu_only else "eligible provider"
            raise NoProvider(f"no {where} has capacity for {job.chat.model} right now: every one is busy; "
                             f"retry shortly")
        self.metrics.placement_failures["failed"] += 1
        raise ProviderFailed(f"no provider could serve the request ({'; '.join(failures)})")

    async def receipt_proof(self, tenant: Tenant, request_id: str) -> dict | None:
        """The proof document of a receipt billed to ``tenant`` (None if there is none for this tenant)."""
        if not any(debit == tenant_account(tenant.name) for _, debit, *_ in await self.books.posted(request_id)):
            return None
        found = await self.receipts.receipt_of(request_id)
        if found is None:
            return None
        receipt_bytes = found[1]
        receipt = Receipt.from_envelope(receipt_bytes)
        size, note, proof = await self.witness_book.inclusion_proof(receipt.provider_key, receipt.index)
        return proof_document(request_id, receipt_bytes, receipt.index, size, proof, note)

    def _failed(self, provider_key: bytes) -> None:
        self.standings[provider_key] = after_failure(self.standings.get(provider_key, Standing()), now_ms())

    def issue_ticket(self, job: _Job, provider: Attestation) -> tuple[Ticket, bytes]:
        issued = now_ms()
        ticket = Ticket(
            v=VERSION, request_id=job.request_id, gateway_key=self.key.public_key,
            provider_key=provider.provider_key, tenant=self.tenant_pseudonym(job.tenant.name),
            model_id=job.chat.model, model_sha256=job.pin, sampling=job.chat.sampling(job.seed),
            price_in=ticket_price(provider.price_in, job.multiplier_bp),
            price_out=ticket_price(provider.price_out, job.multiplier_bp), currency=provider.currency,
            issued_ms=issued, expires_ms=issued + limits.TICKET_LIFETIME_MS)
        return ticket, ticket.seal(self.key)

    async def _attempt(self, job: _Job, provider: Attestation) -> Completion:
        ticket, ticket_bytes = self.issue_ticket(job, provider)
        standing = self.standings.get(provider.provider_key, Standing())
        started = now_ms()
        self.standings[provider.provider_key] = Standing(standing.success_ppm, standing.ttft_ms,
                                                        standing.failures_in_a_row, standing.backoff_until_ms,
                                                        started)
        async with request_inference(self.p2p, provider, Request(ticket_bytes, job.salt, job.prompt)) as call:
            job.provider_peer_id = peer_id_of(provider.provider_key)
            try:
                completion = await self._relay(call, job, ticket, ticket_bytes, provider, started)
            except BaseException:
                # Accepted but not completed: keep the ticket, so reconciliation expects (and checks) a receipt.
                with trio.CancelScope(shield=True):
                    await self.receipts.record_ticket(ticket, ticket_bytes)
                raise
        self.standings[provider.provider_key] = after_success(self.standings[provider.provider_key],
                                                              completion.receipt.first_token_ms -
                                                              completion.receipt.accepted_ms)
        return completion

    async def _relay(self, call: InferenceCall, job: _Job, ticket: Ticket, ticket_bytes: bytes,
                     provider: Attestation, started_ms: int) -> Completion:
        regenerated = ""                  # everything this provider sent
        while True:
            try:
                frame = await call.next_frame()
            except ProtocolError as exc:
                if not job.delivered:             # the customer has nothing yet: an ordinary failed attempt
                    raise AttemptFailed(str(exc)) from None
                raise MidStreamFailure(str(exc)) from None
            if isinstance(frame, Final):
                if regenerated != job.delivered and not regenerated.startswith(job.delivered):
                    raise ProviderFailed("the resumed stream ended before it caught up with what was delivered")
                receipt = check_receipt(frame.receipt, ticket, ticket_bytes, job.salt, job.prompt, regenerated)
                charge = customer_charge(receipt.amount, job.margin_bp)
                # One durable transaction: the ticket, its receipt and the two legs of the posting.
                await self.database.transaction(
                    ReceiptBook.statements(receipt, ticket_bytes, frame.receipt) +
                    Books.usage_statements(job.tenant.name, receipt, charge, job.margin_bp, now_ms()))
                self.metrics.tokens["prompt"] += receipt.tokens_in
                self.metrics.tokens["completion"] += receipt.tokens_out
                return Completion(job.request_id, regenerated, receipt, peer_id_of(provider.provider_key), job.seed,
                                  job.salt, charge)
            regenerated += frame.text
            if len(regenerated) <= len(job.delivered):
                if not job.delivered.startswith(regenerated):
                    raise ProviderFailed("the resumed stream differs from what was already delivered")
                continue
            if not regenerated.startswith(job.delivered):
                raise ProviderFailed("the resumed stream differs from what was already delivered")
            piece = regenerated[len(job.delivered):]
            job.delivered = regenerated
            await job.on_text(piece, job.provider_peer_id)
