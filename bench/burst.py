"""Bursts through the admission queue, with the unmodified `openai` SDK and the real model on two nodes of one slot
and one llama.cpp thread each (2 nodes x 1 slot x 1 thread = the 2 cores; the gateway and this client share them).

Part 1: one tenant sends 64 concurrent streaming requests: every one must succeed; queue wait (from sending to the
first token) at p50/p99, and the same seeds must give the same text whichever node served them.
Part 2: tenant A sends --big and tenant B --small at the same moment: with round-robin admission B's k-th request
is placed within the first 2k + slots placements; it reports where B's requests were placed among all, and B's
wait against A's.

    .venv/bin/python bench/burst.py [--burst 64] [--big 48] [--small 8] [--tokens 16]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import openai
import trio

from llorch.gateway.localnet import LocalNetwork

MODEL = "smollm2-135m-instruct-q4_1"
SLOTS = 2


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


async def burst(base_url: str, requests: list[tuple[str, str, int]], tokens: int) -> list[dict]:
    """Send every (tenant, api key, seed) at once; one dict per request, in the order first tokens arrived."""
    clients = {key: openai.AsyncOpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=900)
               for _, key, _ in requests}
    started = time.monotonic()
    done: list[dict] = []

    async def one(tenant: str, key: str, seed: int) -> None:
        response = await clients[key].chat.completions.with_raw_response.create(
            model=MODEL, messages=[{"role": "user", "content": "Name a colour."}], max_tokens=tokens, seed=seed,
            temperature=0.8, stream=True)
        first_token, parts = None, []
        async for chunk in response.parse():
            if chunk.choices and chunk.choices[0].delta.content:
                first_token = first_token or time.monotonic() - started
                parts.append(chunk.choices[0].delta.content)
        done.append({"tenant": tenant, "seed": seed, "text": "".join(parts), "wait_s": first_token,
                     "total_s": time.monotonic() - started, "provider": response.headers["x-llorch-provider"]})

    async with trio.open_nursery() as nursery:
        for tenant, key, seed in requests:
            nursery.start_soon(one, tenant, key, seed)
    return sorted(done, key=lambda r: r["wait_s"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--burst", type=int, default=64)
    parser.add_argument("--big", type=int, default=48)
    parser.add_argument("--small", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=16)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="llorch-bench-") as workdir:
        net = LocalNetwork(workdir)
        try:
            net.start_gateway(extra="queue_timeout_ms = 600000\n")
            net.start_node("n1", threads=1)
            net.start_node("n2", threads=1)
            net.wait_for_providers(2)
            keys = {name: net.cli("gateway", "tenants", "add", name, "--config", "gateway.toml",
                                  "--max-concurrent", "256").strip() for name in ("a", "b")}

            one_tenant = trio.run(burst, net.base_url, [("a", keys["a"], n % 8) for n in range(args.burst)],
                                  args.tokens)
            waits = [r["wait_s"] for r in one_tenant]
            texts: dict[int, set[str]] = {}
            for r in one_tenant:
                texts.setdefault(r["seed"], set()).add(r["text"])
            print(f"{args.burst} concurrent streams from one tenant, {args.tokens} tokens each, 2 nodes x 1 slot x "
                  f"1 thread: {len(one_tenant)} of {args.burst} succeeded")
            print(f"  queue wait (to first token): p50 {percentile(waits, 0.5):.1f} s, p99 "
                  f"{percentile(waits, 0.99):.1f} s; last stream done after {max(r['total_s'] for r in one_tenant):.1f} s")
            print(f"  served by {len({r['provider'] for r in one_tenant})} nodes; same seed, same text: "
                  f"{all(len(t) == 1 for t in texts.values())} ({len(texts)} seeds)")

            two = trio.run(burst, net.base_url, [("a", keys["a"], n) for n in range(args.big)] +
                           [("b", keys["b"], n) for n in range(args.small)], args.tokens)
            places = [n for n, r in enumerate(two) if r["tenant"] == "b"]
            bound = [2 * k + SLOTS for k in range(1, len(places) + 1)]
            fair = all(place < limit for place, limit in zip(places, bound))
            wait_a = [r["wait_s"] for r in two if r["tenant"] == "a"]
            wait_b = [r["wait_s"] for r in two if r["tenant"] == "b"]
            print(f"two tenants at once: A sends {args.big}, B sends {args.small} ({len(two)} succeeded)")
            print(f"  B's requests were placed {[p + 1 for p in places]} of {len(two)} "
                  f"(round robin bound: k-th within {[b for b in bound]})")
            print(f"  wait p50: A {percentile(wait_a, 0.5):.1f} s, B {percentile(wait_b, 0.5):.1f} s; "
                  f"B's last first token {max(wait_b):.1f} s, A's {max(wait_a):.1f} s")
            ok = (len(one_tenant) == args.burst and all(len(t) == 1 for t in texts.values())
                  and len(two) == args.big + args.small and fair)
            print(f"{'PASS' if ok else 'FAIL'}  every request succeeded, same seeds agree, B within its fair share")
        finally:
            net.stop()


if __name__ == "__main__":
    main()
