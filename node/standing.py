"""Where this node stands with each gateway it trusts, asked over /llorch/standing/1 (node/wire/standing.py).

``keep_standing`` (under ``supervise``) asks every trusted gateway the node is connected to, over the connection
the node keeps to it (never a new dial): every STANDING_RECHECK_S once settled, every STANDING_UNSETTLED_RECHECK_S
while waiting for the operator (pending, suspended, geo not certified, excluded), STANDING_RETRY_S after a failure.
It keeps the latest answer per gateway, with the measured clock offset, in ``Standings``; the status document
(`llorch node status`) and the dashboard's warnings read it.

Clock offset: the node notes its clock when it sends the question and when the answer arrives; the gateway's clock
(``gateway_ms``) is compared with the midpoint, which is right to within half the round trip.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import trio
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID

from llorch.node import limits
from llorch.node.errors import ProtocolError
from llorch.node.p2p import P2P
from llorch.node.stream_io import close_quietly, now_ms
from llorch.node.wire.standing import (STANDING_PROTOCOL_ID, AskStanding, OneFrame, Standing, StandingRefused,
                                       decode_answer)

log = logging.getLogger("llorch.node.standing")


class StandingUnknown(Exception):
    """The gateway could not be asked (not connected), did not answer in time, refused, or answered something that
    is not a standing of this node; the message says which. The loop keeps the previous answer and asks again
    after STANDING_RETRY_S."""


@dataclass(frozen=True)
class Observed:
    """One answer, as the node received it: ``clock_offset_ms`` is the gateway's clock minus the node's (positive:
    the node's clock is behind), accurate to ``round_trip_ms`` / 2; ``received_ms`` on the node's clock."""

    standing: Standing
    clock_offset_ms: int
    round_trip_ms: int
    received_ms: int


@dataclass
class Standings:
    """The latest answer (and the latest failure, if the last question failed) per gateway peer id."""

    latest: dict[str, Observed] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)

    def document(self, gateway: str, now_ms_: int) -> dict:
        """The status document's view of one gateway's answer (its ``standing`` and ``standing_error``)."""
        seen = self.latest.get(gateway)
        view = None if seen is None else {
            "status": seen.standing.status, "country": seen.standing.country,
            "geo_certified": seen.standing.geo_certified, "fork_detected_ms": seen.standing.fork_detected_ms,
            "fork_reason": seen.standing.fork_reason, "clock_offset_ms": seen.clock_offset_ms,
            "round_trip_ms": seen.round_trip_ms, "age_ms": now_ms_ - seen.received_ms}
        return {"standing": view, "standing_error": self.failures.get(gateway)}


async def ask_standing(p2p: P2P, gateway: ID, clock=now_ms) -> Observed:
    """Ask ``gateway`` where this node stands, over the existing connection; StandingUnknown if it cannot say."""
    if gateway not in p2p.host.get_network().connections:
        raise StandingUnknown(f"not connected to {gateway}")
    stream, finished = None, False
    try:
        with trio.fail_after(limits.STANDING_TIMEOUT_S):
            stream = await p2p.host.new_stream(gateway, [TProtocol(STANDING_PROTOCOL_ID)])
            sent_ms = clock()
            await stream.write(AskStanding(p2p.peer_id).to_bytes())
            reader = OneFrame(limits.STANDING_ANSWER_FRAME_BYTES_MAX)
            while reader.frame is None:
                data = await stream.read(limits.STANDING_ANSWER_FRAME_BYTES_MAX)
                if not data:
                    raise StandingUnknown(f"{gateway} closed the standing stream without answering (a gateway "
                                          f"from before /llorch/standing/1 does not answer it)")
                reader.receive_data(data)
            received_ms = clock()
            finished = True
        answer = decode_answer(reader.frame)
    except trio.TooSlowError:
        raise StandingUnknown(f"{gateway} did not answer a standing question within "
                              f"{limits.STANDING_TIMEOUT_S:g} s") from None
    except ProtocolError as exc:
        raise StandingUnknown(f"{gateway} answered a standing question badly: {exc}") from None
    except StandingUnknown:
        raise
    except Exception as exc:  # stream and negotiation errors come in many types
        raise StandingUnknown(f"standing question to {gateway} failed: {type(exc).__name__}: {exc}") from None
    finally:
        if stream is not None:
            await close_quietly(stream, reset=not finished)
    return observed(answer, p2p.peer_id, gateway, sent_ms, received_ms)


def observed(answer: Standing | StandingRefused, me: str, gateway: ID, sent_ms: int, received_ms: int) -> Observed:
    """Check that ``answer`` is a standing of this node (``me``), and measure the clocks: pure."""
    if isinstance(answer, StandingRefused):
        raise StandingUnknown(f"{gateway} refused the standing question ({answer.code}): {answer.message}")
    if answer.provider_id != me:
        raise StandingUnknown(f"{gateway} answered with the standing of {answer.provider_id}, not of this node")
    round_trip = max(0, received_ms - sent_ms)
    return Observed(answer, answer.gateway_ms - (sent_ms + received_ms) // 2, round_trip, received_ms)


async def keep_standing(p2p: P2P, gateways: tuple[str, ...], standings: Standings, clock=now_ms) -> None:
    """Runs until cancelled (under ``supervise``): ask each gateway in ``gateways`` (the trusted ones) that the node
    is connected to, again after STANDING_RECHECK_S, sooner while one is unsettled or failed."""
    peers = [ID.from_base58(gateway) for gateway in gateways]
    while True:
        wait_s = limits.STANDING_RECHECK_S
        for peer in peers:
            name = peer.to_base58()
            try:
                seen = standings.latest[name] = await ask_standing(p2p, peer, clock)
                standings.failures.pop(name, None)
                if not settled(seen.standing):
                    wait_s = min(wait_s, limits.STANDING_UNSETTLED_RECHECK_S)
            except StandingUnknown as exc:
                wait_s = min(wait_s, limits.STANDING_RETRY_S)
                if standings.failures.get(name) != str(exc):
                    log.info("standing: %s", exc)
                standings.failures[name] = str(exc)
        await trio.sleep(wait_s)


def settled(standing: Standing) -> bool:
    """Approved, geo certified, not excluded: no decision of the operator's left to wait for (else the node asks
    more often, to show a decision soon after it is made)."""
    return standing.status == "approved" and standing.geo_certified and not standing.excluded
