"""The engine wrapper (canonical evaluation, worker thread, streaming into trio) against raw llama-cpp-python
(`Llama.create_completion` on the same formatted prompt and the same llama.cpp context), same model, prompt, seed
and sampler settings, interleaved round by round in one run.

    .venv/bin/python bench/engine_overhead.py [--rounds 5] [--max-tokens 128] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import trio

from llorch.inference import catalog
from llorch.inference.engine import MIN_P, REPEAT_PENALTY, TOP_K, Engine, Sampling

MESSAGES = [{"role": "user", "content": "Tell me a long story about a lighthouse keeper."}]
SEED, TEMPERATURE_PPM, TOP_P_PPM = 7, 800_000, 950_000


def wrapper_rate(engine: Engine, max_tokens: int) -> tuple[float, int]:
    async def ignore(text: str) -> None:
        return None

    prepared = engine.prepare({"messages": MESSAGES}, Sampling(SEED, TEMPERATURE_PPM, TOP_P_PPM, max_tokens))
    start = time.perf_counter()
    generation = trio.run(engine.generate, prepared, ignore)
    return generation.tokens_out / (time.perf_counter() - start), generation.tokens_out


def raw_rate(llm, prompt: str, max_tokens: int) -> tuple[float, int]:
    # Run from trio's worker thread, like the wrapper: ggml's OpenMP team belongs to the calling OS thread, and a
    # second team spinning idle on 2 cores would halve whichever path ran from the other thread.
    return trio.run(trio.to_thread.run_sync, raw_rate_blocking, llm, prompt, max_tokens)


def raw_rate_blocking(llm, prompt: str, max_tokens: int) -> tuple[float, int]:
    llm.reset()
    start = time.perf_counter()
    result = llm.create_completion(prompt, max_tokens=max_tokens, temperature=TEMPERATURE_PPM / 1e6,
                                   top_p=TOP_P_PPM / 1e6, top_k=TOP_K, min_p=MIN_P, repeat_penalty=REPEAT_PENALTY,
                                   seed=SEED)
    tokens = result["usage"]["completion_tokens"]
    return tokens / (time.perf_counter() - start), tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    from llama_cpp.llama_chat_format import format_chatml

    path = catalog.fetch(catalog.lookup(catalog.DEFAULT_MODEL_ID), log=lambda message: None)
    engine = Engine.load(catalog.DEFAULT_MODEL_ID, path.parent, threads=args.threads)
    llm = engine._llm   # the same llama.cpp context and thread pool: only the wrapper differs between the two
    prompt = format_chatml(messages=MESSAGES).prompt
    wrapper_rate(engine, 8)
    raw_rate(llm, prompt, 8)
    wrapped, raw = [], []
    for _ in range(args.rounds):
        wrapped.append(wrapper_rate(engine, args.max_tokens))
        raw.append(raw_rate(llm, prompt, args.max_tokens))
    w, r = statistics.median(x[0] for x in wrapped), statistics.median(x[0] for x in raw)
    print(f"{args.threads} threads, max {args.max_tokens} tokens, median of {args.rounds} interleaved rounds")
    print(f"raw llama-cpp-python create_completion : {r:7.1f} tokens/s ({raw[0][1]} tokens)")
    print(f"llorch engine wrapper (streamed to trio): {w:7.1f} tokens/s ({wrapped[0][1]} tokens)")
    print(f"ratio wrapper / raw: {w / r:.3f}   (target >= 0.97)")


if __name__ == "__main__":
    main()
