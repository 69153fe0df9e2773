"""Bursts wait instead of failing: the admission queue in a real gateway (in-process market: real libp2p hosts, real
SQLite, providers on the test-only echo engine). Before it, every request beyond the free slots got 503 "every one
is busy"."""

from __future__ import annotations

import json

import pytest
import trio

from llorch.gateway.errors import RateLimited
from llorch.node.stream_io import now_ms
from tests.helpers import MODEL_ID
from tests.inprocess import market, serving_http

BODY = {"messages": [{"role": "user", "content": "a burst"}], "max_tokens": 6}


async def test_a_burst_beyond_every_free_slot_waits_and_every_request_succeeds(tmp_path):
    async with market(tmp_path, {"a": {"delay_s": 0.01}, "b": {"delay_s": 0.01}},
                      tenants={"acme": {"max_concurrent": 64}}) as m:
        texts: dict[int, list[str]] = {}

        async def one(n: int) -> None:
            completion = await m.complete("acme", {**BODY, "seed": n % 4})
            texts.setdefault(n % 4, []).append(completion.text)

        async with trio.open_nursery() as nursery:
            for n in range(16):                       # 2 providers × 1 slot
                nursery.start_soon(one, n)
        assert sum(len(v) for v in texts.values()) == 16
        assert all(len(set(v)) == 1 for v in texts.values())       # same seed, same text, whoever served it
        assert len(m.gateway.waiting.queue) == 0
        assert await m.rows("SELECT COUNT(DISTINCT request_id) FROM tickets WHERE outcome = 'finished'") == [(16,)]
        # and no ticket was written (durably, then settled) for a provider the gateway's own requests fill
        assert await m.rows("SELECT COUNT(*) FROM tickets") == [(16,)]


async def test_a_tenants_burst_does_not_starve_another_tenant(tmp_path):
    async with market(tmp_path, {"a": {"delay_s": 0.01}},
                      tenants={"big": {"max_concurrent": 64}, "small": {"max_concurrent": 64}}) as m:
        finished: list[str] = []

        async def one(tenant: str, n: int) -> None:
            await m.complete(tenant, {**BODY, "seed": n})
            finished.append(tenant)

        async with trio.open_nursery() as nursery:
            for n in range(20):
                nursery.start_soon(one, "big", n)
            await trio.sleep(0.05)                    # big's burst is queued first
            for n in range(3):
                nursery.start_soon(one, "small", n)
        assert finished.count("small") == 3
        last_small = max(i for i, tenant in enumerate(finished) if tenant == "small")
        assert last_small < 12, finished               # served in turn, not after all of big's


async def test_a_request_not_placed_by_its_deadline_gets_429_and_is_never_sent_afterwards(tmp_path):
    async with market(tmp_path, {"a": {"stall": (1, 3.0)}}, tenants={"acme": {"max_concurrent": 8}},
                      gateway_options={"queue_timeout_ms": 500}) as m:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(m.complete, "acme", {**BODY, "seed": 1})      # holds the only slot for 3 s
            await trio.sleep(0.3)
            with pytest.raises(RateLimited) as refused:
                await m.complete("acme", {**BODY, "seed": 2}, request_id="chatcmpl-queued-too-long")
            assert refused.value.code == "queue_timeout" and refused.value.retry_after_s >= 1
            assert len(m.gateway.waiting.queue) == 0
        # The slot freed after the 429: the refused request was not placed then (no ghost work, no charge). It has
        # no ticket at all: the gateway knew its own request filled the provider's one slot.
        assert await m.rows("SELECT * FROM tickets WHERE request_id = 'chatcmpl-queued-too-long'") == []


