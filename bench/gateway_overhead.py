"""Latency the gateway adds: the same request (echo engine on the node, 8 tokens) sent through the gateway's HTTP
API versus straight to the node over /llorch/infer/1, at 1, 8 and 32 concurrent clients, in one run; then the same
against a gateway whose database already holds a million postings (and half a million settled tickets).

Direct and gateway rounds alternate (``--rounds`` of ``--seconds`` each, per concurrency), so a neighbour's load on
this machine falls on both alike. The node runs the echo engine (no llama.cpp threads): the gateway, the node and
this client are three processes sharing the cores. Floors (the issue's): at 1 client the gateway adds at most
1.5 ms at p50 and 5 ms at p99; at 8 clients it sustains at least 0.8 × the requests/s of going direct.

    .venv/bin/python bench/gateway_overhead.py [--seconds 2] [--rounds 3] [--tokens 8] [--postings 1000000]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sqlite3
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import trio

from llorch.gateway.config import GatewayConfig
from llorch.gateway.db import open_gateway_db
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
CONCURRENCY = (1, 8, 32)
FLOOR_ADDED_P50_MS, FLOOR_ADDED_P99_MS, FLOOR_RATE_RATIO = 1.5, 5.0, 0.8


def cpu_s(pid: int | None = None) -> float:
    """User + system CPU seconds of a process (this one by default), from /proc."""
    fields = Path(f"/proc/{pid or os.getpid()}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


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


async def measure(network: LocalNetwork, direct_key: SigningKey, seconds: float, rounds: int) -> dict:
    """Latencies per (path, concurrency), and CPU seconds per (path, process) over the 1-client rounds."""
    node = network.nodes[0].state()
    gateway_pid = network.gateway.popen.pid
    provider = SimpleNamespace(provider_key=public_key_of_peer_id(node["peer_id"]), addrs=node["addrs"])
    results: dict = {}
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

        await run_clients(1, 1.0, direct)            # warm up both paths (connections, caches)
        await run_clients(1, 1.0, gateway)
        for concurrency in CONCURRENCY:
            for path, one in (("direct", direct), ("gateway", gateway)):
                results[(path, concurrency)] = []
            for _ in range(rounds):
                for path, one in (("direct", direct), ("gateway", gateway)):
                    before = cpu_s(), cpu_s(gateway_pid)
                    results[(path, concurrency)] += await run_clients(concurrency, seconds, one)
                    if concurrency == 1:
                        for process, (was, now) in (("client", (before[0], cpu_s())),
                                                    ("gateway", (before[1], cpu_s(gateway_pid)))):
                            results[("cpu", path, process)] = results.get(("cpu", path, process), 0) + now - was
    return results


def prefill(db_path: Path, postings: int, tenant: str) -> float:
    """A gateway database holding ``postings`` postings (two legs per settled request, half of them the bench
    tenant's, the rest spread over 1,000 tenants and 100 providers) and the settled ticket of each request."""
    started = time.perf_counter()
    trio.run(_create_schema, db_path)
    requests = postings // 2
    period = time.strftime("%Y-%m", time.gmtime())
    connection = sqlite3.connect(str(db_path), isolation_level=None)
    connection.execute("BEGIN")
    for start in range(0, requests, 50_000):
        postings_rows, ticket_rows = [], []
        for n in range(start, min(requests, start + 50_000)):
            request_id = f"chatcmpl-prefill{n:012d}"
            who = tenant if n % 2 else f"tenant-{n % 1000}"
            provider = f"12D3KooWprefill{n % 100:04d}"
            ticket_sha = hashlib.sha256(request_id.encode()).digest()
            posted = 1_700_000_000_000 + n
            for leg, debit, credit, amount in (("payout", f"tenant:{who}", f"provider:{provider}", 30),
                                               ("fee", f"tenant:{who}", "platform:fees", 12)):
                postings_rows.append((request_id, leg, debit, credit, amount, "EUR", period, who, provider, MODEL,
                                      20, 8, 4000, posted, ticket_sha))
            ticket_rows.append((ticket_sha, request_id, os.urandom(32), posted, os.urandom(420), "settled", who,
                                4000, 42, 42, 100, 30, "finished", 8, 40, posted, posted, posted, posted, 20, 8, 30,
                                12, 42, os.urandom(32)))
        connection.executemany(
            "INSERT INTO postings (request_id, leg, debit, credit, amount, currency, period, tenant, provider_id, "
            "model_id, tokens_in, tokens_out, margin_bp, posted_ms, ticket_sha256) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", postings_rows)
        connection.executemany(
            "INSERT INTO tickets (ticket_sha256, request_id, provider_key, issued_ms, ticket, state, tenant, margin_bp, "
            "customer_price_in, customer_price_out, reserved_minor, prompt_tokens_max, outcome, frames, text_bytes, "
            "accepted_ms, first_token_ms, ended_ms, settled_ms, tokens_in, tokens_out, payout, fee, charge, "
            "receipt_sha256) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            ticket_rows)
    connection.execute("COMMIT")
    count = connection.execute("SELECT COUNT(*) FROM postings").fetchone()[0]
    connection.close()
    assert count == requests * 2, count
    return time.perf_counter() - started


async def _create_schema(db_path: Path) -> None:
    async with open_gateway_db(db_path):
        pass


def run_network(workdir: Path, direct_key: SigningKey, args, postings: int) -> dict:
    network = LocalNetwork(workdir)
    if postings:
        seconds = prefill(workdir / "gateway.sqlite", postings, GatewayConfig.tenant)
        size_mb = (workdir / "gateway.sqlite").stat().st_size / 1e6
        print(f"prefilled {postings:,} postings and {postings // 2:,} tickets in {seconds:.0f} s "
              f"({size_mb:.0f} MB database)")
    try:
        network.start_gateway()
        network.start_node("echo", extra='engine = "echo"\nslots = 64\n', also_trusted=(direct_key.peer_id,))
        network.wait_for_providers(1)
        return trio.run(measure, network, direct_key, args.seconds, args.rounds)
    finally:
        network.stop()


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def report(title: str, results: dict, seconds: float) -> list[tuple[str, bool]]:
    print(f"\n{title}: latency in ms, rate in requests/s")
    print("clients | direct p50    p99  rate | gateway p50    p99  rate | added p50  added p99 | rate ratio")
    for concurrency in CONCURRENCY:
        d, g = results[("direct", concurrency)], results[("gateway", concurrency)]
        d50, d99, g50, g99 = (percentile(d, 0.5), percentile(d, 0.99), percentile(g, 0.5), percentile(g, 0.99))
        print(f"{concurrency:7d} | {d50 * 1000:10.2f} {d99 * 1000:6.1f} {len(d) / seconds:5.0f} | "
              f"{g50 * 1000:11.2f} {g99 * 1000:6.1f} {len(g) / seconds:5.0f} | "
              f"{(g50 - d50) * 1000:9.2f} {(g99 - d99) * 1000:10.2f} | {len(g) / len(d):10.2f}")
    d1, g1 = results[("direct", 1)], results[("gateway", 1)]
    print(f"CPU per request at 1 client: direct: client {results[('cpu', 'direct', 'client')] / len(d1) * 1000:.2f} "
          f"ms; through the gateway: gateway process {results[('cpu', 'gateway', 'gateway')] / len(g1) * 1000:.2f} "
          f"ms, HTTP client {results[('cpu', 'gateway', 'client')] / len(g1) * 1000:.2f} ms")
    added50 = (percentile(g1, 0.5) - percentile(d1, 0.5)) * 1000
    added99 = (percentile(g1, 0.99) - percentile(d1, 0.99)) * 1000
    ratio8 = len(results[("gateway", 8)]) / len(results[("direct", 8)])
    return [(f"{title}: added p50 at 1 client {added50:.2f} ms <= {FLOOR_ADDED_P50_MS} ms",
             added50 <= FLOOR_ADDED_P50_MS),
            (f"{title}: added p99 at 1 client {added99:.2f} ms <= {FLOOR_ADDED_P99_MS} ms",
             added99 <= FLOOR_ADDED_P99_MS),
            (f"{title}: rate at 8 clients {ratio8:.2f} x direct >= {FLOOR_RATE_RATIO}", ratio8 >= FLOOR_RATE_RATIO)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="length of one round (default 2)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per path and concurrency")
    parser.add_argument("--tokens", type=int, default=TOKENS, help=f"output tokens per request (default {TOKENS})")
    parser.add_argument("--postings", type=int, default=1_000_000,
                        help="postings in the second run's database (0: skip that run)")
    args = parser.parse_args()
    globals()["TOKENS"] = args.tokens
    direct_key = SigningKey.generate()
    print(f"echo engine, {TOKENS} tokens per request; {args.rounds} alternating rounds of {args.seconds:g} s per "
          f"path and concurrency; gateway, node and client share {os.cpu_count()} cores")
    checks = []
    runs = [("empty database", 0)] + ([(f"{args.postings:,}-posting database", args.postings)] if args.postings else [])
    for title, postings in runs:
        with tempfile.TemporaryDirectory(prefix="llorch-bench-") as workdir:
            results = run_network(Path(workdir), direct_key, args, postings)
        checks += report(title, results, args.seconds * args.rounds)
    print()
    for line, ok in checks:
        print(f"{'PASS' if ok else 'FAIL'}  {line}")


if __name__ == "__main__":
    main()
