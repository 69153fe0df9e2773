"""Signed capacity/geo attestations, gossiped on ``llorch/attestations/1``.

A provider signs one every interval; the gateway keeps the latest valid one per provider. Validation order
(each step raises AttestationRejected with the reason): size cap → canonical envelope → fields → signature →
sender is the signer → clock skew → expiry → seq strictly increasing (checked by the directory that keeps them).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

from multiaddr import Multiaddr

from llorch.ledger.errors import EncodingError, SignatureError
from llorch.ledger.objects import CURRENCY_PATTERN, SignedObject, check_field
from llorch.ledger.signing import peer_id_of
from llorch.node import limits
from llorch.node.errors import AttestationRejected

TOPIC = "llorch/attestations/1"
MULTIADDR_FIRST = frozenset({"ip4", "ip6", "dns", "dns4", "dns6"})
MULTIADDR_PROTOCOLS = MULTIADDR_FIRST | {"tcp", "udp", "quic-v1", "p2p", "p2p-circuit"}
COUNTRY_PATTERN = re.compile(r"[A-Z]{2}")      # with fullmatch
# Member states of the EU (ISO 3166-1 alpha-2). A claim only counts for EU-only routing once certified.
EU_COUNTRIES = frozenset(
    "AT BE BG HR CY CZ DK EE FI FR DE GR HU IE IT LV LT LU MT NL PL PT RO SK SI ES SE".split())


class RuleBroken(EncodingError):
    """A field that decodes but breaks one of the market's rules; ``reason`` names the rule's row in the drop table
    of docs/protocol.md §5 (bad_address, too_long_valid)."""

    def __init__(self, reason: str, message: str) -> None:
        self.reason = reason
        super().__init__(message)


def check_multiaddr(addr: str, own_peer_id: str) -> None:
    """An address a provider may claim: a parseable multiaddr of the allowed transports only (MULTIADDR_PROTOCOLS),
    ending, if it names a peer, in the provider's own peer id. Raises RuleBroken("bad_address", …) naming the problem. (A claimed
    address is still only a claim: the gateway never dials one it was only told about.)"""
    try:
        parsed = Multiaddr(addr)
        names = [protocol.name for protocol in parsed.protocols()]
    except Exception as exc:  # py-multiaddr raises several types for a bad string; all mean "not a multiaddr"
        raise RuleBroken("bad_address", f"addr {addr[:80]!r} is not a multiaddr: {exc}") from None
    if not names or names[0] not in MULTIADDR_FIRST or not set(names) <= MULTIADDR_PROTOCOLS:
        raise RuleBroken("bad_address", f"addr {addr[:80]!r} uses a transport this market does not dial ({'/'.join(names)}); "
                            f"allowed: {', '.join(sorted(MULTIADDR_PROTOCOLS))}")
    peers = addr.split("/p2p/")[1:]
    if peers and peers[-1].split("/")[0] != own_peer_id:
        raise RuleBroken("bad_address", f"addr {addr[:80]!r} names another peer than the signer")


@dataclass(frozen=True)
class Attestation(SignedObject):
    SIGNED_TYPE: ClassVar[str] = "attestation"
    SIGNER_FIELD: ClassVar[str] = "provider_key"
    FIELDS: ClassVar[dict[str, str]] = {
        "v": "uint", "provider_key": "key", "seq": "uint", "issued_ms": "uint", "expires_ms": "uint",
        "addrs": "list", "models": "list", "engine_build": "str", "slots_total": "uint", "slots_free": "uint",
        "queue_depth": "uint", "wait_ms": "uint", "price_in": "uint", "price_out": "uint", "currency": "str",
        "geo": "map", "sla": "map",
    }

    v: int
    provider_key: bytes
    seq: int
    issued_ms: int
    expires_ms: int
    addrs: list
    models: list
    engine_build: str
    slots_total: int
    slots_free: int
    queue_depth: int
    wait_ms: int
    price_in: int
    price_out: int
    currency: str
    geo: dict
    sla: dict

    def _validate(self) -> None:
        if not len(self.addrs) <= limits.ATTESTATION_ADDRS_MAX:      # none: reachable over its own links only
            raise EncodingError(f"attestation has more than {limits.ATTESTATION_ADDRS_MAX} addrs")
        for addr in self.addrs:
            check_field("addrs[]", "str", addr)
            check_multiaddr(addr, peer_id_of(self.provider_key))
        if not 0 < len(self.models) <= limits.ATTESTATION_MODELS_MAX:
            raise EncodingError(f"attestation needs 1..{limits.ATTESTATION_MODELS_MAX} models")
        for model in self.models:
            if not isinstance(model, dict) or set(model) != {"id", "sha256", "context_tokens"}:
                raise EncodingError("each model is a map {id, sha256, context_tokens}")
            check_field("models[].id", "str", model["id"])
            check_field("models[].sha256", "hash", model["sha256"])
            check_field("models[].context_tokens", "uint", model["context_tokens"])
        if self.slots_free > self.slots_total:
            raise EncodingError("slots_free exceeds slots_total")
        if self.expires_ms <= self.issued_ms:
            raise EncodingError("expires_ms must be after issued_ms")
        if self.expires_ms - self.issued_ms > limits.ATTESTATION_VALIDITY_MS_MAX:
            raise RuleBroken("too_long_valid", f"an attestation is valid for at most {limits.ATTESTATION_VALIDITY_MS_MAX} ms "
                                f"(3 × the longest interval), this one for {self.expires_ms - self.issued_ms} ms")
        if set(self.geo) != {"country", "region"} or not isinstance(self.geo["country"], str) \
                or not COUNTRY_PATTERN.fullmatch(self.geo["country"]):
            raise EncodingError("geo must be {country: ISO 3166-1 alpha-2, region: str}")
        check_field("geo.region", "str", self.geo["region"])
        if set(self.sla) != {"uptime_ppm", "ttft_ms"}:
            raise EncodingError("sla must be {uptime_ppm, ttft_ms}")
        check_field("sla.uptime_ppm", "uint", self.sla["uptime_ppm"])
        check_field("sla.ttft_ms", "uint", self.sla["ttft_ms"])
        if not CURRENCY_PATTERN.fullmatch(self.currency):
            raise EncodingError("currency must be an ISO 4217 code")

    def offers(self, model_id: str, sha256: bytes) -> bool:
        return any(m["id"] == model_id and m["sha256"] == sha256 for m in self.models)


def parse_attestation(data: bytes, sender_key: bytes | None, now_ms: int) -> Attestation:
    """Validate gossiped bytes into an Attestation or raise AttestationRejected with the reason.

    ``sender_key`` is the Ed25519 key of the gossip message's originator (None when unknown); it must be the
    attestation's signer, so nobody can republish someone else's capacity under their own message.
    """
    if len(data) > limits.ATTESTATION_BYTES_MAX:
        raise AttestationRejected(f"attestation is {len(data)} bytes, limit {limits.ATTESTATION_BYTES_MAX}",
                                  "oversized")
    try:
        attestation = Attestation.from_envelope(data)
    except RuleBroken as exc:
        raise AttestationRejected(f"invalid attestation: {exc}", exc.reason) from None
    except SignatureError as exc:
        raise AttestationRejected(f"invalid attestation: {exc}", "bad_signature") from None
    except EncodingError as exc:
        raise AttestationRejected(f"invalid attestation: {exc}", "malformed") from None
    if sender_key is not None and sender_key != attestation.provider_key:
        raise AttestationRejected("attestation published by a peer other than its signer", "not_signer")
    if attestation.issued_ms > now_ms + limits.ATTESTATION_CLOCK_SKEW_MS:
        raise AttestationRejected(
            f"attestation issued {attestation.issued_ms - now_ms} ms in the future: check the provider's clock",
            "from_future")
    if attestation.expires_ms <= now_ms:
        raise AttestationRejected(f"attestation expired {now_ms - attestation.expires_ms} ms ago", "expired")
    return attestation
