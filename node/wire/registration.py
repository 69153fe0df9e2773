"""A provider's signed registration with a gateway (the seed's `POST /v2/platform/providers/register`).

The payload is signed with the provider's own key (the one its peer id names), so nobody can register someone
else's peer id: the gateway verifies the signature with the key inside ``provider_id``. On the wire it travels as
JSON ``{"registration": "<base64 of the envelope>"}``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

from llorch.ledger.errors import EncodingError
from llorch.ledger.objects import CURRENCY_PATTERN, SignedObject, check_field
from llorch.ledger.signing import peer_id_of

COUNTRY = re.compile(r"[A-Z]{2}")      # with fullmatch
PRICE_PER_1M_MAX = 10**12
SLOTS_MAX = 1024
GPUS_MAX = 1024
VRAM_GB_MAX = 100_000


def _bounded(name: str, value, high: int) -> None:
    check_field(name, "uint", value)
    if value > high:
        raise EncodingError(f"{name} is {value}; at most {high} is accepted")


@dataclass(frozen=True)
class Registration(SignedObject):
    SIGNED_TYPE: ClassVar[str] = "registration"
    SIGNER_FIELD: ClassVar[str] = "provider_key"
    FIELDS: ClassVar[dict[str, str]] = {
        "v": "uint", "provider_key": "key", "provider_id": "str", "endpoint": "str", "pricing": "map",
        "capacity": "map", "sla": "map", "geo": "map", "issued_ms": "uint",
    }
    OPTIONAL_FIELDS: ClassVar[dict[str, str]] = {"payout": "map"}

    v: int
    provider_key: bytes
    provider_id: str
    endpoint: str
    pricing: dict
    capacity: dict
    sla: dict
    geo: dict
    issued_ms: int
    payout: dict | None = None     # where payout runs pay this provider: {holder, iban, bic (or nil), currency}

    def _validate(self) -> None:
        if self.provider_id != peer_id_of(self.provider_key):
            raise EncodingError("provider_id is not the peer id of the signing key: a provider can only register "
                                "itself")
        if not self.endpoint.startswith("/") or len(self.endpoint) > 200:
            raise EncodingError("endpoint must be a libp2p multiaddr (e.g. /ip4/1.2.3.4/tcp/4101)")
        if set(self.pricing) != {"currency", "input_per_1m", "output_per_1m"}:
            raise EncodingError("pricing must be {currency, input_per_1m, output_per_1m}")
        if not isinstance(self.pricing["currency"], str) or not CURRENCY_PATTERN.fullmatch(self.pricing["currency"]):
            raise EncodingError("pricing.currency must be an ISO 4217 code")
        _bounded("pricing.input_per_1m", self.pricing["input_per_1m"], PRICE_PER_1M_MAX)
        _bounded("pricing.output_per_1m", self.pricing["output_per_1m"], PRICE_PER_1M_MAX)
        if set(self.capacity) != {"slots", "gpus", "vram_gb"}:
            raise EncodingError("capacity must be {slots, gpus, vram_gb}")
        _bounded("capacity.slots", self.capacity["slots"], SLOTS_MAX)
        _bounded("capacity.gpus", self.capacity["gpus"], GPUS_MAX)
        _bounded("capacity.vram_gb", self.capacity["vram_gb"], VRAM_GB_MAX)
        if self.capacity["slots"] < 1:
            raise EncodingError("capacity.slots must be at least 1")
        if set(self.sla) != {"uptime_ppm", "ttft_ms"}:
            raise EncodingError("sla must be {uptime_ppm, ttft_ms}")
        _bounded("sla.uptime_ppm", self.sla["uptime_ppm"], 1_000_000)
        _bounded("sla.ttft_ms", self.sla["ttft_ms"], 3_600_000)
        if set(self.geo) != {"country", "region"} or not isinstance(self.geo["country"], str) \
                or not COUNTRY.fullmatch(self.geo["country"]):
            raise EncodingError("geo must be {country: ISO 3166-1 alpha-2, region}")
        check_field("geo.region", "str", self.geo["region"])
        if self.payout is not None:
            if set(self.payout) != {"holder", "iban", "bic", "currency"}:
                raise EncodingError("payout must be {holder, iban, bic, currency}")
            for name in ("holder", "iban", "currency"):
                check_field(f"payout.{name}", "str", self.payout[name])
            if self.payout["bic"] is not None:
                check_field("payout.bic", "str", self.payout["bic"])
            if not CURRENCY_PATTERN.fullmatch(self.payout["currency"]):
                raise EncodingError("payout.currency must be an ISO 4217 code")

    def public_view(self) -> dict:
        """The registration as the seed's JSON shape."""
        return {"provider_id": self.provider_id, "endpoint": self.endpoint, "pricing": self.pricing,
                "capacity": self.capacity, "sla": self.sla, "geo": self.geo, "issued_ms": self.issued_ms}

    def payout_view(self) -> dict | None:
        """The payout account as shown everywhere but a run's file: the IBAN masked to its country, check digits
        and last four characters."""
        if self.payout is None:
            return None
        return {"holder": self.payout["holder"], "iban": mask_iban(self.payout["iban"]), "bic": self.payout["bic"],
                "currency": self.payout["currency"]}


def mask_iban(iban: str) -> str:
    """An IBAN as logs, pages and commands show it: country, check digits and the last 4 characters
    ("DE89 •••• •••• •••• •••• 3000"); only a payout run's file holds it whole."""
    iban = iban.replace(" ", "")
    return " ".join([iban[:4], *["••••"] * -(-(len(iban) - 8) // 4), iban[-4:]])
