"""The provider's side of one request: ``serve_inference`` handles one /llorch/infer/2 stream, hop by hop.

  (5) read the request frame; check the ticket (signed by a trusted gateway, addressed to us, unexpired,
      request_id unseen, model offered); take a free engine slot or answer BUSY at once;
  (6) generate with the ticket's seed, streaming tokens frames (``TokenSender``: several tokens share a frame only
      when the gateway is behind);
  (7) build the receipt, append it durably to the ledger, and only then send the final frame carrying it.

Any failure is answered with an error frame when the stream still works, and never crashes the host.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import trio

from llorch.inference.catalog import CatalogEntry
from llorch.inference.engine import Generation, Prepared, Sampling
from llorch.inference.errors import InferenceError, RequestError
from llorch.ledger import canonical
from llorch.ledger.errors import EncodingError, LedgerError, SignatureError, sole_exception
from llorch.ledger.money import readable
from llorch.ledger.objects import Ticket, amount_minor, logprobs_sha256, prompt_commitment, sampling_sha256
from llorch.ledger.signing import sha256
from llorch.ledger.store import LedgerStore
from llorch.node import limits
from llorch.node.errors import FrameTimeout, ProtocolError, TicketRejected
from llorch.node.wire.frames import Accepted, Busy, Cancel, Error, Final, More, Request, Tokens
from llorch.node.wire.infer_protocol import InferProtocol, Role
from llorch.node.stream_io import now_ms, read_frame, serve_stream, write_frame

log = logging.getLogger("llorch.node")


class SlotEngine(Protocol):
    """What a slot needs of its engine: inference.engine.Engine, or inference.echo.EchoEngine (a fake for tests)."""

    entry: CatalogEntry
    fingerprint: str

    def prepare(self, prompt: dict, sampling: Sampling) -> Prepared: ...

    async def generate(self, prepared: Prepared, emit: Callable[[str], Awaitable[None]]) -> Generation: ...


@dataclass
class EnginePool:
    """The node's slots: one engine per slot, each for one model, taken without waiting (no free slot for the
    ticket's model means BUSY). Models join while the node runs (node/model_loader.py ``add``)."""

    engines: Sequence[SlotEngine]
    free: list[SlotEngine] = field(default_factory=list)
    changed: trio.Event = field(default_factory=trio.Event)    # set when a slot is taken or freed, or models join

    def __post_init__(self) -> None:
        self.engines = list(self.engines)
        self.free = list(self.engines)

    @property
    def total(self) -> int:
        return len(self.engines)

    @property
    def fingerprint(self) -> str | None:
        """The engine build every slot shares (None before the first model is loaded)."""
        return self.engines[0].fingerprint if self.engines else None

    def add(self, engines: Sequence[SlotEngine]) -> None:
        """More slots, for a model loaded while the node runs."""
        self.engines = [*self.engines, *engines]
        self.free.extend(engines)
        self.changed.set()

    def try_take(self, model_id: str) -> SlotEngine | None:
        for engine in reversed(self.free):
            if engine.entry.id == model_id:
                self.free.remove(engine)
                self.changed.set()
                return engine
        return None

    def give_back(self, engine: SlotEngine) -> None:
        assert engine in self.engines and engine not in self.free
        self.free.append(engine)
        self.changed.set()


