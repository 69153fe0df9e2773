"""A burst as a customer makes one, with the unmodified `openai` SDK: 64 concurrent streaming requests against a
network of two real nodes (the real model, one slot and one thread each on this 2-core machine). Before the
admission queue, everything beyond the two free slots got 503 even after the SDK's own retries."""

from __future__ import annotations

import time

import openai
import pytest
import trio

from llorch.gateway.localnet import LocalNetwork
from tests.helpers import MODEL_ID

pytestmark = pytest.mark.e2e
BURST = 64


def test_64_concurrent_streams_on_two_single_slot_nodes_all_succeed_and_same_seeds_agree(tmp_path, model_path):
    net = LocalNetwork(tmp_path)
    try:
        net.start_gateway(extra="queue_timeout_ms = 300000\n")
        net.start_node("n1", threads=1)
        net.start_node("n2", threads=1)
        net.wait_for_providers(2)
        client = openai.AsyncOpenAI(base_url=net.base_url, api_key=net.api_key, max_retries=0, timeout=600)
        results: dict[int, tuple[str, str, float]] = {}

        async def one(n: int) -> None:
            started = time.monotonic()
            stream = await client.chat.completions.with_raw_response.create(
                model=MODEL_ID, messages=[{"role": "user", "content": "Name a colour."}], max_tokens=6,
                seed=n % 8, temperature=0.8, stream=True)
            provider = stream.headers["x-llorch-provider"]
            text = "".join([chunk.choices[0].delta.content or "" async for chunk in stream.parse()
                            if chunk.choices])
            results[n] = (text, provider, time.monotonic() - started)

        async def burst() -> None:
            async with trio.open_nursery() as nursery:
                for n in range(BURST):
                    nursery.start_soon(one, n)

        trio.run(burst)
        assert len(results) == BURST
        by_seed: dict[int, set[str]] = {}
        for n, (text, _, _) in results.items():
            by_seed.setdefault(n % 8, set()).add(text)
        assert all(len(texts) == 1 for texts in by_seed.values()), by_seed       # whichever node served it
        providers = {provider for _, provider, _ in results.values()}
        assert len(providers) == 2
        waits = sorted(seconds for _, _, seconds in results.values())
        print(f"\n{BURST} streams: p50 {waits[len(waits) // 2]:.1f} s, p99 {waits[-1]:.1f} s end to end")
    finally:
        net.stop()
