"""End to end: one gateway and two provider nodes as separate OS processes started through the `llorch` CLI,
real libp2p on loopback, real llama.cpp on the pinned SmolLM2 model, real SQLite; the customer is the `openai` SDK.
"""

import json
import signal
import sqlite3
import subprocess
import sys
import time

import httpx
import openai
import pytest

from llorch.gateway.localnet import LocalNetwork
from llorch.ledger.note import verify_cosignature
from llorch.ledger.objects import Receipt
from llorch.ledger.signing import public_key_of_peer_id
from llorch.ledger.verify import read_sqlite_entries

pytestmark = pytest.mark.e2e

MODEL = "smollm2-135m-instruct-q4_1"
MESSAGES = [{"role": "user", "content": "Name three colours of the rainbow."}]


@pytest.fixture(scope="module")
def network(tmp_path_factory, model_path):
    net = LocalNetwork(tmp_path_factory.mktemp("net"))
    try:
        net.start_gateway()
        net.start_node("node1", threads=1)
        net.start_node("node2", threads=1)
        net.wait_for_providers(2)
        yield net
    finally:
        net.stop()


@pytest.fixture(scope="module")
def client(network):
    return openai.OpenAI(base_url=network.base_url, api_key=network.api_key, max_retries=0, timeout=120)


def chat(client, seed=1234, **extra):
    response = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=MESSAGES, seed=seed, max_tokens=40, temperature=0.9, **extra)
    return response.parse(), response.headers["x-llorch-provider"]


def ledger_receipts(network, node_name):
    path = network.workdir / f"{node_name}.ledger.sqlite"
    return {Receipt.from_envelope(entry).request_id: Receipt.from_envelope(entry)
            for entry in read_sqlite_entries(path)}


def test_models_lists_the_default_model(client):
    assert [model.id for model in client.models.list()] == [MODEL]


def test_non_streaming_completion(client):
    completion, provider = chat(client)
    text = completion.choices[0].message.content
    assert text.strip()
    assert completion.usage.completion_tokens > 0 and completion.usage.prompt_tokens > 0
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + completion.usage.completion_tokens
    assert completion.choices[0].finish_reason in ("stop", "length")
    assert completion.system_fingerprint.startswith("llama-cpp-python/")
    assert provider.startswith("12D3KooW")


