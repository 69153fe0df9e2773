"""What a customer asks the gateway for, as the domain sees it: the API's parsed body (gateway/api/openai_api.py)
becomes an ``InferenceRequest``, and nothing below the API sees the HTTP shapes. Every number is already an integer
(temperature and top_p in ppm, node/wire/sampling.py): nothing downstream sees a float."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class InferenceRequest:
    """One chat (``prompt`` has "messages") or raw completion (``prompt`` has "text") request."""

    model: str
    prompt: dict                          # as the provider receives it (and as the prompt commitment hashes it)
    sampling_template: dict               # the ticket's sampling map but for the seed (node/wire/sampling.py)
    seed: int | None = None               # None: the gateway draws one
    max_price_in_per_1m: int | None = None    # the customer's price ceilings (llorch extension)
    max_price_out_per_1m: int | None = None

    @property
    def max_tokens(self) -> int:
        return self.sampling_template["max_tokens"]

    def sampling(self, seed: int) -> dict:
        """The ticket's integer sampling map with ``seed``."""
        return {**self.sampling_template, "seed": seed}
