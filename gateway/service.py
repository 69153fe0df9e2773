"""The gateway's request flow, hop by hop (docs/architecture.md numbers the same steps). This module orchestrates
one customer request; each hop's work is in the part named beside it:

  (1) authenticate the API key → tenant (gateway/market/tenants.py ``Authenticator``);
  (2) admission: model allowed, rate, concurrency, and a budget reservation for the request's worst case at the
      customer's prices, against the spend read from the books (gateway/market/admission.py ``Admission``);
  (3) place: rank eligible providers (gateway/market/placement.py over gateway/market/view.py's views): approved,
      fresh, offering the pinned model, under the customer's price ceiling after margin, EU-only tenants on
      certified EU providers only (fails closed), determinism-required tenants on the pinned class;
  (4)-(8) one ticket per attempt through the ticket runner (gateway/ticket_runner.py): issued and written durably,
      sent, relayed and metered, its receipt checked, settled exactly once by ``settle``. Here: busy or failure
      before the first token → the next candidate; failure mid-stream → the same order on another provider of the
      same determinism class whose price fits the reservation; every eligible provider busy → the fair admission
      queue until a slot frees or the deadline passes (429);
  (8a) after settlement, a draw for a spot-check (gateway/spot_checks.py), never waited for.
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass, replace
from typing import Any, Awaitable, Callable, Protocol

import trio

from llorch.gateway import limits
from llorch.gateway.catalog import CatalogBook, GatewayCatalog
from llorch.node.models import Catalog
from llorch.gateway.books.postings import Books, tenant_account
from llorch.gateway.books.pricing import Charge
from llorch.gateway.books.receipts import ReceiptBook
from llorch.gateway.books.settlement import Payer, Settlement
from llorch.gateway.books.tickets import TicketBook
from llorch.gateway.config import GatewayConfig, margin_bp
from llorch.gateway.errors import (AllBusy, BadRequest, DatabaseUnavailable, Forbidden, GatewayError, ModelNotFound,
                                  NoProvider, ProviderFailed, RateLimited)
from llorch.gateway.market.admission import Admission, QueueFull, QueueTimeout, WaitingRoom
from llorch.gateway.market.directory import ProviderDirectory
from llorch.gateway.market.node_client import AttemptFailed, Refusal, StreamPool
from llorch.gateway.market.placement import ProviderView, Requirements, why_not
from llorch.gateway.market.providers import ProviderBook
from llorch.gateway.market.quota import prompt_tokens_upper_bound, worst_case_minor
from llorch.gateway.market.shared import SharedReservations
from llorch.gateway.market.tenants import Authenticator, Tenant, TenantBook
from llorch.gateway.market.view import MarketView
from llorch.gateway.metrics import Metrics
from llorch.gateway.request import InferenceRequest
from llorch.gateway.spot_checks import Finished, SpotChecker
from llorch.gateway.ticket_runner import (CustomerGone, Order, Piece, StreamBroke, TicketRun, TicketRunner,
                                         new_request_id)
from llorch.gateway.witness.witness import WitnessBook
from llorch.ledger import canonical
from llorch.ledger.errors import StoreError
from llorch.ledger.objects import Receipt
from llorch.ledger.receipt_proof import proof_document
from llorch.ledger.signing import SigningKey, peer_id_of
from llorch.node import limits as node_limits
from llorch.node.limits import SALT_BYTES
from llorch.node.p2p import P2P
from llorch.node.stream_io import now_ms
from llorch.node.wire.frames import prompt_chars, prompt_parts

log = logging.getLogger("llorch.gateway")

CURRENCY = "EUR"
CHARS_PER_TOKEN_ESTIMATE = 4

__all__ = ["Completion", "Gateway", "new_request_id", "PROMPT_BYTES_MAX"]


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
    logprobs: tuple[dict, ...] = ()  # with logprobs: each output token's entry (docs/protocol.md §6)


@dataclass(frozen=True)
class Failure:
    """One candidate that did not serve the request, and why."""

    provider_key: bytes
    refusal: Refusal
    reason: str

    def __str__(self) -> str:
        return f"{peer_id_of(self.provider_key)[-8:]}: {self.reason}"


class Draining(Protocol):
    """The HTTP server's graceful stop as the gateway sees it (gateway/api/http_server.py ``Drain``)."""

    draining: bool


OnText = Callable[[list[Piece], str], Awaitable[None]]
"""Where a request's output goes as it arrives: (the pieces of one tokens frame, provider peer id); a piece is one
token's text and its logprobs entries (ticket_runner.Piece)."""


