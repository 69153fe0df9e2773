"""Hops (4)-(8) of every ticket the gateway sends, whoever pays for it: a customer's request (and its failover and
resumption), a spot-check re-run and a probe all go through ``TicketRunner.run``; no other module opens
/llorch/infer/1 or calls ``settle`` (tests/test_one_ticket_flow.py keeps it so).

  (4) issue: sign a ticket for the provider (its prices under the demand multiplier, never below what it attested;
      the tenant's pseudonym at that provider) and write it with the gateway's own terms (payer, customer prices,
      reservation, prompt bound) durably, before it is sent;
  (5) send it over /llorch/infer/2 (gateway/market/node_client.py) and wait for admission;
  (6) relay: meter every tokens frame's texts on the gateway's clock (``Meter``) and hand them to the ticket's
      ``Sink`` (the customer's stream; a platform run only keeps it). At most max_tokens + 1 texts: one per token and
      one more for held-back text (docs/protocol.md §6; several share a frame when the gateway is behind). A resumed stream regenerates what was delivered: each
      piece is compared with it in O(piece) and only the rest goes on;
  (7) check the final frame's receipt against the ticket and the text this provider sent;
  (8) settle exactly once, shielded from cancellation: ``settle`` computes every leg for the ticket's payer, one
      transaction stores them with the settlement, the receipt and any finding (and, for a customer of a provider
      caught while the ticket was in flight, its credit); then the provider's standing.

Failures are typed: ``AttemptFailed`` (not admitted, or failed before any text reached the sink: ``refusal``),
``StreamBroke`` (failed after text reached the sink: the caller may resume on the same determinism class),
``CustomerGone`` (the sink failed: the customer's connection broke). Cancellation propagates after the ticket is
settled.
"""

from __future__ import annotations

import hmac
import logging
import secrets
from dataclasses import dataclass, field
from typing import Protocol

import trio
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from llorch.gateway import limits
from llorch.gateway.books.pricing import customer_price, ticket_price
from llorch.gateway.books.receipts import check_receipt, receipt_expectations
from llorch.gateway.books.settlement import (Credit, Event, Meter, Payer, Settlement, State, Terms,
                                             credit_of_settlement, settle)
from llorch.gateway.books.tickets import TicketBook
from llorch.gateway.errors import ReceiptRejected
from llorch.gateway.market.node_client import AttemptFailed, Refusal, StreamPool, InferenceCall, request_inference
from llorch.ledger.errors import EncodingError, LedgerError
from llorch.ledger.objects import VERSION, Receipt, Ticket, check_logprobs_entry
from llorch.ledger.signing import SigningKey, peer_id_of
from llorch.node.errors import FrameTimeout, ProtocolError
from llorch.node.p2p import P2P
from llorch.node.stream_io import now_ms
from llorch.node.wire.attestation import Attestation
from llorch.node.wire.frames import Final, Request, Tokens

log = logging.getLogger("llorch.gateway")

PSEUDONYM_KEY_INFO = b"llorch/tenant-pseudonym-key/v1"     # HKDF info: the pseudonym key, from the gateway's seed
PSEUDONYM_TAG = b"llorch/tenant/v2\x00"                   # HMAC input: tag ‖ provider_key ‖ tenant name


def new_request_id() -> str:
    return "chatcmpl-" + secrets.token_hex(12)


@dataclass(frozen=True)
class Order:
    """What a ticket asks of a provider, the same for every provider it may go to (a resumed stream's next ticket
    carries the same order): the request, who pays, and the bounds its money must keep."""

    request_id: str
    tenant: str                      # the customer; for a platform run, the tenant whose pseudonym it carries
    payer: Payer
    model_id: str
    model_sha256: bytes
    sampling: dict                   # the ticket's integer sampling map, seed included
    salt: bytes
    prompt: dict
    prompt_tokens_max: int           # the gateway's own upper bound on the prompt's tokens
    multiplier_bp: int               # demand multiplier on the provider's prices
    margin_bp: int = 0               # the tenant's tier margin (customer payer)
    reserved_minor: int = 0          # the reservation: no ticket of this order may charge more (customer payer)


