"""A fast fake engine for protocol and placement tests (never for end-to-end tests): the echo engine on the
default catalog entry."""

from __future__ import annotations

from llorch.inference import catalog
from llorch.inference.echo import EchoEngine


def FakeEngine(delay_s: float = 0.0) -> EchoEngine:
    return EchoEngine(catalog.lookup(catalog.DEFAULT_MODEL_ID), delay_s)


class ShortEngine(EchoEngine):
    """The echo engine that stops (finish_reason "stop") after ``tokens`` tokens, before max_tokens: test-only."""

    def __init__(self, entry, delay_s: float = 0.0, tokens: int = 4) -> None:
        super().__init__(entry, delay_s)
        self.tokens = tokens

    async def generate(self, prepared, emit):
        from dataclasses import replace
        short = replace(prepared, sampling=replace(prepared.sampling,
                                                   max_tokens=min(self.tokens, prepared.sampling.max_tokens)))
        generation = await super().generate(short, emit)
        return replace(generation, finish_reason="stop") if generation.finish_reason == "length" else generation
