"""Where this node stands with each gateway it trusts, asked over /llorch/listing/1 (node/wire/listing.py).

``keep_listing`` (under ``supervise``) asks every trusted gateway the node is connected to, over the connection
the node keeps to it (never a new dial): every LISTING_RECHECK_S once settled, every LISTING_UNSETTLED_RECHECK_S
while waiting for the operator (pending, suspended, geo not certified, excluded), LISTING_RETRY_S after a failure.
It keeps the latest answer per gateway, with the measured clock offset, in ``Listings``; the status document
(`llorch node status`) and the dashboard's warnings read it.

Clock offset: the node notes its clock when it sends the question and when the answer arrives; the gateway's clock
(``gateway_ms``) is compared with the midpoint, which is right to within half the round trip.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import trio
from libp2p.peer.id import ID

from llorch.node import limits
from llorch.node.errors import ProtocolError
from llorch.node.p2p import P2P
from llorch.node.stream_io import Unanswered, ask_once, now_ms
from llorch.node.wire.listing import (LISTING_PROTOCOL_ID, AskListing, Listing, ListingRefused,
                                       decode_answer)

log = logging.getLogger("llorch.node.listing")


class ListingUnknown(Exception):
    """The gateway could not be asked (not connected), did not answer in time, refused, or answered something that
    is not a listing of this node; the message says which. The loop keeps the previous answer and asks again
    after LISTING_RETRY_S."""


@dataclass(frozen=True)
class Observed:
    """One answer, as the node received it: ``clock_offset_ms`` is the gateway's clock minus the node's (positive:
    the node's clock is behind), accurate to ``round_trip_ms`` / 2; ``received_ms`` on the node's clock."""

    listing: Listing
    clock_offset_ms: int
    round_trip_ms: int
    received_ms: int


@dataclass
class Listings:
    """The latest answer (and the latest failure, if the last question failed) per gateway peer id."""

    latest: dict[str, Observed] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)

    def document(self, gateway: str, now_ms_: int) -> dict:
        """The status document's view of one gateway's answer (its ``listing`` and ``listing_error``)."""
        seen = self.latest.get(gateway)
        view = None if seen is None else {
            "status": seen.listing.status, "country": seen.listing.country,
            "geo_certified": seen.listing.geo_certified, "fork_detected_ms": seen.listing.fork_detected_ms,
            "fork_reason": seen.listing.fork_reason, "clock_offset_ms": seen.clock_offset_ms,
            "round_trip_ms": seen.round_trip_ms, "age_ms": now_ms_ - seen.received_ms,
            "payouts": seen.listing.payouts}
        return {"listing": view, "listing_error": self.failures.get(gateway)}


async def ask_listing(p2p: P2P, gateway: ID, clock=now_ms) -> Observed:
    """Ask ``gateway`` for this node's listing, over the existing connection; ListingUnknown if it cannot say."""
    try:
        frame, sent_ms, received_ms = await ask_once(
            p2p.host, gateway, LISTING_PROTOCOL_ID, AskListing(p2p.peer_id).to_bytes(),
            limits.LISTING_ANSWER_FRAME_BYTES_MAX, limits.LISTING_TIMEOUT_S, "listing", clock)
        answer = decode_answer(frame)
    except Unanswered as exc:
        raise ListingUnknown(str(exc)) from None
    except ProtocolError as exc:
        raise ListingUnknown(f"{gateway} answered a listing question badly: {exc}") from None
    return observed(answer, p2p.peer_id, gateway, sent_ms, received_ms)


def observed(answer: Listing | ListingRefused, me: str, gateway: ID, sent_ms: int, received_ms: int) -> Observed:
    """Check that ``answer`` is a listing of this node (``me``), and measure the clocks: pure."""
    if isinstance(answer, ListingRefused):
        raise ListingUnknown(f"{gateway} refused the listing question ({answer.code}): {answer.message}")
    if answer.provider_id != me:
        raise ListingUnknown(f"{gateway} answered with the listing of {answer.provider_id}, not of this node")
    round_trip = max(0, received_ms - sent_ms)
    return Observed(answer, answer.gateway_ms - (sent_ms + received_ms) // 2, round_trip, received_ms)


async def keep_listing(p2p: P2P, gateways: tuple[str, ...], listings: Listings, clock=now_ms) -> None:
    """Runs until cancelled (under ``supervise``): ask each gateway in ``gateways`` (the trusted ones) that the node
    is connected to, again after LISTING_RECHECK_S, sooner while one is unsettled or failed."""
    peers = [ID.from_base58(gateway) for gateway in gateways]
    while True:
        wait_s = limits.LISTING_RECHECK_S
        for peer in peers:
            name = peer.to_base58()
            try:
                seen = await ask_listing(p2p, peer, clock)
                change = listing_change(listings.latest.get(name), seen.listing)
                if change:
                    log.info("gateway %s: %s", name, change)
                listings.latest[name] = seen
                listings.failures.pop(name, None)
                if not settled(seen.listing):
                    wait_s = min(wait_s, limits.LISTING_UNSETTLED_RECHECK_S)
            except ListingUnknown as exc:
                wait_s = min(wait_s, limits.LISTING_RETRY_S)
                if listings.failures.get(name) != str(exc):
                    log.info("listing: %s", exc)
                listings.failures[name] = str(exc)
        await trio.sleep(wait_s)


def listing_change(before: Observed | None, now: Listing) -> str | None:
    """One line for the log when a gateway's decision about this node changed (approved, suspended, geo certified,
    excluded or readmitted), or on the first answer; None when nothing changed."""
    old = None if before is None else before.listing
    if old is not None and (old.status, old.geo_certified, old.fork_detected_ms) == \
            (now.status, now.geo_certified, now.fork_detected_ms):
        return None
    if now.fork_detected_ms is not None:
        return f"EXCLUDED for fork evidence ({now.fork_reason}): no work until the operator readmits this node"
    geo = "" if now.country is None else \
        f"; geo claim {now.country} {'certified' if now.geo_certified else 'not certified (EU-only customers wait)'}"
    return {"unregistered": "not registered there: run `llorch node register --gateway <its URL>`",
            "pending": "registered, waiting for the operator's approval (no work until then)",
            "approved": "approved: placed on" + (" again" if old is not None and old.fork_detected_ms else ""),
            "suspended": "SUSPENDED by the operator: no work until they readmit this node",
            }.get(now.status, now.status) + geo


def settled(listing: Listing) -> bool:
    """Approved, geo certified, not excluded: no decision of the operator's left to wait for (else the node asks
    more often, to show a decision soon after it is made)."""
    return listing.status == "approved" and listing.geo_certified and not listing.excluded