Piece = tuple[str, list[dict]]
"""One token's text the customer has not had yet, with its logprobs entry (none without logprobs, or when the customer
already has it): the unit of the customer's stream, one SSE chunk."""


class Sink(Protocol):
    """Where a ticket's text goes. ``delivered``: what the customer already has (a resumed stream skips it), and
    ``delivered_logprobs`` the logprobs entries of its tokens; ``send`` takes the pieces of one tokens frame at
    once; ``settled``: told of every ticket run for it once the ticket is settled, whatever its outcome."""

    @property
    def delivered(self) -> str: ...

    @property
    def delivered_logprobs(self) -> list[dict]: ...

    async def send(self, pieces: list[Piece], provider_peer_id: str) -> None: ...

    def settled(self, run: TicketRun) -> None: ...


class Keep:
    """The sink of a platform run: nobody waits for the text; the run keeps it (``TicketRun.text``)."""

    delivered = ""
    delivered_logprobs: list[dict] = []

    async def send(self, pieces: list[Piece], provider_peer_id: str) -> None:
        return None

    def settled(self, run: TicketRun) -> None:
        return None


class Standings(Protocol):
    """What the runner tells the market view (gateway/market/view.py) about each ticket."""

    def ticket_started(self, provider_key: bytes) -> None: ...
    def ticket_ended(self, provider_key: bytes, held_slot: bool) -> None: ...
    def failed(self, provider_key: bytes) -> None: ...
    def succeeded(self, provider_key: bytes, ttft_ms: int, tokens_per_s: int = 0) -> None: ...
    def suspended(self, provider_key: bytes) -> bool: ...
    def credit_due(self, provider_key: bytes, issued_ms: int) -> bool: ...


class TenantLocks(Protocol):
    """Admission's per-tenant lock: a settlement posts under it (gateway/market/admission.py)."""

    def tenant_lock(self, name: str) -> trio.Lock: ...


class TokenCounter(Protocol):
    def tokens(self, tokens_in: int, tokens_out: int) -> None: ...


class StreamBroke(Exception):
    """The provider failed after text reached the sink; the stream may be resumed on a provider of the same class."""


class CustomerGone(Exception):
    """Sending to the customer failed: the connection is gone (as if it had disconnected)."""


@dataclass
class TicketRun:
    """One ticket while it runs: its terms, meter, the text this provider sent, and the receipt once it came."""

    provider: Attestation
    ticket: Ticket
    ticket_bytes: bytes
    terms: Terms
    meter: Meter
    received: list[str] = field(default_factory=list)
    received_chars: int = 0
    logprobs: list[dict] = field(default_factory=list)     # the logprobs entries of this provider's tokens
    tail: Tokens | None = None       # with logprobs, a frame without entries: held-back text, so the last one
    expected: dict | None = None     # receipt_expectations of this ticket, computed while the provider works
    receipt: Receipt | None = None
    receipt_bytes: bytes | None = None
    settlement: Settlement | None = None
    posted: bool = False             # the settlement is in the books (False: reconciliation will settle it)
    credit: Credit | None = None     # repaid at settlement: the provider was caught while this ticket ran

    @property
    def admitted(self) -> bool:
        """The provider took the ticket (it held one of its slots)."""
        return self.meter.accepted_ms is not None

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

    def receive_logprobs(self, entry: dict | None, delivered: list[dict]) -> list[dict]:
        """Take a token's logprobs entry (when the ticket asks for them: exactly ``sampling.logprobs``
        alternatives); return it unless the customer already has the entry at its place (a resumed stream)."""
        if entry is None:
            return []
        try:
            check_logprobs_entry(entry, self.ticket.sampling["logprobs"])
        except (EncodingError, KeyError) as exc:
            raise ProtocolError(f"tokens frame logprobs: {exc}" if not isinstance(exc, KeyError) else
                                "a tokens frame carries logprobs the ticket did not ask for") from None
        position = len(self.logprobs)
        self.logprobs.append(entry)
        if position < len(delivered):
            if delivered[position] != entry:
                raise ProtocolError("the resumed stream's logprobs differ from what was already delivered")
            return []
        return [entry]