class _Job:
    """One customer request while it is served: its order (the same for every ticket), and the ticket runner's sink
    for its text (what the customer already has, and the charges of its settled tickets)."""

    def __init__(self, order: Order, tenant: Tenant, request: InferenceRequest, seed: int,
                 on_text: OnText) -> None:
        self.order = order
        self.tenant = tenant
        self.request = request
        self.seed = seed
        self.delivered = ""
        self.delivered_logprobs: list[dict] = []
        self.charged = 0                 # what the settled tickets charged (at most one is ever non-zero)
        self.held_slot = False           # a provider admitted one of its tickets (its end woke the next waiter)
        self.price_caps = (0, 0)         # customer prices per 1M the reservation was made at (resume stays within)
        self._on_text = on_text

    async def send(self, pieces: list[Piece], provider_peer_id: str) -> None:
        self.delivered += "".join(text for text, _ in pieces)
        for _, logprobs in pieces:
            self.delivered_logprobs += logprobs
        await self._on_text(pieces, provider_peer_id)

    def settled(self, run: TicketRun) -> None:
        if run.posted and run.settlement is not None:      # unposted: reconciliation settles it, the platform paying
            self.charged += run.settlement.charge
        self.held_slot |= run.admitted


class Gateway:
    """The parts of the gateway, each given only what it uses, and the orchestration of one request (``complete``).
    The API (gateway/api/) and the wiring (gateway/run.py) reach the parts through it."""

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
        self.drain: Draining | None = None      # its HTTP server's graceful stop, once wired (gateway/run.py)
        self.waiting = WaitingRoom(limits.ADMISSION_QUEUE_MAX)
        self.streams = StreamPool(p2p)       # its ``run`` is one of the gateway's supervised loops
        self.auth = Authenticator(tenants, config.api_key_sha256, config.tenant)
        # On a database replicas share, tenants' concurrency and budget hold over all of them (market/shared.py)
        self.admission = Admission(books, SharedReservations(books.database, p2p.peer_id)
                                   if books.database.engine.name == "postgresql" else None)
        self.catalog = GatewayCatalog(CatalogBook(books.database), key)    # ``load`` it before serving
        self.market = MarketView(directory, providers, self.waiting, self.catalog)
        self.tickets = TicketBook(books.database)
        self.runner = TicketRunner(key, p2p, self.streams, self.tickets, self.market, self.admission, self.metrics)
        self.spot_checks = SpotChecker(self.runner, self.market, books.database, providers, books,
                                       config.spot_check_rate_ppm, self.metrics.spot_check)   # ``run``: supervised

    @property
    def bootstrap_tenant(self) -> Tenant:
        return self.auth.bootstrap_tenant

    async def authenticate(self, authorization: str | None) -> Tenant:
        return await self.auth.authenticate(authorization)

    async def provider_views(self) -> list[ProviderView]:
        return await self.market.provider_views()

    async def offered_models(self) -> list[str]:
        return await self.market.offered_models()

    # (1)-(8) -----------------------------------------------------------------------------------------------------
    async def complete(self, request: InferenceRequest, tenant: Tenant,
                       on_text: OnText, request_id: str | None = None) -> Completion:
        """Serve one request, passing (the pieces of each tokens frame, provider peer id) to ``on_text`` as they
        arrive; return the verified completion."""
        catalog = self.catalog.catalog
        pin = catalog.pin(request.model)
        if pin is None:
            retired = catalog.entries.get(request.model)
            raise ModelNotFound(f"the model {request.model!r} " + (
                "was retired from the catalog" if retired is not None else "does not exist") +
                f" (known: {', '.join(catalog.live_ids())})", param="model")
        if not tenant.allows(request.model):
            raise Forbidden(f"tenant {tenant.name} may not use {request.model} (allowed: "
                            f"{', '.join(tenant.models or ())})", param="model")
        check_model_serves(catalog, request.model, request.prompt)
        check_fits_a_request_frame(request.prompt)
        seed = request.seed if request.seed is not None else secrets.randbelow(2**32)
        order = Order(request_id or new_request_id(), tenant.name, Payer.CUSTOMER, request.model, pin,
                      request.sampling(seed), secrets.token_bytes(SALT_BYTES), request.prompt,
                      prompt_tokens_upper_bound(len(str(request.prompt).encode()), prompt_parts(request.prompt)),
                      await self.market.demand_multiplier(request.model, pin), margin_bp(self.config, tenant.tier))
        job = _Job(order, tenant, request, seed, on_text)
        need = self.requirements(job)
        ranking = await self.market.rank(need, limits.PLACEMENT_ATTEMPTS_MAX)
        candidates = ranking.candidates
        if ranking.price_caps is None:
            raise self.no_provider(job, await self.market.provider_views(), need)
        job.price_caps = ranking.price_caps
        job.order = order = replace(order, reserved_minor=worst_case_minor(order.prompt_tokens_max, need.max_tokens,
                                                                           *job.price_caps))
        await self.admission.admit(tenant, order.request_id, order.reserved_minor)
        try:
            completion = await self._serve_or_wait(job, need, candidates)
        finally:
            await self.admission.release(tenant, order.request_id, job.charged)
            if not job.held_slot:
                self.waiting.wake()     # a turn this request was handed and did not use goes to the next waiter
        # Settled: only now is it drawn whether this request is re-run elsewhere (never waits; docs/verification.md),
        # unless the customer asked that its prompt go to no other provider (provider.data_collection "deny")
        if request.routing.share_for_checks:
            self.spot_checks.finished(Finished(order.request_id, tenant, order.prompt, order.salt, completion.text,
                                               completion.receipt.finish_reason))
        return completion

    async def complete_choices(self, request: InferenceRequest, tenant: Tenant, choices: int,
                               on_text: Callable[[int], OnText], request_id: str) -> list[Completion | GatewayError]:
        """OpenAI's ``n``: ``choices`` completions of one request, served side by side, each its own request through
        ``complete`` (its own ticket, receipt and bill): choice i has the seed ``seed + i`` (mod 2^64; one seed is
        drawn when the request has none) and the request id ``request_id`` (i = 0) or ``request_id-i``;
        ``on_text(i)`` takes its text. A choice that fails is its error at its place: the others stand, each billed
        for itself. When every choice fails, the first one's error is raised."""
        if choices == 1:
            return [await self.complete(request, tenant, on_text(0), request_id)]
        base = request.seed if request.seed is not None else secrets.randbelow(2**32)
        results: list[Completion | GatewayError | None] = [None] * choices

        async def serve(index: int) -> None:
            one = replace(request, seed=(base + index) % 2**64)
            try:
                results[index] = await self.complete(one, tenant, on_text(index),
                                                     request_id if index == 0 else f"{request_id}-{index}")
            except GatewayError as error:
                results[index] = error
            except StoreError as exc:          # the database failed under this choice: retryable, like the others
                results[index] = DatabaseUnavailable.of(exc)

        async with trio.open_nursery() as nursery:
            for index in range(choices):
                nursery.start_soon(serve, index)
        done = [result for result in results if result is not None]
        if not any(isinstance(result, Completion) for result in done):
            first = done[0]
            assert isinstance(first, GatewayError)
            raise first
        return done

    def requirements(self, job: _Job, **overrides: Any) -> Requirements:
        """What placement must honour for ``job``; ``overrides`` (a resumed stream's class, exclusions, the
        reservation's prices) replace fields of it."""
        request = job.request
        routing = request.routing
        if "exclude" in overrides:
            overrides["exclude"] = overrides["exclude"] | routing.ignore
        need = Requirements(request.model, job.order.model_sha256, CURRENCY,
                            prompt_tokens_estimate=prompt_chars(request.prompt) // CHARS_PER_TOKEN_ESTIMATE + 1,
                            max_tokens=request.max_tokens, eu_only=job.tenant.eu_only,
                            multiplier_bp=job.order.multiplier_bp, margin_bp=job.order.margin_bp,
                            engine_build=(self.config.determinism_pin or "(no pinned class)")
                            if job.tenant.require_determinism else None,
                            max_price_in=request.max_price_in_per_1m, max_price_out=request.max_price_out_per_1m,
                            exclude=routing.ignore, only=routing.only, order=routing.order,
                            fallbacks=routing.allow_fallbacks, sort=routing.sort)
        return replace(need, **overrides)

    def no_provider(self, job: _Job, views: list[ProviderView], need: Requirements) -> NoProvider:
        reasons = sorted({reason for v in views if (reason := why_not(v, need, now_ms())) is not None})
        model = job.request.model
        if need.eu_only:
            reason, message = "eu_only", f"no certified EU provider has capacity for {model} right now"
        elif job.tenant.require_determinism:
            reason, message = "determinism", f"no provider in the pinned determinism class offers {model}"
        else:
            reason, message = "none_eligible", f"no provider offering {model} has a free slot right now"
        self.metrics.placement_failure(reason)
        detail = f" ({'; '.join(reasons)})" if reasons else ""
        return NoProvider(f"{message}; retry shortly{detail}")

    async def _serve_or_wait(self, job: _Job, need: Requirements, candidates: list[ProviderView]) -> Completion:
        """(4)-(8), and while every eligible provider is busy, wait in the fair admission queue for a slot (woken
        when a ticket ends or an attestation shows free slots) until the queue deadline: then 429."""
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
                candidates = (await self.market.rank(need, limits.PLACEMENT_ATTEMPTS_MAX)).candidates

    async def _serve(self, job: _Job, candidates: list[ProviderView]) -> Completion:
        """Try candidates in order, one ticket each. Before any text was delivered, any failure moves on to the next
        candidate; after, only providers of the failed one's determinism class, within the reservation's prices,
        may resume."""
        tried: set[bytes] = set()
        failures: list[Failure] = []
        resume_class: str | None = None
        while candidates and len(tried) < limits.PLACEMENT_ATTEMPTS_MAX:
            view = candidates[0]
            tried.add(view.key)
            if self.market.full_with_ours(view.attestation) or await self._full_in_the_books(view):
                # Full with this gateway's own requests: busy without asking (no ticket written, no stream opened).
                failures.append(Failure(view.key, Refusal.BUSY, "busy (every slot serves this gateway's or another "
                                                                "replica's tickets)"))
                candidates = [c for c in candidates[1:] if c.key not in tried]
                continue
            try:
                run = await self.runner.run(job.order, view.attestation, job)
                assert run.receipt is not None and run.settlement is not None
                settlement = run.settlement
                return Completion(job.order.request_id, job.delivered, run.receipt, peer_id_of(view.key), job.seed,
                                  job.order.salt, Charge(settlement.payout, settlement.fee, settlement.charge),
                                  settlement, tuple(job.delivered_logprobs))
            except AttemptFailed as exc:
                if exc.refusal is Refusal.BAD_REQUEST:    # the request itself is unservable: no provider would differ
                    raise BadRequest(f"the provider refused the request before any work: {exc}") from None
                failures.append(Failure(view.key, exc.refusal, str(exc)))
                log.info("provider %s did not take %s: %s", peer_id_of(view.key), job.order.request_id, exc)
                if exc.busy:                       # full, not failing: no mark against its standing
                    candidates = [c for c in candidates[1:] if c.key not in tried]
                    continue
            except StreamBroke as exc:
                failures.append(Failure(view.key, Refusal.FAILED, str(exc)))
                log.warning("provider %s failed mid-stream on %s: %s", peer_id_of(view.key), job.order.request_id,
                            exc)
                resume_class = resume_class or view.attestation.engine_build
                self.metrics.failover()
            except CustomerGone:
                raise ProviderFailed("the customer went away") from None
            if job.delivered:
                need = self.requirements(job, engine_build=resume_class, exclude=frozenset(tried),
                                         max_price_in=job.price_caps[0], max_price_out=job.price_caps[1])
                candidates = (await self.market.rank(need, limits.PLACEMENT_ATTEMPTS_MAX)).candidates
            else:
                candidates = [c for c in candidates[1:] if c.key not in tried]
        summary = "; ".join(str(failure) for failure in failures)
        if job.delivered:
            self.metrics.placement_failure("resume")
            raise ProviderFailed(f"the provider failed mid-stream and no other provider of its determinism class "
                                 f"could resume it ({summary})")
        if any(failure.refusal is Refusal.BUSY for failure in failures):
            # A busy provider frees its slot soon: wait for it (those that failed are backed off meanwhile), not 502
            self.metrics.placement_failure("busy")
            where = "certified EU provider" if job.tenant.eu_only else "eligible provider"
            raise AllBusy(f"no {where} has capacity for {job.request.model} right now: every one is busy or "
                          f"failed ({summary}); retry shortly")
        self.metrics.placement_failure("failed")
        raise ProviderFailed(f"no provider could serve the request ({summary})")

    async def _full_in_the_books(self, view: ProviderView) -> bool:
        """Replicas: every slot of the provider holds an open ticket of some replica, as the shared books say right
        now (one indexed count; cheaper than a ticket written for a certain busy refusal and its round trip)."""
        if self.admission.shared is None:
            return False
        since = now_ms() - limits.TICKET_LIFETIME_MS
        return await self.tickets.open_for(view.key, since) >= view.attestation.slots_total

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


