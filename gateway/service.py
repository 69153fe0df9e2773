"""The gateway's request flow, hop by hop (docs/architecture.md numbers the same steps):

  (1)-(2) authenticate the API key → tenant; admission: model allowed, rate, concurrency, and a budget reservation
          for the request's worst case at the customer's prices (gateway/market/quota.py), against the spend read
          from the books;
  (3) place: rank eligible providers (gateway/market/placement.py): approved, fresh, offering the pinned model, under
      the customer's price ceiling after margin, EU-only tenants on certified EU providers only (fails closed),
      determinism-required tenants on the pinned class;
  (4) sign a ticket for the chosen provider and write it durably before it is sent (gateway/books/tickets.py);
  (5)-(7) relay over /llorch/infer/1 (gateway/market/node_client.py), metering every frame on the gateway's clock
      (gateway/books/settlement.py ``Meter``): busy or failure before the first token → the next candidate; failure
      mid-stream → the same ticket parameters on another provider of the same determinism class whose price fits the
      reservation, skipping the text already delivered (checked to be identical); the customer going away → a cancel
      frame, and the provider's receipt for what it generated;
  (8) check the receipt against the ticket and what the provider sent, and settle the ticket exactly once, shielded
      from cancellation: ``settle`` bounds every claim by the gateway's measurements, and one transaction writes
      the settlement, the receipt, the postings and any finding against the provider.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
from dataclasses import dataclass, field, replace
from typing import Awaitable, Callable

import trio
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from llorch.gateway import limits
from llorch.gateway.metrics import Metrics
from llorch.gateway.api.openai_api import ChatRequest
from llorch.gateway.books.postings import Books, tenant_account
from llorch.gateway.books.pricing import Charge, customer_price, demand_multiplier_bp, ticket_price, utilisation_ppm
from llorch.gateway.books.receipts import ReceiptBook, check_receipt, receipt_expectations
from llorch.gateway.books.settlement import ENDED, Meter, Settlement, State, Terms, settle
from llorch.gateway.books.tickets import TicketBook
from llorch.gateway.config import GatewayConfig, margin_bp
from llorch.gateway.errors import (AllBusy, AuthError, BadRequest, Forbidden, ModelNotFound, NoProvider,
                                  PaymentRequired, ProviderFailed, RateLimited, ReceiptRejected)
from llorch.gateway.market.admission import QueueFull, QueueTimeout, WaitingRoom
from llorch.gateway.market.directory import ProviderDirectory
from llorch.gateway.market.node_client import AttemptFailed, InferenceCall, StreamPool, request_inference
from llorch.gateway.market.placement import (ProviderView, Requirements, Standing, after_failure, after_success,
                                             customer_prices, rank_providers, why_not)
from llorch.gateway.market.providers import ProviderBook
from llorch.gateway.spot_checks import Finished, SpotChecker
from llorch.gateway.market.shared import SharedReservations
from llorch.gateway.market.quota import (QuotaExceeded, TenantQuota, TokenBucket, prompt_tokens_upper_bound,
                                         worst_case_minor)
from llorch.gateway.market.tenants import Tenant, TenantBook
from llorch.gateway.witness.witness import WitnessBook
from llorch.ledger import canonical
from llorch.ledger.errors import LedgerError
from llorch.ledger.objects import VERSION, Receipt, Ticket
from llorch.ledger.receipt_proof import proof_document
from llorch.ledger.signing import SigningKey, peer_id_of
from llorch.node.errors import FrameTimeout, ProtocolError
from llorch.node import limits as node_limits
from llorch.node.limits import SALT_BYTES
from llorch.node.models import catalog_kind, catalog_model_ids, catalog_pin, chat_model_ids
from llorch.node.p2p import P2P
from llorch.node.stream_io import now_ms
from llorch.node.wire.attestation import Attestation
from llorch.node.wire.frames import Final, Request, prompt_chars, prompt_parts

log = logging.getLogger("llorch.gateway")

CURRENCY = "EUR"
CHARS_PER_TOKEN_ESTIMATE = 4
PSEUDONYM_KEY_INFO = b"llorch/tenant-pseudonym-key/v1"     # HKDF info: the pseudonym key, from the gateway's seed
PSEUDONYM_TAG = b"llorch/tenant/v2\x00"                   # HMAC input: tag ‖ provider_key ‖ tenant name


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
    settlement: Settlement           # the billed counts (the receipt's claims bounded by the gateway's measurements)


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
    prompt_tokens_max: int = 0       # the gateway's own upper bound on the prompt's tokens
    price_caps: tuple[int, int] = (0, 0)   # customer prices per 1M the reservation was made at (resume stays within)
    reserved_minor: int = 0          # the reservation: no ticket of this request may charge more
    charged: int = 0                 # what the settled tickets charged (at most one is ever non-zero)


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
        self.tickets = TicketBook(books.database)
        self.metrics = Metrics()
        self.waiting = WaitingRoom(limits.ADMISSION_QUEUE_MAX)
        self.streams = StreamPool(p2p)       # its ``run`` is one of the gateway's supervised loops
        # The bootstrap key's tenant: unlimited, named by the config; run_gateway refuses to start if a real
        # tenant has the name, and `tenants add` refuses the name, so the two never share an account.
        self.bootstrap_tenant = Tenant(config.tenant, "enterprise", None, 0, False, False, None, None, None, False)
        self._pseudonym_key = HKDF(algorithm=SHA256(), length=32, salt=None,
                                   info=PSEUDONYM_KEY_INFO).derive(key.seed)
        self.standings: dict[bytes, Standing] = {}
        self._in_flight: dict[bytes, int] = {}   # this gateway's tickets per provider, from issue to settlement
        self._quotas: dict[str, TenantQuota] = {}
        self._locks: dict[str, trio.Lock] = {}
        # On a database replicas share, tenants' concurrency and budget hold over all of them (market/shared.py)
        self.shared = (SharedReservations(books.database, p2p.peer_id)
                       if books.database.engine.name == "postgresql" else None)
        self.spot_checks = SpotChecker(self, config.spot_check_rate_ppm)    # its ``run``: a supervised loop
        self.sla_missed: frozenset[bytes] = frozenset()   # ranked last: kept by run.py's "sla" loop (market/sla.py)

    # (1)-(2) --------------------------------------------------------------------------------------------------
    async def authenticate(self, authorization: str | None) -> Tenant:
        """The tenant of a valid ``Authorization: Bearer <key>`` header; AuthError otherwise (revoked included)."""
        scheme, _, credentials = (authorization or "").strip().partition(" ")
        if scheme.lower() != "bearer" or not credentials.strip():
            raise AuthError("missing API key: send the header `Authorization: Bearer <api key>`")
        presented = hashlib.sha256(credentials.strip().encode()).hexdigest()
        if self.config.api_key_sha256 and hmac.compare_digest(presented, self.config.api_key_sha256):
            return self.bootstrap_tenant
        tenant = await self.tenants.by_key_hash(presented)
        if tenant is None:
            raise AuthError("incorrect API key")
        if tenant.revoked:
            raise AuthError(f"the API key of tenant {tenant.name} has been revoked")
        return tenant

    def tenant_pseudonym(self, tenant: str, provider_key: bytes) -> str:
        """The tenant's name in tickets (and so in ``provider_key``'s ledger): stable per provider, different at
        every provider, so nobody reading two ledgers can link a tenant's requests; only this gateway, holding a
        key derived from its own (HKDF, never the signing seed itself), can map it back."""
        message = PSEUDONYM_TAG + provider_key + tenant.encode()
        return "t_" + hmac.new(self._pseudonym_key, message, "sha256").hexdigest()[:24]

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
                                      self.standings.get(attestation.provider_key, Standing()),
                                      attestation.provider_key not in self.sla_missed))
        return views

    def requirements(self, job: _Job, **overrides) -> Requirements:
        extension = job.chat.llorch
        fields = dict(model_id=job.chat.model, model_sha256=job.pin, currency=CURRENCY,
                      prompt_tokens_estimate=prompt_chars(job.prompt) // CHARS_PER_TOKEN_ESTIMATE + 1,
                      max_tokens=job.chat.max_tokens_effective, eu_only=job.tenant.eu_only,
                      multiplier_bp=job.multiplier_bp, margin_bp=job.margin_bp,
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
        self.metrics.placement_failure(reason)
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
        check_model_serves(chat.model, job.prompt)
        check_fits_a_request_frame(job.prompt)
        job.multiplier_bp = self.demand_multiplier(job.chat.model, pin)
        job.margin_bp = margin_bp(self.config, tenant.tier)
        job.prompt_tokens_max = prompt_tokens_upper_bound(len(str(job.prompt).encode()), prompt_parts(job.prompt))
        views = await self.provider_views()
        need = self.requirements(job)
        candidates = rank_providers(views, need, now_ms())
        if not candidates:
            raise self.no_provider(job, views, need)
        job.price_caps = (max(customer_prices(c.attestation, need)[0] for c in candidates),
                          max(customer_prices(c.attestation, need)[1] for c in candidates))
        job.reserved_minor = worst_case_minor(job.prompt_tokens_max, need.max_tokens, *job.price_caps)
        quota = await self.admit(tenant, job.request_id, job.reserved_minor)
        try:
            completion = await self._serve_or_wait(job, need, candidates)
        finally:
            quota.settle(job.request_id, job.charged)
            if self.shared is not None and tenant.limited:
                with trio.CancelScope(shield=True):     # after the settlement: its charge is in the books
                    await self.shared.release(job.request_id)
            self.waiting.wake()                 # a slot this request held (or tried for) may be free now
        # Settled: only now is it drawn whether this request is re-run elsewhere (never waits; docs/verification.md)
        self.spot_checks.finished(Finished(job.request_id, tenant, job.prompt, job.salt, completion.text))
        return completion

    async def _serve_or_wait(self, job: _Job, need: Requirements, candidates: list[ProviderView]) -> Completion:
        """(5)-(8), and while every eligible provider is busy, wait in the fair admission queue for a slot (woken
        when a request finishes or an attestation shows free slots) until the queue deadline: then 429."""
        deadline = trio.current_time() + self.config.queue_timeout_ms / 1000
        queued_since, again = None, False
        while True:
            try:
                completion = await self._serve(job, candidates)
                if queued_since is not None:
                    self.metrics.queue_waited(trio.current_time() - queued_since)
                return completion
            except AllBusy as busy:
                queued_since = queued_since if queued_since is not None else trio.current_time()
                try:
                    self.metrics.queue_depth(len(self.waiting.queue) + 1)
                    await self.waiting.wait(job.tenant.name, deadline - trio.current_time(), again)
                except (QueueFull, QueueTimeout) as exc:
                    self.metrics.queue_waited(trio.current_time() - queued_since)
                    raise RateLimited(f"{busy}; the request waited in the admission queue and {exc}",
                                      "queue_full" if isinstance(exc, QueueFull) else "queue_timeout",
                                      max(1, self.config.queue_timeout_ms // 10_000)) from None
                finally:
                    self.metrics.queue_depth(len(self.waiting.queue))
                again = True
                candidates = rank_providers(await self.provider_views(), need, now_ms())

    async def admit(self, tenant: Tenant, request_id: str, reserved_minor: int) -> TenantQuota:
        """(2): a rate token, a concurrency slot and the reservation, all or nothing, against the spend in the books.
        The caller releases them with ``quota.settle(request_id, charged)``."""
        quota = self._quota(tenant)
        async with self._tenant_lock(tenant.name):
            quota.spent_minor = await self.books.tenant_spent(tenant.name)      # the books, not a counter
            try:
                quota.admit(request_id, reserved_minor, now_ms())
                if self.shared is not None and tenant.limited:
                    try:
                        await self.shared.admit(tenant.name, tenant.max_concurrent, tenant.budget_minor, request_id,
                                                reserved_minor, now_ms())
                    except BaseException:
                        quota.settle(request_id, None)
                        raise
            except QuotaExceeded as exc:
                raise (PaymentRequired(str(exc)) if exc.kind == "budget" else
                       RateLimited(str(exc), "rate_limit_exceeded" if exc.kind == "rate" else "too_many_concurrent",
                                   max(1, -(-(exc.retry_after_ms or 1000) // 1000)))) from None
        return quota

    def _tenant_lock(self, name: str) -> trio.Lock:
        """Admission reads the tenant's spend and reserves under this lock; a settlement posts and then releases its
        reservation under it, so no admission sees a charge both spent and still reserved, or neither."""
        return self._locks.setdefault(name, trio.Lock())

    def demand_multiplier(self, model_id: str, pin: bytes) -> int:
        """The demand multiplier from the utilisation of every fresh provider offering the model."""
        offering = [a for a in self.directory.fresh(now_ms()) if a.offers(model_id, pin)]
        return demand_multiplier_bp(utilisation_ppm(sum(a.slots_total for a in offering),
                                                    sum(a.slots_free for a in offering)))

    async def _serve(self, job: _Job, candidates: list[ProviderView]) -> Completion:
        """Try candidates in order. Before any text was delivered, any failure moves on to the next candidate; after,
        only providers of the failed one's determinism class, within the reservation's prices, may resume."""
        tried: set[bytes] = set()
        failures: list[str] = []
        resume_class: str | None = None
        while candidates and len(tried) < limits.PLACEMENT_ATTEMPTS_MAX:
            view = candidates[0]
            tried.add(view.key)
            if self._in_flight.get(view.key, 0) >= view.attestation.slots_total:
                # Full with this gateway's own requests: busy without asking (no ticket written, no stream opened).
                failures.append(f"{peer_id_of(view.key)[-8:]}: busy (every slot serves this gateway)")
                candidates = [c for c in candidates[1:] if c.key not in tried]
                continue
            try:
                return await self._attempt(job, view.attestation)
            except AttemptFailed as exc:
                if exc.code == "bad_request":      # the request itself is unservable: no provider would differ
                    raise BadRequest(f"the provider refused the request before any work: {exc}") from None
                failures.append(f"{peer_id_of(view.key)[-8:]}: {exc}")
                log.info("provider %s did not take %s: %s", peer_id_of(view.key), job.request_id, exc)
                if exc.busy:                       # full, not failing: no mark against its standing
                    candidates = [c for c in candidates[1:] if c.key not in tried]
                    continue
            except MidStreamFailure as exc:
                failures.append(f"{peer_id_of(view.key)[-8:]}: {exc}")
                log.warning("provider %s failed mid-stream on %s: %s", peer_id_of(view.key), job.request_id, exc)
                resume_class = resume_class or view.attestation.engine_build
                self.metrics.failover()
            self._failed(view.key)
            if job.delivered:
                need = self.requirements(job, engine_build=resume_class, exclude=frozenset(tried),
                                         max_price_in=job.price_caps[0], max_price_out=job.price_caps[1])
                candidates = rank_providers(await self.provider_views(), need, now_ms())
            else:
                candidates = [c for c in candidates[1:] if c.key not in tried]
        if job.delivered:
            self.metrics.placement_failure("resume")
            raise ProviderFailed(f"the provider failed mid-stream and no other provider of its determinism class "
                                 f"could resume it ({'; '.join(failures)})")
        if failures and all("busy" in failure for failure in failures):
            self.metrics.placement_failure("busy")
            where = "certified EU provider" if job.tenant.eu_only else "eligible provider"
            raise AllBusy(f"no {where} has capacity for {job.chat.model} right now: every one is busy; "
                             f"retry shortly")
        self.metrics.placement_failure("failed")
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

    def issue_ticket(self, job: _Job, provider: Attestation) -> tuple[Ticket, bytes, Terms]:
        """(4): the ticket for ``provider`` (its prices, never below what it attested) and the gateway's own terms
        for it (the customer's prices, the reservation, the prompt bound), kept beside it."""
        issued = now_ms()
        ticket = Ticket(
            v=VERSION, request_id=job.request_id, gateway_key=self.key.public_key,
            provider_key=provider.provider_key, tenant=self.tenant_pseudonym(job.tenant.name, provider.provider_key),
            model_id=job.chat.model, model_sha256=job.pin, sampling=job.chat.sampling(job.seed),
            price_in=ticket_price(provider.price_in, job.multiplier_bp),
            price_out=ticket_price(provider.price_out, job.multiplier_bp), currency=provider.currency,
            issued_ms=issued, expires_ms=issued + limits.TICKET_LIFETIME_MS)
        terms = Terms(job.tenant.name, job.margin_bp,
                      customer_price(provider.price_in, job.multiplier_bp, job.margin_bp),
                      customer_price(provider.price_out, job.multiplier_bp, job.margin_bp),
                      job.reserved_minor, job.prompt_tokens_max)
        return ticket, ticket.seal(self.key), terms

    async def _attempt(self, job: _Job, provider: Attestation) -> Completion:
        """One ticket, from its durable issue to its settlement (exactly once, shielded from cancellation)."""
        ticket, ticket_bytes, terms = self.issue_ticket(job, provider)
        key = provider.provider_key
        self._in_flight[key] = self._in_flight.get(key, 0) + 1
        try:
            await self.tickets.issue(ticket, ticket_bytes, terms)
            run = _TicketRun(ticket, ticket_bytes, terms, Meter(now_ms()))
            self._placed(key)
            try:
                await self._run_ticket(job, provider, run)
            finally:
                with trio.CancelScope(shield=True):
                    await self._settle(job, provider, run)
        finally:
            self._in_flight[key] -= 1
        return Completion(job.request_id, job.delivered, run.receipt, peer_id_of(provider.provider_key), job.seed,
                          job.salt, run.charge, run.settlement)

    async def _run_ticket(self, job: _Job, provider: Attestation, run: _TicketRun) -> None:
        meter = run.meter
        try:
            async with request_inference(self.p2p, provider, Request(run.ticket_bytes, job.salt, job.prompt),
                                         self.streams) as call:
                meter.handle("accepted", now_ms())
                job.provider_peer_id = peer_id_of(provider.provider_key)
                try:
                    await self._relay(call, job, run)
                except (trio.Cancelled, CustomerGone):
                    meter.handle("customer_gone", now_ms())
                    with trio.CancelScope(shield=True):
                        await self._collect_cancelled_receipt(call, job, run)
                    raise
        except AttemptFailed:
            meter.handle("refused", now_ms())
            raise
        except trio.Cancelled:
            if meter.state is State.ISSUED:                # the customer left while the provider was admitting
                meter.handle("customer_gone", now_ms())
            raise
        except CustomerGone:
            raise ProviderFailed("the customer went away") from None
        except FrameTimeout as exc:
            meter.handle("timed_out", now_ms())
            raise self._failure(job, str(exc)) from None
        except (ProtocolError, ReceiptRejected) as exc:
            meter.handle("provider_failed", now_ms())
            raise self._failure(job, str(exc)) from None

    @staticmethod
    def _failure(job: _Job, reason: str) -> Exception:
        """Before any text reached the customer a failure is an ordinary failed attempt; after, a mid-stream one."""
        return MidStreamFailure(reason) if job.delivered else AttemptFailed(reason)

    async def _relay(self, call: InferenceCall, job: _Job, run: _TicketRun) -> None:
        """Relay token frames (metering each), then check the final frame's receipt. Resumed streams regenerate what
        was delivered: it is compared in O(n) and only the rest reaches the customer."""
        # While the provider generates (the gateway would only wait): what its receipt must say, but for the output.
        run.expected = receipt_expectations(run.ticket, run.ticket_bytes, job.salt, job.prompt)
        while True:
            frame = await call.next_frame()
            if isinstance(frame, Final):
                if run.received_chars < len(job.delivered):
                    raise ProtocolError("the resumed stream ended before it caught up with what was delivered")
                run.receipt = check_receipt(frame.receipt, run.ticket, run.ticket_bytes, job.salt, job.prompt,
                                            run.text(), expected=run.expected)
                run.receipt_bytes = frame.receipt
                run.meter.handle("final", now_ms())
                return
            if run.meter.frames >= limits.RELAY_FRAMES_MAX or run.meter.frames > run.ticket.sampling["max_tokens"]:
                raise ProtocolError(f"the provider sent more than {run.meter.frames} token frames for "
                                    f"{run.ticket.sampling['max_tokens']} tokens")
            run.meter.handle("token", now_ms(), frame.text)
            piece = run.receive(frame.text, job.delivered)
            if piece:
                job.delivered += piece
                try:
                    await job.on_text(piece, job.provider_peer_id)
                except trio.Cancelled:
                    raise
                except Exception as exc:      # the customer's connection broke under the send
                    raise CustomerGone(str(exc)) from None

    async def _collect_cancelled_receipt(self, call: InferenceCall, job: _Job, run: _TicketRun) -> None:
        """The customer went away: send a cancel frame and read the provider's receipt for what it generated
        (frames still in flight are drained, not billed). Bounded in time and frames; a provider that does not
        answer in time is settled without a receipt."""
        try:
            with trio.fail_after(limits.CANCEL_DRAIN_TIMEOUT_S):
                await call.cancel()
                for _ in range(limits.RELAY_FRAMES_MAX):
                    frame = await call.next_frame(limits.CANCEL_DRAIN_TIMEOUT_S)
                    if isinstance(frame, Final):
                        run.receipt = check_receipt(frame.receipt, run.ticket, run.ticket_bytes, job.salt,
                                                    job.prompt, run.text(), cancelled_by_gateway=True,
                                                    expected=run.expected)
                        run.receipt_bytes = frame.receipt
                        return
                    run.receive(frame.text, job.delivered)
        except (ProtocolError, ReceiptRejected, trio.TooSlowError) as exc:
            log.info("no receipt from %s for cancelled %s: %s", job.provider_peer_id, job.request_id, exc)

    async def _settle(self, job: _Job, provider: Attestation, run: _TicketRun) -> None:
        """Settle the ticket once: bounded by the gateway's measurements, one transaction, then the standing."""
        meter = run.meter
        if meter.state not in ENDED:           # cancelled before the stream opened, or a bug: nothing was relayed
            meter.handle("customer_gone", now_ms())
        metered = meter.metered()
        run.settlement = settle(run.ticket, run.terms, run.receipt, metered)
        meter.handle("settled", now_ms())
        try:
            async with self._tenant_lock(job.tenant.name):
                await self.tickets.settle(run.ticket, run.ticket_bytes, metered, run.settlement, run.receipt,
                                          run.receipt_bytes if run.settlement.receipt_used else None,
                                          job.tenant.name, now_ms())
                job.charged += run.settlement.charge
        except LedgerError as exc:   # the ticket stays open: `llorch billing reconcile --post` settles it
            log.error("could not settle ticket of %s: %s", job.request_id, exc)
        run.charge = Charge(run.settlement.payout, run.settlement.fee, run.settlement.charge)
        if run.settlement.receipt_used:
            self.metrics.tokens(run.settlement.tokens_in, run.settlement.tokens_out)
        if run.settlement.findings:
            for finding in run.settlement.findings:
                log.warning("provider %s: %s on %s: %s", peer_id_of(provider.provider_key), finding.kind,
                            job.request_id, finding.detail)
            self._failed(provider.provider_key)
        elif metered.outcome is State.FINISHED and metered.ttft_ms is not None:
            self.standings[provider.provider_key] = after_success(self.standings[provider.provider_key],
                                                                  metered.ttft_ms, now_ms())

    def _placed(self, provider_key: bytes) -> None:
        standing = self.standings.get(provider_key, Standing())
        self.standings[provider_key] = replace(standing, last_placed_ms=now_ms())


PROMPT_BYTES_MAX = node_limits.REQUEST_FRAME_BYTES_MAX - limits.REQUEST_FRAME_OVERHEAD_BYTES_MAX


def check_model_serves(model_id: str, prompt: dict) -> None:
    """Refuse (400, before placement) a chat for a base model: it has no chat template and only continues text, so
    a chat prompt gets gibberish back. Raw completions (/v1/completions) serve every model."""
    if "messages" in prompt and catalog_kind(model_id) == "base":
        raise BadRequest(f"{model_id} is a base model (not instruction-tuned): it does not follow a chat. Send a raw "
                         f"prompt to POST /v1/completions to continue text with it, or chat with "
                         f"{' or '.join(chat_model_ids())}", param="model")


def check_fits_a_request_frame(prompt: dict) -> None:
    """Refuse (400, before placement) a prompt no provider would take: the request frame (ticket, salt, prompt) must
    stay within node.limits.REQUEST_FRAME_BYTES_MAX, or every provider tried would drop the stream and be backed
    off for the tenant's mistake."""
    size = len(canonical.encode(prompt))
    if size > PROMPT_BYTES_MAX:
        raise BadRequest(f"the prompt is {size} bytes encoded; providers accept at most {PROMPT_BYTES_MAX}",
                         param="messages")


class CustomerGone(Exception):
    """Sending to the customer failed: the connection is gone (as if it had disconnected)."""


@dataclass
class _TicketRun:
    """One ticket while it runs: its terms, meter, the text this provider sent, and the receipt once it came."""

    ticket: Ticket
    ticket_bytes: bytes
    terms: Terms
    meter: Meter
    received: list[str] = field(default_factory=list)
    received_chars: int = 0
    expected: dict | None = None     # receipt_expectations of this ticket, computed while the provider works
    receipt: Receipt | None = None
    receipt_bytes: bytes | None = None
    settlement: Settlement | None = None
    charge: Charge = Charge(0, 0, 0)

    def text(self) -> str:
        return "".join(self.received)

    def receive(self, text: str, delivered: str) -> str:
        """Take a piece of this provider's text; return the part the customer has not had yet. While a resumed
        stream regenerates what was delivered, each piece must equal the delivered text at its place (O(piece))."""
        start = self.received_chars
        self.received.append(text)
        self.received_chars += len(text)
        overlap = delivered[start:start + len(text)]
        if text[:len(overlap)] != overlap:
            raise ProtocolError("the resumed stream differs from what was already delivered")
        return text[len(overlap):]
