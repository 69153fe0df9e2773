"""Step (1) of a request: the OpenAI chat-completions request, parsed strictly, and the response shapes.

Floats from the customer (temperature, top_p) are converted once, here, into integer parts per million; nothing
downstream sees a float.
"""

from __future__ import annotations

import hashlib
import json
from decimal import Decimal
from typing import Annotated, Any, Literal

from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, WithJsonSchema, field_validator,
                      model_validator)
from pydantic_core import PydanticCustomError

from llorch.gateway import limits
from llorch.gateway.api.body import parse_json_object
from llorch.gateway.errors import BadRequest
from llorch.gateway.request import InferenceRequest, Routing
from llorch.ledger.errors import EncodingError
from llorch.ledger.signing import public_key_of_peer_id
from llorch.node.models import DEFAULT_MODEL_ID, CatalogEntry
from llorch.node.wire.sampling import (MAX_TOKENS_DEFAULT, MAX_TOKENS_MAX, chat_request_prompt, chat_request_sampling,
                                       logprobs_top, sampling_map)
from llorch.node.wire.tools import PARALLEL_CALLS_MAX, check_tools, reply_of, tools_active
from llorch.node.wire.structured import SchemaRefused, response_format_entry


LOGPROBS_TOP_MAX = 20                # chat top_logprobs (OpenAI's limit; sampling.logprobs, docs/protocol.md §3)
COMPLETION_LOGPROBS_MAX = 5          # completions logprobs (OpenAI's limit)
CHOICES_MAX = 8                      # n: choices per request, each its own ticket
STRICT = ConfigDict(extra="forbid", strict=True)    # a JSON string is never a number, 1.0 never an integer


def _json_boolean(value):
    """Literal[False] alone accepts 0 and 0.0 even in strict mode (0 == False): the JSON must say false."""
    if not isinstance(value, bool):
        raise PydanticCustomError("bool_type", "Input should be a valid boolean")
    return value


JsonFalse = Annotated[Literal[False], BeforeValidator(_json_boolean)]


CONTENT_PARTS_MAX = 64
TEXT_PART_SCHEMA: dict[str, Any] = {
    "type": "object", "required": ["type", "text"], "additionalProperties": False,
    "properties": {"type": {"const": "text"}, "text": {"type": "string", "maxLength": 200_000}}}
CONTENT_SCHEMA: dict[str, Any] = {
    "anyOf": [{"type": "string", "maxLength": 200_000},
              {"type": "array", "items": TEXT_PART_SCHEMA, "minItems": 1, "maxItems": CONTENT_PARTS_MAX}],
    "description": "A string, or a list of text parts ({\"type\": \"text\", \"text\": ...}), which the model "
                   "reads joined by newlines. Other part types (image_url, input_audio, file) are refused: no model "
                   "in the catalog takes them."}


def _content(value):
    """A message's content: a string, or a list of text parts; another part type is refused by name."""
    if isinstance(value, str):
        if len(value) > 200_000:
            raise PydanticCustomError("string_too_long", "content is longer than 200000 characters")
        return value
    if not isinstance(value, list) or not 0 < len(value) <= CONTENT_PARTS_MAX:
        raise PydanticCustomError("content_type", f"content must be a string or a list of 1-{CONTENT_PARTS_MAX} "
                                                  f"text parts")
    for number, part in enumerate(value):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text":
            raise PydanticCustomError(
                "content_part", f"content part {number} has type {str(kind)[:32]!r}: only text parts are served "
                                f"(no model in this catalog takes images, audio or files)")
        if set(part) != {"type", "text"} or not isinstance(part["text"], str) or len(part["text"]) > 200_000:
            raise PydanticCustomError("content_part", f"content part {number} must be exactly "
                                                      f'{{"type": "text", "text": <string>}}')
    return value


Content = Annotated[str | list[dict[str, str]], BeforeValidator(_content), WithJsonSchema(CONTENT_SCHEMA)]


