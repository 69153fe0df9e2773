"""The OpenAI-compatible HTTP surface: GET /v1/models, POST /v1/chat/completions (JSON or SSE), GET /healthz.

Handlers are thin: parse (gateway/openai_api.py), call Gateway.complete (gateway/service.py), shape the answer.
Every error is OpenAI's error shape with a specific message.
"""

from __future__ import annotations

import json
import logging
import time

import trio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send

from gateway import limits
from gateway.errors import BadRequest, GatewayError
from gateway.openai_api import ChatRequest, parse_chat_request
from gateway.service import Completion, Gateway, new_request_id
from node.stream_io import now_ms

log = logging.getLogger("llorch.gateway")


def error_response(error: GatewayError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status)


def completion_body(chat: ChatRequest, completion: Completion, created: int) -> dict:
    receipt = completion.receipt
    return {
        "id": completion.request_id, "object": "chat.completion", "created": created, "model": chat.model,
        "system_fingerprint": receipt.engine_build,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": completion.text},
                     "finish_reason": receipt.finish_reason, "logprobs": None}],
        "usage": usage_of(completion),
        "llorch": llorch_extension(completion),
    }


def usage_of(completion: Completion) -> dict:
    receipt = completion.receipt
    return {"prompt_tokens": receipt.tokens_in, "completion_tokens": receipt.tokens_out,
            "total_tokens": receipt.tokens_in + receipt.tokens_out}


def llorch_extension(completion: Completion) -> dict:
    """What a customer needs to check their bill later: the request id, provider, seed and the prompt salt."""
    receipt = completion.receipt
    return {"request_id": completion.request_id, "provider": completion.provider_peer_id, "seed": completion.seed,
            "prompt_salt": completion.salt.hex(), "amount": receipt.amount, "currency": receipt.currency}


async def read_body_capped(request: Request) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limits.HTTP_BODY_BYTES_MAX:
        raise BadRequest(f"request body is {declared} bytes; the limit is {limits.HTTP_BODY_BYTES_MAX}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limits.HTTP_BODY_BYTES_MAX:
            raise BadRequest(f"request body exceeds {limits.HTTP_BODY_BYTES_MAX} bytes")
    return bytes(body)


class ChatStreamResponse(Response):
    """An SSE response that starts only when the first token arrives, so errors before it keep their status code.

    Runs the request and a watcher for the client's disconnect side by side; a disconnect cancels the request,
    which closes the provider stream, which stops the provider's engine.
    """

    def __init__(self, gateway: Gateway, chat: ChatRequest, tenant: str) -> None:
        self.background = None
        self.gateway = gateway
        self.chat = chat
        self.tenant = tenant
        self.created = int(time.time())
        self.request_id = new_request_id()     # known before the first byte: every chunk carries it

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async with trio.open_nursery() as nursery:
            async def watch_disconnect() -> None:
                while (await receive())["type"] != "http.disconnect":
                    pass
                nursery.cancel_scope.cancel()

            nursery.start_soon(watch_disconnect)
            await self._run(send)
            nursery.cancel_scope.cancel()

    async def _run(self, send: Send) -> None:
        started = False

        async def start() -> None:
            nonlocal started
            if not started:
                started = True
                await send({"type": "http.response.start", "status": 200,
                            "headers": [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]})
                await self._event({"role": "assistant", "content": ""}, None, send)

        async def on_text(text: str) -> None:
            await start()
            await self._event({"content": text}, None, send)

        try:
            completion = await self.gateway.complete(self.chat, self.tenant, on_text, self.request_id)
        except GatewayError as error:
            if not started:
                response = error_response(error)
                await response({"type": "http"}, _no_receive, send)
                return
            await self._data(error.body(), send)
            await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})
            return
        await start()
        await self._event({}, completion.receipt.finish_reason, send, completion)
        if self.chat.stream_options and self.chat.stream_options.include_usage:
            await self._data(self._chunk([], completion, usage=usage_of(completion)), send)
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})

    def _chunk(self, choices: list, completion: Completion | None = None, usage: dict | None = None) -> dict:
        chunk = {"id": self.request_id, "object": "chat.completion.chunk", "created": self.created,
                 "model": self.chat.model, "choices": choices}
        if completion is not None:
            chunk["system_fingerprint"] = completion.receipt.engine_build
            chunk["llorch"] = llorch_extension(completion)
        if usage is not None:
            chunk["usage"] = usage
        return chunk

    async def _event(self, delta: dict, finish_reason: str | None, send: Send,
                     completion: Completion | None = None) -> None:
        choice = {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
        await self._data(self._chunk([choice], completion), send)

    async def _data(self, payload: dict, send: Send) -> None:
        line = b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"
        await send({"type": "http.response.body", "body": line, "more_body": True})


async def _no_receive() -> dict:
    return {"type": "http.disconnect"}


def build_app(gateway: Gateway) -> FastAPI:
    app = FastAPI(title="llorch gateway", version="0.1.0",
                  description="OpenAI-compatible gateway to the llorch peer-to-peer inference market.")

    @app.exception_handler(GatewayError)
    async def _gateway_error(request: Request, error: GatewayError) -> JSONResponse:
        return error_response(error)

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok", "providers": len(gateway.directory.fresh(now_ms())),
                "models": gateway.offered_models()}

    @app.get("/v1/models")
    async def list_models(request: Request) -> dict:
        gateway.authenticate(request.headers.get("authorization"))
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": 0, "owned_by": "llorch"}
                                           for model_id in gateway.offered_models()]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        tenant = gateway.authenticate(request.headers.get("authorization"))
        chat = parse_chat_request(await read_body_capped(request))
        if chat.stream:
            return ChatStreamResponse(gateway, chat, tenant)

        async def ignore(text: str) -> None:
            return None

        completion = await gateway.complete(chat, tenant, ignore)
        return JSONResponse(completion_body(chat, completion, int(time.time())),
                            headers={"x-llorch-provider": completion.provider_peer_id})

    return app
