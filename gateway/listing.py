"""/llorch/listing/1, the gateway side: tell a provider its listing here (node/wire/listing.py,
docs/protocol.md §5b).

A provider asks over the connection it keeps to the gateway; the answer is read from the operator's decisions
(``ProviderBook``: registered, approved, suspended, geo certified), the witness's exclusions (``WitnessBook``:
fork evidence) and the books (its unpaid balance and payout statements: gateway/books/payouts.py), with the
gateway's clock. The gateway answers only about the peer the connection's Noise handshake
authenticated: a question about any other provider id is refused (``not_yourself``) without looking it up, so a
peer learns nothing about another provider. Answering reads and never writes; questions are bounded in size, time
and number at once.
"""

from __future__ import annotations

import logging
from typing import Awaitable, Callable

import trio

from llorch.gateway import limits
from llorch.gateway.market.providers import ProviderBook
from llorch.gateway.storage import log_fault
from llorch.gateway.witness.witness import WitnessBook
from llorch.ledger.signing import public_key_of_peer_id
from llorch.node import limits as node_limits
from llorch.node.errors import ProtocolError
from llorch.node.stream_io import answer_once, now_ms
from llorch.node.wire.listing import AskListing, Listing, ListingRefused

log = logging.getLogger("llorch.gateway.listing")


def cut(text: str, chars_max: int) -> str:
    """``text`` in at most ``chars_max`` characters (an ellipsis marks a cut), never empty."""
    text = text or "(no reason recorded)"
    return text if len(text) <= chars_max else text[:chars_max - 1] + "…"


class ListingDesk:
    """Answers /llorch/listing/1. ``clock()`` is the gateway's time in ms (the answer's ``gateway_ms``)."""

    def __init__(self, providers: ProviderBook, witness_book: WitnessBook, clock=now_ms,
                 payouts: Callable[[str, str | None, int], Awaitable[dict]] | None = None) -> None:
        self.providers = providers
        self.witness_book = witness_book
        self.clock = clock
        self.payouts = payouts          # (provider id, masked account, now) → its payouts view (books/payouts.py)
        self.limiter = trio.CapacityLimiter(limits.LISTING_ANSWERS_CONCURRENT_MAX)

    async def listing_of(self, provider_id: str) -> Listing:
        """Where ``provider_id`` (a well-formed peer id) stands now."""
        record = await self.providers.get(provider_id)
        fork = await self.witness_book.exclusion(public_key_of_peer_id(provider_id))
        now = self.clock()
        account = record.registration.payout_view() if record else None
        payouts = await self.payouts(provider_id, account["iban"] if account else None, now) \
            if self.payouts is not None and record is not None else None
        return Listing(
            provider_id=provider_id, status=record.status if record else "unregistered",
            country=record.registration.geo["country"] if record else None,
            geo_certified=bool(record and record.geo_certified),
            fork_detected_ms=fork[0] if fork else None,
            fork_reason=cut(fork[1], node_limits.LISTING_FORK_REASON_CHARS_MAX) if fork else None,
            gateway_ms=now, payouts=payouts)

    async def answer(self, frame: bytes, asker: str) -> Listing | ListingRefused:
        """The answer to one question frame from the peer ``asker`` (its authenticated peer id)."""
        try:
            question = AskListing.from_bytes(frame)
        except ProtocolError as exc:
            return ListingRefused("malformed", f"not a listing question: {exc}"[:node_limits.ERROR_MESSAGE_CHARS_MAX])
        if question.provider_id != asker:
            return ListingRefused("not_yourself", f"this gateway tells a provider only its own listing: ask "
                                                   f"about {asker}, the peer id of your connection")
        try:
            return await self.listing_of(asker)
        except Exception:  # the database is closing or dropped its connection: the node asks again later
            log_fault(log, "cannot look up the listing of %s", asker)
            return ListingRefused("unavailable", "the gateway cannot read its records now; ask again later")

    async def serve_listing(self, stream) -> None:
        """The stream handler: one question in, one answer out, under timeouts; never raises."""
        asker = stream.muxed_conn.peer_id.to_base58()
        answer = await answer_once(
            stream, self.limiter, ListingRefused("busy", "too many listing questions at once; ask again in a minute"),
            node_limits.LISTING_REQUEST_FRAME_BYTES_MAX, limits.LISTING_READ_TIMEOUT_S, limits.LISTING_WRITE_TIMEOUT_S,
            lambda frame: self.answer(frame, asker), "listing")
        if isinstance(answer, ListingRefused):
            log.info("listing question from %s refused (%s): %s", asker, answer.code, answer.message)
