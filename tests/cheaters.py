"""Cheating engines, test-only: each claims the pinned model and the echo engine's determinism class (its
fingerprint is ``echo/1`` like the honest echo engine's, so its attestations and receipts name the same class) but
does not serve what it signs. The honest echo engine is deterministic, so two honest echo providers always agree:
only a cheater makes a spot-check disagree. For tests/test_spot_checks.py; never used outside tests."""

from __future__ import annotations

import random
from dataclasses import replace

from llorch.inference.echo import EchoEngine
from llorch.inference.engine import Generation
from llorch.node.service import ProviderService


class OtherModelEngine(EchoEngine):
    """Serves another (cheaper) model's output under the pinned model's name: other words, same length."""

    async def generate(self, prepared, emit) -> Generation:
        sent = []
        for index in range(prepared.sampling.max_tokens):
            word = f"small{prepared.sampling.seed}-{index} "
            await emit(word)
            sent.append(word)
        return Generation("".join(sent), len(prepared.prompt_tokens), len(sent), "length")


class SchemaIgnoringEngine(EchoEngine):
    """Ignores the customer's response_format: generates as for plain text (a provider that skips the grammar's
    cost, or whose engine cannot build it) while signing the ticket's sampling map."""

    async def generate(self, prepared, emit) -> Generation:
        return await super().generate(replace(prepared, sampling=replace(prepared.sampling, json_schema=None)), emit)


class TruncatingEngine(EchoEngine):
    """Stops after half the tokens asked for and says the answer ended there ("stop"): paid less, but spends less."""

    async def generate(self, prepared, emit) -> Generation:
        half = max(1, prepared.sampling.max_tokens // 2)
        generation = await super().generate(replace(prepared, sampling=replace(prepared.sampling, max_tokens=half)),
                                            emit)
        return replace(generation, finish_reason="stop")


class ResamplingEngine(EchoEngine):
    """Changes the sampling: ignores the ticket's seed (as a cached or greedy answer would)."""

    async def generate(self, prepared, emit) -> Generation:
        return await super().generate(replace(prepared, sampling=replace(prepared.sampling, seed=0)), emit)


class SometimesEngine(EchoEngine):
    """Cheats on a fraction of requests (``CHEAT_PPM``, drawn from a fixed seed so a test run repeats), honest on the
    rest: the hardest cheater for sampling to catch."""

    CHEAT_PPM = 100_000
    cheated = 0
    served = 0

    def __init__(self, entry, delay_s: float = 0.0) -> None:
        super().__init__(entry, delay_s)
        self._rng = random.Random(14)

    async def generate(self, prepared, emit) -> Generation:
        type(self).served += 1
        if self._rng.randrange(1_000_000) < self.CHEAT_PPM:
            type(self).cheated += 1
            return await OtherModelEngine.generate(self, prepared, emit)
        return await super().generate(prepared, emit)


class ProbeAwareProvider(ProviderService):
    """A provider that has somehow learnt which tenant pseudonym the gateway's probes carry (``probe_tenant``, set by
    the test) and records every request it gets (``seen``: (ticket, request frame bytes)). Its engine must be a
    ``ProbeDodgingEngine``: honest on the probe pseudonym's requests, another model's output on everyone else's."""

    probe_tenant: str = ""

    async def _generate(self, stream, protocol, request, ticket, engine, reader):
        type(self).seen.append((ticket, request))
        engine.honest = ticket.tenant == self.probe_tenant
        return await super()._generate(stream, protocol, request, ticket, engine, reader)


ProbeAwareProvider.seen = []


class ProbeDodgingEngine(EchoEngine):
    """Honest when its provider says the request is a probe, cheats (another model) otherwise."""

    honest = True

    async def generate(self, prepared, emit) -> Generation:
        if self.honest:
            return await super().generate(prepared, emit)
        return await OtherModelEngine.generate(self, prepared, emit)


class HeldBackEngine(EchoEngine):
    """Honest, test-only: ends every answer the way llama.cpp does when the last token starts a stop sequence at
    max_tokens (inference/engine.py): that token's frame is empty (its text held back until it is decided), and
    the held-back text follows in one more frame, so an answer of max_tokens tokens takes max_tokens + 1 frames
    (docs/protocol.md §6). Deterministic like the echo engine: two of them always agree."""

    async def generate(self, prepared, emit) -> Generation:
        sent = []
        for index in range(prepared.sampling.max_tokens):
            word = f"w{prepared.sampling.seed}-{index} "
            last = index == prepared.sampling.max_tokens - 1
            await emit("" if last else word)
            sent.append(word)
        await emit(sent[-1])                    # the held-back text, flushed: no new token
        return Generation("".join(sent), len(prepared.prompt_tokens), len(sent), "length")


class LazyEngine(EchoEngine):
    """Answers every request in at most 5 tokens and signs "stop" (the cheapest answer that still looks like one):
    paid for a few tokens, spends almost nothing. Always cheats, so no check of it is ever clean."""

    TOKENS_MAX = 5

    async def generate(self, prepared, emit) -> Generation:
        short = replace(prepared, sampling=replace(prepared.sampling,
                                                   max_tokens=min(self.TOKENS_MAX, prepared.sampling.max_tokens)))
        generation = await super().generate(short, emit)
        return replace(generation, finish_reason="stop")


class LogprobFakingEngine(EchoEngine):
    """Streams the honest text but makes up its logprobs (every token certain: 0), and signs what it streamed: the
    cheap answer to "how sure was the model?" that only a re-run can tell from the real one."""

    @staticmethod
    def logprobs_entry(word: str, top: int | None) -> dict | None:
        return None if top is None else {"token": word.encode(), "logprob": 0,
                                         "top": [[word.encode(), 0]] * top}


class LogprobOmittingEngine(EchoEngine):
    """Ignores the ticket's logprobs: streams plain token frames (what an engine without logprobs support does)."""

    async def generate(self, prepared, emit) -> Generation:
        return await super().generate(replace(prepared, sampling=replace(prepared.sampling, logprobs=None)), emit)


class LogprobRewritingEngine(EchoEngine):
    """Streams honest logprobs, but its receipt commits to others: the receipt does not match the stream."""

    async def generate(self, prepared, emit) -> Generation:
        generation = await super().generate(prepared, emit)
        return replace(generation, logprobs=tuple({**entry, "logprob": 0} for entry in generation.logprobs))


class HeldBackLogprobEngine(EchoEngine):
    """Honest, test-only: with logprobs, ends like llama.cpp when the last token starts a stop sequence: that
    token's frame has its entry and no text, the held-back text follows in one more frame without an entry, and the
    receipt is written a moment later (``FINAL_AFTER_S``), so a customer can hang up between the two."""

    FINAL_AFTER_S = 0.3

    async def generate(self, prepared, emit) -> Generation:
        import trio

        sent, entries = [], []
        for index in range(prepared.sampling.max_tokens):
            word = f"w{prepared.sampling.seed}-{index} "
            entry = self.logprobs_entry(word, prepared.sampling.logprobs)
            last = index == prepared.sampling.max_tokens - 1
            await emit("" if last else word, entry)
            sent.append(word)
            entries.append(entry)
        await emit(sent[-1])                    # the held-back text: no new token, no entry
        await trio.sleep(self.FINAL_AFTER_S)
        return Generation("".join(sent), len(prepared.prompt_tokens), len(sent), "length", tuple(entries))
