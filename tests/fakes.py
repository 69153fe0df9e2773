"""A fast fake engine for protocol and placement tests (never for end-to-end tests): the echo engine on the
default catalog entry."""

from __future__ import annotations

import trio

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


class StallingEngine(EchoEngine):
    """The echo engine that stalls for ``stall_s`` after ``tokens`` tokens, then goes on: plays a provider hit by a
    network blip or an overloaded machine (test-only)."""

    def __init__(self, entry, delay_s: float = 0.0, tokens: int = 3, stall_s: float = 1.0) -> None:
        super().__init__(entry, delay_s)
        self.tokens, self.stall_s = tokens, stall_s

    async def generate(self, prepared, emit):
        sent = 0

        async def stalling_emit(text: str, *logprobs) -> None:
            nonlocal sent
            if sent == self.tokens:
                await trio.sleep(self.stall_s)
            sent += 1
            await emit(text, *logprobs)

        return await super().generate(prepared, stalling_emit)


class OddSeedFailingEngine(EchoEngine):
    """The echo engine whose generation fails (engine_failed, before any token) for an odd seed: plays a choice of
    an n > 1 request that no provider can serve while its siblings are served (test-only)."""

    async def generate(self, prepared, emit):
        from llorch.inference.errors import EngineError
        if prepared.sampling.seed % 2:
            raise EngineError(f"this test engine fails every odd seed ({prepared.sampling.seed})")
        return await super().generate(prepared, emit)
