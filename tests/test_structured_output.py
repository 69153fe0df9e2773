"""Structured output on the real engine (llama.cpp's grammar on the pinned SmolLM2), and the ticket's commitment to
it (docs/protocol.md §3: sampling.response_format).

The model is tiny and does not know what a schema is; the grammar alone makes every output parse and validate, for
every seed, and the same seed gives the same JSON on two engine instances (one determinism class)."""

from __future__ import annotations

import json

import jsonschema
import pytest
import trio
from hypothesis import given, strategies as st

from llorch.inference import catalog
from llorch.inference.engine import ANY_OBJECT, Engine, Sampling
from llorch.inference.errors import RequestError
from llorch.ledger.errors import EncodingError
from llorch.ledger.objects import check_sampling
from llorch.node.wire.structured import schema_text

ORDER = {
    "$defs": {"item": {"type": "object", "additionalProperties": False, "required": ["sku", "quantity"],
                       "properties": {"sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{3}$"},
                                      "quantity": {"type": "integer"}}}},
    "type": "object", "additionalProperties": False, "required": ["customer", "items", "status"],
    "properties": {"customer": {"type": "string", "minLength": 1, "maxLength": 16},
                   "items": {"type": "array", "items": {"$ref": "#/$defs/item"}, "minItems": 1, "maxItems": 2},
                   "status": {"enum": ["new", "paid", "shipped"]},
                   "note": {"anyOf": [{"type": "string", "maxLength": 12}, {"type": "null"}]}}}
PROMPT = {"messages": [{"role": "user", "content": "Write an order for two lamps."}]}


@pytest.fixture(scope="module")
def engines(model_path):
    return [Engine(catalog.lookup(catalog.DEFAULT_MODEL_ID), model_path, 1, 1024, 512) for _ in range(2)]


async def generate(engine: Engine, seed: int, schema: str | None, max_tokens: int = 120) -> tuple[str, str]:
    pieces: list[str] = []

    async def emit(text: str) -> None:
        pieces.append(text)

    generation = await engine.generate(engine.prepare(PROMPT, Sampling(seed, 900_000, 950_000, max_tokens, (),
                                                                       schema)), emit)
    assert "".join(pieces) == generation.text
    return generation.text, generation.finish_reason


async def test_every_seed_gives_json_that_validates_and_the_same_json_on_another_engine(engines):
    first, second = engines
    texts = set()
    for seed in range(6):
        text, finish = await generate(first, seed, schema_text(ORDER))
        assert finish == "stop", (seed, text)
        jsonschema.validate(json.loads(text), ORDER)
        assert (await generate(second, seed, schema_text(ORDER))) == (text, finish)
        texts.add(text)
    assert len(texts) > 1                                   # the seed still matters inside the grammar


async def test_json_object_gives_an_object_and_plain_text_is_unconstrained(engines):
    text, finish = await generate(engines[0], 4, ANY_OBJECT, max_tokens=300)
    assert finish == "stop" and isinstance(json.loads(text), dict)
    plain, _ = await generate(engines[0], 4, None, max_tokens=24)
    with pytest.raises(ValueError):
        json.loads(plain)


def test_a_schema_llama_cpp_cannot_build_a_grammar_from_is_refused_before_any_work(engines):
    with pytest.raises(RequestError, match="cannot build a grammar"):
        engines[0].prepare(PROMPT, Sampling(1, 0, 1_000_000, 8, (), '{"type":"string","pattern":"(unclosed"}'))


SAMPLING = {"seed": 1, "temperature_ppm": 0, "top_p_ppm": 1_000_000, "max_tokens": 8, "stop": []}


@pytest.mark.parametrize("response_format, expected", [
    ({"type": "json_object"}, None),
    ({"type": "json_schema", "schema": '{"type":"object"}'}, None),
    ({"type": "json_schema", "schema": '{"type": "object"}'}, "compact JSON form"),
    ({"type": "json_schema", "schema": '["not", "an", "object"]'}, "compact JSON form"),
    ({"type": "json_schema", "schema": "{"}, "not JSON text"),
    ({"type": "json_schema", "schema": "[" * 5000 + "]" * 5000}, "not JSON text"),
    ({"type": "json_schema", "schema": '{"a":' + '"x"' * 6000 + "}"}, "at most 16384"),
    ({"type": "json_object", "schema": "{}"}, "must be"),
    ({"type": "text"}, "must be"),
    ("json_object", "must be"),
])
def test_a_ticket_commits_to_structured_output_in_one_form(response_format, expected):
    if expected is None:
        check_sampling({**SAMPLING, "response_format": response_format})
    else:
        with pytest.raises(EncodingError, match=expected):
            check_sampling({**SAMPLING, "response_format": response_format})


