"""Hostile HTTP input against a live gateway (hypercorn on loopback, real SQLite, a real libp2p host, a provider
behind it): each test is one request that once got a 500, a wrong answer or an undocumented shape. Every bad request
gets a specific 4xx in OpenAI's error shape and changes nothing: no ticket, no posting, no receipt, no registration.
"""

from __future__ import annotations

import base64
import json

import httpx
import pytest
from hypothesis import given, settings, strategies as st

from llorch.node.stream_io import now_ms
from tests.helpers import MODEL_ID
from tests.inprocess import market, serving_http

TABLES = ("tickets", "postings", "receipts", "findings", "providers", "tenants")


@pytest.fixture
async def live(tmp_path):
    """(market, client): the client carries a valid tenant API key."""
    async with market(tmp_path, {"p1": {}}) as built, serving_http(built.gateway) as base_url:
        api_key = await built.gateway.tenants.add("hostile", "hobby", None, False, False, None, None, None, now_ms())
        async with httpx.AsyncClient(base_url=base_url, headers={"Authorization": f"Bearer {api_key}"},
                                     timeout=30) as client:
            yield built, client


async def table_counts(built) -> dict[str, int]:
    return {table: (await built.rows(f"SELECT COUNT(*) FROM {table}"))[0][0] for table in TABLES}


async def refused(built, client, method: str, path: str, status: int, message: str, **request) -> dict:
    """Send one request; check it got ``status`` in OpenAI's error shape with ``message`` in its text, and that no
    table of the gateway database changed. Returns the error object."""
    before = await table_counts(built)
    response = await client.request(method, path, **request)
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert message in error["message"], error
    assert await table_counts(built) == before
    return error


def chat_body(**fields) -> dict:
    return {"model": MODEL_ID, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 2, **fields}


async def test_an_integer_longer_than_python_parses_is_a_400(live):
    built, client = live
    body = json.dumps(chat_body()).encode()[:-1] + b', "seed": ' + b"9" * 5000 + b"}"
    error = await refused(built, client, "POST", "/v1/chat/completions", 400, "request body is not valid JSON",
                          content=body)
    assert "4300 digits" in error["message"]


async def test_json_nested_deeper_than_the_parser_allows_is_a_400(live):
    built, client = live
    await refused(built, client, "POST", "/v1/completions", 400, "request body nests JSON deeper than",
                  content=b"[" * 100_000 + b"]" * 100_000)


async def test_nan_and_infinity_are_not_json(live):
    built, client = live
    for constant in (b"NaN", b"Infinity", b"-Infinity"):
        body = json.dumps(chat_body()).encode()[:-1] + b', "temperature": ' + constant + b"}"
        error = await refused(built, client, "POST", "/v1/chat/completions", 400,
                              f"request body is not valid JSON: {constant.decode()} is not a JSON number",
                              content=body)
        assert error["code"] == "invalid_request"


@pytest.mark.parametrize("field, value, message", [
    ("temperature", "0.5", "invalid temperature: Input should be a valid number"),
    ("max_tokens", "2", "invalid max_tokens: Input should be a valid integer"),
    ("stream", "false", "invalid stream: Input should be a valid boolean"),
    ("seed", 1.0, "invalid seed: Input should be a valid integer"),
    ("max_tokens", True, "invalid max_tokens: Input should be a valid integer"),
])
async def test_a_value_of_the_wrong_json_type_is_refused_not_coerced(live, field, value, message):
    """The document says number, integer, boolean: a string "0.5" or a float 1.0 is not one, and the ticket must not
    carry a value the customer did not write."""
    built, client = live
    error = await refused(built, client, "POST", "/v1/chat/completions", 400, message, json=chat_body(**{field: value}))
    assert error["param"] == field


@pytest.mark.parametrize("echo", [0, 0.0])
async def test_echo_zero_is_not_false(live, echo):
    """`echo` must be the JSON boolean false: pydantic's Literal[False] alone let 0 and 0.0 through."""
    built, client = live
    error = await refused(built, client, "POST", "/v1/completions", 400,
                          "invalid echo: Input should be a valid boolean",
                          json={"model": MODEL_ID, "prompt": "hello", "max_tokens": 2, "echo": echo})
    assert error["param"] == "echo"


async def test_a_registration_that_is_not_ascii_is_a_400(live):
    built, client = live
    error = await refused(built, client, "POST", "/v2/platform/providers/register", 400,
                          "registration is not base64", json={"registration": "é" * 8})
    assert error["param"] == "registration"


