"""What a customer asks the gateway for, as the domain sees it: the API's parsed body (gateway/api/openai_api.py)
becomes an ``InferenceRequest``, and nothing below the API sees the HTTP shapes. Every number is already an integer
(temperature and top_p in ppm, node/wire/sampling.py): nothing downstream sees a float."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Routing:
    """Where the customer wants the request served (OpenRouter's ``provider`` object; docs/operating.md): providers
    by public key. ``share_for_checks`` False (data_collection "deny"): the prompt is never re-run on a second
    provider by a spot-check, nor kept as evidence."""

    order: tuple[bytes, ...] = ()
    only: frozenset[bytes] | None = None
    ignore: frozenset[bytes] = frozenset()
    allow_fallbacks: bool = True
    sort: str | None = None                   # "price", "latency" or "throughput"
    share_for_checks: bool = True


@dataclass(frozen=True)
class InferenceRequest:
    """One chat (``prompt`` has "messages") or raw completion (``prompt`` has "text") request."""

    model: str
    prompt: dict                          # as the provider receives it (and as the prompt commitment hashes it)
    sampling_template: dict               # the ticket's sampling map but for the seed (node/wire/sampling.py)
    seed: int | None = None               # None: the gateway draws one
    max_price_in_per_1m: int | None = None    # the customer's price ceilings (llorch extension)
    max_price_out_per_1m: int | None = None
    routing: Routing = Routing()

    @property
    def max_tokens(self) -> int:
        return self.sampling_template["max_tokens"]

    def sampling(self, seed: int) -> dict:
        """The ticket's integer sampling map with ``seed``."""
        return {**self.sampling_template, "seed": seed}