def test_streaming_gives_the_same_text_as_non_streaming(client):
    reference, _ = chat(client, seed=77)
    stream = client.chat.completions.create(model=MODEL, messages=MESSAGES, seed=77, max_tokens=40, temperature=0.9,
                                            stream=True, stream_options={"include_usage": True})
    pieces, usage, finish = [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    assert "".join(pieces) == reference.choices[0].message.content
    assert usage is not None and usage.completion_tokens == reference.usage.completion_tokens
    assert finish == reference.choices[0].finish_reason


def test_same_seed_is_byte_identical_whichever_provider_serves(client, network):
    results = [chat(client, seed=2024) for _ in range(4)]
    providers = {provider for _, provider in results}
    texts = {completion.choices[0].message.content.encode() for completion, _ in results}
    assert len(providers) == 2, "placement should spread equal providers; both must have served"
    assert len(texts) == 1
    other_seed, _ = chat(client, seed=2025)
    assert other_seed.choices[0].message.content.encode() not in texts


def test_every_request_has_a_receipt_in_the_serving_nodes_ledger(client, network):
    served = [chat(client, seed=seed) for seed in (5, 6, 7)]
    by_node = {network.nodes[i].state()["peer_id"]: ledger_receipts(network, f"node{i + 1}") for i in range(2)}
    for completion, provider in served:
        receipt = by_node[provider][completion.id]
        assert receipt.tokens_out == completion.usage.completion_tokens
        assert receipt.tokens_in == completion.usage.prompt_tokens
        assert receipt.seed == completion.model_extra["llorch"]["seed"]
        assert receipt.amount == completion.model_extra["llorch"]["provider_amount"]
        assert completion.model_extra["llorch"]["amount"] >= receipt.amount          # payout + platform fee
        others = [receipts for peer, receipts in by_node.items() if peer != provider]
        assert all(completion.id not in receipts for receipts in others)


def test_ledger_verify_passes_then_names_the_entry_after_a_byte_flip(client, network, tmp_path):
    chat(client, seed=99)
    for name in ("node1", "node2"):
        snapshot = tmp_path / f"{name}.sqlite"
        source = sqlite3.connect(network.workdir / f"{name}.ledger.sqlite")
        with sqlite3.connect(snapshot) as destination:
            source.backup(destination)
        source.close()
        command = [sys.executable, "-m", "llorch.gateway", "ledger", "verify", str(snapshot)]
        passed = subprocess.run(command, capture_output=True, text=True)
        assert passed.returncode == 0, passed.stderr
        entries = list(read_sqlite_entries(snapshot))
        assert entries, f"{name} served nothing"
        victim = len(entries) - 1
        raw = bytearray(snapshot.read_bytes())
        position = raw.find(entries[victim][-16:])
        assert position > 0
        raw[position] ^= 0x80
        snapshot.write_bytes(bytes(raw))
        failed = subprocess.run(command, capture_output=True, text=True)
        assert failed.returncode == 1
        assert f"entry {victim}" in failed.stderr and "LV03" in failed.stderr, failed.stderr


def test_the_gateway_witnesses_and_cosigns_each_providers_ledger(client, network, tmp_path):
    for seed in (301, 302, 303, 304):
        chat(client, seed=seed)
    deadline = time.monotonic() + 30
    witness = f"llorch-witness/{network.gateway.state()['peer_id']}"
    for i, node in enumerate(network.nodes):
        ledger_path = network.workdir / f"node{i + 1}.ledger.sqlite"
        provider_key = public_key_of_peer_id(node.state()["peer_id"])
        while True:        # the witness runs every second; wait until it has caught up with this node's ledger
            entries = list(read_sqlite_entries(ledger_path))
            with sqlite3.connect(network.workdir / "gateway.sqlite") as gateway_db:
                row = gateway_db.execute("SELECT size, note FROM witnessed WHERE provider_key = ?",
                                         (provider_key,)).fetchone()
            if row and row[0] == len(entries):
                break
            assert time.monotonic() < deadline, f"node{i + 1}: witness at {row and row[0]}, ledger at {len(entries)}"
            time.sleep(0.5)
        size, cosigned = row
        verify_cosignature(cosigned, witness, public_key_of_peer_id(network.gateway.state()["peer_id"]))
        held = tmp_path / f"node{i + 1}.checkpoint"
        held.write_bytes(cosigned)
        result = subprocess.run([sys.executable, "-m", "llorch.gateway", "ledger", "verify", str(ledger_path),
                                 "--checkpoint", str(held), "--json"], capture_output=True, text=True)
        report = json.loads(result.stdout)
        assert result.returncode == 0 and report["held_checkpoint_size"] == size, result.stdout
        with sqlite3.connect(ledger_path) as node_db:       # the provider keeps the cosigned copy too
            assert node_db.execute("SELECT COUNT(*) FROM cosigned").fetchone()[0] >= 1


def test_text_completions_streaming_and_not(client, network):
    prompt = "The three primary colours are"
    plain = client.completions.create(model=MODEL, prompt=prompt, seed=5, max_tokens=12, temperature=0.7)
    assert plain.object == "text_completion" and plain.choices[0].text and plain.usage.completion_tokens > 0
    streamed = client.completions.create(model=MODEL, prompt=prompt, seed=5, max_tokens=12, temperature=0.7,
                                         stream=True)
    assert "".join(chunk.choices[0].text for chunk in streamed if chunk.choices) == plain.choices[0].text
    chat_text = chat(client, seed=5)[0].choices[0].message.content
    assert chat_text != plain.choices[0].text          # the chat template is not applied to a raw prompt


def test_every_response_has_a_request_id(network):
    for response in (httpx.get(f"{network.http_url}/healthz"), httpx.get(f"{network.base_url}/models"),
                     httpx.post(f"{network.base_url}/chat/completions", json={})):
        assert response.headers["x-request-id"]
    ok = httpx.post(f"{network.base_url}/chat/completions", headers={"Authorization": f"Bearer {network.api_key}"},
                    json={"model": MODEL, "messages": MESSAGES, "max_tokens": 2}, timeout=60)
    assert ok.headers["x-request-id"] == ok.json()["id"]


@pytest.mark.parametrize("body, status, code", [
    ({"model": "gpt-17", "messages": MESSAGES}, 404, "model_not_found"),
    ({"model": MODEL}, 400, "invalid_request"),
    ({"model": MODEL, "messages": MESSAGES, "temperature": 5}, 400, "invalid_request"),
    ({"model": MODEL, "messages": MESSAGES, "n": 9}, 400, "invalid_request"),
    ({"model": MODEL, "messages": MESSAGES, "max_tokens": 0}, 400, "invalid_request"),
    ({"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}, 400, "invalid_request"),
    ({"model": MODEL, "messages": MESSAGES, "logit_bias": {"1": 5}}, 400, "invalid_request"),
])
def test_bad_requests_get_openai_shaped_errors(network, body, status, code):
    response = httpx.post(f"{network.base_url}/chat/completions", json=body,
                          headers={"Authorization": f"Bearer {network.api_key}"}, timeout=30)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and error["message"]


def test_malformed_json_and_oversized_bodies_are_400(network):
    headers = {"Authorization": f"Bearer {network.api_key}", "Content-Type": "application/json"}
    bad_json = httpx.post(f"{network.base_url}/chat/completions", content=b"{not json", headers=headers)
    assert bad_json.status_code == 400 and "JSON" in bad_json.json()["error"]["message"]
    huge = httpx.post(f"{network.base_url}/chat/completions", content=b"x" * (2 * 1024 * 1024), headers=headers)
    assert huge.status_code == 400 and "limit" in huge.json()["error"]["message"]


def test_wrong_or_missing_key_is_401(network):
    for headers in ({}, {"Authorization": "Bearer sk-wrong"}, {"Authorization": "Basic abc"}):
        response = httpx.post(f"{network.base_url}/chat/completions", headers=headers,
                              json={"model": MODEL, "messages": MESSAGES})
        assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{network.base_url}/models").status_code == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=network.base_url, api_key="sk-wrong", max_retries=0).models.list()


def test_no_provider_is_503_saying_so(tmp_path, model_path):
    lonely = LocalNetwork(tmp_path / "lonely")
    try:
        lonely.start_gateway()
        client = openai.OpenAI(base_url=lonely.base_url, api_key=lonely.api_key, max_retries=0)
        with pytest.raises(openai.APIStatusError) as caught:
            client.chat.completions.create(model=MODEL, messages=MESSAGES)
        assert caught.value.status_code == 503
        assert "no provider" in caught.value.body["message"]
        stream_attempt = httpx.post(f"{lonely.base_url}/chat/completions",
                                    headers={"Authorization": f"Bearer {lonely.api_key}"},
                                    json={"model": MODEL, "messages": MESSAGES, "stream": True})
        assert stream_attempt.status_code == 503
    finally:
        lonely.stop()


def test_the_bearer_scheme_is_case_insensitive(network):
    for scheme in ("bearer", "BEARER", "Bearer"):
        answer = httpx.get(f"{network.base_url}/models", headers={"Authorization": f"{scheme} {network.api_key}"})
        assert answer.status_code == 200, (scheme, answer.text)
    assert httpx.get(f"{network.base_url}/models", headers={"Authorization": "Basic abc"}).status_code == 401


def test_metrics_label_routes_not_raw_paths_and_cannot_be_injected(network):
    hostile = '/x"} 1\nllorch_failovers_total 999\n#'
    for n in range(50):
        httpx.get(f"{network.http_url}/nothing-here-{n}")
    httpx.get(network.http_url + "/x%22%7D%201%0Allorch_failovers_total%20999%0A%23")
    text = httpx.get(f"{network.http_url}/metrics").text
    assert "llorch_failovers_total 999" not in text and hostile not in text
    request_lines = [line for line in text.splitlines() if line.startswith("llorch_requests_total")]
    assert not any("nothing-here" in line for line in request_lines), request_lines
    assert len(request_lines) < 20, request_lines          # bounded: one series per route and status


def test_text_parts_and_the_developer_role_give_what_plain_strings_give(client):
    """Many clients send content as a list of text parts, and `developer` for the system role: the real model reads
    the same prompt as from plain strings, so the same seed writes byte-identical text."""
    def ask(messages):
        return client.chat.completions.create(model=MODEL, messages=messages, seed=77, max_tokens=16,
                                              temperature=0.9).choices[0].message.content

    as_parts = ask([{"role": "developer", "content": [{"type": "text", "text": "Answer in one sentence."}]},
                    {"role": "user", "content": [{"type": "text", "text": "Name three colours"},
                                                 {"type": "text", "text": "of the rainbow."}]}])
    as_strings = ask([{"role": "system", "content": "Answer in one sentence."},
                      {"role": "user", "content": "Name three colours\nof the rainbow."}])
    assert as_parts and as_parts == as_strings


CITY_SCHEMA = {"type": "object", "additionalProperties": False, "required": ["city", "population", "tags"],
               "properties": {"city": {"type": "string", "maxLength": 24},
                              "population": {"type": "integer"},
                              "tags": {"type": "array", "maxItems": 3,
                                       "items": {"type": "string", "enum": ["old", "big", "river", "coast"]}}}}


def test_json_schema_output_validates_is_the_same_on_both_providers_and_replays(client, network, tmp_path):
    """response_format json_schema with the unmodified SDK: the real model's output parses and validates against the
    schema (llama.cpp's grammar), the same seed gives byte-identical JSON whichever provider serves, and the schema
    is committed in the sampling map: replay with the request body gives MATCH."""
    import jsonschema

    response_format = {"type": "json_schema", "json_schema": {"name": "city", "strict": True, "schema": CITY_SCHEMA}}
    request = {"model": MODEL, "messages": [{"role": "user", "content": "Describe Paris."}], "seed": 31,
               "max_tokens": 64, "temperature": 0.9, "response_format": response_format}
    results = []
    for _ in range(4):
        raw = client.chat.completions.with_raw_response.create(**request)
        results.append((raw.parse(), raw.headers["x-llorch-provider"]))
    texts = {completion.choices[0].message.content for completion, _ in results}
    assert len({provider for _, provider in results}) == 2 and len(texts) == 1, texts
    document = json.loads(texts.pop())
    jsonschema.validate(document, CITY_SCHEMA)
    assert all(completion.choices[0].finish_reason == "stop" for completion, _ in results)
    plain = client.chat.completions.create(**{**request, "response_format": None})
    assert plain.choices[0].message.content != results[0][0].choices[0].message.content

    completion = results[0][0]
    ledger = next(network.workdir / f"{name}.ledger.sqlite" for name in ("node1", "node2")
                  if completion.id in ledger_receipts(network, name))
    (tmp_path / "request.json").write_text(json.dumps(request))
    replayed = subprocess.run([sys.executable, "-m", "llorch.gateway", "ledger", "replay", str(ledger),
                               "--request-id", completion.id, "--request", str(tmp_path / "request.json"),
                               "--salt", completion.model_extra["llorch"]["prompt_salt"]],
                              capture_output=True, text=True, timeout=300)
    assert replayed.returncode == 0 and replayed.stdout.startswith("MATCH"), replayed.stdout + replayed.stderr
    (tmp_path / "no-schema.json").write_text(json.dumps({k: v for k, v in request.items() if k != "response_format"}))
    unschema = subprocess.run([sys.executable, "-m", "llorch.gateway", "ledger", "replay", str(ledger),
                               "--request-id", completion.id, "--request", str(tmp_path / "no-schema.json"),
                               "--salt", completion.model_extra["llorch"]["prompt_salt"]],
                              capture_output=True, text=True, timeout=300)
    assert unschema.returncode == 1 and "sampling" in unschema.stderr       # the schema is part of what was signed


def test_json_object_output_parses(client):
    completion = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Give a JSON object with a name."}], seed=5,
        max_tokens=200, temperature=0.5, response_format={"type": "json_object"})
    assert completion.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(completion.choices[0].message.content), dict)


def test_openrouters_provider_object_routes_with_the_unmodified_sdk(client, network):
    """A customer moving from OpenRouter keeps its `provider` object (extra_body in the OpenAI SDK)."""
    peers = [network.nodes[0].started_state()["peer_id"], network.nodes[1].started_state()["peer_id"]]
    for wanted in peers:
        raw = client.chat.completions.with_raw_response.create(
            model=MODEL, messages=MESSAGES, max_tokens=4, seed=3,
            extra_body={"provider": {"only": [wanted], "sort": "throughput", "data_collection": "deny"}})
        assert raw.headers["x-llorch-provider"] == wanted
    with pytest.raises(openai.BadRequestError, match="provider.quantizations"):
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4,
                                       extra_body={"provider": {"quantizations": ["fp8"]}})


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["city"],
                   "properties": {"city": {"type": "string", "maxLength": 30},
                                  "unit": {"enum": ["celsius", "fahrenheit"]}}}}}