async def test_a_registration_body_with_a_huge_integer_or_deep_nesting_is_a_400(live):
    built, client = live
    await refused(built, client, "POST", "/v2/platform/providers/register", 400, "request body is not valid JSON",
                  content=b"9" * 5000)
    await refused(built, client, "POST", "/v2/platform/providers/register", 400, "request body nests JSON deeper",
                  content=b"[" * 8000 + b"]" * 8000)
    valid_base64 = base64.b64encode(b"not a registration").decode()
    await refused(built, client, "POST", "/v2/platform/providers/register", 400, "registration is malformed",
                  json={"registration": valid_base64})


@pytest.mark.parametrize("period", ["2026-01\n", "\u0662\u0660\u0662\u0666-01", "", "2026-1", "2026-13"])
async def test_a_period_is_four_ascii_digits_a_dash_and_a_month(live, period):
    built, client = live
    error = await refused(built, client, "GET", "/v2/billing/usage", 400, "period must be YYYY-MM",
                          params={"period": period})
    assert error["param"] == "period"


async def test_a_path_that_matches_no_route_answers_in_the_openai_error_shape(live):
    built, client = live
    error = await refused(built, client, "GET", "/v2/platform/providers/a%2Fb/capacity", 404, "no route")
    assert error["code"] == "not_found"
    error = await refused(built, client, "DELETE", "/v1/models", 405, "method DELETE")
    assert error["code"] == "method_not_allowed"



@pytest.mark.parametrize("path, field", [("/dashboard/sign-in", "api_key"), ("/operator/sign-in", "token")])
async def test_a_sign_in_form_posted_from_another_site_is_refused(live, path, field):
    """Login CSRF: a page elsewhere auto-submits the sign-in form with the attacker's own API key, and the victim's
    browser is signed in to the attacker's account (and what the victim then does lands there). The sign-in
    forms have no session yet to carry a CSRF token, so the browser's Origin header decides."""
    built, client = live
    api_key = client.headers["Authorization"].split()[1]
    credential = api_key if field == "api_key" else "op-llorch-not-a-token"
    response = await client.post(path, data={field: credential}, headers={"Origin": "https://evil.example"},
                                 follow_redirects=False)
    assert response.status_code == 403, response.text
    assert "set-cookie" not in response.headers
    assert "another site" in response.text
    same_site = await client.post("/dashboard/sign-in", data={"api_key": api_key}, follow_redirects=False,
                                  headers={"Origin": str(client.base_url).rstrip("/")})
    assert same_site.status_code == 303 and "set-cookie" in same_site.headers


