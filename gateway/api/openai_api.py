"""Step (1) of a request: the OpenAI chat-completions request, parsed strictly, and the response shapes.

Floats from the customer (temperature, top_p) are converted once, here, into integer parts per million; nothing
downstream sees a float.
"""

from __future__ import annotations

import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from llorch.gateway import limits
from llorch.gateway.errors import BadRequest
from llorch.node.wire.sampling import MAX_TOKENS_DEFAULT, MAX_TOKENS_MAX, chat_request_prompt, sampling_map


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=200_000)
    name: str | None = Field(default=None, max_length=64)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class LlorchExtension(BaseModel):
    """Optional llorch fields of a request body (`extra_body={"llorch": {...}}` in the OpenAI SDK)."""

    model_config = ConfigDict(extra="forbid")
    max_price_in_per_1m: int | None = Field(default=None, ge=0, le=10**12)
    max_price_out_per_1m: int | None = Field(default=None, ge=0, le=10**12)


class SamplingFields(BaseModel):
    """What chat and text completion requests share: model, sampling, limits, streaming, the llorch extension."""

    model_config = ConfigDict(extra="forbid")
    model: str = Field(min_length=1, max_length=128)
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS_MAX)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    n: int = Field(default=1, ge=1, le=1)
    user: str | None = Field(default=None, max_length=256)
    frequency_penalty: float = Field(default=0.0, ge=0.0, le=0.0)
    presence_penalty: float = Field(default=0.0, ge=0.0, le=0.0)
    llorch: LlorchExtension | None = None

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
        return sampling_map(seed, self.temperature, self.top_p, self.max_tokens_effective, list(self.stop or []))

    def prompt(self) -> dict:
        """The prompt as the provider receives it (and as the prompt commitment hashes it)."""
        return chat_request_prompt(self.model_dump())


class ChatRequest(SamplingFields):
    """The subset of OpenAI's chat-completions body llorch serves; anything else is a 400 naming the field."""

    messages: list[Message] = Field(min_length=1, max_length=256)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS_MAX)

    @property
    def max_tokens_effective(self) -> int:
        return self.max_tokens or self.max_completion_tokens or MAX_TOKENS_DEFAULT


class CompletionRequest(SamplingFields):
    """OpenAI's (legacy) completions body: a raw text prompt, no chat template."""

    prompt_text: str = Field(alias="prompt", min_length=1, max_length=200_000)
    echo: Literal[False] = False
    best_of: int = Field(default=1, ge=1, le=1)
    logprobs: None = None
    suffix: None = None

    def prompt(self) -> dict:
        return {"text": self.prompt_text}


def parse_chat_request(body: bytes, model: type = ChatRequest):
    """Parse a request body into ``model``; raise BadRequest naming the offending field."""
    if len(body) > limits.HTTP_BODY_BYTES_MAX:
        raise BadRequest(f"request body is {len(body)} bytes; the limit is {limits.HTTP_BODY_BYTES_MAX}")
    try:
        document = json.loads(body)
    except RecursionError:
        raise BadRequest("request body is not valid JSON: nested too deeply") from None
    except ValueError as exc:       # not JSON, not UTF-8, or a number with more digits than Python converts
        raise BadRequest(f"request body is not valid JSON: {exc}") from None
    if not isinstance(document, dict):
        raise BadRequest("request body must be a JSON object")
    try:
        return model.model_validate(document)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(part) for part in first["loc"]) or None
        raise BadRequest(f"invalid {param or 'body'}: {first['msg']}", param=param) from None
