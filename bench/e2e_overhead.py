"""Overhead of the network path: the same request through gateway → libp2p → node versus the engine in-process.

Runs both in one process tree, interleaved round by round so machine noise hits both alike, and prints tokens/s and
time to first token (TTFT) for each, and their ratios. The in-process engine and the node use the same model file,
thread count, seed and sampling, so they generate the same tokens.

Cores: one llama.cpp thread by default, and the engine's thread (in-process, and in the node) pinned to a core of
its own (the last), every other thread (the node's and the gateway's event loops, this script's client) to the rest,
so the engine computes alone on both paths and the ratio measures what the network path costs it: the hand-off of
each token to the node's event loop and the GIL that loop holds while it frames, encrypts and sends (``--no-pin``:
the OS places every thread). Unpinned on 2 cores the OS sometimes left the node's engine thread beside a relaying
event loop for a whole round, and the ratio fell near 0.88-0.91 or near 0.99-1.01 from run to run whatever the
code. With 2 threads the relaying would steal time from a spinning ggml thread and measure the contention, not the
path. Floor (the issue's): tokens/s through the
network at least 0.97 x in-process, for 256-token outputs.

    .venv/bin/python bench/e2e_overhead.py [--rounds 5] [--max-tokens 256] [--threads 1] [--no-pin]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import openai
import trio

from llorch.gateway.localnet import LocalNetwork
from llorch.inference import catalog
from llorch.inference.engine import Engine, Sampling

MODEL = catalog.DEFAULT_MODEL_ID
MESSAGES = [{"role": "user", "content": "Tell me a long story about a lighthouse keeper."}]
SEED, TEMPERATURE_PPM, TOP_P_PPM = 7, 800_000, 950_000
FLOOR_RATIO = 0.97


def tasks(pid: int) -> dict[int, tuple[str, int]]:
    """Every thread of process ``pid`` and of its child processes: tid -> (name, CPU clock ticks used)."""
    found: dict[int, tuple[str, int]] = {}
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            name = open(f"/proc/{pid}/task/{task}/comm").read().strip()
            fields = open(f"/proc/{pid}/task/{task}/stat").read().rsplit(")", 1)[1].split()
            found[int(task)] = (name, int(fields[11]) + int(fields[12]))
            children = open(f"/proc/{pid}/task/{task}/children").read().split()
        except OSError:                                 # the thread ended meanwhile
            continue
        for child in children:
            found.update(tasks(int(child)))
    return found


def is_engine(name: str) -> bool:
    """The engine computes in a trio worker thread (inference/engine.py: ``trio.to_thread``), named so."""
    return name.startswith("Trio thread")


def pin(pid: int, engine_cores: set[int], other_cores: set[int]) -> None:
    """The engine's threads of process ``pid`` onto ``engine_cores``, its other threads onto ``other_cores``."""
    for tid, (name, _) in tasks(pid).items():
        try:
            os.sched_setaffinity(tid, engine_cores if is_engine(name) else other_cores)
        except OSError:
            pass


def busiest_on(pid: int, before: dict[int, tuple[str, int]], cores: set[int]) -> bool:
    """Whether the thread of ``pid`` that used the most CPU since ``before`` (the engine's) ran on ``cores``; False
    if a thread started meanwhile computed (it inherited its starter's cores, not the engine's)."""
    after = tasks(pid)
    busiest = max(after, key=lambda tid: after[tid][1] - before.get(tid, ("", 0))[1])
    return busiest in before and os.sched_getaffinity(busiest) == cores


