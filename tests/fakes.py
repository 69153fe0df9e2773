"""A fast fake engine for protocol and placement tests (never for end-to-end tests)."""

from __future__ import annotations

from dataclasses import dataclass

import trio

from inference.engine import Generation, Prepared, Sampling
from tests.helpers import MODEL_ID, MODEL_SHA256


@dataclass(frozen=True)
class FakeEntry:
    id: str = MODEL_ID
    sha256: str = MODEL_SHA256.hex()


class FakeEngine:
    """Echoes the last user message word by word, with ``delay_s`` between words; deterministic in the seed."""

    fingerprint = "fake-engine/1"

    def __init__(self, delay_s: float = 0.0) -> None:
        self.entry = FakeEntry()
        self.delay_s = delay_s

    def prepare(self, messages: list[dict], sampling: Sampling) -> Prepared:
        words = tuple(range(len(messages[-1]["content"].split())))
        return Prepared(words, sampling)

    async def generate(self, prepared: Prepared, emit) -> Generation:
        words = [f"w{prepared.sampling.seed}-{i} " for i in range(prepared.sampling.max_tokens)]
        sent = []
        for word in words:
            await trio.sleep(self.delay_s)
            try:
                await emit(word)
            except Exception:
                return Generation("".join(sent), len(prepared.prompt_tokens), len(sent), "cancelled")
            sent.append(word)
        return Generation("".join(sent), len(prepared.prompt_tokens), len(sent), "length")