class ProviderService:
    """Serves /llorch/infer/2 for one node: tickets in, tokens and signed receipts out."""

    def __init__(self, provider_key: bytes, trusted_gateway_keys: frozenset[bytes], pool: EnginePool,
                 ledger: LedgerStore, offered: dict[str, bytes],
                 attested_prices: tuple[int, int, str] | None = None) -> None:
        self.provider_key = provider_key
        self.attested_prices = attested_prices      # (price_in, price_out, currency) per 1M: the floor it accepts
        self.trusted_gateway_keys = trusted_gateway_keys
        self.pool = pool
        self.ledger = ledger
        self.offered = offered                      # model id -> sha256 of the file this node loaded
        self._in_flight: set[str] = set()
        self.served = 0

    async def serve_inference(self, stream) -> None:
        """Stream handler for /llorch/infer/2. Never raises: an exception here would take the host down."""
        await serve_stream(stream, "infer", lambda s: self._serve(s, InferProtocol(Role.SERVER)))

    async def _serve(self, stream, protocol: InferProtocol) -> None:
        """Serve the requests of one stream, one after another, until the gateway closes it or it stays idle for
        REQUEST_READ_TIMEOUT_S. A stream that ends quietly between requests (or before its first: a gateway's
        stream opened ahead and not needed) is no error. One task reads the stream for its whole life
        (``GatewayReader``): a reader is never cancelled between requests, which could cut py-libp2p's window
        update in a read (node/p2p.py) and lose the bytes that read had taken."""
        served = 0
        reader = GatewayReader(stream, protocol)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader.run)
            async for request in reader.requests:
                await self._serve_one(stream, protocol, request, reader)
                served += 1
                reader.idle()
            nursery.cancel_scope.cancel()
        exc = reader.error
        if exc is not None:
            if reader.quiet_end and (served or not isinstance(exc, FrameTimeout)):
                log.debug("infer stream ended between requests after %d: %s", served, exc)
                return
            raise exc

    async def _serve_one(self, stream, protocol: InferProtocol, request: Request, reader: GatewayReader) -> None:
        try:
            ticket = self.check_ticket(request.ticket, now_ms())
        except TicketRejected as exc:
            log.info("ticket rejected (%s): %s", exc.code, exc)
            await write_frame(stream, protocol, Error(exc.code, str(exc)))
            return
        engine = self.pool.try_take(ticket.model_id)
        if engine is None:
            slots = sum(engine.entry.id == ticket.model_id for engine in self.pool.engines)
            await write_frame(stream, protocol, Busy(f"all {slots} slots of {ticket.model_id} are busy"))
            return
        self._in_flight.add(ticket.request_id)
        try:
            await self._generate(stream, protocol, request, ticket, engine, reader)
        finally:
            self._in_flight.discard(ticket.request_id)
            self.pool.give_back(engine)

    def check_ticket(self, ticket_bytes: bytes, now: int) -> Ticket:
        """Parse and check a ticket; raise TicketRejected with the code the gateway will see."""
        try:
            ticket = Ticket.from_envelope(ticket_bytes)
        except (EncodingError, SignatureError) as exc:
            raise TicketRejected("bad_ticket", f"ticket is invalid: {exc}") from None
        if ticket.gateway_key not in self.trusted_gateway_keys:
            raise TicketRejected("untrusted_gateway", "ticket signed by a gateway this node does not trust")
        if ticket.provider_key != self.provider_key:
            raise TicketRejected("wrong_provider", "ticket is addressed to another provider")
        if ticket.expires_ms <= now:
            raise TicketRejected("ticket_expired", f"ticket expired {now - ticket.expires_ms} ms ago: "
                                                   f"check the gateway's clock")
        if ticket.issued_ms > now + limits.TICKET_CLOCK_SKEW_MS:
            raise TicketRejected("ticket_from_future", f"ticket issued {ticket.issued_ms - now} ms in the future: "
                                                       f"check the gateway's clock")
        if ticket.expires_ms - ticket.issued_ms > limits.TICKET_LIFETIME_MS_MAX:
            raise TicketRejected("bad_ticket", "ticket lifetime is longer than this node accepts")
        if ticket.request_id in self._in_flight:
            raise TicketRejected("replayed_request", f"request {ticket.request_id} is already being served")
        if self.attested_prices is not None:
            price_in, price_out, currency = self.attested_prices
            if ticket.currency != currency or ticket.price_in < price_in or ticket.price_out < price_out:
                raise TicketRejected("underpriced", f"ticket pays {ticket.price_in}/{ticket.price_out} "
                                                    f"{ticket.currency} per 1M input/output tokens; this node's "
                                                    f"attested price is {price_in}/{price_out} {currency}")
        if self.offered.get(ticket.model_id) != ticket.model_sha256:
            raise TicketRejected("model_not_offered", f"this node does not offer {ticket.model_id} with that sha256")
        return ticket

    async def _generate(self, stream, protocol: InferProtocol, request: Request, ticket: Ticket,
                        engine: SlotEngine, reader: GatewayReader) -> None:
        if await self.ledger.contains(ticket.request_id):
            await write_frame(stream, protocol, Error("replayed_request",
                                                      f"request {ticket.request_id} is already in the ledger"))
            return
        sampling = Sampling.of(ticket.sampling)
        try:
            prepared = engine.prepare(request.prompt, sampling)
        except RequestError as exc:
            await write_frame(stream, protocol, Error("bad_request", str(exc)))
            return
        cancelled = trio.Event()
        sender = TokenSender(stream, protocol, cancelled)
        reader.generating(sender)          # its more frames wake the sender; a cancel, or the stream ending, stops us
        await write_frame(stream, protocol, Accepted())
        accepted_ms = now_ms()
        first_token_ms: int | None = None

        async def emit(text: str, logprobs: dict | None = None) -> None:
            nonlocal first_token_ms
            if first_token_ms is None:
                first_token_ms = now_ms()
            await sender.add(text, logprobs)

        failure: BaseException | None = None
        drained = False
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sender.run)
            try:
                with trio.fail_after(limits.GENERATION_TIMEOUT_S):
                    generation = await engine.generate(prepared, emit)
            except BaseException as exc:   # the engine's own nursery wraps its errors in exception groups
                failure = sole_exception(exc)
                if not isinstance(failure, (InferenceError, trio.TooSlowError)):
                    raise
            if failure is None:
                drained = await sender.drain()     # every token the receipt counts goes out before the final frame
            nursery.cancel_scope.cancel()
        if failure is not None:
            log.error("generation failed for %s: %s", ticket.request_id, failure)
            await write_frame(stream, protocol, Error("engine_failed", f"generation failed: {failure}"))
            return
        if not drained:
            raise ProtocolError(f"the gateway took no tokens frame for {limits.TOKENS_DRAIN_TIMEOUT_S:g} s: no "
                                f"receipt for {ticket.request_id}")
        finished_ms = now_ms()
        receipt = await self._record(ticket, request, engine, generation, accepted_ms,
                                     first_token_ms or finished_ms, finished_ms)
        self.served += 1
        log.info("served %s (%s): %d tokens in, %d out in %.1f s, earned %s%s", ticket.request_id, ticket.model_id,
                 generation.tokens_in, generation.tokens_out, (finished_ms - accepted_ms) / 1000,
                 readable(amount_minor(generation.tokens_in, generation.tokens_out, ticket.price_in,
                                       ticket.price_out), ticket.currency),
                 "; cancelled by the gateway" if generation.finish_reason == "cancelled" else "")
        await write_frame(stream, protocol, Final(receipt))

    async def _record(self, ticket: Ticket, request: Request, engine: SlotEngine, generation, accepted_ms: int,
                      first_token_ms: int, finished_ms: int) -> bytes:
        """Build the receipt and append it durably; return the envelope bytes that were stored."""
        fields = {
            "request_id": ticket.request_id, "ticket_sha256": sha256(request.ticket),
            "gateway_key": ticket.gateway_key, "tenant": ticket.tenant, "provider_key": self.provider_key,
            "model_id": ticket.model_id, "model_sha256": ticket.model_sha256, "engine_build": engine.fingerprint,
            "seed": ticket.sampling["seed"], "sampling_sha256": sampling_sha256(ticket.sampling),
            "tokens_in": generation.tokens_in, "tokens_out": generation.tokens_out,
            "accepted_ms": accepted_ms, "first_token_ms": first_token_ms, "finished_ms": finished_ms,
            "price_in": ticket.price_in, "price_out": ticket.price_out, "currency": ticket.currency,
            "amount": amount_minor(generation.tokens_in, generation.tokens_out, ticket.price_in, ticket.price_out),
            "prompt_commitment": prompt_commitment(request.salt, request.prompt),
            "output_sha256": sha256(generation.text.encode("utf-8")),
            "finish_reason": generation.finish_reason,
        }
        if "logprobs" in ticket.sampling:
            fields["logprobs_sha256"] = logprobs_sha256(list(generation.logprobs))
        try:
            with trio.CancelScope(shield=True):   # a started append always finishes: no half-recorded request
                return await self.ledger.append(fields)
        except LedgerError as exc:
            raise ProtocolError(f"could not record the receipt, not sending it: {exc}") from None