PROMPT_BYTES_MAX = node_limits.REQUEST_FRAME_BYTES_MAX - limits.REQUEST_FRAME_OVERHEAD_BYTES_MAX


def check_model_serves(catalog: Catalog, model_id: str, prompt: dict) -> None:
    """Refuse (400, before placement) a chat for a base model: it has no chat template and only continues text, so
    a chat prompt gets gibberish back. Raw completions (/v1/completions) serve every model."""
    if "messages" in prompt and not catalog.lookup(model_id).serves_chat:
        raise BadRequest(f"{model_id} is a base model (not instruction-tuned): it does not follow a chat. Send a raw "
                         f"prompt to POST /v1/completions to continue text with it, or chat with "
                         f"{' or '.join(catalog.chat_ids())}", param="model")


def check_fits_a_request_frame(prompt: dict) -> None:
    """Refuse (400, before placement) a prompt no provider would take: the request frame (ticket, salt, prompt) must
    stay within node.limits.REQUEST_FRAME_BYTES_MAX, or every provider tried would drop the stream and be backed
    off for the tenant's mistake."""
    size = len(canonical.encode(prompt))
    if size > PROMPT_BYTES_MAX:
        raise BadRequest(f"the prompt is {size} bytes encoded; providers accept at most {PROMPT_BYTES_MAX}",
                         param="messages")
