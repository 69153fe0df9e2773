"""Signed capacity/geo attestations, gossiped on ``llorch/attestations/1``.

A provider signs one every interval; the gateway keeps the latest valid one per provider. Validation order
(each step raises AttestationRejected with the reason): size cap → canonical envelope → fields → signature →
sender is the signer → clock skew → expiry → seq strictly increasing (checked by the directory that keeps them).
"""

from __future__ import annotations

import functools
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
    """An address a provider may claim (docs/protocol.md §5), or RuleBroken("bad_address", …) naming the problem:

    - direct: a parseable multiaddr of the allowed transports only (MULTIADDR_PROTOCOLS, no ``p2p-circuit``), with
      at most one ``/p2p/``, which names the provider and ends the address;
    - relayed: exactly ``/<ip4|ip6|dns|dns4|dns6>/<host>/tcp/<port>/p2p/<relay>/p2p-circuit/p2p/<provider>``: one
      circuit, through a relay that is not the provider. Whether the relay is one the reader trusts is checked by
      ``parse_attestation`` (``relay_of`` names it).

    A claimed address is still only a claim: it is dialled only as announced, never replaced by what the peerstore
    learnt elsewhere."""
    items = _items(addr)
    names = [name for name, _ in items]
    if not names or names[0] not in MULTIADDR_FIRST or not set(names) <= MULTIADDR_PROTOCOLS:
        raise RuleBroken("bad_address", f"addr {addr[:80]!r} uses a transport this market does not dial "
                                        f"({'/'.join(names)}); allowed: {', '.join(sorted(MULTIADDR_PROTOCOLS))}")
    if "p2p-circuit" in names:
        _check_circuit(addr, items, own_peer_id)
        return
    peers = [value for name, value in items if name == "p2p"]
    if len(peers) > 1 or (peers and names[-1] != "p2p"):
        raise RuleBroken("bad_address", f"addr {addr[:80]!r}: a direct address has at most one /p2p/, at its end")
    if peers and peers[0] != own_peer_id:
        raise RuleBroken("bad_address", f"addr {addr[:80]!r} names another peer than the signer")


CIRCUIT_SHAPE = ["tcp", "p2p", "p2p-circuit", "p2p"]      # after the first (ip4, ip6, dns, dns4, dns6) component


def _check_circuit(addr: str, items: tuple[tuple[str, str | None], ...], own_peer_id: str) -> None:
    names = [name for name, _ in items]
    if names.count("p2p-circuit") != 1:
        raise RuleBroken("bad_address", f"addr {addr[:80]!r}: a relayed address has one circuit, not nested ones")
    circuit = names.index("p2p-circuit")
    if circuit == 0 or names[circuit - 1] != "p2p":
        raise RuleBroken("bad_address", f"addr {addr[:80]!r}: /p2p-circuit must follow the relay's peer id "
                                        f"(/p2p/<relay>/p2p-circuit/p2p/<provider>)")
    if names[circuit + 1:] != ["p2p"]:
        raise RuleBroken("bad_address", f"addr {addr[:80]!r}: a relayed address must end in /p2p/<provider> right "
                                        f"after /p2p-circuit")
    if names[1:] != CIRCUIT_SHAPE:
        raise RuleBroken("bad_address", f"addr {addr[:80]!r}: a relay is reached over tcp: "
                                        f"/<ip4|ip6|dns|dns4|dns6>/<host>/tcp/<port>/p2p/<relay>/p2p-circuit/p2p/<provider>")
    relay, provider = items[2][1], items[4][1]
    if provider != own_peer_id:
        raise RuleBroken("bad_address", f"addr {addr[:80]!r} names another peer than the signer")
    if relay == own_peer_id:
        raise RuleBroken("bad_address", f"addr {addr[:80]!r}: a provider cannot be relayed through itself")


@functools.lru_cache(maxsize=limits.ADDRS_PARSED_KEPT)
def _items(addr: str) -> tuple[tuple[str, str | None], ...]:
    """The (protocol, value) parts of a multiaddr. Kept for the addresses seen last: a provider announces the same
    ones every few seconds (a string that fails is parsed again each time: errors are not kept)."""
    try:
        return tuple((protocol.name, value) for protocol, value in Multiaddr(addr).items())
    except Exception as exc:  # py-multiaddr raises several types for a bad string; all mean "not a multiaddr"
        raise RuleBroken("bad_address", f"addr {addr[:80]!r} is not a multiaddr: {exc}") from None


def relay_of(addr: str) -> str | None:
    """The relay's peer id of a relayed address that passed ``check_multiaddr``; None for a direct address."""
    if "/p2p-circuit" not in addr:
        return None
    return addr.split("/p2p/")[1].split("/")[0]


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


def parse_attestation(data: bytes, sender_key: bytes | None, now_ms: int,
                      relays: frozenset[str] = frozenset()) -> Attestation:
    """Validate gossiped bytes into an Attestation or raise AttestationRejected with the reason.

    ``sender_key`` is the Ed25519 key of the gossip message's originator (None when unknown); it must be the
    attestation's signer, so nobody can republish someone else's capacity under their own message. ``relays`` are
    the peer ids of the relays the reader trusts (a gateway: itself and its configured relay peers); a relayed
    address through any other peer is refused (reason ``untrusted_relay``), so nobody makes a gateway or an auditor
    dial a stranger and ask it for circuits.
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
    for addr in attestation.addrs:
        relay = relay_of(addr)
        if relay is not None and relay not in relays:
            raise AttestationRejected(f"addr {addr[:120]!r} goes through relay {relay}, which this gateway does not "
                                      f"trust (it trusts {', '.join(sorted(relays)) or 'no relay'})", "untrusted_relay")
    return attestation