ASK_WEATHER = [{"role": "user", "content": "What is the weather in Paris?"}]


def test_a_tool_call_round_trip_with_the_unmodified_sdk(client, network):
    """An agent's loop: the model calls the declared function (its arguments validate against the parameters, by
    llama.cpp's grammar), the same seed makes the same call on both providers, the tool's result goes back as a
    `tool` message, and the model answers; streamed, the SDK assembles the same call from OpenAI-shaped deltas."""
    import jsonschema

    request = {"model": MODEL, "messages": ASK_WEATHER, "tools": [WEATHER], "tool_choice": "required", "seed": 8,
               "max_tokens": 64, "temperature": 0.8}
    results = []
    for _ in range(4):
        raw = client.chat.completions.with_raw_response.create(**request)
        results.append((raw.parse(), raw.headers["x-llorch-provider"]))
    assert len({provider for _, provider in results}) == 2
    calls = {json.dumps([c.function.model_dump() for c in completion.choices[0].message.tool_calls])
             for completion, _ in results}
    assert len(calls) == 1                 # byte-identical on both providers (each call's id is its request's)
    first = results[0][0].choices[0]
    assert first.finish_reason == "tool_calls" and first.message.content is None
    call = first.message.tool_calls[0]
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])

    streamed = client.chat.completions.create(**request, stream=True)
    pieces: dict[int, dict] = {}
    finish, argument_deltas = None, 0
    for chunk in streamed:
        for choice in chunk.choices:
            for delta in choice.delta.tool_calls or []:
                argument_deltas += bool(delta.function and delta.function.arguments)
                piece = pieces.setdefault(delta.index, {"id": None, "name": "", "arguments": ""})
                piece["id"] = delta.id or piece["id"]
                piece["name"] += (delta.function.name or "") if delta.function else ""
                piece["arguments"] += (delta.function.arguments or "") if delta.function else ""
            finish = choice.finish_reason or finish
    assert finish == "tool_calls" and argument_deltas > 1          # the arguments stream as they are generated
    assert [(p["name"], p["arguments"]) for _, p in sorted(pieces.items())] == \
        [(c.function.name, c.function.arguments) for c in first.message.tool_calls]

    answer = client.chat.completions.create(
        model=MODEL, seed=8, max_tokens=48, tools=[WEATHER], tool_choice="auto",
        messages=[*ASK_WEATHER, {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                  {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21, "sky": "clear"}'}])
    reply = answer.choices[0]
    assert reply.message.tool_calls or reply.message.content                 # an answer or another call


def test_a_named_function_and_parallel_calls_off_bound_the_calls(client):
    completion = client.chat.completions.create(
        model=MODEL, messages=ASK_WEATHER, tools=[WEATHER], seed=2, max_tokens=64, parallel_tool_calls=False,
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert [c.function.name for c in completion.choices[0].message.tool_calls] == ["get_weather"]
    with pytest.raises(openai.BadRequestError, match="not among the tools"):
        client.chat.completions.create(model=MODEL, messages=ASK_WEATHER, tools=[WEATHER],
                                       tool_choice={"type": "function", "function": {"name": "get_time"}})
    bad = {**WEATHER, "function": {**WEATHER["function"], "parameters": {"type": "object", "properties": {
        "days": {"type": "integer", "maximum": 7}}}}}
    with pytest.raises(openai.BadRequestError, match="tools.0.function.parameters.properties.days.maximum"):
        client.chat.completions.create(model=MODEL, messages=ASK_WEATHER, tools=[bad])


def test_langchain_binds_tools_and_asks_for_structured_output(network):
    """A second client from the ecosystem agent builders use, unmodified: LangChain's ChatOpenAI with
    ``with_structured_output`` (a strict json_schema response_format) and ``bind_tools``."""
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel, Field

    llm = ChatOpenAI(model=MODEL, base_url=network.base_url, api_key=network.api_key, max_retries=0, timeout=120,
                     temperature=0.5, seed=4, max_tokens=64)

    class City(BaseModel):
        """A city and its country."""

        name: str = Field(description="The city's name", max_length=30)
        country: str = Field(description="Its country", max_length=30)

    city = llm.with_structured_output(City).invoke("Name a city in France.")
    assert isinstance(city, City) and city.name

    @tool
    def get_weather(city: str) -> str:
        """The current weather in a city."""
        return "sunny"

    message = llm.bind_tools([get_weather], tool_choice="get_weather").invoke("What is the weather in Paris?")
    assert [call["name"] for call in message.tool_calls][:1] == ["get_weather"]
    assert isinstance(message.tool_calls[0]["args"].get("city"), str)


# Last: it stops the module's network.
def test_logprobs_are_identical_on_both_providers_streamed_or_not_and_replay(client, network, tmp_path):
    """logprobs with top_logprobs from the real model through the unmodified SDK: each provider (pinned with the
    provider object) gives the same entries for the same seed, the stream carries exactly the non-streamed entries,
    the tokens spell the text, and the receipt commits to them: replay regenerates them (MATCH)."""
    peers = [network.nodes[0].started_state()["peer_id"], network.nodes[1].started_state()["peer_id"]]
    request = {"model": MODEL, "messages": MESSAGES, "seed": 11, "max_tokens": 12, "temperature": 0.8,
               "logprobs": True, "top_logprobs": 3}
    answers = [client.chat.completions.create(**request, extra_body={"provider": {"only": [peer]}}) for peer in peers]
    contents = [[item.model_dump() for item in answer.choices[0].logprobs.content] for answer in answers]
    assert contents[0] == contents[1] and len(contents[0]) == answers[0].usage.completion_tokens
    first = answers[0].choices[0]
    assert "".join(item["token"] for item in contents[0]) == first.message.content
    assert all(len(item["top_logprobs"]) == 3 and item["logprob"] <= 0 for item in contents[0])
    assert all(item["top_logprobs"][0]["logprob"] >= item["logprob"] for item in contents[0])
    streamed = []
    for chunk in client.chat.completions.create(**request, stream=True):
        for choice in chunk.choices:
            streamed += [item.model_dump() for item in (choice.logprobs.content if choice.logprobs else None) or []]
    assert streamed == contents[0]
    text = client.completions.create(model=MODEL, prompt="The sky is", max_tokens=5, seed=2, logprobs=2)
    assert len(text.choices[0].logprobs.tokens) == text.usage.completion_tokens
    assert "".join(text.choices[0].logprobs.tokens) == text.choices[0].text

    ledger = next(network.workdir / f"{name}.ledger.sqlite" for name in ("node1", "node2")
                  if answers[0].id in ledger_receipts(network, name))
    (tmp_path / "request.json").write_text(json.dumps(request))
    replayed = subprocess.run([sys.executable, "-m", "llorch.gateway", "ledger", "replay", str(ledger),
                               "--request-id", answers[0].id, "--request", str(tmp_path / "request.json"),
                               "--salt", answers[0].model_extra["llorch"]["prompt_salt"]],
                              capture_output=True, text=True, timeout=300)
    assert replayed.returncode == 0 and replayed.stdout.startswith("MATCH"), replayed.stdout + replayed.stderr


def test_n_choices_with_the_unmodified_sdk_are_separately_receipted_requests(client, network):
    """n = 2 on the real model: two choices, each the text a single request with its seed (seed, seed + 1) gives,
    each with its own receipt in a provider's ledger."""
    answer = client.chat.completions.create(model=MODEL, messages=MESSAGES, seed=60, max_tokens=8, temperature=0.9,
                                            n=2)
    assert [choice.index for choice in answer.choices] == [0, 1]
    bills = answer.model_extra["llorch"]["choices"]
    assert [bill["seed"] for bill in bills] == [60, 61]
    for choice, seed in zip(answer.choices, (60, 61)):
        single = client.chat.completions.create(model=MODEL, messages=MESSAGES, seed=seed, max_tokens=8,
                                                temperature=0.9)
        assert choice.message.content == single.choices[0].message.content
    receipts = {**ledger_receipts(network, "node1"), **ledger_receipts(network, "node2")}
    assert all(bill["request_id"] in receipts for bill in bills)
    assert answer.usage.completion_tokens == sum(receipts[bill["request_id"]].tokens_out for bill in bills)


def test_sigint_and_sigterm_stop_every_process_within_5_s_without_a_traceback(network):
    signals = {"node1": signal.SIGINT, "node2": signal.SIGTERM, "gateway": signal.SIGINT}
    for process in [*network.nodes, network.gateway]:
        assert process.stop(signals[process.name]) == 0, f"{process.name} did not exit cleanly within 5 s"
        log = process.log_path.read_text()
        assert "Traceback" not in log, log[-3000:]

