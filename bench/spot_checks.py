"""Detection figures for spot-checks (docs/verification.md §3): for each test-only cheating engine, how many of its
own requests a provider serves before a spot-check catches it, over several seeds of the gateway's draw, against the
formula n(P) = ln(1 - P) / ln(1 - p·q). In-process market (real libp2p and SQLite, echo engines), three providers of
which one cheats. Then the cost: three honest providers at the default rate (2%), --cost-requests requests, and the
platform's spot-check legs as a share of the fees it earned on them, measured from the postings.

Then (--lazy-runs N) a lazy cheater (<= 5 tokens, signed "stop") on three 1-slot providers kept busy by 3 clients
(tests/test_spot_checks.py catch_a_lazy_cheater_under_load): over N seeds, the requests it served before it was
caught against n(99.9%), and the draws' outcomes (none may be dropped, expired or undecided).

    .venv/bin/python bench/spot_checks.py [--rate-ppm 500000] [--runs 5] [--cost-requests 1000]
    .venv/bin/python bench/spot_checks.py --runs 0 --cost-requests 0 --lazy-runs 100
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import tempfile
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.cheaters import OtherModelEngine, ResamplingEngine, SometimesEngine, TruncatingEngine  # noqa: E402
from tests.inprocess import market  # noqa: E402
from tests.test_spot_checks import catch_a_lazy_cheater_under_load, serve_until_suspended  # noqa: E402

CHEATERS = {"another model": (OtherModelEngine, 1.0), "truncates": (TruncatingEngine, 1.0),
            "changes sampling": (ResamplingEngine, 1.0), "cheats on 10%": (SometimesEngine, 0.1)}


async def one(kind: str, rate_ppm: int, seed: int) -> tuple[int, int]:
    engine, _ = CHEATERS[kind]
    with tempfile.TemporaryDirectory() as workdir:
        providers = {"honest1": {}, "cheater": {"engine": engine}, "honest2": {}}
        async with market(Path(workdir), providers, {"acme": {"spot_checks": True}},
                          {"spot_check_rate_ppm": rate_ppm}) as m, trio.open_nursery() as nursery:
            nursery.start_soon(m.attest_forever)
            m.gateway.spot_checks.rng = random.Random(seed)
            sent, served, _ = await serve_until_suspended(m, m.providers["cheater"], 3_000)
            nursery.cancel_scope.cancel()
            return sent, served


async def cost(requests: int) -> tuple[int, int, int]:
    """(spot-check legs in minor units, fee legs, re-runs) over ``requests`` honest requests at the default rate."""
    from llorch.gateway.config import GatewayConfig
    from llorch.gateway.spot_checks import PLATFORM_LEG

    with tempfile.TemporaryDirectory() as workdir:
        providers = {"honest1": {}, "honest2": {}, "honest3": {}}
        async with market(Path(workdir), providers, {"acme": {"spot_checks": True}},
                          {"spot_check_rate_ppm": GatewayConfig.spot_check_rate_ppm}) as m, \
                trio.open_nursery() as nursery:
            nursery.start_soon(m.attest_forever)
            m.gateway.spot_checks.rng = random.Random(7)
            for seed in range(requests):
                await m.complete("acme", {"messages": [{"role": "user", "content": f"question {seed}"}],
                                          "max_tokens": 8, "seed": seed})
            await m.gateway.spot_checks.wait_idle()
            checks = (await m.rows("SELECT COALESCE(SUM(amount), 0), COUNT(*) FROM postings WHERE leg = ?",
                                   (PLATFORM_LEG,)))[0]
            fees = (await m.rows("SELECT COALESCE(SUM(amount), 0) FROM postings WHERE leg = 'fee'"))[0][0]
            nursery.cancel_scope.cancel()
            return checks[0], fees, checks[1]


def lazy(rate_ppm: int, runs: int) -> None:
    """The lazy cheater under steady load over ``runs`` seeds: PASS when every run caught it within n(99.9%)."""
    bound = math.ceil(math.log(1e-3) / math.log(1 - rate_ppm / 1e6))
    served, outcomes = [], {"sampled": 0, "clean": 0, "suspects": 0, "dropped": 0, "expired": 0, "undecided": 0}

    async def one_run(seed: int) -> None:
        with tempfile.TemporaryDirectory() as workdir:
            stats, by_cheater, _ = await catch_a_lazy_cheater_under_load(Path(workdir), seed, rate_ppm)
        served.append(len(by_cheater))
        for name in outcomes:
            outcomes[name] += getattr(stats, name)

    for seed in range(runs):
        trio.run(one_run, seed)
    verdict = "PASS" if max(served) <= bound else "FAIL"
    print(f"lazy cheater, 3 clients on 3 x 1 slot, p={rate_ppm / 1e6:.0%}, {runs} seeds: served {min(served)}.."
          f"{max(served)} of its requests before it was caught (median {sorted(served)[len(served) // 2]}), bound "
          f"n(99.9%)={bound}: {verdict}; draws {outcomes}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate-ppm", type=int, default=500_000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--cost-requests", type=int, default=1000)
    parser.add_argument("--lazy-runs", type=int, default=0)
    args = parser.parse_args()
    if args.lazy_runs:
        lazy(args.rate_ppm, args.lazy_runs)
    p = args.rate_ppm / 1e6
    for kind, (_, q) in CHEATERS.items() if args.runs else ():
        served = [trio.run(one, kind, args.rate_ppm, seed)[1] for seed in range(args.runs)]
        n50, n99 = (math.ceil(math.log(1 - P) / math.log(1 - p * q)) for P in (0.5, 0.99))
        print(f"{kind:18s} p={p:.0%} q={q:.0%}: caught after serving {sorted(served)} of its requests "
              f"(median {sorted(served)[len(served) // 2]}); formula n(50%)={n50}, n(99%)={n99}", flush=True)
    if args.cost_requests:
        checks, fees, reruns = trio.run(cost, args.cost_requests)
        print(f"cost at the default rate: {reruns} re-runs over {args.cost_requests} honest requests cost the platform "
              f"{checks} minor units against {fees} in fees earned: {checks / fees:.1%} of fees", flush=True)


if __name__ == "__main__":
    main()