@pytest.mark.parametrize("content, message", [
    ([{"type": "image_url", "image_url": {"url": "https://example.org/cat.png"}}],
     "content part 0 has type 'image_url': only text parts are served"),
    ([{"type": "text", "text": "hi"}, {"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}],
     "content part 1 has type 'input_audio'"),
    ([{"type": "text", "text": "hi", "cache_control": {"type": "ephemeral"}}], 'exactly {"type": "text"'),
    ([{"type": "text", "text": 5}], 'exactly {"type": "text"'),
    ([], "a list of 1-64 text parts"),
    ({"type": "text", "text": "hi"}, "a string or a list"),
])
async def test_a_content_part_that_is_not_text_is_refused_by_name(live, content, message):
    """Content as a list of parts: text parts are served; any other part type is refused naming it (no model in the
    catalog reads images, audio or files), and nothing is written."""
    built, client = live
    body = chat_body(messages=[{"role": "user", "content": content}])
    error = await refused(built, client, "POST", "/v1/chat/completions", 400, message, json=body)
    assert error["param"] == "messages.0.content"


def test_text_parts_and_the_developer_role_are_the_prompt_a_string_would_be():
    """The one normalization (node/wire/sampling.py), shared by the gateway and `llorch ledger replay`."""
    from llorch.gateway.api.openai_api import ChatRequest, parse_chat_request
    from llorch.node.wire.sampling import chat_request_prompt

    parts = {"model": MODEL_ID, "messages": [
        {"role": "developer", "content": [{"type": "text", "text": "Answer briefly."}]},
        {"role": "user", "content": [{"type": "text", "text": "Name a colour."}, {"type": "text", "text": "One."}]}]}
    plain = {"model": MODEL_ID, "messages": [{"role": "system", "content": "Answer briefly."},
                                             {"role": "user", "content": "Name a colour.\nOne."}]}
    parsed = parse_chat_request(json.dumps(parts).encode(), ChatRequest)
    assert parsed.prompt() == chat_request_prompt(parts) == chat_request_prompt(plain)


def schema_format(schema) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}


@pytest.mark.parametrize("response_format, message", [
    (schema_format({"type": "object", "properties": {"n": {"type": "integer", "minimum": 3}}}),
     "schema.properties.n.minimum: the keyword 'minimum' is not enforced"),
    (schema_format({"type": "array", "uniqueItems": True}), "'uniqueItems' is not enforced"),
    (schema_format({"not": {"type": "string"}}), "'not' is not enforced"),
    (schema_format({"type": "string", "format": "email"}), "the format 'email' is not enforced"),
    (schema_format({"$ref": "https://example.org/schema.json"}), "only local references"),
    (schema_format({"type": "decimal"}), "must be one of"),
    (schema_format(True), "must be a JSON schema object"),
    ({"type": "json_schema", "json_schema": {"name": "has space", "schema": {}}}, "name must be 1-64"),
    ({"type": "json_schema", "json_schema": {"name": "a", "schema": {}, "extra": 1}}, "unknown keys ['extra']"),
    ({"type": "xml"}, "response_format.type 'xml' is not served"),
    ({"type": "json_object", "schema": {}}, "response_format.type 'json_object' is not served"),
])
async def test_a_response_format_the_grammar_cannot_enforce_is_refused_by_name(live, response_format, message):
    """A schema keyword llama.cpp's grammar would silently ignore is refused, naming it and where it is: the
    customer never gets output that only looks validated. Nothing is written."""
    built, client = live
    error = await refused(built, client, "POST", "/v1/chat/completions", 400, message,
                          json=chat_body(response_format=response_format))
    assert error["param"] == "response_format"


def test_the_schema_is_committed_compactly_in_the_customers_key_order():
    from llorch.gateway.api.openai_api import ChatRequest, parse_chat_request

    schema = {"type": "object", "properties": {"b": {"type": "string"}, "a": {"type": "integer"}}, "required": ["b"]}
    parsed = parse_chat_request(json.dumps(chat_body(response_format=schema_format(schema))).encode(), ChatRequest)
    assert parsed.sampling(9)["response_format"] == {
        "type": "json_schema", "schema": '{"type":"object","properties":{"b":{"type":"string"},"a":{"type":"integer"}},'
                                         '"required":["b"]}'}
    as_text = parse_chat_request(json.dumps(chat_body(response_format={"type": "text"})).encode(), ChatRequest)
    assert "response_format" not in as_text.sampling(9)          # plain text: the map is what it always was


WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


@pytest.mark.parametrize("fields, message", [
    ({"messages": [{"role": "tool", "content": "21"}]}, "a tool message, and only a tool message, has a tool_call_id"),
    ({"messages": [{"role": "user", "content": "x", "tool_call_id": "c1"}]}, "only a tool message"),
    ({"messages": [{"role": "user", "content": "x", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}]},
     "only an assistant message has tool_calls"),
    ({"messages": [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "[1]"}}]}]},
     "arguments must be JSON text of an object"),
    ({"messages": [{"role": "assistant", "content": None}]}, "content is required"),
    ({"tools": [WEATHER_TOOL], "response_format": {"type": "json_object"}}, "cannot be used together"),
    ({"tool_choice": "auto"}, "tool_choice is set but there are no tools"),
    ({"tools": [WEATHER_TOOL, WEATHER_TOOL]}, "each function name once"),
    ({"tools": [{"type": "function", "function": {"name": "a b"}}]}, "tools.0.function.name"),
    ({"tools": [{"type": "code_interpreter"}]}, "tools.0.type"),
])
async def test_a_malformed_tool_request_is_refused_by_name(live, fields, message):
    built, client = live
    await refused(built, client, "POST", "/v1/chat/completions", 400, message, json=chat_body(**fields))


