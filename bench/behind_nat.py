"""Customers' view of two home-lab nodes behind NAT, with and without slow lossy public links.

Builds the small internet of tests/small_internet.py twice, side by side (as root: network namespaces, nftables
routers): one with plain links, one with ``--delay-ms`` each way and ``--loss-ppm`` per direction on both routers'
public links (the defaults give an 80 ms round trip and 1% loss, what tests/test_behind_nat.py checks in short). Each
runs a gateway and two nodes on the real model; a customer on each public side sends ``--rounds`` streamed requests
with the unmodified ``openai`` client, alternating between the two, and the bench prints per node the median time to
first token (TTFT) and tokens/s. Both use the same seeds, and every seed must give one text on both and either node.

    sudo .venv/bin/python bench/behind_nat.py [--rounds 8] [--max-tokens 128] [--delay-ms 40] [--loss-ppm 10000]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

import openai

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llorch.gateway.localnet import LocalNetwork  # noqa: E402
from llorch.inference import catalog  # noqa: E402
from tests.small_internet import (Served, SmallInternet, slow_links_unavailable_reason, start_market,  # noqa: E402
                                  stream_chat, unavailable_reason)

MODEL = catalog.DEFAULT_MODEL_ID
MESSAGES = [{"role": "user", "content": "Tell me a long story about a lighthouse keeper."}]
FIRST_SEED = 7


class Market:
    """One topology with its gateway and two nodes, and a customer on its public side."""

    def __init__(self, stack: ExitStack, delay_ms: int, loss_ppm: int) -> None:
        self.internet = stack.enter_context(SmallInternet(delay_ms=delay_ms, loss_ppm=loss_ppm))
        self.net = LocalNetwork(stack.enter_context(tempfile.TemporaryDirectory(prefix="llorch-bench-nat-")))
        stack.callback(self.net.stop)
        start_market(self.internet, self.net)
        self.names = {process.state()["peer_id"]: process.name for process in self.net.nodes}
        self.client = openai.OpenAI(base_url=self.net.base_url, api_key=self.net.api_key, max_retries=0,
                                    timeout=300)
        self.served: dict[str, list[Served]] = {name: [] for name in self.names.values()}

    def request(self, seed: int, max_tokens: int) -> None:
        served = stream_chat(self.internet, self.client, MODEL, MESSAGES, seed, max_tokens)
        self.served[self.names[served.provider]].append(served)


def report(title: str, by_node: dict[str, list[Served]]) -> None:
    print(title)
    for name, served in sorted(by_node.items()):
        if not served:
            print(f"  node {name}: served nothing")
            continue
        print(f"  node {name}: {len(served)} requests, {statistics.median(s.tokens for s in served):.0f} tokens, "
              f"TTFT median {statistics.median(s.ttft_s for s in served) * 1000:6.0f} ms "
              f"(max {max(s.ttft_s for s in served) * 1000:.0f}), "
              f"{statistics.median(s.tokens_per_s for s in served):5.1f} tokens/s median")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--delay-ms", type=int, default=40, help="one-way delay on each public link")
    parser.add_argument("--loss-ppm", type=int, default=10_000, help="packets lost per million, each direction")
    args = parser.parse_args()
    reason = unavailable_reason() or slow_links_unavailable_reason()
    if reason:
        sys.exit(f"cannot run: {reason}")
    catalog.fetch(catalog.lookup(MODEL), log=lambda message: None)

    with ExitStack() as stack:
        # Both at once (the same addresses, in separate namespaces), requests interleaved round by round, so the
        # machine's noise hits both alike.
        plain, slow = Market(stack, 0, 0), Market(stack, args.delay_ms, args.loss_ppm)
        for market in (plain, slow):
            stream_chat(market.internet, market.client, MODEL, MESSAGES, FIRST_SEED - 1, 8)      # warm-up
        for seed in range(FIRST_SEED, FIRST_SEED + args.rounds):
            plain.request(seed, args.max_tokens)
            slow.request(seed, args.max_tokens)

    texts: dict[int, set[str]] = {}
    for served in [s for node in (*plain.served.values(), *slow.served.values()) for s in node]:
        texts.setdefault(served.seed, set()).add(served.text)
    differing = sorted(seed for seed, variants in texts.items() if len(variants) > 1)
    print(f"{args.rounds} streamed requests to each topology, up to {args.max_tokens} tokens, 1 thread per node, "
          f"timed by the customer on the public side")
    report("plain links:", plain.served)
    report(f"public links {2 * args.delay_ms} ms round trip, {args.loss_ppm / 10_000:g}% loss each way:", slow.served)
    print("determinism: every seed gave one text in both topologies and on either node" if not differing
          else f"determinism BROKEN for seeds {differing}")
    sys.exit(1 if differing else 0)


if __name__ == "__main__":
    main()
