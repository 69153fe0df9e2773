"""The hand-off of each generated piece from the engine's thread to the event loop, while that loop is busy.

A node's event loop frames, encrypts and sends each token (about 1.3 ms of it per token here, measured with
/proc per-thread CPU times on a 256-token request). The engine used to hand each piece over and wait until the loop
had taken it, so every token also paid for whatever the loop was doing at that moment; now it queues the piece and
goes on (inference/engine.py ``send_piece``; it waits only while ``TOKEN_PIECES_AHEAD_MAX`` pieces are not taken
yet). This runs the real engine with an ``emit`` that keeps the loop busy for ``--busy-ms`` per piece (waiting in
short sleeps, as socket writes do, so the GIL is free meanwhile), interleaved round by round with an ``emit`` that
returns at once, and prints the median tokens/s of each.

Floor: with the loop busy, at least 0.9 x the rate with it idle (here 0.972; before this change 0.687 at 5 ms).
Cores: one llama.cpp thread, so on 2 cores the engine's thread and the event loop each have one.

    .venv/bin/python bench/engine_handoff.py [--rounds 5] [--busy-ms 5] [--max-tokens 256]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import trio

from llorch.inference import catalog
from llorch.inference.engine import Engine, Sampling

MODEL = catalog.DEFAULT_MODEL_ID
MESSAGES = [{"role": "user", "content": "Tell me a long story about a lighthouse keeper."}]
SEED, TEMPERATURE_PPM, TOP_P_PPM = 7, 800_000, 950_000
FLOOR_RATIO = 0.9
BUSY_STEP_S = 0.0002


def rate(engine: Engine, max_tokens: int, busy_s: float) -> float:
    """Tokens/s of one generation whose ``emit`` holds the event loop ``busy_s`` per piece."""
    async def emit(text: str) -> None:
        until = time.perf_counter() + busy_s
        while time.perf_counter() < until:
            time.sleep(BUSY_STEP_S)             # blocks the event loop, not the GIL

    async def one() -> float:
        prepared = engine.prepare({"messages": MESSAGES}, Sampling(SEED, TEMPERATURE_PPM, TOP_P_PPM, max_tokens))
        start = time.perf_counter()
        generation = await engine.generate(prepared, emit)
        return generation.tokens_out / (time.perf_counter() - start)

    return trio.run(one)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--busy-ms", type=float, default=5.0)
    parser.add_argument("--max-tokens", type=int, default=256)
    args = parser.parse_args()
    path = catalog.fetch(catalog.lookup(MODEL), log=lambda message: None)
    engine = Engine.load(MODEL, path.parent, threads=1)
    rate(engine, 8, 0.0)                           # warm-up
    idle, busy = [], []
    for _ in range(args.rounds):
        idle.append(rate(engine, args.max_tokens, 0.0))
        busy.append(rate(engine, args.max_tokens, args.busy_ms / 1000))
    idle_rate, busy_rate = statistics.median(idle), statistics.median(busy)
    ratio = busy_rate / idle_rate
    print(f"{args.max_tokens} tokens, 1 llama.cpp thread, median of {args.rounds} rounds")
    print(f"event loop idle          : {idle_rate:6.1f} tokens/s")
    print(f"event loop busy {args.busy_ms:g} ms/piece: {busy_rate:6.1f} tokens/s")
    print(f"{'PASS' if ratio >= FLOOR_RATIO else 'FAIL'}  busy / idle = {ratio:.3f} >= {FLOOR_RATIO}")
    return 0 if ratio >= FLOOR_RATIO else 1


if __name__ == "__main__":
    sys.exit(main())
