"""Tokens per second with a JSON-schema grammar against without, same model, prompt, seed and engine, interleaved
round by round in one run (one engine, `--threads` threads: the cores are not shared with anything else), the time
to the first token of a grammar-constrained answer, and the time to the first tool call (a tool_choice "required"
request, from the prompt to its first streamed delta and to the complete call, rendered and constrained as the gateway does: node/wire/tools.py). The grammar run is asked for an array of short records, so
it generates about as many tokens as the plain run. PASS when the grammar run keeps at least --floor of the plain
rate (llama-cpp-python applies the grammar to the candidates in Python-visible sampler calls: it costs).

    .venv/bin/python bench/structured_output.py [--rounds 5] [--max-tokens 96] [--threads 2] [--floor 0.3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from llorch.inference import catalog  # noqa: E402
from llorch.inference.engine import Engine, Sampling  # noqa: E402
from llorch.node.wire.sampling import chat_request_prompt, chat_request_sampling  # noqa: E402
from llorch.node.wire.structured import schema_text  # noqa: E402
from llorch.node.wire.tools import AnswerStream, reply_of  # noqa: E402

PROMPT = {"messages": [{"role": "user", "content": "List some cities with a short note on each."}]}
SCHEMA = {"type": "array", "minItems": 4, "maxItems": 8, "items": {"type": "object", "additionalProperties": False, "required": ["city", "note"],
                                     "properties": {"city": {"type": "string", "maxLength": 20},
                                                    "note": {"type": "string", "maxLength": 60}}}}


def run(engine: Engine, seed: int, max_tokens: int, schema: str | None) -> tuple[float, float, int]:
    """(tokens per second, seconds to the first token, tokens)."""
    first: list[float] = []

    async def emit(text: str) -> None:
        if not first:
            first.append(time.perf_counter())

    prepared = engine.prepare(PROMPT, Sampling(seed, 800_000, 950_000, max_tokens, (), schema))
    start = time.perf_counter()
    generation = trio.run(engine.generate, prepared, emit)
    took = time.perf_counter() - start
    return generation.tokens_out / took, (first[0] if first else time.perf_counter()) - start, generation.tokens_out


TOOL_REQUEST = {"messages": [{"role": "user", "content": "What is the weather in Paris?"}], "tool_choice": "required",
                "tools": [{"type": "function", "function": {
                    "name": "get_weather", "description": "The current weather in a city",
                    "parameters": {"type": "object", "additionalProperties": False, "required": ["city"],
                                   "properties": {"city": {"type": "string", "maxLength": 30}}}}}]}


def first_tool_call(engine: Engine, seed: int) -> tuple[float, float]:
    """Seconds from the request to its first tool call's first streamed delta (its name: node/wire/tools.py
    AnswerStream, as the gateway streams it), and to the complete call."""
    stream, named = AnswerStream(), []

    async def watch(text: str) -> None:
        if not named and any(event[0] == "call" for event in stream.feed(text)):
            named.append(time.perf_counter())

    start = time.perf_counter()
    prepared = engine.prepare(chat_request_prompt(TOOL_REQUEST),
                              Sampling.of(chat_request_sampling({**TOOL_REQUEST, "max_tokens": 64}, seed)))
    generation = trio.run(engine.generate, prepared, watch)
    took = time.perf_counter() - start
    _, calls = reply_of(generation.text)
    assert calls and named, generation.text
    return named[0] - start, took


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--floor", type=float, default=0.3)
    args = parser.parse_args()
    entry = catalog.lookup(catalog.DEFAULT_MODEL_ID)
    engine = Engine(entry, catalog.fetch(entry, log=lambda m: None), args.threads, 2048, 512)
    rates: dict[str, list[float]] = {"plain": [], "schema": []}
    ttft: list[float] = []
    tokens: dict[str, list[int]] = {"plain": [], "schema": []}
    for round_number in range(args.rounds):
        for name, schema in (("plain", None), ("schema", schema_text(SCHEMA))):
            rate, first, count = run(engine, 100 + round_number, args.max_tokens, schema)
            rates[name].append(rate)
            tokens[name].append(count)
            if schema:
                ttft.append(first)
    calls = [first_tool_call(engine, 200 + n) for n in range(args.rounds)]
    tool_named, tool_call = statistics.median(c[0] for c in calls), statistics.median(c[1] for c in calls)
    plain, constrained = statistics.median(rates["plain"]), statistics.median(rates["schema"])
    ratio = constrained / plain
    print(f"{entry.id}, one engine of {args.threads} thread(s) (nothing else on the cores), median of {args.rounds} "
          f"interleaved rounds, up to {args.max_tokens} tokens; schema: {json.dumps(SCHEMA)[:60]}...")
    print(f"plain {plain:.1f} tok/s ({statistics.median(tokens['plain'])} tokens), json_schema {constrained:.1f} tok/s "
          f"({statistics.median(tokens['schema'])} tokens); first token with the schema after "
          f"{statistics.median(ttft) * 1000:.0f} ms; first tool call streamed (its name) after "
          f"{tool_named * 1000:.0f} ms, complete after {tool_call * 1000:.0f} ms")
    verdict = "PASS" if ratio >= args.floor else "FAIL"
    print(f"{verdict}  json_schema at {ratio:.2f} of the plain rate (floor {args.floor})")
    return 0 if verdict == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
