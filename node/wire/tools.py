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


class AnswerStream:
    """Reads the model's answer (the JSON the answer schema holds it to) as its text arrives and says, at once,
    what OpenAI's stream says: pieces of ``content``, each call's start (index and name) and pieces of its
    ``arguments``, which are the arguments' JSON text exactly as the model writes it. ``feed`` returns the events
    of a piece: ("content", text), ("call", index, name), ("arguments", index, text). Only what is certain is
    said: a content escape cut between pieces waits for its end, a call waits for its whole name. The state after
    the last piece is the reply (``reply``), so a streamed answer and a non-streamed one are the same by
    construction, also when max_tokens cuts the answer short."""

    def __init__(self) -> None:
        self.content: str | None = None         # the decoded "content" so far, once its string began
        self.calls: list[dict] = []             # {"name": str | None, "arguments": str, "complete": bool}
        self.complete = False                   # the answer object closed
        self.text = ""
        self._stack: list[list] = []            # ["{", key, expecting_key] or ["[", index]
        self._string: str | None = None         # inside a string: its raw text so far (escapes undecoded)
        self._string_role = ""                  # "key", "content", "name" or "" (another value)
        self._escape = ""                       # an escape of the content string not yet complete
        self._surrogate = ""                    # a decoded high surrogate waiting for its low half
        self._arguments: dict | None = None     # the call whose arguments are being copied
        self._raw_depth = 0
        self._raw_string = False
        self._raw_escape = False

    def feed(self, piece: str) -> list[tuple]:
        self.text += piece
        events: list[tuple] = []
        for char in piece:
            self._take(char, events)
        return events

    def _take(self, char: str, events: list[tuple]) -> None:
        if self._arguments is not None:
            self._copy_argument(char, events)
        elif self._string is not None:
            self._in_string(char, events)
        elif char == '"':
            self._string, self._string_role = "", self._role_of_string()
        elif char in "{[":
            if self._value_path() == ("tool_calls", "arguments") and char == "{":
                self._arguments = self.calls[-1]
                self._raw_depth, self._raw_string, self._raw_escape = 0, False, False
                self._copy_argument(char, events)
                return
            if char == "{" and len(self._stack) == 2 and self._stack[0][1] == "tool_calls":
                self.calls.append({"name": None, "arguments": "", "complete": False})
            self._stack.append(["{", None, True] if char == "{" else ["[", 0])
        elif char in "}]":
            if self._stack:
                self._stack.pop()
            if not self._stack:
                self.complete = True
        elif char == "," and self._stack:
            top = self._stack[-1]
            if top[0] == "[":
                top[1] += 1
            else:
                top[1], top[2] = None, True
        elif char == ":" and self._stack and self._stack[-1][0] == "{":
            self._stack[-1][2] = False

    def _role_of_string(self) -> str:
        if self._stack and self._stack[-1][0] == "{" and self._stack[-1][2]:
            return "key"
        path = self._value_path()
        if path == ("content",):
            self.content = self.content or ""
            return "content"
        return "name" if path == ("tool_calls", "name") else ""

    def _value_path(self) -> tuple:
        """The keys leading to the value about to start (list indexes left out)."""
        return tuple(entry[1] for entry in self._stack if entry[0] == "{")

    def _in_string(self, char: str, events: list[tuple]) -> None:
        assert self._string is not None
        if self._string_role == "content":
            self._content_char(char, events)
            return
        if char != '"' or (len(self._string) - len(self._string.rstrip("\\"))) % 2:     # an escaped quote
            self._string += char
            return
        value = _json_string(self._string)
        role, self._string = self._string_role, None
        if role == "key" and self._stack:
            self._stack[-1][1] = value
        elif role == "name" and self.calls:
            self.calls[-1]["name"] = value
            events.append(("call", len(self.calls) - 1, value))

    def _content_char(self, char: str, events: list[tuple]) -> None:
        if not self._escape and char == '"':
            self._string = None
            if self._surrogate:
                self._say_content(self._surrogate, events)
                self._surrogate = ""
            return
        if self._escape or char == "\\":
            self._escape += char
            decoded = _json_string(self._escape) if _escape_complete(self._escape) else None
            if decoded is None:
                return
            self._escape = ""
            char = decoded
        if "\ud800" <= char <= "\udbff":                  # a high surrogate: wait for its low half
            self._surrogate = char
            return
        if self._surrogate:
            char = (self._surrogate + char).encode("utf-16", "surrogatepass").decode("utf-16") \
                if "\udc00" <= char <= "\udfff" else self._surrogate + char
            self._surrogate = ""
        self._say_content(char, events)

    def _say_content(self, text: str, events: list[tuple]) -> None:
        self.content = (self.content or "") + text
        if events and events[-1][0] == "content":
            events[-1] = ("content", events[-1][1] + text)
        else:
            events.append(("content", text))

    def _copy_argument(self, char: str, events: list[tuple]) -> None:
        call = self._arguments
        assert call is not None
        call["arguments"] += char
        index = len(self.calls) - 1
        if events and events[-1][0] == "arguments" and events[-1][1] == index:
            events[-1] = ("arguments", index, events[-1][2] + char)
        else:
            events.append(("arguments", index, char))
        if self._raw_string:
            if self._raw_escape:
                self._raw_escape = False
            elif char == "\\":
                self._raw_escape = True
            elif char == '"':
                self._raw_string = False
        elif char == '"':
            self._raw_string = True
        elif char in "{[":
            self._raw_depth += 1
        elif char in "}]":
            self._raw_depth -= 1
            if self._raw_depth == 0:
                call["complete"] = True
                self._arguments = None

    def reply(self) -> tuple[str | None, list[dict] | None]:
        """(content, calls) of the answer so far: calls as [{"name", "arguments": JSON text as written}]."""
        if self.calls and all(call["name"] is not None for call in self.calls):
            return None, [{"name": call["name"], "arguments": call["arguments"]} for call in self.calls]
        if self.content is not None:
            return self.content, None
        return self.text, None                 # not an answer object at all: the text as it is


def _escape_complete(escape: str) -> bool:
    return len(escape) >= 2 and (escape[1] != "u" or len(escape) == 6)


def _json_string(raw: str) -> str:
    try:
        return json.loads('"' + raw + '"')
    except ValueError:
        return raw


def reply_of(text: str) -> tuple[str | None, list[dict] | None]:
    """The model's answer as (content, calls): calls as [{"name", "arguments": the arguments' JSON text as the model
    wrote it}]. An answer cut short (max_tokens) gives what was written so far: the content, or the calls with the
    last one's arguments cut; text that is not an answer object at all is content as it is."""
    stream = AnswerStream()
    stream.feed(text)
    return stream.reply()