def core_split(threads: int) -> tuple[set[int], set[int]] | None:
    """(the engine's cores, everything else's), or None where there are too few to split."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < threads + 1:
        return None
    return set(cores[-threads:]), set(cores[:-threads])


def in_process(engine: Engine, max_tokens: int) -> tuple[float, float, int]:
    """(tokens/s, TTFT s, tokens) for one request to the engine called directly."""
    first: list[float] = []

    async def emit(text: str) -> None:
        if not first:
            first.append(time.perf_counter())

    async def one():
        prepared = engine.prepare({"messages": MESSAGES}, Sampling(SEED, TEMPERATURE_PPM, TOP_P_PPM, max_tokens))
        return await engine.generate(prepared, emit)

    start = time.perf_counter()
    generation = trio.run(one)
    elapsed = time.perf_counter() - start
    return generation.tokens_out / elapsed, first[0] - start, generation.tokens_out


def through_network(client: openai.OpenAI, max_tokens: int) -> tuple[float, float, int]:
    """(tokens/s, TTFT s, tokens) for one streamed request through the gateway, as a customer sees it."""
    start = time.perf_counter()
    first = None
    tokens = 0
    stream = client.chat.completions.create(model=MODEL, messages=MESSAGES, seed=SEED, max_tokens=max_tokens,
                                            temperature=TEMPERATURE_PPM / 1e6, top_p=TOP_P_PPM / 1e6, stream=True,
                                            stream_options={"include_usage": True})
    for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter()
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    elapsed = time.perf_counter() - start
    return tokens / elapsed, (first or time.perf_counter()) - start, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-pin", action="store_true", help="let the OS place every process on any core")
    args = parser.parse_args()
    split = None if args.no_pin else core_split(args.threads)

    path = catalog.fetch(catalog.lookup(MODEL), log=lambda message: None)
    engine = Engine.load(MODEL, path.parent, threads=args.threads)
    with tempfile.TemporaryDirectory(prefix="llorch-bench-") as workdir:
        network = LocalNetwork(Path(workdir))
        try:
            network.start_gateway()
            network.start_node("node1", threads=args.threads)
            network.wait_for_providers(1)
            client = openai.OpenAI(base_url=network.base_url, api_key=network.api_key, max_retries=0, timeout=300)
            local, remote, off_core = [], [], 0
            for round in range(args.rounds + 1):       # round 0 warms both paths up (and starts their engine threads)
                assert network.gateway is not None
                for pid in (os.getpid(), network.nodes[0].popen.pid, network.gateway.popen.pid):
                    if split is not None:
                        pin(pid, *split)
                before = {pid: tasks(pid) for pid in (os.getpid(), network.nodes[0].popen.pid)}
                local.append(in_process(engine, args.max_tokens if round else 8))
                remote.append(through_network(client, args.max_tokens if round else 8))
                if split is not None and round:
                    off_core += sum(not busiest_on(pid, seen, split[0]) for pid, seen in before.items())
            local, remote = local[1:], remote[1:]
        finally:
            network.stop()

    assert {r[2] for r in local} == {r[2] for r in remote}, "both paths must generate the same number of tokens"
    local_tps, remote_tps = statistics.median(r[0] for r in local), statistics.median(r[0] for r in remote)
    local_ttft, remote_ttft = statistics.median(r[1] for r in local), statistics.median(r[1] for r in remote)
    print(f"request: {local[0][2]} output tokens, seed {SEED}, {args.threads} threads, median of {args.rounds} rounds")
    print("cores: " + ("any, as the OS places them (--no-pin)" if args.no_pin else
                       f"too few to split ({len(os.sched_getaffinity(0))}), as the OS places them" if split is None else
                       f"the engine (in-process and the node's) on {sorted(split[0])}, every other thread (the node's "
                       f"and the gateway's event loops, the client) on {sorted(split[1])}"
                       + (f"; in {off_core} runs the engine computed on a new thread off its cores" if off_core
                          else "")))
    print(f"in-process engine        : {local_tps:7.1f} tokens/s   TTFT {local_ttft * 1000:7.1f} ms")
    print(f"gateway → libp2p → node  : {remote_tps:7.1f} tokens/s   TTFT {remote_ttft * 1000:7.1f} ms")
    print(f"throughput ratio (network / in-process): {remote_tps / local_tps:.3f}")
    print(f"{'PASS' if remote_tps / local_tps >= FLOOR_RATIO else 'FAIL'}  network tokens/s >= {FLOOR_RATIO} x "
          f"in-process")
    print(f"TTFT added by the network path: {(remote_ttft - local_ttft) * 1000:.1f} ms "
          f"(ratio {remote_ttft / local_ttft:.2f})")


if __name__ == "__main__":
    main()
