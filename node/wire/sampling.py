"""The one conversion from a customer's OpenAI sampling parameters to the integer sampling map a ticket carries.

The gateway uses it to write tickets; `llorch ledger replay` uses it to rebuild the map from the customer's request,
so both sides hash exactly the same thing (receipt field sampling_sha256).
"""

from __future__ import annotations

from llorch.inference.limits import MAX_TOKENS_CAP as MAX_TOKENS_MAX
from llorch.node.wire import tools
from llorch.node.wire.structured import SchemaRefused, response_format_entry

MAX_TOKENS_DEFAULT = 256          # when the customer sends no max_tokens
TEMPERATURE_DEFAULT = 1.0
TOP_P_DEFAULT = 1.0


def sampling_map(seed: int, temperature: float | None, top_p: float | None, max_tokens: int | None,
                 stop: list[str] | None, response_format: dict | None = None, frequency_penalty: float | None = None,
                 presence_penalty: float | None = None, repetition_penalty: float | None = None,
                 logprobs: int | None = None) -> dict:
    """The ticket's sampling map: temperature and top_p as integer parts per million, rounded half to even;
    ``response_format`` the customer's (OpenAI's form), committed as node/wire/structured.py says (SchemaRefused
    names what cannot be enforced); ``logprobs`` (None: none asked) how many alternatives each token lists."""
    temperature = TEMPERATURE_DEFAULT if temperature is None else temperature
    top_p = TOP_P_DEFAULT if top_p is None else top_p
    sampling = {"seed": seed, "temperature_ppm": round(temperature * 1_000_000),
                "top_p_ppm": max(1, round(top_p * 1_000_000)),
                "max_tokens": max_tokens or MAX_TOKENS_DEFAULT, "stop": list(stop or [])}
    entry = response_format_entry(response_format)
    if entry is not None:
        sampling["response_format"] = entry
    for name, value, neutral in (("frequency_penalty_ppm", frequency_penalty, 0),
                                 ("presence_penalty_ppm", presence_penalty, 0),
                                 ("repeat_penalty_ppm", repetition_penalty, 1_000_000)):
        ppm = neutral if value is None else round(value * 1_000_000)
        if name == "repeat_penalty_ppm":
            ppm = max(1, ppm)                  # as top_p: the smallest positive penalty, never 0
        if ppm != neutral:                     # at its neutral value a key is absent: the map is what it was
            sampling[name] = ppm
    if logprobs is not None:
        sampling["logprobs"] = logprobs
    return sampling


def logprobs_top(body: dict) -> int | None:
    """How many alternatives per token a request body asks for, or None when it asks for no logprobs: a chat's
    ``logprobs: true`` with ``top_logprobs`` (default 0), a completion's ``logprobs`` (an integer, 0..5)."""
    if "messages" in body:
        return (body.get("top_logprobs") or 0) if body.get("logprobs") is True else None
    value = body.get("logprobs")
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def chat_request_sampling(body: dict, seed: int) -> dict:
    """The sampling map of an OpenAI chat request body (as sent by the customer) with the seed that was used; with
    tools the answer's schema (node/wire/tools.py) is its response_format."""
    stop = body.get("stop")
    sampling = sampling_map(seed, body.get("temperature"), body.get("top_p"),
                            body.get("max_tokens") or body.get("max_completion_tokens"),
                            [stop] if isinstance(stop, str) else stop, body.get("response_format"),
                            body.get("frequency_penalty"), body.get("presence_penalty"),
                            body.get("repetition_penalty"), logprobs_top(body))
    tool_format = tools.response_format_of(body)
    if tool_format is not None:
        if "response_format" in sampling:
            raise SchemaRefused("response_format and tools cannot be used together: the tools decide the answer's "
                                "shape")
        sampling["response_format"] = tool_format
    return sampling


PART_SEPARATOR = "\n"           # text parts of one message's content, as the model reads them


def chat_request_prompt(body: dict) -> dict:
    """The prompt map (what the prompt commitment hashes) of an OpenAI chat or completions request body: a message's
    content given as text parts is their texts joined by newlines, the ``developer`` role is ``system``, and tools,
    earlier tool calls and their results are rendered as node/wire/tools.py says."""
    if "messages" not in body and isinstance(body.get("prompt"), str):
        return {"text": body["prompt"]}
    messages = [tools.rendered(m, message_text(m.get("content") or "")) for m in body["messages"]]
    if tools.tools_active(body):
        messages.insert(0, {"role": "system", "content": tools.instruction(body)})
    return {"messages": messages}


def message_text(content: str | list) -> str:
    """A message's content as one string: itself, or its text parts joined by PART_SEPARATOR."""
    if isinstance(content, str):
        return content
    return PART_SEPARATOR.join(part["text"] for part in content)