class TicketRunner:
    def __init__(self, key: SigningKey, p2p: P2P, streams: StreamPool, tickets: TicketBook, standings: Standings,
                 locks: TenantLocks, counter: TokenCounter) -> None:
        self._key = key
        self._p2p = p2p
        self._streams = streams
        self._tickets = tickets
        self._standings = standings
        self._locks = locks
        self._counter = counter
        self._pseudonym_key = HKDF(algorithm=SHA256(), length=32, salt=None,
                                   info=PSEUDONYM_KEY_INFO).derive(key.seed)

    def tenant_pseudonym(self, tenant: str, provider_key: bytes) -> str:
        """The tenant's name in tickets (and so in ``provider_key``'s ledger): stable per provider, different at
        every provider, so nobody reading two ledgers can link a tenant's requests; only this gateway, holding a
        key derived from its own (HKDF, never the signing seed itself), can map it back."""
        message = PSEUDONYM_TAG + provider_key + tenant.encode()
        return "t_" + hmac.new(self._pseudonym_key, message, "sha256").hexdigest()[:24]

    # (4) ---------------------------------------------------------------------------------------------------------
    def issue(self, order: Order, provider: Attestation) -> tuple[Ticket, bytes, Terms]:
        """The ticket for ``provider`` (its prices, never below what it attested) and the gateway's own terms for it
        (the payer, the customer's prices, the reservation, the prompt bound), kept beside it."""
        issued = now_ms()
        ticket = Ticket(
            v=VERSION, request_id=order.request_id, gateway_key=self._key.public_key,
            provider_key=provider.provider_key, tenant=self.tenant_pseudonym(order.tenant, provider.provider_key),
            model_id=order.model_id, model_sha256=order.model_sha256, sampling=order.sampling,
            price_in=ticket_price(provider.price_in, order.multiplier_bp),
            price_out=ticket_price(provider.price_out, order.multiplier_bp), currency=provider.currency,
            issued_ms=issued, expires_ms=issued + limits.TICKET_LIFETIME_MS)
        if order.payer.platform:
            terms = Terms(order.tenant, 0, 0, 0, 0, order.prompt_tokens_max, order.payer)
        else:
            terms = Terms(order.tenant, order.margin_bp,
                          customer_price(provider.price_in, order.multiplier_bp, order.margin_bp),
                          customer_price(provider.price_out, order.multiplier_bp, order.margin_bp),
                          order.reserved_minor, order.prompt_tokens_max, order.payer)
        return ticket, ticket.seal(self._key), terms

    async def run(self, order: Order, provider: Attestation, sink: Sink) -> TicketRun:
        """One ticket, from its durable issue to its settlement (exactly once, shielded from cancellation). Returns
        the settled run (with the checked receipt); raises AttemptFailed, StreamBroke or CustomerGone."""
        key = provider.provider_key
        if self._standings.suspended(key):      # caught since the caller looked at the market: no ticket
            raise AttemptFailed(f"{peer_id_of(key)} was suspended a moment ago", Refusal.SUSPENDED)
        ticket, ticket_bytes, terms = self.issue(order, provider)
        run = TicketRun(provider, ticket, ticket_bytes, terms, Meter(now_ms()))
        self._standings.ticket_started(key)
        try:
            await self._tickets.issue(ticket, ticket_bytes, terms)
            try:
                await self._send_and_relay(order, run, sink)
            finally:
                with trio.CancelScope(shield=True):
                    await self._settle(run)
                    sink.settled(run)
        except AttemptFailed as exc:
            if exc.refusal in (Refusal.UNREACHABLE, Refusal.REFUSED, Refusal.FAILED):
                self._standings.failed(key)
            raise
        except StreamBroke:
            self._standings.failed(key)
            raise
        finally:
            self._standings.ticket_ended(key, run.admitted)
        return run

    # (5)-(7) -----------------------------------------------------------------------------------------------------
    async def _send_and_relay(self, order: Order, run: TicketRun, sink: Sink) -> None:
        meter = run.meter
        try:
            async with request_inference(self._p2p, run.provider, Request(run.ticket_bytes, order.salt, order.prompt),
                                         self._streams) as call:
                meter.handle(Event.ACCEPTED, now_ms())
                try:
                    await self._relay(call, order, run, sink)
                except (trio.Cancelled, CustomerGone):
                    meter.handle(Event.CUSTOMER_GONE, now_ms())
                    with trio.CancelScope(shield=True):
                        await self._collect_cancelled_receipt(call, order, run, sink)
                    raise
        except AttemptFailed:
            meter.handle(Event.REFUSED, now_ms())
            raise
        except trio.Cancelled:
            if meter.state is State.ISSUED:                # the customer left while the provider was admitting
                meter.handle(Event.CUSTOMER_GONE, now_ms())
            raise
        except FrameTimeout as exc:
            meter.handle(Event.TIMED_OUT, now_ms())
            raise self._failure(sink, str(exc)) from None
        except (ProtocolError, ReceiptRejected) as exc:
            meter.handle(Event.PROVIDER_FAILED, now_ms())
            raise self._failure(sink, str(exc)) from None

    @staticmethod
    def _failure(sink: Sink, reason: str) -> Exception:
        """Before any text reached the customer a failure is an ordinary failed attempt; after, a broken stream."""
        return StreamBroke(reason) if sink.delivered else AttemptFailed(reason, Refusal.FAILED)

    async def _relay(self, call: InferenceCall, order: Order, run: TicketRun, sink: Sink) -> None:
        """Relay tokens frames (metering each text), then check the final frame's receipt."""
        # While the provider generates (the gateway would only wait): what its receipt must say, but for the output.
        run.expected = receipt_expectations(run.ticket, run.ticket_bytes, order.salt, order.prompt)
        tokens_max = min(limits.RELAY_TOKENS_MAX, run.ticket.sampling["max_tokens"] + 1)
        provider_peer_id = peer_id_of(run.provider.provider_key)
        while True:
            frame = await call.next_frame()
            if isinstance(frame, Final):
                if run.tail is not None:
                    await self._pass_on(run, run.tail, sink, provider_peer_id)
                if run.received_chars < len(sink.delivered):
                    raise ProtocolError("the resumed stream ended before it caught up with what was delivered")
                run.receipt = check_receipt(frame.receipt, run.ticket, run.ticket_bytes, order.salt, order.prompt,
                                            run.text(), expected=run.expected, logprobs=run.logprobs)
                run.receipt_bytes = frame.receipt
                run.meter.handle(Event.FINAL, now_ms())
                return
            if run.meter.frames + len(frame.texts) > tokens_max:
                raise ProtocolError(f"the provider sent more than {tokens_max} tokens for "
                                    f"{run.ticket.sampling['max_tokens']}")
            run.meter.handle(Event.TOKEN, now_ms(), frame.texts)
            if run.tail is not None:
                raise ProtocolError("a tokens frame without logprobs, which the ticket asks for, was not the last")
            if frame.logprobs is None and "logprobs" in run.ticket.sampling:
                if len(frame.texts) != 1:
                    raise ProtocolError("a tokens frame without logprobs, which the ticket asks for, carries more "
                                        "than the one held-back text")
                run.tail = frame         # held-back text (docs/protocol.md §6): relayed only once it is the last
                continue
            await self._pass_on(run, frame, sink, provider_peer_id)

    async def _pass_on(self, run: TicketRun, frame: Tokens, sink: Sink, provider_peer_id: str) -> None:
        """Hand a tokens frame's texts and logprobs entries to the sink (what the customer has not had yet), all
        at once."""
        pieces = self._receive(run, frame, sink)
        if pieces:
            try:
                await sink.send(pieces, provider_peer_id)
            except trio.Cancelled:
                raise
            except Exception as exc:      # the customer's connection broke under the send
                raise CustomerGone(str(exc)) from None

    @staticmethod
    def _receive(run: TicketRun, frame: Tokens, sink: Sink) -> list[Piece]:
        entries = frame.logprobs if frame.logprobs is not None else [None] * len(frame.texts)
        pieces = []
        for text, entry in zip(frame.texts, entries):
            piece = run.receive(text, sink.delivered)
            fresh = run.receive_logprobs(entry, sink.delivered_logprobs)
            if piece or fresh:
                pieces.append((piece, fresh))
        return pieces

    async def _collect_cancelled_receipt(self, call: InferenceCall, order: Order, run: TicketRun,
                                         sink: Sink) -> None:
        """The customer went away: send a cancel frame and read the provider's receipt for what it generated
        (frames still in flight are drained, not billed). Bounded in time and frames; a provider that does not
        answer in time is settled without a receipt."""
        if run.tail is not None:          # held-back text kept for the final frame: part of what the provider sent
            self._receive(run, run.tail, sink)
            run.tail = None
        try:
            with trio.fail_after(limits.CANCEL_DRAIN_TIMEOUT_S):
                await call.cancel()
                for _ in range(limits.RELAY_TOKENS_MAX):
                    frame = await call.next_frame(limits.CANCEL_DRAIN_TIMEOUT_S)
                    if isinstance(frame, Final):
                        run.receipt = check_receipt(frame.receipt, run.ticket, run.ticket_bytes, order.salt,
                                                    order.prompt, run.text(), cancelled_by_gateway=True,
                                                    expected=run.expected, logprobs=run.logprobs)
                        run.receipt_bytes = frame.receipt
                        return
                    self._receive(run, frame, sink)
        except (ProtocolError, ReceiptRejected, trio.TooSlowError) as exc:
            log.info("no receipt from %s for cancelled %s: %s", peer_id_of(run.provider.provider_key),
                     order.request_id, exc)

    # (8) ---------------------------------------------------------------------------------------------------------
    async def _settle(self, run: TicketRun) -> None:
        """Settle the ticket once: bounded by the gateway's measurements, one transaction, then the standing."""
        meter = run.meter
        meter.end(Event.CUSTOMER_GONE, now_ms())     # cancelled before the stream opened: nothing was relayed
        metered = meter.metered()
        run.settlement = settle(run.ticket, run.terms, run.receipt, metered)
        meter.handle(Event.SETTLED, now_ms())
        key = run.ticket.provider_key
        try:
            async with self._locks.tenant_lock(run.terms.tenant):
                if self._standings.credit_due(key, run.ticket.issued_ms):
                    run.credit = credit_of_settlement(run.ticket.request_id, run.settlement)
                await self._tickets.settle(run.ticket, run.ticket_bytes, metered, run.settlement, run.receipt,
                                           run.receipt_bytes if run.settlement.receipt_used else None,
                                           run.terms.tenant, now_ms(), run.credit)
                run.posted = True
                if run.credit is None and self._standings.credit_due(key, run.ticket.issued_ms):
                    # caught while this settlement was being written, after the checker read the books
                    run.credit = credit_of_settlement(run.ticket.request_id, run.settlement)
                    if run.credit is not None:
                        await self._tickets.credit(run.ticket, run.credit, run.terms.tenant,
                                                   run.settlement.margin_bp, now_ms())
        except LedgerError as exc:   # the ticket stays open: `llorch billing reconcile --post` settles it
            log.error("could not settle ticket of %s: %s", run.ticket.request_id, exc)
        if run.settlement.receipt_used:
            self._counter.tokens(run.settlement.tokens_in, run.settlement.tokens_out)
        if run.settlement.findings:
            for finding in run.settlement.findings:
                log.warning("provider %s: %s on %s: %s", peer_id_of(key), finding.kind, run.ticket.request_id,
                            finding.detail)
            self._standings.failed(key)
        elif metered.outcome is State.FINISHED and metered.ttft_ms is not None:
            self._standings.succeeded(key, metered.ttft_ms, metered.tokens_per_s)