RESPONSE_FORMAT_SCHEMA: dict[str, Any] = {
    "anyOf": [
        {"type": "object", "required": ["type"], "additionalProperties": False,
         "properties": {"type": {"enum": ["text", "json_object"]}}},
        {"type": "object", "required": ["type", "json_schema"], "additionalProperties": False,
         "properties": {"type": {"const": "json_schema"}, "json_schema": {
             "type": "object", "required": ["name", "schema"], "additionalProperties": False,
             "properties": {"name": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"},
                            "description": {"type": "string", "maxLength": 4096},
                            "strict": {"type": ["boolean", "null"]},
                            "schema": {"type": "object"}}}}},
        {"type": "null"}],
    "description": "Structured output, enforced by llama.cpp's grammar (the output always parses, and validates "
                   "against the schema): json_object (any JSON object) or json_schema. A schema keyword the grammar "
                   "does not enforce (minimum, multipleOf, uniqueItems, not, ...) is a 400 naming it. The schema "
                   "is committed in the ticket's sampling map (docs/protocol.md §3)."}


def _response_format(value):
    """OpenAI's response_format, checked as the ticket will commit it (node/wire/structured.py)."""
    try:
        response_format_entry(value)
    except SchemaRefused as exc:
        raise PydanticCustomError("response_format", str(exc)) from None
    return value


ToolName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]


class FunctionCallIn(BaseModel):
    model_config = STRICT
    name: ToolName
    arguments: str = Field(max_length=100_000, description="The arguments as JSON text (an object).")

    @field_validator("arguments")
    @classmethod
    def _an_object(cls, value: str) -> str:
        try:
            parsed = json.loads(value)
        except (ValueError, RecursionError):
            raise ValueError("arguments must be JSON text of an object") from None
        if not isinstance(parsed, dict):
            raise ValueError("arguments must be JSON text of an object")
        return value


class ToolCallIn(BaseModel):
    """An earlier tool call, in an assistant message of the conversation."""

    model_config = STRICT
    id: str = Field(min_length=1, max_length=64)
    type: Literal["function"]
    function: FunctionCallIn


class Message(BaseModel):
    model_config = STRICT
    role: Literal["system", "developer", "user", "assistant", "tool"] = Field(
        description="developer is read as system (OpenAI's name for it on newer models); tool carries a function's "
                    "result (with tool_call_id).")
    content: Content | None = None
    name: str | None = Field(default=None, max_length=64)
    tool_calls: list[ToolCallIn] | None = Field(default=None, min_length=1, max_length=16,
                                                description="An assistant's earlier calls.")
    tool_call_id: str | None = Field(default=None, min_length=1, max_length=64,
                                     description="Which call a tool message answers.")

    @model_validator(mode="after")
    def _shape(self) -> "Message":
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError("only an assistant message has tool_calls")
        if (self.tool_call_id is not None) != (self.role == "tool"):
            raise ValueError("a tool message, and only a tool message, has a tool_call_id")
        if self.content is None and self.tool_calls is None:
            raise ValueError("content is required (it may be null only in an assistant message with tool_calls)")
        return self


class FunctionDefinition(BaseModel):
    model_config = STRICT
    name: ToolName
    description: str | None = Field(default=None, max_length=1024)
    parameters: dict[str, Any] | None = Field(default=None, description="A JSON schema of the arguments object; "
                                              "its keywords as response_format's (a keyword the grammar would not "
                                              "enforce is a 400 naming it).")
    strict: bool | None = None


class Tool(BaseModel):
    model_config = STRICT
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(BaseModel):
    model_config = STRICT
    name: ToolName


class NamedToolChoice(BaseModel):
    model_config = STRICT
    type: Literal["function"]
    function: NamedFunction


class StreamOptions(BaseModel):
    model_config = STRICT
    include_usage: bool = False


class LlorchExtension(BaseModel):
    """Optional llorch fields of a request body (`extra_body={"llorch": {...}}` in the OpenAI SDK)."""

    model_config = STRICT
    max_price_in_per_1m: int | None = Field(default=None, ge=0, le=10**12)
    max_price_out_per_1m: int | None = Field(default=None, ge=0, le=10**12)


PEER_ID_PATTERN = r"^12D3KooW[1-9A-HJ-NP-Za-km-z]{44}$"


def _peer_id(value):
    """A provider named in a routing preference: its libp2p peer id."""
    if not isinstance(value, str):
        raise PydanticCustomError("peer_id", "a provider is named by its peer id (a string)")
    try:
        public_key_of_peer_id(value)
    except (EncodingError, ValueError):
        raise PydanticCustomError("peer_id", f"{value[:64]!r} is not a provider's peer id (12D3KooW...)") from None
    return value