class GatewayReader:
    """The one task that reads a stream from the gateway, for the stream's whole life: ``request`` frames go to
    ``requests`` (the serve loop), a ``more`` frame wakes the running request's sender, a ``cancel`` stops its
    generation (a cancel or more that crossed the final frame finds none running: ignored). The stream ending, a
    timeout or a bad frame ends ``requests`` with ``error`` (and stops a running generation): between requests the
    stream may stay idle REQUEST_READ_TIMEOUT_S; during one, the generation's own timeout bounds it."""

    def __init__(self, stream, protocol: InferProtocol) -> None:
        self.stream = stream
        self.protocol = protocol
        self._requests_in, self.requests = trio.open_memory_channel[Request](1)
        self.running: TokenSender | None = None
        self.error: ProtocolError | None = None
        self.quiet_end = False                 # the error came between requests, before any byte of the next
        self._idle_bytes = 0
        self._deadline = trio.current_time() + limits.REQUEST_READ_TIMEOUT_S
        self._scope: trio.CancelScope | None = None      # the read in progress

    def generating(self, sender: TokenSender) -> None:
        self.running = sender

    def idle(self) -> None:
        """The request ended: the next must come within REQUEST_READ_TIMEOUT_S."""
        self.running = None
        self._idle_bytes = self.protocol.bytes_received
        self._set_deadline(trio.current_time() + limits.REQUEST_READ_TIMEOUT_S)

    def _set_deadline(self, deadline: float) -> None:
        self._deadline = deadline
        if self._scope is not None:
            self._scope.deadline = deadline

    async def run(self) -> None:
        async with self._requests_in:
            try:
                while True:
                    frame = await self._next()
                    if isinstance(frame, Request):
                        self._set_deadline(math.inf)            # the generation's own timeout bounds it
                        self._requests_in.send_nowait(frame)     # the state machine allows one at a time
                    elif self.running is None:                 # crossed the final frame: ignored
                        self._idle_bytes = self.protocol.bytes_received
                    elif isinstance(frame, More):
                        self.running.wake()
                    else:                                       # cancel
                        self.running.cancelled.set()
            except ProtocolError as exc:
                self.error = exc
                self.quiet_end = self.running is None and self.protocol.bytes_received == self._idle_bytes
                if self.running is not None:
                    self.running.cancelled.set()

    async def _next(self):
        with trio.CancelScope(deadline=self._deadline) as self._scope:
            return await read_frame(self.stream, self.protocol, math.inf)
        raise FrameTimeout(f"no request within {limits.REQUEST_READ_TIMEOUT_S:g} s")