async def test_penalties_change_the_output_and_stay_deterministic(engines):
    """frequency, presence and repeat penalties reach llama.cpp's sampler: the same seed gives the same text on
    two engines with them, and other text than without them."""
    first, second = engines

    async def run(engine, **penalties) -> str:
        pieces: list[str] = []

        async def emit(text: str) -> None:
            pieces.append(text)

        sampling = Sampling(5, 800_000, 950_000, 48, (), None, **penalties)
        await engine.generate(engine.prepare({"messages": [{"role": "user", "content": "Repeat: la la la la"}]},
                                             sampling), emit)
        return "".join(pieces)

    plain = await run(first)
    penalised = await run(first, frequency_penalty_ppm=1_500_000, presence_penalty_ppm=1_000_000,
                          repeat_penalty_ppm=1_300_000)
    assert penalised != plain
    assert penalised == await run(second, frequency_penalty_ppm=1_500_000, presence_penalty_ppm=1_000_000,
                                  repeat_penalty_ppm=1_300_000)


@pytest.mark.parametrize("key, value, ok", [
    ("frequency_penalty_ppm", -2_000_000, True), ("frequency_penalty_ppm", 2_000_001, False),
    ("presence_penalty_ppm", 1.5, False), ("repeat_penalty_ppm", 0, False), ("repeat_penalty_ppm", 1_200_000, True),
])
def test_a_ticket_commits_to_penalties_in_ppm(key, value, ok):
    if ok:
        check_sampling({**SAMPLING, key: value})
    else:
        with pytest.raises(EncodingError, match=key):
            check_sampling({**SAMPLING, key: value})


def test_the_api_commits_penalties_only_when_they_are_not_neutral():
    import json as json_module

    from llorch.gateway.api.openai_api import ChatRequest, parse_chat_request
    from llorch.node.wire.sampling import chat_request_sampling

    body = {"model": catalog.DEFAULT_MODEL_ID, "messages": [{"role": "user", "content": "x"}],
            "frequency_penalty": 0.5, "presence_penalty": 0, "repetition_penalty": 1.1}
    parsed = parse_chat_request(json_module.dumps(body).encode(), ChatRequest)
    assert parsed.sampling(1) == chat_request_sampling(body, 1)
    assert parsed.sampling(1)["frequency_penalty_ppm"] == 500_000 and "presence_penalty_ppm" not in parsed.sampling(1)
    assert parsed.sampling(1)["repeat_penalty_ppm"] == 1_100_000


def test_the_smallest_repetition_penalty_is_refused_or_kept_positive():
    """schemathesis sent repetition_penalty 5e-324: it rounded to 0 ppm, which no ticket may carry (a 500). The API
    refuses below one millionth, and the map never holds 0."""
    import json as json_module

    from llorch.gateway.api.openai_api import ChatRequest, parse_chat_request
    from llorch.gateway.errors import BadRequest
    from llorch.node.wire.sampling import sampling_map

    with pytest.raises(BadRequest, match="repetition_penalty"):
        parse_chat_request(json_module.dumps({"model": catalog.DEFAULT_MODEL_ID, "repetition_penalty": 5e-324,
                                              "messages": [{"role": "user", "content": "x"}]}).encode(), ChatRequest)
    check_sampling(sampling_map(1, None, None, 8, [], repetition_penalty=5e-324))


ANSWERS = [
    '{"tool_calls":[{"name":"get_weather","arguments":{"city":"Paris","unit":"celsius"}}]}',
    '{ "tool_calls" : [ { "name" : "f" , "arguments" : { "q" : "a \\" } { [" , "n" : [1, {"x": []}] } } ,'
    ' {"name": "g", "arguments": {}} ] }',
    '{"content": "It is 21 \\u00b0C and \\ud83d\\ude00 sunny, \\"clear\\"\\nbye"}',
    '{"content": "cut \\u00',
    '{"tool_calls": [{"name": "f", "arguments": {"a": "b',
]


@given(st.sampled_from(ANSWERS), st.lists(st.integers(min_value=1, max_value=7), max_size=40))
def test_an_answer_streams_in_any_pieces_as_it_reads_whole(answer, cuts):
    """However the model's answer is cut into token pieces, the deltas the gateway streams (content pieces, each
    call's name once, its arguments' pieces) assemble into exactly the non-streamed reply; nothing is said twice,
    and an escape or a surrogate pair cut between pieces is said only when whole."""
    from llorch.gateway.api.http_api import answer_deltas
    from llorch.node.wire.tools import AnswerStream, reply_of

    stream, position, deltas = AnswerStream(), 0, []
    for cut in cuts + [len(answer)]:
        deltas += answer_deltas(stream.feed(answer[position:position + cut]), "chatcmpl-x")
        position += cut
        if position >= len(answer):
            break
    content, calls = "", {}
    for delta in deltas:
        content += delta.get("content", "")
        for call in delta.get("tool_calls", []):
            entry = calls.setdefault(call["index"], {"name": "", "arguments": ""})
            entry["name"] += call["function"].get("name") or ""
            entry["arguments"] += call["function"].get("arguments") or ""
    whole_content, whole_calls = reply_of(answer)
    if whole_calls is not None:
        assert [calls[i] for i in sorted(calls)] == whole_calls and not content
    else:
        assert content == whole_content and not calls
        assert all("\ud800" > ch or ch > "\udfff" for ch in content)       # no lone surrogate


def test_the_arguments_are_what_the_model_wrote_and_parse():
    from llorch.node.wire.tools import reply_of

    _, calls = reply_of(ANSWERS[1])
    assert [json.loads(call["arguments"]) for call in calls] == [{"q": 'a " } { [', "n": [1, {"x": []}]}, {}]
