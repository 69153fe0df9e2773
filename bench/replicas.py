"""Requests/s of one gateway and of two replicas on one PostgreSQL, against one gateway on SQLite, in one run.

Each setup runs two echo-engine nodes (a test-only fake: no llama.cpp threads, 8 slots each) and ``--clients``
concurrent HTTP clients sending non-streaming chat completions of ``--tokens`` tokens for ``--seconds``; with two
replicas the clients alternate between them (a load balancer's round robin). The tenant has a concurrency limit
and a budget, so the replicas' shared admission (gateway/market/shared.py) is on the path. Gateways, nodes,
PostgreSQL and this client all share this machine's cores: on 2 cores the point is that two replicas stay correct,
not that they are faster (each process competes for the same 2 cores); the figures show what sharing costs.

    sudo .venv/bin/python bench/replicas.py [--seconds 10] [--clients 16] [--tokens 8]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import httpx
import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llorch.gateway.localnet import LocalNetwork  # noqa: E402
from tests.helpers import MODEL_ID  # noqa: E402
from tests.postgres import PostgresCluster, unavailable_reason  # noqa: E402

NODE = 'engine = "echo"\nslots = 8\n'


async def load(base_urls: list[str], key: str, clients: int, seconds: float, tokens: int) -> tuple[int, int, float]:
    """(answered 200, refused, p50 latency ms) over ``seconds``."""
    ok, refused, latencies = 0, 0, []
    deadline = trio.current_time() + seconds
    async with httpx.AsyncClient(timeout=60, headers={"Authorization": f"Bearer {key}"},
                                 limits=httpx.Limits(max_connections=2 * clients)) as http:
        async def client(n: int) -> None:
            nonlocal ok, refused
            seed = n * 1_000_000
            while trio.current_time() < deadline:
                started = time.perf_counter()
                response = await http.post(f"{base_urls[seed % len(base_urls)]}/chat/completions", json={
                    "model": MODEL_ID, "messages": [{"role": "user", "content": "hello"}], "seed": seed,
                    "max_tokens": tokens})
                latencies.append(time.perf_counter() - started)
                if response.status_code == 200:
                    ok += 1
                else:
                    refused += 1
                seed += 1

        async with trio.open_nursery() as nursery:
            for n in range(clients):
                nursery.start_soon(client, n)
    latencies.sort()
    return ok, refused, latencies[len(latencies) // 2] * 1000 if latencies else 0.0


def run(workdir: Path, database: str, replicas: int, args) -> tuple[int, int, float]:
    net = LocalNetwork(workdir)
    try:
        net.start_gateway(database=database)
        for n in range(1, replicas):
            net.start_replica(f"gateway{n + 1}")
        for name in ("a", "b"):
            net.start_node(name, extra=NODE)
        net.wait_for_providers(2)
        key = net.cli("gateway", "tenants", "add", "bench", "--config", "gateway.toml", "--budget", "1000000",
                      "--max-concurrent", str(args.clients)).strip()
        urls = [process.state()["base_url"] for process in (net.gateway, *net.replicas)]
        trio.run(load, urls, key, args.clients, 2.0, args.tokens)                       # warm up
        return trio.run(load, urls, key, args.clients, args.seconds, args.tokens)
    finally:
        net.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=8)
    args = parser.parse_args()
    reason = unavailable_reason()
    if reason:
        print(f"cannot run: {reason}", file=sys.stderr)
        return 2
    print(f"{args.clients} clients, {args.tokens} tokens per request, {args.seconds:g} s; two echo nodes; every "
          f"process on this machine's cores")
    results = {}
    with PostgresCluster() as cluster:
        for title, database, replicas in (("1 gateway, SQLite", "", 1),
                                          ("1 gateway, PostgreSQL", cluster.new_database(), 1),
                                          ("2 replicas, PostgreSQL", cluster.new_database(), 2)):
            with tempfile.TemporaryDirectory() as workdir:
                ok, refused, p50 = results[title] = run(Path(workdir), database, replicas, args)
            print(f"{title:24s} {ok / args.seconds:7.1f} requests/s  p50 {p50:6.1f} ms  ({refused} refused)")
    base = results["1 gateway, SQLite"][0]
    for title, (ok, _, _) in results.items():
        print(f"  {title:24s} {ok / base:5.2f} x one gateway on SQLite")
    return 0


if __name__ == "__main__":
    sys.exit(main())
