"""The echo engine: a fast, deterministic stand-in for llama.cpp, for protocol tests and gateway benchmarks only.

It "generates" words derived from the seed, one per token, optionally with a delay. Its fingerprint (``echo/1``)
is never a real determinism class, so a gateway with a pinned class never places determinism-required tenants on
it, and its receipts are recognisable. A node runs it only when its config says ``engine = "echo"``.
"""

from __future__ import annotations

import hashlib

from dataclasses import dataclass

import trio

from llorch.inference.catalog import CatalogEntry
from llorch.inference.engine import Generation, Prepared, Sampling, check_serves_chat, determinism_class


class EchoEngine:
    fingerprint = "echo/1"

    def __init__(self, entry: CatalogEntry, delay_s: float = 0.0) -> None:
        self.entry = entry
        self.delay_s = delay_s
        self.context_tokens = entry.context_tokens
        self.determinism_class = determinism_class(entry.sha256, self.fingerprint)

    def prepare(self, prompt: dict, sampling: Sampling) -> Prepared:
        if "text" not in prompt:
            check_serves_chat(self.entry)
        text = prompt["text"] if "text" in prompt else " ".join(m["content"] for m in prompt["messages"])
        return Prepared(tuple(range(max(1, len(text.split())))), sampling)

    @staticmethod
    def _shape(prepared: Prepared) -> str:
        """What structured output changes in the echo: a word per schema, so two honest echo providers agree on a
        schema'd request and one that ignores the schema (tests/cheaters.py) does not."""
        schema = prepared.sampling.json_schema
        return "" if schema is None else "-j" + hashlib.sha256(schema.encode()).hexdigest()[:8]

    @staticmethod
    def logprobs_entry(word: str, top: int | None) -> dict | None:
        """With logprobs asked (``top`` not None): an entry derived from the word, so honest echo providers agree."""
        if top is None:
            return None
        logprob = -(int.from_bytes(hashlib.sha256(word.encode()).digest()[:2], "big") * 1000)
        return {"token": word.encode(), "logprob": logprob,
                "top": [[f"alt{rank}".encode(), -rank * 1000] for rank in range(top)]}

    async def generate(self, prepared: Prepared, emit) -> Generation:
        sent: list[str] = []
        entries: list[dict] = []
        for index in range(prepared.sampling.max_tokens):
            await trio.sleep(self.delay_s)
            word = f"w{prepared.sampling.seed}-{index}{self._shape(prepared)} "
            entry = self.logprobs_entry(word, prepared.sampling.logprobs)
            try:
                await (emit(word) if entry is None else emit(word, entry))
            except Exception:
                return Generation("".join(sent), len(prepared.prompt_tokens), len(sent), "cancelled",
                                  tuple(entries))
            sent.append(word)
            entries += [entry] if entry is not None else []
        return Generation("".join(sent), len(prepared.prompt_tokens), len(sent), "length", tuple(entries))
