"""Aggregate tokens/s and time to first token with 1, 2 and 4 concurrent requests, each on its own slot (one llama.cpp
context per slot, as a node runs them), on this machine. The 1-request row is the baseline of the ratios.

    .venv/bin/python bench/engine_concurrency.py [--max-tokens 96] [--threads-per-slot 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

import trio

from llorch.inference import catalog
from llorch.inference.engine import Engine, Sampling

MESSAGES = [{"role": "user", "content": "Tell me a long story about a lighthouse keeper."}]


async def run_concurrently(engines: list[Engine], max_tokens: int) -> tuple[float, list[float], set[str]]:
    ttfts: list[float] = []
    texts: set[str] = set()
    tokens = 0
    start = time.perf_counter()

    async def one(engine: Engine) -> None:
        nonlocal tokens
        first: list[float] = []

        async def emit(text: str) -> None:
            if not first:
                first.append(time.perf_counter() - start)

        prepared = engine.prepare({"messages": MESSAGES}, Sampling(7, 800_000, 950_000, max_tokens))
        generation = await engine.generate(prepared, emit)
        tokens += generation.tokens_out
        ttfts.append(first[0])
        texts.add(generation.text)

    async with trio.open_nursery() as nursery:
        for engine in engines:
            nursery.start_soon(one, engine)
    return tokens / (time.perf_counter() - start), ttfts, texts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--threads-per-slot", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    path = catalog.fetch(catalog.lookup(catalog.DEFAULT_MODEL_ID), log=lambda message: None)
    engines = [Engine.load(catalog.DEFAULT_MODEL_ID, path.parent, threads=args.threads_per_slot) for _ in range(4)]
    trio.run(run_concurrently, engines[:1], 8)
    rows = {}
    for concurrency in (1, 2, 4):
        runs = [trio.run(run_concurrently, engines[:concurrency], args.max_tokens) for _ in range(args.rounds)]
        rate = statistics.median(r[0] for r in runs)
        ttft = statistics.median(t for r in runs for t in r[1])
        identical = len(set().union(*(r[2] for r in runs))) == 1
        rows[concurrency] = rate
        print(f"{concurrency} concurrent: {rate:7.1f} tokens/s aggregate ({rate / rows[1]:.2f}x of 1), "
              f"TTFT median {ttft * 1000:7.1f} ms, all outputs identical: {identical}")
    print(f"({args.threads_per_slot} thread(s) per slot, {args.max_tokens} tokens per request, "
          f"median of {args.rounds} rounds)")


if __name__ == "__main__":
    main()
