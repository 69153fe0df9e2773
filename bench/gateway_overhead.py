"""Latency the gateway adds: the same request (echo engine on the node, 8 tokens) sent through the gateway's HTTP
API versus straight to the node over /llorch/infer/1, at 1, 8 and 32 concurrent clients, in one run; then the
highest sustained request rate through the gateway.

    .venv/bin/python bench/gateway_overhead.py [--seconds 6]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from types import SimpleNamespace

import httpx
import trio

from llorch.gateway.localnet import LocalNetwork
from llorch.gateway.market.node_client import request_inference
from llorch.ledger.objects import VERSION, Ticket
from llorch.ledger.signing import SigningKey, public_key_of_peer_id
from llorch.node.wire.frames import Final, Request
from llorch.node.p2p import running_host
from llorch.node.stream_io import now_ms

MODEL = "smollm2-135m-instruct-q4_1"
MODEL_SHA256 = bytes.fromhex("b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53")
PROMPT = {"messages": [{"role": "user", "content": "hello there"}]}
TOKENS = 8


async def run_clients(concurrency: int, seconds: float, one) -> list[float]:
    latencies: list[float] = []
    deadline = trio.current_time() + seconds

    async def client(n: int) -> None:
        while trio.current_time() < deadline:
            start = time.perf_counter()
            await one(n)
            latencies.append(time.perf_counter() - start)

    async with trio.open_nursery() as nursery:
        for n in range(concurrency):
            nursery.start_soon(client, n)
    return latencies


async def measure(network: LocalNetwork, direct_key: SigningKey, seconds: float) -> dict:
    node = network.nodes[0].state()
    provider = SimpleNamespace(provider_key=public_key_of_peer_id(node["peer_id"]), addrs=node["addrs"])
    results = {}
    async with running_host(direct_key, "/ip4/127.0.0.1/tcp/0") as p2p, \
            httpx.AsyncClient(base_url=network.base_url, timeout=60,
                              headers={"Authorization": f"Bearer {network.api_key}"},
                              limits=httpx.Limits(max_connections=64)) as http:
        async def direct(n: int) -> None:
            issued = now_ms()
            ticket = Ticket(v=VERSION, request_id=f"bench-{n}-{time.perf_counter_ns()}", gateway_key=direct_key.public_key,
                            provider_key=provider.provider_key, tenant="t_bench", model_id=MODEL,
                            model_sha256=MODEL_SHA256, sampling={"seed": n, "temperature_ppm": 0, "top_p_ppm": 1_000_000,
                                                                 "max_tokens": TOKENS, "stop": []},
                            price_in=100_000, price_out=200_000, currency="EUR",   # the node's attested prices:
                            issued_ms=issued, expires_ms=issued + 60_000)           # it refuses any lower ticket
            async with request_inference(p2p, provider, Request(ticket.seal(direct_key), bytes(16), PROMPT)) as call:
                while not isinstance(await call.next_frame(), Final):
                    pass

        async def gateway(n: int) -> None:
            response = await http.post("/chat/completions", json={"model": MODEL, "messages": PROMPT["messages"],
                                                                   "max_tokens": TOKENS, "seed": n})
            response.raise_for_status()

        await run_clients(1, 1.0, direct)
        await run_clients(1, 1.0, gateway)
        for concurrency in (1, 8, 32):
            results[("direct", concurrency)] = await run_clients(concurrency, seconds, direct)
            results[("gateway", concurrency)] = await run_clients(concurrency, seconds, gateway)
    return results


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=6.0)
    args = parser.parse_args()
    direct_key = SigningKey.generate()
    with tempfile.TemporaryDirectory(prefix="llorch-bench-") as workdir:
        network = LocalNetwork(workdir)
        try:
            network.start_gateway()
            network.start_node("echo", extra='engine = "echo"\nslots = 64\n', also_trusted=(direct_key.peer_id,))
            network.wait_for_providers(1)
            results = trio.run(measure, network, direct_key, args.seconds)
        finally:
            network.stop()
    print(f"echo engine, {TOKENS} tokens per request, {args.seconds:g} s per row; latency in ms")
    print("clients | direct p50    p99   req/s | gateway p50    p99   req/s | added p50  added p99")
    for concurrency in (1, 8, 32):
        d, g = results[("direct", concurrency)], results[("gateway", concurrency)]
        d50, d99, g50, g99 = (percentile(d, 0.5), percentile(d, 0.99), percentile(g, 0.5), percentile(g, 0.99))
        print(f"{concurrency:7d} | {d50 * 1000:10.1f} {d99 * 1000:6.1f} {len(d) / args.seconds:7.0f} | "
              f"{g50 * 1000:11.1f} {g99 * 1000:6.1f} {len(g) / args.seconds:7.0f} | "
              f"{(g50 - d50) * 1000:9.1f} {(g99 - d99) * 1000:10.1f}")
    best = max(len(results[("gateway", c)]) / args.seconds for c in (1, 8, 32))
    print(f"highest sustained rate through the gateway: {best:.0f} requests/s (median latency "
          f"{statistics.median(results[('gateway', 32)]) * 1000:.1f} ms at 32 clients)")


if __name__ == "__main__":
    main()
