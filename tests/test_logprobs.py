"""logprobs / top_logprobs (chat) and logprobs (completions): committed in the ticket (sampling.logprobs), carried
in tokens frames, committed in the receipt (logprobs_sha256) and so covered by spot-checks like the text. Each
defect a provider could commit is played by a test-only engine (tests/cheaters.py) on the in-process market; the
real engine's logprobs are checked in tests/test_e2e.py."""

from __future__ import annotations

import httpx
import pytest
import trio

from llorch.gateway.api.http_api import chat_logprobs, completion_logprobs
from llorch.inference import limits as inference_limits
from llorch.ledger import objects
from llorch.ledger.errors import EncodingError
from llorch.ledger.objects import Receipt, check_logprobs_entry, logprobs_sha256
from llorch.node.errors import ProtocolError
from llorch.node.stream_io import now_ms
from llorch.node.wire.frames import Tokens, decode_frame, decode_uvarint, encode_frame
from tests.cheaters import (HeldBackLogprobEngine, LogprobFakingEngine, LogprobOmittingEngine,
                            LogprobRewritingEngine)
from tests.helpers import MODEL_ID
from tests.inprocess import market, serving_http
from tests.test_spot_checks import ALL_PPM, CONSENTING, check_exported_evidence

ENTRY = {"token": b" blue", "logprob": -120_000, "top": [[b" blue", -120_000], [b" red", -2_500_000]]}


def test_a_tokens_frame_carries_logprobs_only_in_their_documented_shape():
    frame = Tokens(3, [" blue", " sky"], [ENTRY, {**ENTRY, "token": b" sky"}])
    encoded = encode_frame(frame)
    _, prefix = decode_uvarint(encoded)
    assert decode_frame(encoded[prefix:]) == frame
    plain = Tokens(4, ["x"])
    assert b"logprobs" not in encode_frame(plain) and decode_frame(encode_frame(plain)[1:]) == plain
    for bad in ({**ENTRY, "logprob": 5},                                   # a probability above 1
                {**ENTRY, "top": [[b" red", -2_500_000], [b" blue", -120_000]]},   # not most likely first
                {**ENTRY, "token": b"x" * 257},                            # not a token
                {**ENTRY, "logprob": -120_000.5},                          # a float
                {**ENTRY, "extra": 1},
                {**ENTRY, "top": [[b"a", -1]] * 21}):                       # more than 20 alternatives
        with pytest.raises(ProtocolError):
            Tokens(0, [""], [bad])
    with pytest.raises(ProtocolError, match="one entry per text"):
        Tokens(0, ["a", "b"], [ENTRY])
    with pytest.raises(EncodingError, match="exactly the ticket's sampling.logprobs"):
        check_logprobs_entry(ENTRY, 3)
    assert objects.LOGPROB_MICRO_MIN == inference_limits.LOGPROB_MICRO_MIN
    assert objects.LOGPROB_TOKEN_BYTES_MAX == inference_limits.LOGPROB_TOKEN_BYTES_MAX


def test_a_nil_optional_field_is_not_a_frame():
    body = bytearray(encode_frame(Tokens(0, ["a"]))[1:])
    # {"index": 0, "t": "tokens", "texts": ["a"]} with "logprobs": nil added in key order is not canonical-free of nil
    import msgpack
    tampered = msgpack.packb({"index": 0, "logprobs": None, "t": "tokens", "texts": ["a"]})
    with pytest.raises(ProtocolError, match="absent, never nil"):
        decode_frame(tampered)
    assert decode_frame(bytes(body)) == Tokens(0, ["a"])


def test_sampling_logprobs_is_bounded():
    from llorch.ledger.objects import check_sampling
    base = {"seed": 1, "temperature_ppm": 0, "top_p_ppm": 1, "max_tokens": 2, "stop": []}
    check_sampling({**base, "logprobs": 20})
    for bad in (21, -1, True):
        with pytest.raises(EncodingError, match="sampling.logprobs"):
            check_sampling({**base, "logprobs": bad})


def body(seed: int, **fields) -> dict:
    return {"messages": [{"role": "user", "content": f"how sure are you, {seed}?"}], "max_tokens": 5, "seed": seed,
            **fields}


async def test_the_customer_gets_every_tokens_logprobs_and_the_receipt_commits_to_them(tmp_path):
    async with market(tmp_path, {"p1": {}}) as m:
        completion = await m.complete("acme", body(1, logprobs=True, top_logprobs=2))
        assert len(completion.logprobs) == 5 == completion.receipt.tokens_out
        assert all(len(entry["top"]) == 2 for entry in completion.logprobs)
        assert completion.receipt.logprobs_sha256 == logprobs_sha256(list(completion.logprobs))
        plain = await m.complete("acme", body(1))
        assert plain.logprobs == () and plain.receipt.logprobs_sha256 is None
        assert plain.text == completion.text                 # logprobs change nothing of the text


async def test_a_provider_that_ignores_logprobs_is_a_failed_attempt_and_another_serves(tmp_path):
    providers = {"omits": {"engine": LogprobOmittingEngine}, "honest": {}}
    async with market(tmp_path, providers) as m:
        served = [await m.complete("acme", body(seed, logprobs=True)) for seed in range(1, 5)]
        assert all(c.provider_peer_id == m.providers["honest"].key.peer_id for c in served)
        assert all(len(c.logprobs) == c.receipt.tokens_out for c in served)


async def test_a_receipt_that_commits_to_other_logprobs_than_streamed_is_rejected(tmp_path):
    providers = {"rewrites": {"engine": LogprobRewritingEngine}, "honest": {}}
    async with market(tmp_path, providers) as m:
        served = [await m.complete("acme", body(seed, logprobs=True)) for seed in range(1, 5)]
        assert all(c.provider_peer_id == m.providers["honest"].key.peer_id for c in served)
        rewriter = m.providers["rewrites"].key.public_key
        billed = await m.rows("SELECT COUNT(*) FROM receipts WHERE provider_key = ?", (rewriter,))
        assert billed == [(0,)]