PeerId = Annotated[str, BeforeValidator(_peer_id), WithJsonSchema({"type": "string", "pattern": PEER_ID_PATTERN})]
PRICE_DECIMALS = 6                 # a price per 1M tokens in the currency, to the micro-unit (the minor unit here)


def _price(value):
    """max_price.prompt / .completion: a number of currency units per 1M tokens with at most 6 decimals."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PydanticCustomError("price", "a price is a number (currency units per 1M tokens)")
    exact = Decimal(str(value))
    if exact < 0 or exact > 10**6 or exact != round(exact, PRICE_DECIMALS):
        raise PydanticCustomError("price", f"a price must be 0..1000000 with at most {PRICE_DECIMALS} decimals")
    return value


Price = Annotated[float, BeforeValidator(_price)]


class MaxPrice(BaseModel):
    """OpenRouter's max_price, read in the gateway's currency (EUR) per 1M tokens."""

    model_config = STRICT
    prompt: Price | None = None
    completion: Price | None = None


class ProviderPreferences(BaseModel):
    """OpenRouter's ``provider`` object (docs/operating.md maps each field to placement); providers are named by
    peer id (GET /v2/platform/providers). Any other key is a 400 naming it."""

    model_config = STRICT
    order: list[PeerId] | None = Field(default=None, max_length=16,
                                       description="Try these providers first, in this order.")
    only: list[PeerId] | None = Field(default=None, max_length=64, description="Use none but these providers.")
    ignore: list[PeerId] | None = Field(default=None, max_length=64, description="Never use these providers.")
    allow_fallbacks: bool = Field(default=True, description="False: only the providers in `order`.")
    sort: Literal["price", "throughput", "latency"] | None = Field(
        default=None, description="Rank by the customer price, the measured tokens/s, or the measured time to "
                                  "first token, before the gateway's own ranking.")
    max_price: MaxPrice | None = Field(default=None, description="Price ceilings in EUR per 1M tokens (combined "
                                                                 "with llorch.max_price_*_per_1m: the lower wins).")
    require_parameters: bool = Field(default=False, description="Accepted: every provider runs the same pinned "
                                                                "engine and honours every parameter served.")
    data_collection: Literal["allow", "deny"] = Field(
        default="allow", description="deny: the prompt is never re-run on a second provider by a spot-check nor "
                                     "kept as evidence (providers never store prompts; receipts carry a salted "
                                     "commitment only).")

    def routing(self) -> Routing:
        def keys(ids: list[str] | None) -> tuple[bytes, ...]:
            return tuple(public_key_of_peer_id(peer) for peer in ids or ())

        return Routing(order=keys(self.order), only=frozenset(keys(self.only)) if self.only is not None else None,
                       ignore=frozenset(keys(self.ignore)), allow_fallbacks=self.allow_fallbacks, sort=self.sort,
                       share_for_checks=self.data_collection == "allow")

    def ceilings(self) -> tuple[int | None, int | None]:
        """max_price in minor units (micro-EUR) per 1M tokens."""
        def minor(value: float | None) -> int | None:
            return None if value is None else int(Decimal(str(value)).scaleb(PRICE_DECIMALS))

        return (minor(self.max_price.prompt), minor(self.max_price.completion)) if self.max_price else (None, None)


def lower(a: int | None, b: int | None) -> int | None:
    return b if a is None else a if b is None else min(a, b)


STOP_TEXT_SCHEMA: dict[str, Any] = {"type": "string", "minLength": 1, "maxLength": 64}
STOP_SCHEMA: dict[str, Any] = {"anyOf": [STOP_TEXT_SCHEMA, {"type": "array", "items": STOP_TEXT_SCHEMA, "maxItems": 4},
                         {"type": "null"}],
               "description": "Up to 4 sequences (1-64 characters each) where generation stops."}


class SamplingFields(BaseModel):
    """What chat and text completion requests share: model, sampling, limits, streaming, the llorch extension."""

    model_config = STRICT
    model: str = Field(min_length=1, max_length=128, examples=[DEFAULT_MODEL_ID],
                       description="A catalog model id (GET /v1/models lists those on offer now); another is a 404.")
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS_MAX)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    stop: Annotated[str | list[str] | None, WithJsonSchema(STOP_SCHEMA)] = None
    n: int = Field(default=1, ge=1, le=CHOICES_MAX, description=(
        f"How many choices (at most {CHOICES_MAX}): each is its own request, served side by side with its own "
        f"ticket, receipt and bill, choice i with the seed seed + i (so it differs, and repeats); each counts "
        f"against the tenant's rate and concurrency limits. Usage is the sum; llorch.choices has each bill. A "
        f"choice that fails leaves the others served and billed, and is named in llorch.failed_choices."))
    user: str | None = Field(default=None, max_length=256)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(default=None, ge=0.000001, le=2.0,
                                             description="OpenRouter's (llama.cpp's repeat penalty): 1 is none.")
    llorch: LlorchExtension | None = None
    provider: ProviderPreferences | None = Field(
        default=None, description="OpenRouter's provider routing object, accepted as it is (docs/operating.md).")

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value):
        stops = [value] if isinstance(value, str) else (value or [])
        if len(stops) > 4 or any(not 0 < len(s) <= 64 for s in stops):
            raise ValueError("stop takes at most 4 non-empty strings of at most 64 characters")
        return stops

    @property
    def max_tokens_effective(self) -> int:
        return self.max_tokens or MAX_TOKENS_DEFAULT

    def sampling(self, seed: int) -> dict:
        """The ticket's integer sampling map (node/wire/sampling.py is the one place floats become ppm)."""
        return sampling_map(seed, self.temperature, self.top_p, self.max_tokens_effective, list(self.stop or []),
                            getattr(self, "response_format", None), self.frequency_penalty, self.presence_penalty,
                            self.repetition_penalty, logprobs_top(self.model_dump(by_alias=True)))

    def prompt(self) -> dict:
        """The prompt as the provider receives it (and as the prompt commitment hashes it)."""
        return chat_request_prompt(self.model_dump())

    def to_domain(self) -> InferenceRequest:
        """The request as the gateway's domain takes it (gateway/request.py)."""
        extension = self.llorch
        routed_in, routed_out = self.provider.ceilings() if self.provider else (None, None)
        return InferenceRequest(self.model, self.prompt(), self.sampling(0), self.seed,
                                lower(extension.max_price_in_per_1m if extension else None, routed_in),
                                lower(extension.max_price_out_per_1m if extension else None, routed_out),
                                self.provider.routing() if self.provider else Routing())


