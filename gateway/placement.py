"""Placement as a pure function: which providers may serve a request, best first.

Eligible: a fresh attestation (not expired at ``now_ms``) offering the model with the catalog's sha256, priced in
the request's currency, and a slot. Ranked first by whether the latest attestation showed a free slot (it may be a second old: a busy
provider answers BUSY and the next candidate is tried), then by the price of the request's worst case (input and output prices), then by how long ago we last
placed on the provider (spreads load among equals), then by provider key (a stable final tie-break).
"""

from __future__ import annotations

from typing import Iterable, Mapping

from node.attestation import Attestation


def rank_providers(attestations: Iterable[Attestation], model_id: str, model_sha256: bytes, currency: str,
                   now_ms: int, last_placed_ms: Mapping[bytes, int], prompt_tokens_estimate: int,
                   max_tokens: int) -> list[Attestation]:
    eligible = [a for a in attestations
                if a.expires_ms > now_ms and a.offers(model_id, model_sha256) and a.currency == currency
                and a.slots_total > 0]

    def cost(a: Attestation) -> int:
        return prompt_tokens_estimate * a.price_in + max_tokens * a.price_out

    return sorted(eligible, key=lambda a: (a.slots_free == 0, cost(a), last_placed_ms.get(a.provider_key, 0),
                                           a.provider_key))