class TokenSender:
    """(6) The engine's tokens on their way to the gateway. ``add`` takes one token's text (and logprobs entry)
    without waiting for the network; ``run`` sends what it holds, as many as fit in one tokens frame, whenever flow
    control lets it (docs/protocol.md §6). So a token goes alone while the gateway keeps up, and tokens share a frame
    exactly when the gateway (or its customer) is behind. Past TOKENS_PENDING_MAX held tokens the engine waits.

    A token the engine was told was taken is sent even after a cancel: the receipt counts it, and an honest
    receipt never counts more tokens than the texts it sent."""

    FRAME_OVERHEAD_BYTES = 64            # the frame's map, keys, index and list headers, generously

    def __init__(self, stream, protocol: InferProtocol, cancelled: trio.Event) -> None:
        self.stream = stream
        self.protocol = protocol
        self.cancelled = cancelled
        self.held: deque[tuple[str, dict | None]] = deque()
        self.closing = False
        self.done = trio.Event()
        self.broken: ProtocolError | None = None      # the stream failed under a write
        self._wake = trio.Event()
        self._room = trio.Event()

    def wake(self) -> None:
        """Something changed: a token was added, the gateway took frames, or it is time to finish."""
        self._wake.set()

    async def add(self, text: str, logprobs: dict | None) -> None:
        """Hold one token for sending; raise ProtocolError once the gateway cancelled (the engine stops)."""
        while len(self.held) >= limits.TOKENS_PENDING_MAX and not self.cancelled.is_set():
            self._room = trio.Event()
            await self._room.wait()
        if self.cancelled.is_set():
            raise ProtocolError("the gateway cancelled the request")
        self.held.append((text, logprobs))
        self._wake.set()

    async def drain(self) -> bool:
        """Wait until every held token was sent, or the stream broke (the final frame's write then fails too).
        False when the gateway took nothing for TOKENS_DRAIN_TIMEOUT_S: it is gone, and no receipt is made."""
        self.closing = True
        self._wake.set()
        with trio.move_on_after(limits.TOKENS_DRAIN_TIMEOUT_S):
            await self.done.wait()
        return self.done.is_set()

    async def run(self) -> None:
        try:
            while self.broken is None:
                if self.held and self.protocol.may_send_tokens:
                    await write_frame(self.stream, self.protocol, self._next_frame())
                    self._room.set()
                    continue
                if self.closing and not self.held:
                    break
                self._wake = trio.Event()
                await self._wake.wait()
        except ProtocolError as exc:            # the stream broke: the engine stops at its next token
            self.broken = exc
            self.cancelled.set()
            self._room.set()
        self.done.set()

    def _next_frame(self) -> Tokens:
        """The held tokens that fit one frame, in order. With logprobs asked, the held-back text that carries no
        entry (always the last) goes in a frame of its own."""
        with_entry = self.held[0][1] is not None
        texts: list[str] = []
        entries: list[dict] = []
        room = limits.FRAME_BYTES_MAX - self.FRAME_OVERHEAD_BYTES
        while self.held and len(texts) < limits.TOKENS_PER_FRAME_MAX and (self.held[0][1] is not None) == with_entry:
            text, entry = self.held[0]
            size = len(text.encode("utf-8")) + 5 + (len(canonical.encode(entry)) if entry is not None else 0)
            if texts and size > room:
                break
            room -= size
            self.held.popleft()
            texts.append(text)
            if entry is not None:
                entries.append(entry)
        return Tokens(self.protocol.tokens_seen, texts, entries if with_entry else None)