def test_tools_render_the_same_from_the_parsed_body_and_the_raw_one():
    """The gateway commits what it parsed; `llorch ledger replay` rebuilds from the customer's raw body: a key
    absent and a key null must give the same prompt and sampling map."""
    from llorch.gateway.api.openai_api import ChatRequest, parse_chat_request
    from llorch.node.wire.sampling import chat_request_prompt, chat_request_sampling

    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'}}
    body = chat_body(tools=[WEATHER_TOOL], messages=[
        {"role": "user", "content": "Weather in Oslo?"}, {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": [{"type": "text", "text": "rain"}]}])
    parsed = parse_chat_request(json.dumps(body).encode(), ChatRequest)
    assert parsed.prompt() == chat_request_prompt(body) and parsed.sampling(3) == chat_request_sampling(body, 3)
    messages = parsed.prompt()["messages"]
    assert messages[0]["role"] == "system" and "get_weather" in messages[0]["content"]
    assert messages[2] == {"role": "assistant", "content": '{"tool_calls":[{"name":"get_weather","arguments":'
                                                           '{"city":"Oslo"}}]}'}
    assert messages[3] == {"role": "user", "content": "Result of the function call call_1: rain"}
    none = parse_chat_request(json.dumps({**body, "tool_choice": "none"}).encode(), ChatRequest)
    assert "response_format" not in none.sampling(3) and none.prompt()["messages"][0]["role"] == "user"


def test_an_answer_cut_short_still_reads_as_text():
    from llorch.node.wire.tools import reply_of

    assert reply_of('{"content": "It is sun') == ("It is sun", None)
    assert reply_of('{"content": "a \\') == ("a ", None)                     # cut inside an escape
    assert reply_of('{"content": "a \\\\') == ("a \\", None)               # an escaped backslash
    # cut inside a call's arguments: the call, its arguments as far as they were written (finish_reason "length")
    assert reply_of('{"tool_calls": [{"name": "f", "arguments": {"a":') == (None, [{"name": "f", "arguments": '{"a":'}])
    assert reply_of('{"tool_calls": [{"name": "f') == ('{"tool_calls": [{"name": "f', None)    # no whole name yet
    assert reply_of("not an answer") == ("not an answer", None)
    assert reply_of('{"tool_calls":[{"name":"f","arguments":{"a":1}}]}') == (None, [{"name": "f",
                                                                                     "arguments": '{"a":1}'}])


async def test_healthz_is_ready_only_with_a_fresh_approved_provider_and_livez_says_up(live):
    """Before: /healthz answered 200 with 0 providers, so a load balancer sent customers to an empty replica."""
    built, client = live
    ready = await client.get("/healthz")
    assert ready.status_code == 200 and ready.json()["providers"] == 1 and ready.json()["status"] == "ok"
    built.gateway.directory.exclude(built.providers["p1"].key.public_key)     # its only provider gone
    empty = await client.get("/healthz")
    assert empty.status_code == 503 and empty.json()["providers"] == 0 and empty.headers["retry-after"] == "1"
    assert "no approved provider" in empty.json()["reason"]
    alive = await client.get("/livez")
    assert alive.status_code == 200 and alive.json() == {"status": "alive"}


async def test_a_database_that_fails_under_a_request_is_a_503_with_retry_after_and_changes_nothing(live):
    """Before: a database error under a request (a PostgreSQL restart dropping the connection, a disk gone
    read-only) answered 500 {"message": "internal error", "code": null}, with no Retry-After and no documented code.
    Now a 503 ``database_unavailable`` the client retries; the request wrote nothing."""
    built, client = live
    before = await table_counts(built)
    await built.database.execute("PRAGMA query_only = 1")          # every write fails from here
    try:
        for stream in (False, True):
            response = await client.post("/v1/chat/completions", json=chat_body(stream=stream))
            assert response.status_code == 503, response.text
            assert response.headers["retry-after"] == "1"
            error = response.json()["error"]
            assert error["code"] == "database_unavailable" and error["type"] == "service_unavailable"
            assert "retry" in error["message"]
    finally:
        await built.database.execute("PRAGMA query_only = 0")
    assert await table_counts(built) == before
    assert (await client.post("/v1/chat/completions", json=chat_body())).status_code == 200


@settings(max_examples=300, deadline=None)
@given(piece=st.text(), index=st.integers(0, 3), chat=st.booleans())
def test_a_content_chunk_from_its_template_is_the_chunk_byte_for_byte(piece, index, chat):
    """The relay writes a token's chunk from a template made once per choice (only the text is encoded per token):
    what the customer reads is exactly the chunk built whole, for any text (quotes, controls, surrogates, emoji)."""
    from llorch.gateway.api.http_api import ChatStreamResponse
    from llorch.gateway.api.openai_api import ChatRequest, CompletionRequest

    request = (ChatRequest(model="m", messages=[{"role": "user", "content": "hi"}], n=4) if chat
               else CompletionRequest(model="m", prompt="hi", n=4))
    response = ChatStreamResponse(None, request, None)   # type: ignore[arg-type]
    assert response._content_line(index, piece) == response._event_line(index, {"content": piece}, None)
    assert response._content_line(index, piece + "x") == response._event_line(index, {"content": piece + "x"}, None)
