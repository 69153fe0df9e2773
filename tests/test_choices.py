"""OpenAI's ``n``: several choices of one request, each its own ticket, seed, receipt and bill (gateway/service.py
``complete_choices``), over HTTP on the in-process market (test-only echo engines; tests/test_e2e.py has the real
model). A choice that fails leaves the others served and billed, and the customer pays for exactly what it got."""

from __future__ import annotations

import json

import httpx
import pytest

from llorch.node.stream_io import now_ms
from tests.fakes import OddSeedFailingEngine
from tests.helpers import MODEL_ID
from tests.inprocess import market, serving_http


@pytest.fixture
async def live(tmp_path, request):
    providers = getattr(request, "param", {"p1": {}, "p2": {}})
    async with market(tmp_path, providers) as built, serving_http(built.gateway) as base_url:
        api_key = await built.gateway.tenants.add("many", "hobby", None, False, False, None, None, None, now_ms())
        async with httpx.AsyncClient(base_url=base_url, headers={"Authorization": f"Bearer {api_key}"},
                                     timeout=30) as client:
            yield built, client


def chat(**fields) -> dict:
    return {"model": MODEL_ID, "messages": [{"role": "user", "content": "name a colour"}], "max_tokens": 3,
            "seed": 20, **fields}


async def billed(built, request_id: str) -> int:
    rows = await built.rows("SELECT SUM(amount) FROM postings WHERE request_id = ? AND debit = 'tenant:many'",
                            (request_id,))
    return rows[0][0] or 0


async def test_n_choices_are_n_requests_each_with_its_seed_ticket_and_bill(live):
    built, client = live
    answer = (await client.post("/v1/chat/completions", json=chat(n=3))).json()
    choices = answer["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2]
    bills = answer["llorch"]["choices"]
    assert [b["seed"] for b in bills] == [20, 21, 22] and answer["llorch"]["failed_choices"] == []
    ids = [b["request_id"] for b in bills]
    assert ids == [answer["id"], f"{answer['id']}-1", f"{answer['id']}-2"]
    for index, choice in enumerate(choices):       # choice i is what a single request with seed 20 + i gives
        single = (await client.post("/v1/chat/completions", json=chat(seed=20 + index))).json()
        assert choice["message"]["content"] == single["choices"][0]["message"]["content"]
    assert len({c["message"]["content"] for c in choices}) == 3
    receipts = await built.rows(f"SELECT COUNT(*) FROM receipts WHERE request_id IN ({','.join('?' * 3)})",
                                tuple(ids))
    assert receipts == [(3,)]
    assert [await billed(built, i) for i in ids] == [b["amount"] for b in bills]
    usage = answer["usage"]
    assert usage["completion_tokens"] == 9 and usage["total_tokens"] == usage["prompt_tokens"] + 9


async def test_n_choices_stream_interleaved_with_their_indexes(live):
    built, client = live
    plain = (await client.post("/v1/chat/completions", json=chat(n=2))).json()
    texts, finishes, bills = ["", ""], {}, {}
    async with client.stream("POST", "/v1/chat/completions",
                             json=chat(n=2, stream=True, stream_options={"include_usage": True})) as response:
        usage = None
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            assert "error" not in chunk, chunk
            usage = chunk.get("usage") or usage
            for choice in chunk["choices"]:
                texts[choice["index"]] += choice["delta"].get("content") or ""
                if choice["finish_reason"]:
                    finishes[choice["index"]] = choice["finish_reason"]
                    bills[choice["index"]] = chunk["llorch"]["seed"]
    assert texts == [c["message"]["content"] for c in plain["choices"]]
    assert finishes == {0: "length", 1: "length"} and bills == {0: 20, 1: 21}
    assert usage["completion_tokens"] == 6


@pytest.mark.parametrize("live", [{"odd_fails": {"engine": OddSeedFailingEngine}}], indirect=True)
async def test_a_failed_choice_leaves_the_others_served_and_billed_for_exactly_what_was_served(live):
    built, client = live
    answer = (await client.post("/v1/chat/completions", json=chat(n=3))).json()     # seeds 20, 21, 22
    assert [c["index"] for c in answer["choices"]] == [0, 2]
    (failed,) = answer["llorch"]["failed_choices"]
    assert failed["index"] == 1 and failed["code"] and "odd seed" in failed["message"]
    bills = answer["llorch"]["choices"]
    assert bills[1] is None
    charged = await built.rows("SELECT COALESCE(SUM(amount), 0) FROM postings WHERE debit = 'tenant:many'")
    assert charged == [(bills[0]["amount"] + bills[2]["amount"],)]
    assert answer["usage"]["completion_tokens"] == 6
    streamed = []
    async with client.stream("POST", "/v1/chat/completions", json=chat(n=2, stream=True)) as response:
        async for line in response.aiter_lines():
            if line.startswith("data: {"):
                streamed.append(json.loads(line[6:]))
    assert "choice 1 of 2 failed" in streamed[-1]["error"]["message"]          # after choice 0 ended
    assert any(c["choices"] and c["choices"][0]["finish_reason"] == "length" for c in streamed[:-1])
    alone = await client.post("/v1/chat/completions", json=chat(seed=21, n=1))
    assert alone.status_code >= 500 and "odd seed" in alone.json()["error"]["message"]


async def test_more_choices_than_the_limit_is_a_400(live):
    built, client = live
    response = await client.post("/v1/chat/completions", json=chat(n=9))
    assert response.status_code == 400 and response.json()["error"]["param"] == "n"
    assert await built.rows("SELECT COUNT(*) FROM tickets") == [(0,)]