class ChatRequest(SamplingFields):
    """The subset of OpenAI's chat-completions body llorch serves; anything else is a 400 naming the field."""

    model_config = ConfigDict(**STRICT, json_schema_extra={"examples": [{
        "model": DEFAULT_MODEL_ID, "messages": [{"role": "system", "content": "Answer briefly."},
                                                {"role": "user", "content": "Name a prime number."}],
        "max_tokens": 16, "temperature": 0.7, "seed": 42, "stream": False}]})
    messages: list[Message] = Field(min_length=1, max_length=256)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS_MAX)
    response_format: Annotated[dict[str, Any] | None, BeforeValidator(_response_format),
                               WithJsonSchema(RESPONSE_FORMAT_SCHEMA)] = None
    tools: list[Tool] | None = Field(default=None, max_length=32, description=(
        "Functions the model may call. The model answers with one JSON object that llama.cpp's grammar holds to "
        "the declared functions and their parameters: every call's arguments validate. Non-streamed and streamed "
        "answers carry OpenAI's tool_calls; a stream says each call's name, then its arguments' pieces, and an "
        "answer's content, as the model writes them."))
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = Field(default=True, description=f"False: at most one call per answer (else at most "
                                                                f"{PARALLEL_CALLS_MAX}).")
    logprobs: bool = Field(default=False, description=(
        "Each output token's log-probability (the model's, before sampling settings or a grammar), in "
        "choices[].logprobs.content; committed in the ticket and the receipt, so identical on every provider of a "
        "determinism class. Not with tools."))
    top_logprobs: int | None = Field(default=None, ge=0, le=LOGPROBS_TOP_MAX, description=(
        "With logprobs: how many most likely tokens to list at each position (ties by token id)."))

    @model_validator(mode="after")
    def _tools(self) -> "ChatRequest":
        try:
            check_tools([tool.model_dump() for tool in self.tools or []],
                        self.tool_choice.model_dump() if isinstance(self.tool_choice, BaseModel)
                        else self.tool_choice)
            if self.response_format is not None and self.tools_active and \
                    response_format_entry(self.response_format) is not None:
                raise SchemaRefused("response_format and tools cannot be used together: the tools decide the "
                                    "answer's shape")
        except SchemaRefused as exc:
            raise PydanticCustomError("tools", str(exc)) from None
        if self.top_logprobs is not None and not self.logprobs:
            raise PydanticCustomError("logprobs", "top_logprobs needs logprobs: true")
        if self.logprobs and self.tools_active:
            raise PydanticCustomError("logprobs", "logprobs and tools cannot be used together: a tool call's "
                                                  "arguments are not the model's text")
        return self

    @property
    def tools_active(self) -> bool:
        return tools_active(self.model_dump())

    def sampling(self, seed: int) -> dict:
        """The ticket's sampling map, built from the body as `llorch ledger replay` builds it (node/wire/sampling.py),
        tools included."""
        return chat_request_sampling(self.model_dump(), seed)

    @property
    def max_tokens_effective(self) -> int:
        return self.max_tokens or self.max_completion_tokens or MAX_TOKENS_DEFAULT