async def test_a_customer_who_hangs_up_while_queued_leaves_the_queue_at_once(tmp_path):
    async with market(tmp_path, {"a": {"stall": (1, 3.0)}}, tenants={"acme": {"max_concurrent": 8}}) as m:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(m.complete, "acme", {**BODY, "seed": 1})
            await trio.sleep(0.3)
            with trio.move_on_after(0.5):            # the customer gives up while waiting
                await m.complete("acme", {**BODY, "seed": 2}, request_id="chatcmpl-gave-up-waiting")
            assert len(m.gateway.waiting.queue) == 0
        rows = await m.rows("SELECT accepted_ms FROM tickets WHERE request_id = 'chatcmpl-gave-up-waiting'")
        assert all(accepted is None for accepted, in rows), rows      # never placed after it left


@pytest.mark.parametrize("stream", [False, True])
async def test_a_customer_who_hangs_up_its_http_connection_while_queued_is_never_served(tmp_path, stream):
    """Over HTTP, as a customer hangs up: the connection closes while the request waits in the queue. Before, a
    non-streaming request stayed queued, was placed when the slot freed, ran on the provider and was billed to a
    customer who was gone (ghost work). It must leave the queue at once and never get a ticket."""
    async with market(tmp_path, {"a": {"stall": (1, 3.0)}}, tenants={"acme": {"max_concurrent": 8}}) as m, \
            serving_http(m.gateway) as base_url:
        api_key = await m.gateway.tenants.add("caller", "hobby", None, False, False, None, None, 8, now_ms())
        host, port = base_url.removeprefix("http://").split(":")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(m.complete, "acme", {**BODY, "seed": 1})      # holds the only slot for 3 s
            await trio.sleep(0.3)
            body = json.dumps({"model": MODEL_ID, **BODY, "seed": 2, "stream": stream}).encode()
            connection = await trio.open_tcp_stream(host, int(port))
            await connection.send_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                                      b"Authorization: Bearer " + api_key.encode() + b"\r\n"
                                      b"Content-Type: application/json\r\n"
                                      b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
            with trio.fail_after(2):
                while len(m.gateway.waiting.queue) == 0:
                    await trio.sleep(0.02)
            await connection.aclose()                                      # the customer hangs up
            with trio.fail_after(1):
                while len(m.gateway.waiting.queue) != 0:
                    await trio.sleep(0.02)
        await trio.sleep(0.5)                                              # the slot is free again by now
        assert await m.rows("SELECT request_id FROM tickets WHERE tenant = 'caller'") == []
        assert await m.rows("SELECT * FROM postings WHERE tenant = 'caller'") == []


class FailingEngine:
    """Test-only: every generation fails before its first token (engine_failed), like a provider that broke."""

    @staticmethod
    def make():
        from llorch.inference.echo import EchoEngine
        from llorch.inference.errors import EngineError

        class Failing(EchoEngine):
            async def generate(self, prepared, emit):
                raise EngineError("this test engine always fails")
        return Failing


async def test_one_provider_failing_while_the_other_is_busy_waits_for_the_busy_one_instead_of_502(tmp_path):
    """Before: with B's only slot taken and A failing (a provider that died: behind NAT, a killed node is tried
    until its attestation expires), the customer got 502 "no provider could serve the request" though B would be
    free a moment later (a CI run of tests/test_behind_nat.py found it). Now a request that found a busy provider
    waits in the admission queue for it, and is served."""
    async with market(tmp_path, {"busy": {"delay_s": 0.05}, "broken": {"engine": FailingEngine.make()}},
                      tenants={"acme": {"max_concurrent": 8}}) as m:
        served: list = []
        async with trio.open_nursery() as nursery:
            async def occupy() -> None:
                served.append(await m.complete("acme", {**BODY, "max_tokens": 20, "seed": 1}))
            nursery.start_soon(occupy)                 # holds busy's only slot for about a second
            await trio.sleep(0.2)
            served.append(await m.complete("acme", {**BODY, "seed": 2}))
        busy = m.providers["busy"].key.peer_id
        assert [completion.provider_peer_id for completion in served] == [busy, busy]
