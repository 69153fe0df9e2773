"""A simulated market as the measuring device (issue 30): one gateway's real market code (its provider book on a
real SQLite gateway database, its directory, its placement index and views) against N simulated providers (real
keys, real signed attestations, each parsed and checked as the gossip path does), under a load of customers'
requests, with a fixed seed so a run repeats.

    .venv/bin/python bench/market_scale.py [--providers 10000] [--requests 2000] [--seed 7]
    .venv/bin/python bench/market_scale.py --short          # 2,000 providers, 500 requests (well under 5 minutes)

It reports, against floors (one PASS/FAIL line each; exit 1 on any FAIL):
- placement: wall time of one decision (``MarketView.rank``: the first 4 candidates and the price caps) at N
  eligible providers, p50 and p99 over the requests, while the market changes between them (each placement, its
  outcome, and every 10th request a provider's new attestation); baseline: the full sort over every provider's
  view (``rank_providers(provider_views())``, what a decision cost before the index) on a sample, in the same run.
  Every decision is compared with the full sort's: a disagreement is a FAIL.
- attestation ingest: CPU seconds to take 2,000 attestations the way the gateway's gossip path does (gateway/run.py:
  64 topic validations at a time, the gateway's pubsub limit (py-libp2p's default is 10); ``AttestationChecks`` checks them in batches in its worker
  process; the reader takes each from the validator, asks the provider book whether it is approved and keeps it):
  the event loop's share of its core at 2,000 attestations a second (``time.thread_time``: the floor), and the CPU
  of both processes. Baseline in the same run: the same 2,000 checked inline on the event loop (as before).
  Not counted: py-libp2p's GossipSub itself (framing, the mesh, its own message ids).
- directory and index memory at N providers (tracemalloc: what the directory, the index and the views hold).

- witnessing: the real cost of a witness round (gateway/witness/witness.py ``Witness.witness``, in this process, on
  its own SQLite database) against providers in a child process (each its own libp2p host serving a real ledger of
  signed receipts over /llorch/ledger/1): CPU and wall time of a round that verifies and cosigns 10 new entries,
  and of a round with nothing new. Then the schedule (``witness_forever``) over N providers whose rounds take those
  wall times, in trio's virtual time: every provider witnessed within the stated period (WITNESS_PERIOD_S: the
  floor), and the CPU that costs (rounds per second × CPU per round of the measured kind with new entries).

- relay: a real gateway process and a real node process (the echo engine, 64 slots) on loopback, 32 customers each
  streaming one request after another (512 tokens, SSE) through the gateway's HTTP API from this process: the
  gateway process's CPU (from /proc) per token the customers received. Providers faster than the gateway can
  relay (echo with no pause: the gateway is behind, flow control puts several tokens in a frame; the floor,
  0.05 ms, applies here, to all the gateway's CPU over the run, and the bench also splits it into what each
  request and what each token adds, from 64- and 512-token answers). Baseline in the same run: providers at 100
  tokens/s per stream (a 10 ms pause: 3,200 tokens/s in all), which the gateway keeps up with, so each token
  has a frame of its own (the per-frame cost, as before flow control). The three processes share the 2 cores.

The market, ingest and witness sections run in one process on one core, with nothing else beside it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import trio
from trio.testing import MockClock

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llorch.gateway.db import open_gateway_db  # noqa: E402
from llorch.inference.catalog import DEFAULT_MODEL_ID  # noqa: E402
from llorch.gateway import limits  # noqa: E402
from llorch.gateway.attestation_checks import AttestationChecks  # noqa: E402
from llorch.gateway.run import CheckedAttestations  # noqa: E402
from llorch.gateway.market.admission import WaitingRoom  # noqa: E402
from llorch.gateway.market.directory import ProviderDirectory  # noqa: E402
from llorch.gateway.market.placement import Requirements, rank_providers  # noqa: E402
from llorch.gateway.market.providers import ProviderBook  # noqa: E402
from llorch.gateway.market.view import MarketView  # noqa: E402
from llorch.ledger.objects import VERSION  # noqa: E402
from llorch.ledger.signing import SigningKey  # noqa: E402
from llorch.node import limits as node_limits  # noqa: E402
from llorch.node.stream_io import now_ms  # noqa: E402
from llorch.node.wire.attestation import Attestation, parse_attestation  # noqa: E402
from llorch.node.wire.registration import Registration  # noqa: E402

MODEL_ID, MODEL_SHA256 = "bench-model", bytes(range(32))
PRICES = [(100_000, 200_000)] * 6 + [(80_000, 250_000), (150_000, 150_000), (90_000, 180_000)]
PLACEMENT_P50_MS, PLACEMENT_P99_MS = 1.0, 5.0
INGEST_SHARE_MAX = 0.5                    # of one core at 2,000 attestations per second
INGEST_RATE = 2_000
VALIDATORS_AT_ONCE = node_limits.GOSSIP_VALIDATIONS_AT_ONCE_MAX     # the gateway's pubsub validates this many at once
BASELINE_SAMPLE = 30
CANDIDATES = 4


class NoCatalog:
    catalog = None


def attestation(key: SigningKey, rng: random.Random, seq: int, now: int) -> Attestation:
    slots = rng.choice([1, 1, 2, 4])
    price_in, price_out = rng.choice(PRICES)
    return Attestation(
        v=VERSION, provider_key=key.public_key, seq=seq, issued_ms=now, expires_ms=now + 180_000,
        addrs=[f"/ip4/127.0.0.1/tcp/{4001 + key.public_key[0] * 64 + key.public_key[1] % 64}/p2p/{key.peer_id}"],
        models=[{"id": MODEL_ID, "sha256": MODEL_SHA256, "context_tokens": 4096}],
        engine_build=rng.choice(["llama-cpp-python/0.3.36;ggml-cpu/abc", "llama-cpp-python/0.3.36;ggml-cuda/def"]),
        slots_total=slots, slots_free=rng.randrange(slots + 1), queue_depth=0, wait_ms=0, price_in=price_in,
        price_out=price_out, currency="EUR", geo={"country": rng.choice(["DE", "FR", "NL", "US"]), "region": "r"},
        sla={"uptime_ppm": 990_000, "ttft_ms": 1_000})


async def register(database, keys: list[SigningKey], rng: random.Random, now: int) -> None:
    rows = []
    for number, key in enumerate(keys):
        country = rng.choice(["DE", "FR", "NL", "US"])
        registration = Registration(
            v=VERSION, provider_key=key.public_key, provider_id=key.peer_id, endpoint=f"/p2p/{key.peer_id}",
            pricing={"currency": "EUR", "input_per_1m": 100_000, "output_per_1m": 200_000},
            capacity={"slots": 1, "gpus": 0, "vram_gb": 0}, sla={"uptime_ppm": 950_000, "ttft_ms": 2_000},
            geo={"country": country, "region": "r"}, issued_ms=now)
        rows.append((key.peer_id, key.public_key, registration.seal(key), "approved", int(number % 3 == 0), now, now))
    await database.transaction([("INSERT INTO providers (provider_id, provider_key, registration, status, "
                                 "geo_certified, registered_ms, issued_ms) VALUES (?, ?, ?, ?, ?, ?, ?)", rows)])


async def ingest(envelopes: list[bytes], keys: list[SigningKey], directory: ProviderDirectory,
                 providers: ProviderBook, inline: bool = False) -> tuple[float, float, float]:
    """(event loop, this process, the checking worker process) CPU seconds to take ``envelopes`` as gateway/run.py's
    gossip path does: up to VALIDATORS_AT_ONCE validations at a time (py-libp2p's MAX_CONCURRENT_VALIDATORS), each
    parsed and verified by ``AttestationChecks`` (``inline``: all on the event loop, as while gossip is light), then
    the subscription's reader keeps it."""
    checked = CheckedAttestations()
    checks = AttestationChecks(frozenset(), rate_min=math.inf if inline else limits.ATTESTATION_WORKER_RATE_MIN)
    send, receive = trio.open_memory_channel[tuple[bytes, SigningKey]](len(envelopes))
    for item in zip(envelopes, keys):
        send.send_nowait(item)
    send.close()

    async def validator() -> None:
        async for envelope, key in receive:
            attestation = await checks.check(envelope, key.public_key, now_ms())            # the topic validator
            directory.check_newer(attestation)
            checked.keep(envelope, attestation)
            kept = checked.take(envelope, key.public_key, now_ms(), frozenset())           # the reader
            approved = await providers.approved_keys(limits.GOSSIP_APPROVALS_RECHECK_S)
            directory.observe(kept, kept.provider_key in approved)

    if not inline:
        await checks.warm()                  # started and importing before the clock starts, as in a running gateway
    worker_before = sum(process_cpu_s(pid) for pid in checks.worker_pids())
    loop_cpu, cpu, worker_cpu = time.thread_time(), time.process_time(), -worker_before
    async with trio.open_nursery() as nursery:
        nursery.start_soon(checks.run)
        async with trio.open_nursery() as validators:
            for _ in range(VALIDATORS_AT_ONCE):
                validators.start_soon(validator)
        loop_cpu, cpu = time.thread_time() - loop_cpu, time.process_time() - cpu
        for pid in checks.worker_pids():
            worker_cpu += process_cpu_s(pid)
        nursery.cancel_scope.cancel()
    return loop_cpu, cpu, worker_cpu


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


async def run(args: argparse.Namespace) -> list[tuple[bool, str]]:
    rng = random.Random(args.seed)
    verdicts: list[tuple[bool, str]] = []
    started = time.perf_counter()
    keys = [SigningKey(rng.randbytes(32)) for _ in range(args.providers)]
    now = now_ms()
    with tempfile.TemporaryDirectory(prefix="llorch-bench-market-") as scratch:
        async with open_gateway_db(Path(scratch) / "gateway.sqlite") as database:
            await register(database, keys, rng, now)
            providers = ProviderBook(database)
            await providers.all()
            directory = ProviderDirectory()
            envelopes = [attestation(key, rng, 1, now).seal(key) for key in keys]
            print(f"{args.providers} providers registered and attested in {time.perf_counter() - started:.1f} s",
                  flush=True)

            tracemalloc.start()
            before = tracemalloc.take_snapshot()
            market = MarketView(directory, providers, WaitingRoom(64), NoCatalog())   # type: ignore[arg-type]
            _, cpu, worker_cpu = await ingest(envelopes, keys, directory, providers, inline=True)
            await market.provider_views()
            held = sum(stat.size_diff for stat in tracemalloc.take_snapshot().compare_to(before, "filename"))
            tracemalloc.stop()
            per_attestation = cpu / len(envelopes)     # measured with tracemalloc on: an upper bound
            print(f"directory + index + views of {args.providers} providers: {held / 2**20:.1f} MiB", flush=True)

            second = [attestation(key, rng, 2, now_ms()).seal(key) for key in keys[:INGEST_RATE]]
            loop_cpu, cpu, worker_cpu = await ingest(second, keys[:INGEST_RATE], directory, providers)
            third = [attestation(key, rng, 3, now_ms()).seal(key) for key in keys[:INGEST_RATE]]
            inline_cpu, _, _ = await ingest(third, keys[:INGEST_RATE], directory, providers, inline=True)
            share = loop_cpu * INGEST_RATE / len(second)
            total = (cpu + worker_cpu) * INGEST_RATE / len(second)
            before = inline_cpu * INGEST_RATE / len(third)
            print(f"attestation ingest, checks in the worker process: the event loop {loop_cpu / len(second) * 1e3:.3f} "
                  f"ms CPU each, the worker {worker_cpu / len(second) * 1e3:.3f} ms, in all {total / INGEST_RATE * 1e3:.3f} "
                  f"ms; checks inline (baseline): {inline_cpu / len(third) * 1e3:.3f} ms (the first {len(envelopes)} "
                  f"inline with tracemalloc: {per_attestation * 1e3:.3f} ms)", flush=True)
            verdicts.append((share < INGEST_SHARE_MAX, f"attestation ingest {share:.0%} of the event loop's core at "
                                                       f"{INGEST_RATE}/s < {INGEST_SHARE_MAX:.0%} (inline, the "
                                                       f"baseline: {before:.0%}; both processes: {total:.0%} of a "
                                                       f"core)"))

            timings, baseline, disagreements = [], [], 0
            for number in range(args.requests):
                need = Requirements(MODEL_ID, MODEL_SHA256, "EUR", prompt_tokens_estimate=rng.randrange(10, 4000),
                                    max_tokens=rng.randrange(16, 2048), eu_only=rng.random() < 0.2,
                                    max_price_out=rng.choice([None, None, None, 400_000]))
                begun = time.perf_counter()
                ranking = await market.rank(need, CANDIDATES)
                timings.append((time.perf_counter() - begun) * 1e3)
                if number % max(1, args.requests // BASELINE_SAMPLE) == 0:
                    begun = time.perf_counter()
                    views = await market.provider_views()
                    full = rank_providers(views, need, now_ms())
                    baseline.append((time.perf_counter() - begun) * 1e3)
                    moment = now_ms()                     # both at one moment: standings change with time
                    disagreements += ([v.key for v in rank_providers(views, need, moment)[:CANDIDATES]] !=
                                      [v.key for v in market.index.rank(need, moment, CANDIDATES).candidates])
                if ranking.candidates:                     # the market moves: a placement and its outcome
                    chosen = ranking.candidates[0].key
                    market.ticket_started(chosen)
                    if rng.random() < 0.05:
                        market.failed(chosen)
                    else:
                        market.succeeded(chosen, rng.randrange(150, 2_500), rng.randrange(10, 80))
                    market.ticket_ended(chosen, True)
                if number % 10 == 0:                      # and a provider attests anew
                    mover = rng.randrange(len(keys))
                    directory.observe(attestation(keys[mover], rng, 4 + number, now_ms()))
            p50, p99 = statistics.median(timings), percentile(timings, 0.99)
            print(f"placement at {len(market.index)} placeable providers: p50 {p50:.3f} ms, p99 {p99:.3f} ms over "
                  f"{len(timings)} requests; baseline full sort p50 {statistics.median(baseline):.1f} ms "
                  f"({len(baseline)} requests); {disagreements} disagreement(s) with the full sort", flush=True)
            verdicts.append((p50 < PLACEMENT_P50_MS, f"placement p50 {p50:.3f} ms < {PLACEMENT_P50_MS:g} ms"))
            verdicts.append((p99 < PLACEMENT_P99_MS, f"placement p99 {p99:.3f} ms < {PLACEMENT_P99_MS:g} ms"))
            verdicts.append((disagreements == 0, f"{disagreements} placement disagreement(s) with the full sort"))
    return verdicts


WITNESS_PROVIDERS = 12            # real providers whose rounds are timed
WITNESS_ENTRIES = 10              # new entries a timed round verifies and cosigns


def serve_ledgers(workdir: str, gateway_hex: str, count: int) -> None:
    """The child: ``count`` providers, each a libp2p host serving its ledger; prints their (key, addrs) as JSON
    and serves until its standard input closes."""
    from tests.helpers import write_ledger_file

    async def main() -> None:
        from contextlib import AsyncExitStack

        from libp2p.custom_types import TProtocol

        from llorch.ledger.store import LedgerStore
        from llorch.node.ledger_service import LedgerService
        from llorch.node.p2p import running_host
        from llorch.node.wire.ledger_protocol import LEDGER_PROTOCOL_ID
        trusted = frozenset({bytes.fromhex(gateway_hex)})
        listed = []
        async with AsyncExitStack() as stack:
            for number in range(count):
                key = SigningKey(bytes([number + 1]) * 32)
                path = Path(workdir) / f"ledger-{number}.sqlite"
                write_ledger_file(path, key, WITNESS_ENTRIES, checkpoint_every=WITNESS_ENTRIES, tree=True)
                ledger = await stack.enter_async_context(LedgerStore.open(path, key))
                p2p = await stack.enter_async_context(running_host(key, "/ip4/127.0.0.1/tcp/0"))
                p2p.host.set_stream_handler(TProtocol(LEDGER_PROTOCOL_ID),
                                            LedgerService(ledger, trusted).serve_ledger)
                listed.append([key.public_key.hex(), p2p.addrs()])
            print(json.dumps(listed), flush=True)
            await trio.to_thread.run_sync(sys.stdin.read)
    trio.run(main)


def witnessing(providers: int) -> list[tuple[bool, str]]:
    from llorch.gateway.witness.witness import Witness, WitnessBook
    from llorch.node.ledger_client import request_ledger
    from llorch.node.wire.ledger_protocol import GetCheckpoint

    gateway = SigningKey(bytes([99]) * 32)
    with tempfile.TemporaryDirectory(prefix="llorch-bench-witness-") as scratch:
        child = subprocess.Popen([sys.executable, __file__, "--serve-ledgers", scratch, gateway.public_key.hex(),
                                  str(WITNESS_PROVIDERS)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            assert child.stdout is not None
            listed = [(bytes.fromhex(key), addrs) for key, addrs in json.loads(child.stdout.readline())]

            async def rounds() -> tuple[list[tuple[float, float]], list[tuple[float, float]]]:
                from llorch.node.p2p import running_host
                new, steady = [], []
                async with open_gateway_db(Path(scratch) / "gateway.sqlite") as database, \
                        running_host(gateway, "/ip4/127.0.0.1/tcp/0") as p2p:
                    witness = Witness(p2p, gateway, WitnessBook(database), lambda key: None)
                    for key, addrs in listed:           # connected first, as every node keeps itself connected
                        await request_ledger(p2p, key, addrs, GetCheckpoint())
                    for timed in (new, steady, steady, steady):
                        for key, addrs in listed:
                            cpu, wall = time.process_time(), time.perf_counter()
                            state = await witness.witness(key, addrs)
                            assert state is not None and state.size == WITNESS_ENTRIES, state
                            timed.append((time.process_time() - cpu, time.perf_counter() - wall))
                return new, steady
            new, steady = trio.run(rounds)
        finally:
            child.stdin.close()            # type: ignore[union-attr]
            child.wait(timeout=60)
    new_cpu, new_wall = (statistics.mean(x) for x in zip(*new))
    steady_cpu, steady_wall = (statistics.mean(x) for x in zip(*steady))
    print(f"witness round (real, {WITNESS_PROVIDERS} providers over loopback libp2p): {WITNESS_ENTRIES} new entries "
          f"{new_cpu * 1e3:.1f} ms CPU / {new_wall * 1e3:.1f} ms wall; nothing new {steady_cpu * 1e3:.1f} ms CPU / "
          f"{steady_wall * 1e3:.1f} ms wall", flush=True)
    return [schedule_coverage(providers, new_cpu, new_wall)]


def schedule_coverage(providers: int, round_cpu_s: float, round_wall_s: float) -> tuple[bool, str]:
    """``witness_forever`` over ``providers`` whose rounds take ``round_wall_s`` (±50%), in virtual time."""
    from llorch.gateway.witness.witness import WITNESS_PERIOD_S, WitnessSchedule, witness_forever
    rng = random.Random(30)
    began: dict[bytes, list[float]] = {}
    most, running = [0], [0]

    class Rounds:                       # the measured round's wall time, as the schedule would meet it
        async def witness(self, key: bytes, addrs: list[str]) -> None:
            began.setdefault(key, []).append(trio.current_time())
            running[0] += 1
            most[0] = max(most[0], running[0])
            await trio.sleep(round_wall_s * rng.uniform(0.5, 1.5))
            running[0] -= 1

    listed = [(number.to_bytes(32, "big"), []) for number in range(providers)]

    async def simulate() -> float:
        async def keys() -> list:
            return listed
        with trio.move_on_after(2 * WITNESS_PERIOD_S):
            await witness_forever(Rounds(), keys, 5.0, WITNESS_PERIOD_S, WitnessSchedule(5.0, WITNESS_PERIOD_S))
        return trio.current_time()
    end = trio.run(simulate, clock=MockClock(autojump_threshold=0))
    worst = max(max(b - a for a, b in zip([0.0, *times], [*times, end])) for times in began.values())
    covered = len(began) == providers and worst <= WITNESS_PERIOD_S
    rate = sum(len(times) for times in began.values()) / end
    share = rate * round_cpu_s
    print(f"witness schedule over {providers} providers (virtual time, {2 * WITNESS_PERIOD_S:.0f} s): longest gap "
          f"{worst:.0f} s (period {WITNESS_PERIOD_S:.0f} s), up to {most[0]} rounds at once, {rate:.0f} rounds/s: "
          f"{share:.0%} of one core", flush=True)
    return (covered, f"every one of {providers} providers witnessed within {WITNESS_PERIOD_S:.0f} s (longest gap "
                     f"{worst:.0f} s), costing {share:.0%} of one core")


RELAY_STREAMS = 32
RELAY_TOKENS_SHORT, RELAY_TOKENS_LONG = 64, 512
RELAY_MODEL = DEFAULT_MODEL_ID         # the echo engine answers as the embedded default
RELAY_SECONDS, RELAY_SECONDS_SHORT = 20.0, 8.0
RELAY_CPU_PER_TOKEN_MS_MAX = 0.05


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid``, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def stream_for(base_url: str, api_key: str, streams: int, seconds: float, max_tokens: int) -> tuple[int, int]:
    """``streams`` customers each streaming ``max_tokens``-token requests one after another for ``seconds``;
    returns (tokens received: chunks with content, requests finished)."""
    import httpx

    received, finished = [0], [0]
    deadline = trio.current_time() + seconds
    async with httpx.AsyncClient(base_url=base_url, timeout=120, limits=httpx.Limits(max_connections=streams + 4),
                                 headers={"Authorization": f"Bearer {api_key}"}) as http:
        async def customer(n: int) -> None:
            seed = n * 1_000_000
            while trio.current_time() < deadline:
                seed += 1
                body = {"model": RELAY_MODEL, "messages": [{"role": "user", "content": "relay me"}], "stream": True,
                        "max_tokens": max_tokens, "seed": seed}
                async with http.stream("POST", "/chat/completions", json=body) as response:
                    response.raise_for_status()
                    async for line in response.aiter_lines():
                        if line.startswith("data: {") and '"content":"' in line and '"content":""' not in line:
                            received[0] += 1
                finished[0] += 1

        async with trio.open_nursery() as nursery:
            for n in range(streams):
                nursery.start_soon(customer, n)
    return received[0], finished[0]


def relay_load(label: str, delay_ms: int, streams: int, max_tokens: int, seconds: float) -> tuple[float, int, int]:
    """(gateway CPU seconds, tokens, requests) of ``streams`` customers for ``seconds`` against a fresh gateway and
    echo node pausing ``delay_ms`` before each token; prints the line."""
    from llorch.gateway.localnet import LocalNetwork

    with tempfile.TemporaryDirectory(prefix="llorch-bench-relay-") as scratch:
        network = LocalNetwork(Path(scratch))
        try:
            network.start_gateway()
            network.start_node("echo", extra=f'engine = "echo"\nslots = 64\necho_token_delay_ms = {delay_ms}\n')
            network.wait_for_providers(1)
            assert network.gateway is not None
            pid = network.gateway.popen.pid
            trio.run(stream_for, network.base_url, network.api_key, streams, 1.0, max_tokens)     # warm up
            cpu_before, wall_before = process_cpu_s(pid), time.perf_counter()
            tokens, requests = trio.run(stream_for, network.base_url, network.api_key, streams, seconds, max_tokens)
            cpu, wall = process_cpu_s(pid) - cpu_before, time.perf_counter() - wall_before
        finally:
            network.stop()
    print(f"relay, {label}: {tokens} tokens in {requests} requests of {max_tokens} in {wall:.1f} s "
          f"({tokens / wall:.0f} tokens/s): gateway CPU {cpu:.2f} s, {cpu / max(tokens, 1) * 1000:.4f} ms per token "
          f"({cpu / wall:.0%} of one core)", flush=True)
    return cpu, tokens, requests


def relaying(seconds: float) -> list[tuple[bool, str]]:
    """Gateway CPU per streamed token (see the module's docstring, "relay")."""
    short = relay_load(f"{RELAY_STREAMS} customers, providers faster than the gateway", 0, RELAY_STREAMS,
                       RELAY_TOKENS_SHORT, seconds)
    long = relay_load(f"{RELAY_STREAMS} customers, providers faster than the gateway", 0, RELAY_STREAMS,
                      RELAY_TOKENS_LONG, seconds)
    paced = relay_load(f"{RELAY_STREAMS} customers at 100 tokens/s each (the gateway keeps up: about a frame per "
                       f"token; the baseline)", 10, RELAY_STREAMS, RELAY_TOKENS_LONG, seconds)
    per_request = [cpu / max(requests, 1) for cpu, _, requests in (short, long)]
    per_token = [tokens / max(requests, 1) for _, tokens, requests in (short, long)]
    marginal = (per_request[1] - per_request[0]) / max(per_token[1] - per_token[0], 1) * 1000
    fixed = (per_request[0] - marginal / 1000 * per_token[0]) * 1000
    whole = long[0] / max(long[1], 1) * 1000
    print(f"relay at {RELAY_STREAMS} streams, providers faster than the gateway: gateway CPU per request = "
          f"{fixed:.2f} ms + {marginal:.4f} ms per token streamed (from {RELAY_TOKENS_SHORT}- and "
          f"{RELAY_TOKENS_LONG}-token requests)", flush=True)
    return [(whole <= RELAY_CPU_PER_TOKEN_MS_MAX,
             f"relay: gateway CPU per streamed token at {RELAY_STREAMS} streams of {RELAY_TOKENS_LONG}-token answers, "
             f"providers faster than the gateway: {whole:.4f} ms <= {RELAY_CPU_PER_TOKEN_MS_MAX} ms, all its work "
             f"counted ({long[1] / seconds:.0f} tokens/s; each token adds {marginal:.4f} ms, each request "
             f"{fixed:.1f} ms); baseline, {RELAY_STREAMS} streams at 100 tokens/s: "
             f"{paced[0] / max(paced[1], 1) * 1000:.4f} ms")]


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--serve-ledgers":
        serve_ledgers(sys.argv[2], sys.argv[3], int(sys.argv[4]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--providers", type=int, default=10_000)
    parser.add_argument("--requests", type=int, default=2_000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--short", action="store_true")
    parser.add_argument("--relay-seconds", type=float, default=None, help="each relay load's length (default 20, "
                        "--short 8; 0 leaves the relay out)")
    args = parser.parse_args()
    if args.short:
        args.providers, args.requests = 2_000, 500
    verdicts = trio.run(run, args)
    verdicts.extend(witnessing(args.providers))
    relay_seconds = args.relay_seconds if args.relay_seconds is not None else \
        RELAY_SECONDS_SHORT if args.short else RELAY_SECONDS
    if relay_seconds > 0:
        verdicts.extend(relaying(relay_seconds))
    for ok, text in verdicts:
        print(("PASS " if ok else "FAIL ") + text)
    return 0 if all(ok for ok, _ in verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())