class CompletionRequest(SamplingFields):
    """OpenAI's (legacy) completions body: a raw text prompt, no chat template."""

    model_config = ConfigDict(**STRICT, json_schema_extra={"examples": [{
        "model": DEFAULT_MODEL_ID, "prompt": "The three primary colours are", "max_tokens": 16, "seed": 7,
        "stream": True, "stream_options": {"include_usage": True}, "stop": ["\n"]}]})

    prompt_text: str = Field(alias="prompt", min_length=1, max_length=200_000)
    echo: JsonFalse = False
    best_of: int = Field(default=1, ge=1, le=1)
    logprobs: int | None = Field(default=None, ge=0, le=COMPLETION_LOGPROBS_MAX, description=(
        "Each output token's log-probability and this many most likely alternatives (OpenAI's legacy shape: "
        "choices[].logprobs.tokens, token_logprobs, top_logprobs, text_offset)."))
    suffix: None = None

    def prompt(self) -> dict:
        return {"text": self.prompt_text}


def parse_chat_request(body: bytes, model: type[SamplingFields] = ChatRequest) -> Any:
    """Parse a request body into ``model``; raise BadRequest naming the offending field."""
    if len(body) > limits.HTTP_BODY_BYTES_MAX:
        raise BadRequest(f"request body is {len(body)} bytes; the limit is {limits.HTTP_BODY_BYTES_MAX}")
    document = parse_json_object(body)
    try:
        return model.model_validate(document)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(part) for part in first["loc"]) or None
        raise BadRequest(f"invalid {param or 'body'}: {first['msg']}", param=param) from None


def request_of(body: dict) -> InferenceRequest:
    """A chat request body, parsed exactly as a customer's and taken to the domain's type (the probes build theirs
    so: gateway/probes.py)."""
    return parse_chat_request(json.dumps(body).encode(), ChatRequest).to_domain()


# Response shapes (documentation of what gateway/api/http_api.py writes; the schemathesis test holds them to it) ----
class ErrorDetail(BaseModel):
    message: str = Field(description="What is wrong and, where there is one, the remedy.")
    type: str = Field(description="OpenAI's error type: invalid_request_error, insufficient_quota, ...")
    param: str | None = Field(description="The request field at fault (dotted path), if one is.")
    code: str | None = Field(description="llorch's specific code: invalid_request, invalid_api_key, no_provider, ...")


class ErrorBody(BaseModel):
    """OpenAI's error shape; every error the gateway answers has it."""

    error: ErrorDetail


class Usage(BaseModel):
    """The billed counts: the provider's claims bounded by the gateway's own measurements."""

    prompt_tokens: int = Field(ge=0)
    completion_tokens: int = Field(ge=0)
    total_tokens: int = Field(ge=0)