async def test_made_up_logprobs_are_caught_by_a_spot_check(tmp_path):
    providers = {"honest1": {}, "cheater": {"engine": LogprobFakingEngine}, "honest2": {}}
    async with market(tmp_path, providers, CONSENTING, {"spot_check_rate_ppm": ALL_PPM}) as m:
        cheater = m.providers["cheater"]
        for seed in range(1, 7):
            await m.complete("acme", body(seed, logprobs=True, top_logprobs=1))
            await m.gateway.spot_checks.wait_idle()
            if (await m.gateway.providers.get(cheater.key.peer_id)).status == "suspended":
                break
        assert (await m.gateway.providers.get(cheater.key.peer_id)).status == "suspended"
        await check_exported_evidence(m, tmp_path, cheater)


def test_openai_shapes_of_the_entries():
    chat = chat_logprobs([ENTRY])
    assert chat == {"content": [{"token": " blue", "logprob": -0.12, "bytes": list(b" blue"),
                                 "top_logprobs": [{"token": " blue", "logprob": -0.12, "bytes": list(b" blue")},
                                                  {"token": " red", "logprob": -2.5, "bytes": list(b" red")}]}],
                    "refusal": None}
    text = completion_logprobs([ENTRY, {**ENTRY, "token": b" sky"}], 10)
    assert text == {"tokens": [" blue", " sky"], "token_logprobs": [-0.12, -0.12],
                    "top_logprobs": [{" blue": -0.12, " red": -2.5}, {" blue": -0.12, " red": -2.5}],
                    "text_offset": [10, 15]}


@pytest.fixture
async def live(tmp_path):
    async with market(tmp_path, {"p1": {}}) as built, serving_http(built.gateway) as base_url:
        api_key = await built.gateway.tenants.add("lp", "hobby", None, False, False, None, None, None, now_ms())
        async with httpx.AsyncClient(base_url=base_url, headers={"Authorization": f"Bearer {api_key}"},
                                     timeout=30) as client:
            yield built, client


async def test_logprobs_over_http_streamed_and_not(live):
    built, client = live
    request = {"model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "seed": 3,
               "logprobs": True, "top_logprobs": 2}
    answer = (await client.post("/v1/chat/completions", json=request)).json()
    content = answer["choices"][0]["logprobs"]["content"]
    assert len(content) == 4 and all(len(item["top_logprobs"]) == 2 for item in content)
    assert "".join(item["token"] for item in content) == answer["choices"][0]["message"]["content"]
    streamed = []
    async with client.stream("POST", "/v1/chat/completions", json={**request, "stream": True}) as response:
        async for line in response.aiter_lines():
            if line.startswith("data: {"):
                import json
                for choice in json.loads(line[6:])["choices"]:
                    streamed += (choice.get("logprobs") or {}).get("content") or []
    assert streamed == content
    text = (await client.post("/v1/completions", json={"model": MODEL_ID, "prompt": "one two", "max_tokens": 3,
                                                       "seed": 3, "logprobs": 2})).json()
    lp = text["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == 3 and all(len(top) == 2 for top in lp["top_logprobs"])
    assert lp["text_offset"][0] == 0


@pytest.mark.parametrize("fields, message", [
    ({"top_logprobs": 2}, "top_logprobs needs logprobs"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"logprobs": True, "tools": [{"type": "function", "function": {"name": "f"}}]}, "logprobs and tools"),
])
async def test_logprobs_requests_the_gateway_cannot_serve_are_400s(live, fields, message):
    built, client = live
    request = {"model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **fields}
    response = await client.post("/v1/chat/completions", json=request)
    assert response.status_code == 400 and message in response.json()["error"]["message"], response.text
    assert (await built.rows("SELECT COUNT(*) FROM tickets")) == [(0,)]


def test_a_receipt_without_logprobs_has_exactly_its_old_fields():
    assert "logprobs_sha256" not in Receipt.FIELDS and Receipt.OPTIONAL_FIELDS == {"logprobs_sha256": "hash"}


async def test_a_customer_gone_between_the_held_back_text_and_the_final_frame_still_gets_the_receipt_kept(tmp_path):
    """With logprobs the frame of held-back text waits for the final frame before it is relayed; a customer who hangs
    up in between must not make the gateway check the receipt against text missing that frame (it would reject an
    honest receipt and leave the provider unpaid)."""

    async with market(tmp_path, {"held": {"engine": HeldBackLogprobEngine}}) as m:
        seen: list[str] = []
        scope = trio.CancelScope()

        async def hang_up_later() -> None:
            await trio.sleep(HeldBackLogprobEngine.FINAL_AFTER_S / 2)     # the held-back frame has arrived by now
            scope.cancel()

        async with trio.open_nursery() as nursery:
            async def on_text(pieces: list, provider: str) -> None:
                hung_up = len(seen) >= 4
                seen.extend(text for text, _ in pieces)
                if len(seen) >= 4 and not hung_up:     # every visible piece of 5 tokens (the last is held back)
                    nursery.start_soon(hang_up_later)

            with scope:
                await m.complete("acme", body(1, logprobs=True, max_tokens=5), on_text)
        assert scope.cancelled_caught and "".join(seen) == "w1-0 w1-1 w1-2 w1-3 ", seen   # not the held-back text
        rows = await m.rows("SELECT COUNT(*) FROM receipts")
        assert rows == [(1,)]                          # the honest receipt was accepted and kept
