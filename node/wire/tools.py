"""Tool calls (OpenAI's ``tools``, ``tool_choice``, ``parallel_tool_calls``) as the provider serves them (a key
that is absent and one that is null mean the same: the gateway's parsed body and the customer's raw body, which
`llorch ledger replay` reads, must give the same prompt and sampling map): the tools
are described to the model in a system message, the model answers with one JSON object that llama.cpp's grammar
holds to a schema built from the tools (so every call names a declared function and its arguments validate against
that function's parameters), and earlier calls and their results become ordinary messages. The gateway turns the
JSON back into OpenAI's ``tool_calls``. The rendering is part of the prompt map and the schema part of the sampling
map (node/wire/sampling.py), so the prompt commitment, ``sampling_sha256``, replay and spot-checks cover both.

The model's answer, with ``tool_choice`` "auto":   {"content": str} or {"tool_calls": [{"name", "arguments"}, ...]}
                     "required" or a named function: {"tool_calls": [...]} (only that function, when named)
At most PARALLEL_CALLS_MAX calls at once when ``parallel_tool_calls`` is true (the default), else one.
"""

from __future__ import annotations

import json
import re

from llorch.node.wire.structured import SchemaRefused, check_schema, schema_text

TOOLS_MAX = 32
PARALLEL_CALLS_MAX = 4
TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
DESCRIPTION_CHARS_MAX = 1024
ANY_ARGUMENTS = {"type": "object"}


def tools_active(body: dict) -> bool:
    """Whether the model may call a tool: some are declared and tool_choice is not "none"."""
    return bool(body.get("tools")) and body.get("tool_choice") != "none"


def check_tools(tools: list, tool_choice: object) -> None:
    """SchemaRefused naming what is wrong with a request's tools (their parameter schemas as response_format's)."""
    if len(tools) > TOOLS_MAX:
        raise SchemaRefused(f"tools: at most {TOOLS_MAX} tools")
    names = [tool["function"]["name"] for tool in tools]
    if len(set(names)) != len(names):
        raise SchemaRefused("tools: each function name once")
    for number, tool in enumerate(tools):
        parameters = tool["function"].get("parameters")
        if parameters is not None:
            check_schema(parameters, f"tools.{number}.function.parameters", 0)
    named = chosen_function(tool_choice)
    if named is not None and named not in names:
        raise SchemaRefused(f"tool_choice names the function {named!r}, which is not among the tools")
    if tool_choice is not None and not tools:
        raise SchemaRefused("tool_choice is set but there are no tools")


def chosen_function(tool_choice: object) -> str | None:
    if isinstance(tool_choice, dict):
        return tool_choice["function"]["name"]
    return None


def answer_schema(body: dict) -> dict:
    """The JSON schema the model's answer must follow (see the module docstring)."""
    named = chosen_function(body.get("tool_choice"))
    tools = [t for t in body["tools"] if named is None or t["function"]["name"] == named]
    calls = [{"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
              "properties": {"name": {"const": t["function"]["name"]},
                             "arguments": t["function"].get("parameters") or ANY_ARGUMENTS}} for t in tools]
    parallel = body.get("parallel_tool_calls", True) is not False
    call_list = {"type": "array", "minItems": 1, "maxItems": PARALLEL_CALLS_MAX if parallel else 1,
                 "items": calls[0] if len(calls) == 1 else {"anyOf": calls}}
    calling = {"type": "object", "additionalProperties": False, "required": ["tool_calls"],
               "properties": {"tool_calls": call_list}}
    if (body.get("tool_choice") or "auto") == "auto":
        answering = {"type": "object", "additionalProperties": False, "required": ["content"],
                     "properties": {"content": {"type": "string"}}}
        return {"anyOf": [answering, calling]}
    return calling


def instruction(body: dict) -> str:
    """The system message that describes the tools to the model."""
    lines = ["You can call functions. Each is a JSON object with its name, description and parameters (a JSON "
             "schema):"]
    for tool in body["tools"]:
        function = tool["function"]
        lines.append(json.dumps({"name": function["name"], "description": function.get("description") or "",
                                 "parameters": function.get("parameters") or ANY_ARGUMENTS},
                                separators=(",", ":"), ensure_ascii=False))
    named = chosen_function(body.get("tool_choice"))
    calls = '{"tool_calls": [{"name": "<function>", "arguments": {<its parameters>}}]}'
    if (body.get("tool_choice") or "auto") == "auto":
        lines.append(f'Answer with one JSON object: {{"content": "<your answer>"}} to answer, or {calls} to call '
                     f"functions; a function's result comes back in the next message.")
    elif named is not None:
        lines.append(f"Call the function {named}: answer with one JSON object {calls}.")
    else:
        lines.append(f"Call one or more functions: answer with one JSON object {calls}.")
    return "\n".join(lines)


def rendered(message: dict, text: str) -> dict:
    """One message as the model reads it: an assistant's earlier calls in the JSON it writes, a tool's result as a
    user message naming the call it answers; any other message as it is (``text``: its content as one string)."""
    if message["role"] == "assistant" and message.get("tool_calls"):
        calls = [{"name": call["function"]["name"], "arguments": json.loads(call["function"]["arguments"])}
                 for call in message["tool_calls"]]
        return {"role": "assistant", "content": json.dumps({"tool_calls": calls}, separators=(",", ":"),
                                                          ensure_ascii=False)}
    if message["role"] == "tool":
        return {"role": "user", "content": f"Result of the function call {message['tool_call_id']}: {text}"}
    return {"role": "system" if message["role"] == "developer" else message["role"], "content": text}


def response_format_of(body: dict) -> dict | None:
    """The sampling map's response_format when tools are active (None otherwise)."""
    if not tools_active(body):
        return None
    return {"type": "json_schema", "schema": schema_text(answer_schema(body))}


def reply_of(text: str) -> tuple[str | None, list[dict] | None]:
    """The model's answer as (content, calls): calls as [{"name", "arguments": JSON text}]. Text that is not the
    answer object (cut short by max_tokens) is content as it is."""
    try:
        answer = json.loads(text)
    except ValueError:
        return _cut_content(text), None
    if isinstance(answer, dict) and isinstance(answer.get("tool_calls"), list):
        return None, [{"name": call["name"], "arguments": json.dumps(call["arguments"], separators=(",", ":"),
                                                                     ensure_ascii=False)}
                      for call in answer["tool_calls"]]
    if isinstance(answer, dict) and isinstance(answer.get("content"), str):
        return answer["content"], None
    return text, None


def _cut_content(text: str) -> str:
    """An answer cut short inside {"content": "...": the text written so far (else the text as it is)."""
    start = re.match(r'\s*\{\s*"content"\s*:\s*"', text)
    if start is None:
        return text
    body = text[start.end():]
    for candidate in (body, body[:-1]):          # the second drops an escape cut after its backslash
        try:
            return json.loads('"' + candidate + '"')
        except ValueError:
            continue
    return text