class LlorchBill(BaseModel):
    """What a customer needs to check the bill later (docs/operating.md, "As a customer")."""

    request_id: str = Field(description="The receipt's request id: GET /v2/receipts/{request_id}.")
    provider: str = Field(description="The provider's libp2p peer id.")
    seed: int = Field(ge=0, description="The seed used (the gateway picks one when the request has none).")
    prompt_salt: str = Field(pattern="^[0-9a-f]{32}$", description="Hex; keep it to prove which prompt the "
                             "receipt commits to.")
    amount: int = Field(ge=0, description="What the tenant pays, in minor units (micro-euros).")
    provider_amount: int = Field(ge=0, description="The provider's payout, in minor units.")
    currency: str = Field(pattern="^[A-Z]{3}$")


class FailedChoice(ErrorDetail):
    index: int = Field(ge=0)


class LlorchBills(LlorchBill):
    """The first served choice's bill; with n > 1 also each choice's."""

    choices: list[LlorchBill | None] | None = Field(default=None, description="With n > 1: each choice's bill, by "
                                                                              "index (null: it failed).")
    failed_choices: list[FailedChoice] | None = Field(default=None, description="With n > 1: the choices that "
                                                                                "failed and why.")


FinishReason = Literal["stop", "length", "cancelled", "tool_calls"]


class FunctionCallOut(BaseModel):
    name: str
    arguments: str = Field(description="JSON text of an object that validates against the function's parameters.")


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"]
    function: FunctionCallOut


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str | None = Field(description="Null when the answer is tool calls.")
    tool_calls: list[ToolCallOut] | None = None


def call_id(request_id: str, index: int) -> str:
    """A tool call's id: derived from the request id, so a replayed or resumed answer names its calls the same."""
    return "call_" + hashlib.sha256(f"{request_id}:{index}".encode()).hexdigest()[:24]


def assistant_reply(chat: "ChatRequest", text: str, finish_reason: str, request_id: str) -> tuple[dict, str]:
    """The assistant message and finish_reason of a completion's text: with tools, the model's JSON answer taken
    back to OpenAI's shape (content, or tool_calls with finish_reason "tool_calls", or "length" when max_tokens
    cut the arguments short)."""
    if not chat.tools_active:
        return {"role": "assistant", "content": text}, finish_reason
    content, calls = reply_of(text)
    if calls is None:
        return {"role": "assistant", "content": content}, finish_reason
    return {"role": "assistant", "content": None,
            "tool_calls": [{"id": call_id(request_id, n), "type": "function", "function": call}
                           for n, call in enumerate(calls)]}, "tool_calls" if finish_reason == "stop" else finish_reason


class TokenLogprob(BaseModel):
    token: str = Field(description="The token's text (its bytes as UTF-8, an incomplete character replaced).")
    logprob: float = Field(le=0, description="Natural log of its probability, to 6 decimals; -9999 for never.")
    bytes: list[int] = Field(description="The token's bytes.")


class TokenLogprobs(TokenLogprob):
    top_logprobs: list[TokenLogprob] = Field(description="The most likely tokens at this position, most likely "
                                                         "first (top_logprobs of them).")


class ChatLogprobs(BaseModel):
    content: list[TokenLogprobs]
    refusal: None = None


class TextLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int] = Field(description="Where each token starts in the text, in characters.")


def _token_logprob(token: bytes, micro: int) -> dict:
    return {"token": token.decode("utf-8", "replace"), "logprob": micro / 1_000_000, "bytes": list(token)}


def chat_logprobs(entries: list[dict]) -> dict:
    """Token frames' logprobs entries (docs/protocol.md §6) in a chat choice's shape."""
    return {"content": [{**_token_logprob(entry["token"], entry["logprob"]),
                         "top_logprobs": [_token_logprob(token, micro) for token, micro in entry["top"]]}
                        for entry in entries], "refusal": None}


def completion_logprobs(entries: list[dict], text_offset: int = 0) -> dict:
    """Token frames' logprobs entries in a text completion's (legacy) shape; ``text_offset``: where the first
    token starts in the completion's text."""
    tokens = [entry["token"].decode("utf-8", "replace") for entry in entries]
    offsets = []
    for token in tokens:
        offsets.append(text_offset)
        text_offset += len(token)
    return {"tokens": tokens, "token_logprobs": [entry["logprob"] / 1_000_000 for entry in entries],
            "top_logprobs": [{token.decode("utf-8", "replace"): micro / 1_000_000 for token, micro in entry["top"]}
                             for entry in entries],
            "text_offset": offsets}


class ChatChoice(BaseModel):
    index: int = Field(ge=0, lt=CHOICES_MAX)
    message: AssistantMessage
    finish_reason: FinishReason
    logprobs: ChatLogprobs | None = Field(description="With logprobs: true.")


class TextChoice(BaseModel):
    index: int = Field(ge=0, lt=CHOICES_MAX)
    text: str
    finish_reason: FinishReason
    logprobs: TextLogprobs | None = Field(description="With logprobs (an integer).")


class CompletionShared(BaseModel):
    id: str
    created: int = Field(description="Unix seconds.")
    model: str
    system_fingerprint: str = Field(description="The engine build (determinism class) that produced the text.")
    usage: Usage
    llorch: LlorchBills


class ChatCompletion(CompletionShared):
    object: Literal["chat.completion"]
    choices: list[ChatChoice] = Field(min_length=1, max_length=CHOICES_MAX)


class TextCompletion(CompletionShared):
    object: Literal["text_completion"]
    choices: list[TextChoice] = Field(min_length=1, max_length=CHOICES_MAX)


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    kind: Literal["instruct", "base"] = Field(
        description="What the model is for: instruct (instruction-tuned: chat and raw completions) or base (a "
                    "pretrained model that only continues text: POST /v1/completions only; a chat request is "
                    "refused with 400).")
    context_length: int = Field(description="The model's trained context length in tokens (a provider may serve "
                                            "a shorter window; prompt plus max_tokens must fit the provider's).")
    license: str
    sha256: str = Field(description="The pinned sha256 of the model's GGUF file, which every receipt cites.")


def model_card(entry: CatalogEntry) -> dict:
    """A catalog entry as GET /v1/models shows it."""
    return {"id": entry.id, "object": "model", "created": 0, "owned_by": "llorch", "kind": entry.kind,
            "context_length": entry.context_tokens, "license": entry.license, "sha256": entry.sha256}


class ModelList(BaseModel):
    """The catalog models some fresh provider offers right now, among those the tenant may use."""

    object: Literal["list"]
    data: list[ModelCard]


class FunctionDelta(BaseModel):
    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(BaseModel):
    index: int = Field(ge=0)
    id: str | None = Field(default=None, description="In the first delta of each call.")
    type: Literal["function"] | None = None
    function: FunctionDelta


class Delta(BaseModel):
    role: Literal["assistant"] | None = Field(default=None, description="Only in the first chunk.")
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChatChunkChoice(BaseModel):
    index: int = Field(ge=0, lt=CHOICES_MAX)
    delta: Delta
    finish_reason: FinishReason | None
    logprobs: ChatLogprobs | None = Field(description="With logprobs: the entries of this chunk's tokens.")


class ChunkShared(BaseModel):
    id: str = Field(description="The same in every chunk of a stream: the completion id.")
    created: int
    model: str
    system_fingerprint: str | None = Field(default=None, description="In the last chunk.")
    llorch: LlorchBill | None = Field(default=None, description="In the last chunk of each choice: its bill.")
    usage: Usage | None = Field(default=None, description="With stream_options.include_usage: in a chunk of its "
                                                          "own, with no choices, after the last one.")


class ChatCompletionChunk(ChunkShared):
    object: Literal["chat.completion.chunk"]
    choices: list[ChatChunkChoice] = Field(max_length=1)


class TextChunkChoice(BaseModel):
    index: int = Field(ge=0, lt=CHOICES_MAX)
    text: str
    finish_reason: FinishReason | None
    logprobs: TextLogprobs | None = Field(description="With logprobs: the entries of this chunk's tokens.")


class TextCompletionChunk(ChunkShared):
    object: Literal["text_completion"]
    choices: list[TextChunkChoice] = Field(max_length=1)


STREAM_DESCRIPTION = (
    "With `stream: true`: server-sent events, each `data: <JSON>` and a blank line, ending with `data: [DONE]`. "
    "The last chunk has `finish_reason`, `system_fingerprint` and `llorch`; with `stream_options.include_usage` "
    "one more chunk carries `usage` and no choices. An error after the first token arrives as `data: <error "
    "body>`; an error before it is an ordinary JSON error response with its status.")
