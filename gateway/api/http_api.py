"""The HTTP surface: the OpenAI-compatible routes (GET /v1/models, POST /v1/chat/completions and /v1/completions, JSON
or SSE), llorch's own /v2 routes, /healthz (ready), /livez (up) and /metrics.

Handlers are thin: read and parse the body (gateway/api/body.py, openai_api.py), call Gateway.complete
(gateway/service.py), shape the answer. Every error is OpenAI's error shape with a specific message. Each route
declares its body, responses and security for the OpenAPI document (gateway/api/openapi.py, GET /openapi.json).
"""

from __future__ import annotations

import base64
import json
import logging
import re
import secrets
import time
from typing import Annotated

import trio
from fastapi import FastAPI, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from llorch.gateway.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE, UNMATCHED_ROUTE
from llorch.gateway import limits
from llorch.gateway.api.body import parse_json, read_body_capped
from llorch.gateway.api.pages import mount_pages
from llorch.gateway.errors import BadRequest, DatabaseUnavailable, GatewayError, MethodNotAllowed, NotFound
from llorch.ledger.errors import StoreError
from llorch.gateway.api.openai_api import (STREAM_DESCRIPTION, ChatCompletion, ChatCompletionChunk, ChatRequest,
                                           CompletionRequest, ModelList, TextCompletion, TextCompletionChunk,
                                           assistant_reply, call_id, chat_logprobs, completion_logprobs, model_card,
                                           parse_chat_request)
from llorch.gateway.api.openapi import (BEARER, CatalogView, GatewayInfo, Health, Liveness, ProviderCapacity,
                                        ProviderList, ProviderRecord, ReceiptProof, RegistrationBody, Statement, errors,
                                        event_stream, openapi_document, request_body)
from llorch.gateway.market.providers import parse_registration_body, record_json
from llorch.gateway.market.tenants import Tenant
from llorch.node.wire.tools import AnswerStream
from llorch.gateway.service import PROMPT_BYTES_MAX, Completion, Gateway, new_request_id
from llorch.gateway.ticket_runner import Piece
from llorch.node.models import entry_map
from llorch.ledger.errors import sole_exception
from llorch.node.stream_io import now_ms

log = logging.getLogger("llorch.gateway")


def error_response(error: GatewayError) -> JSONResponse:
    retry_after = getattr(error, "retry_after_s", None)
    headers = {"retry-after": str(retry_after)} if retry_after is not None else None
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


def completion_body(chat, results: list[Completion | GatewayError], created: int) -> dict:
    """The response to a request whose choices (``n``, in order) ended with these results: each completion is a
    choice at its index; a failed choice is named in ``llorch.failed_choices`` (the others were served and billed);
    usage is the sum of the choices' billed counts."""
    served = [(index, result) for index, result in enumerate(results) if isinstance(result, Completion)]
    first = served[0][1]
    body = {"id": first.request_id, "object": "text_completion" if isinstance(chat, CompletionRequest) else
            "chat.completion", "created": created, "model": chat.model,
            "system_fingerprint": first.receipt.engine_build,
            "choices": [completion_choice(chat, index, completion) for index, completion in served],
            "usage": usage_of(*(completion for _, completion in served)),
            "llorch": bills_of(results)}
    return body


def completion_choice(chat, index: int, completion: Completion) -> dict:
    """One choice of a non-streamed answer, in OpenAI's shape (text, or an assistant message with tool calls)."""
    receipt = completion.receipt
    asked = receipt.logprobs_sha256 is not None          # the ticket asked for logprobs
    entries = list(completion.logprobs)
    if isinstance(chat, CompletionRequest):
        return {"index": index, "text": completion.text, "finish_reason": receipt.finish_reason,
                "logprobs": completion_logprobs(entries) if asked else None}
    message, finish_reason = assistant_reply(chat, completion.text, receipt.finish_reason, completion.request_id)
    return {"index": index, "message": message, "finish_reason": finish_reason,
            "logprobs": chat_logprobs(entries) if asked else None}


def bills_of(results: list[Completion | GatewayError]) -> dict:
    """The ``llorch`` object: the first served choice's bill, and with several choices each choice's bill (None for
    a failed one) and the errors of the failed ones."""
    served = [result for result in results if isinstance(result, Completion)]
    bill = llorch_extension(served[0])
    if len(results) > 1:
        bill["choices"] = [llorch_extension(result) if isinstance(result, Completion) else None for result in results]
        bill["failed_choices"] = [{"index": index, **result.body()["error"]} for index, result in enumerate(results)
                                  if isinstance(result, GatewayError)]
    return bill


def answer_deltas(events: list[tuple], request_id: str) -> list[dict]:
    """What node/wire/tools.py's AnswerStream read, as OpenAI streams it: content pieces; for each tool call a
    delta with its index, id, type and name (arguments empty), then pieces of its arguments."""
    deltas: list[dict] = []
    for event in events:
        if event[0] == "content":
            deltas.append({"content": event[1]})
        elif event[0] == "call":
            deltas.append({"tool_calls": [{"index": event[1], "id": call_id(request_id, event[1]), "type": "function",
                                           "function": {"name": event[2], "arguments": ""}}]})
        else:
            deltas.append({"tool_calls": [{"index": event[1], "function": {"arguments": event[2]}}]})
    return deltas


def usage_of(*completions: Completion) -> dict:
    """The billed counts (the providers' claims bounded by the gateway's own measurements), summed over the
    choices: each choice's prompt is billed with its own ticket."""
    tokens_in = sum(completion.settlement.tokens_in for completion in completions)
    tokens_out = sum(completion.settlement.tokens_out for completion in completions)
    return {"prompt_tokens": tokens_in, "completion_tokens": tokens_out, "total_tokens": tokens_in + tokens_out}


def llorch_extension(completion: Completion) -> dict:
    """What a customer needs to check their bill later: the request id, provider, seed and the prompt salt."""
    receipt = completion.receipt
    return {"request_id": completion.request_id, "provider": completion.provider_peer_id, "seed": completion.seed,
            "prompt_salt": completion.salt.hex(), "amount": completion.charge.charge,
            "provider_amount": completion.charge.payout, "currency": receipt.currency}


HUNG_UP = object()
CLIENT_CLOSED_REQUEST = 499           # the status nginx logs for a client that went away before the answer


async def unless_the_client_hangs_up(receive: Receive, work):
    """``await work()``, cancelled as soon as the client's connection closes (ASGI ``http.disconnect``; the request
    body must have been read): a request waiting in the admission queue leaves it at once and is never placed, a
    placed one cancels its provider stream and is billed only for what was relayed. Returns work's result, or
    HUNG_UP if the client went away first."""
    result = HUNG_UP
    try:
        async with trio.open_nursery() as nursery:
            async def watch_disconnect() -> None:
                while (await receive())["type"] != "http.disconnect":
                    pass
                nursery.cancel_scope.cancel()

            nursery.start_soon(watch_disconnect)
            result = await work()
            nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:      # work's own error (a 4xx, a 503) reaches the handlers unwrapped
        sole = sole_exception(group)
        if sole is group:
            raise
        raise sole from None
    return result


class ChatStreamResponse(Response):
    """An SSE response that starts only when the first token arrives, so errors before it keep their status code.

    Runs the request (its ``n`` choices side by side, their chunks interleaved, each with its index) and a watcher
    for the client's disconnect; a disconnect cancels the request, which closes the provider streams, which stops
    the providers' engines. A choice that fails after the stream started is reported in one error event after the
    other choices finished (they were served and billed).
    """

    def __init__(self, gateway: Gateway, chat: ChatRequest, tenant: Tenant) -> None:
        self.background = None
        self.gateway = gateway
        self.chat = chat
        self.tenant = tenant
        self.created = int(time.time())
        self.request_id = new_request_id()     # known before the first byte: every chunk carries it
        self.chat_shape = not isinstance(chat, CompletionRequest)
        self.tools = isinstance(chat, ChatRequest) and chat.tools_active
        self.text_offsets = [0] * chat.n       # completions with logprobs: where each choice's next token starts
        self.started = False
        self.sending = trio.Lock()             # the choices' chunks go out whole, one at a time
        self._templates: dict[int, tuple[bytes, bytes]] = {}     # a choice's content chunk around its text

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope.setdefault("state", {})["request_id"] = self.request_id
        await unless_the_client_hangs_up(receive, lambda: self._run(send))

    def _request_id_of(self, index: int) -> str:
        """Choice ``index``'s request id (gateway/service.py ``complete_choices``): its tool calls' ids derive
        from it."""
        return self.request_id if index == 0 else f"{self.request_id}-{index}"

    async def _start(self, provider: str, send: Send) -> None:
        if self.started:
            return
        self.started = True
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache"),
                                (b"x-llorch-provider", provider.encode())]})

    async def _run(self, send: Send) -> None:
        # with tools, each choice's answer is JSON, read as it arrives and said in OpenAI's shape
        answers = [AnswerStream() for _ in range(self.chat.n)]
        opened = [False] * self.chat.n

        def on_text(index: int):
            async def text(pieces: list[Piece], provider: str) -> None:
                # One chunk per token, as OpenAI streams them; a frame's chunks leave in one write.
                lines = []
                if self.chat_shape and not opened[index]:
                    opened[index] = True
                    lines.append(self._event_line(index, {"role": "assistant", "content": ""}, None))
                for piece, logprobs in pieces:
                    if self.tools:
                        lines += [self._event_line(index, delta, None)
                                  for delta in answer_deltas(answers[index].feed(piece), self._request_id_of(index))]
                    elif logprobs:
                        lines.append(self._event_line(index, {"content": piece}, None, logprobs=logprobs))
                    else:
                        lines.append(self._content_line(index, piece))
                async with self.sending:
                    await self._start(provider, send)
                    if lines:
                        await send({"type": "http.response.body", "body": b"".join(lines), "more_body": True})
            return text

        try:
            try:
                results = await self.gateway.complete_choices(self.chat.to_domain(), self.tenant, self.chat.n,
                                                              on_text, self.request_id)
            except StoreError as exc:
                raise DatabaseUnavailable.of(exc) from None
        except GatewayError as error:
            if not self.started:
                response = error_response(error)
                await response({"type": "http"}, _no_receive, send)
                return
            await self._data(error.body(), send)
            await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})
            return
        served = [(index, result) for index, result in enumerate(results) if isinstance(result, Completion)]
        await self._start(served[0][1].provider_peer_id, send)
        for index, completion in served:
            if self.chat_shape and not opened[index]:          # an answer with no text at all
                await self._event(index, {"role": "assistant", "content": ""}, None, send)
            finish_reason = completion.receipt.finish_reason
            if self.tools:
                answer = answers[index]
                if answer.calls:
                    finish_reason = "tool_calls" if finish_reason == "stop" else finish_reason
                elif answer.content is None and answer.text:      # not an answer object: its text as it is
                    await self._event(index, {"content": answer.text}, None, send)
            await self._event(index, {}, finish_reason, send, completion)
        if self.chat.stream_options and self.chat.stream_options.include_usage:
            await self._data(self._chunk([], usage=usage_of(*(completion for _, completion in served))), send)
        failed = [(index, result) for index, result in enumerate(results) if isinstance(result, GatewayError)]
        if failed:
            index, failure = failed[0]
            body = failure.body()
            body["error"]["message"] = (f"choice {index} of {self.chat.n} failed (the others were served and "
                                        f"billed): {body['error']['message']}")
            await self._data(body, send)
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})

    def _chunk(self, choices: list, completion: Completion | None = None, usage: dict | None = None) -> dict:
        chunk: dict[str, object] = {"id": self.request_id, "object": "chat.completion.chunk" if self.chat_shape
                                    else "text_completion", "created": self.created, "model": self.chat.model,
                                    "choices": choices}
        if completion is not None:
            chunk["system_fingerprint"] = completion.receipt.engine_build
            chunk["llorch"] = llorch_extension(completion)
        if usage is not None:
            chunk["usage"] = usage
        return chunk

    async def _event(self, index: int, delta: dict, finish_reason: str | None, send: Send,
                     completion: Completion | None = None) -> None:
        await send({"type": "http.response.body", "body": self._event_line(index, delta, finish_reason, completion),
                    "more_body": True})

    def _event_line(self, index: int, delta: dict, finish_reason: str | None, completion: Completion | None = None,
                    logprobs: list[dict] | None = None) -> bytes:
        """One chunk of choice ``index`` as its SSE line; ``logprobs``: the entries of the tokens whose text it
        carries (with logprobs asked); ``completion``: the choice's end (its last chunk carries its bill)."""
        content = {"delta": delta} if self.chat_shape else {"text": delta.get("content", "")}
        shaped = None
        if logprobs:
            if self.chat_shape:
                shaped = chat_logprobs(logprobs)
            else:
                shaped = completion_logprobs(logprobs, self.text_offsets[index])
                self.text_offsets[index] += sum(len(token) for token in shaped["tokens"])
        choice = {"index": index, **content, "finish_reason": finish_reason, "logprobs": shaped}
        return sse_line(self._chunk([choice], completion))

    def _content_line(self, index: int, piece: str) -> bytes:
        """``_event_line(index, {"content": piece}, None)``, byte for byte, at the cost of encoding ``piece`` alone:
        the chunk around it is the same for every token of the choice (the relay's per-token work at 32 streams)."""
        template = self._templates.get(index)
        if template is None:
            line = self._event_line(index, {"content": _PLACEHOLDER}, None)
            prefix, suffix = line.split(_PLACEHOLDER_JSON)
            template = self._templates[index] = (prefix, suffix)
        return template[0] + json.dumps(piece).encode() + template[1]

    async def _data(self, payload: dict, send: Send) -> None:
        await send({"type": "http.response.body", "body": sse_line(payload), "more_body": True})


_PLACEHOLDER = "\ue000llorch-content\ue000"      # a private-use string: JSON writes it as \ue000..., found once
_PLACEHOLDER_JSON = json.dumps(_PLACEHOLDER).encode()


def sse_line(payload: dict) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


async def _no_receive() -> dict:
    return {"type": "http.disconnect"}


class GatewayApp(FastAPI):
    """The FastAPI app, with the two completion routes taken straight to their handler: past FastAPI's and
    Starlette's middleware, routing and dependency solving, about 0.15 ms of each request (a quarter of what the
    gateway may add at p50). The handler, the X-Request-Id and metrics wrapper and the answers are the same ones."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.completion_routes: dict[str, tuple[type, APIRoute]] = {}   # path → (body shape, route: for metrics)
        self.fast_completion: ASGIApp | None = None   # build_app's: the handler as an ASGI app, in RequestIdMiddleware

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = self.completion_routes.get(scope.get("path", "")) if scope.get("method") == "POST" else None
        if route is None or self.fast_completion is None:
            await super().__call__(scope, receive, send)
            return
        scope["route"], scope["app"] = route[1], self
        await self.fast_completion(scope, receive, send)


def build_app(gateway: Gateway) -> FastAPI:
    app = GatewayApp(title="llorch gateway", version="0.1.0",
                     description="OpenAI-compatible gateway to the llorch peer-to-peer inference market.",
                     generate_unique_id_function=lambda route: route.name)
    app.add_middleware(RequestIdMiddleware, gateway=gateway)

    @app.exception_handler(GatewayError)
    async def _gateway_error(request: Request, error: GatewayError) -> JSONResponse:
        return error_response(error)

    @app.exception_handler(StoreError)
    async def _database_error(request: Request, error: StoreError) -> JSONResponse:
        return error_response(DatabaseUnavailable.of(error))

    @app.exception_handler(StarletteHTTPException)
    async def _routing_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        """Starlette's own answers (no route, wrong method) in OpenAI's error shape too."""
        method, path = request.method, request.url.path
        if error.status_code == 405:
            response = error_response(MethodNotAllowed(f"method {method} is not allowed on {path}"))
            response.headers.update(error.headers or {})
            return response
        if error.status_code == 404:
            return error_response(NotFound(f"no route for {method} {path}: the API is described at /openapi.json"))
        return error_response(BadRequest(f"{error.detail}"))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        """A path or query parameter the route's signature refuses: a 400 naming it, as the handlers' own checks."""
        first = error.errors()[0]
        param = ".".join(str(part) for part in first["loc"][1:]) or None
        return error_response(BadRequest(f"invalid {param or 'request'}: {first['msg']}", param=param))

    @app.get("/healthz", response_model=None, responses={
        200: {"model": Health, "description": "Ready: at least one approved provider has a fresh attestation."},
        503: {"model": Health, "description": "Up, but no approved provider is fresh here (every request would "
                                              "be a 503): a load balancer sends customers elsewhere."}})
    async def healthz() -> JSONResponse:
        """Readiness, for a load balancer's health check (GET /livez says only that the process is up)."""
        providers = await gateway.market.ready_providers()
        if gateway.drain is not None and gateway.drain.draining:
            return JSONResponse({"status": "draining", "providers": providers, "models": [],
                                 "reason": "this replica is stopping: it finishes what it serves and takes nothing "
                                           "new"}, status_code=503, headers={"retry-after": "1"})
        if providers:
            return JSONResponse({"status": "ok", "providers": providers, "models": await gateway.offered_models()})
        return JSONResponse({"status": "unready", "providers": 0, "models": [],
                             "reason": "no approved provider has a fresh attestation here (nodes reconnect within "
                                       "seconds of a restart; check `llorch gateway providers list`)"},
                            status_code=503, headers={"retry-after": "1"})

    @app.get("/livez", response_model=None, responses={200: {"model": Liveness, "description": "Up."}})
    async def livez() -> dict:
        """Liveness: the process answers HTTP (restart it only when this fails)."""
        return {"status": "alive"}

    @app.get("/v2/platform/gateway", response_model=None,
             responses={200: {"model": GatewayInfo, "description": "The gateway's libp2p identity."}})
    async def gateway_info() -> dict:
        addrs = gateway.p2p.addrs()
        ports = [int(addr.split("/tcp/")[1].split("/")[0]) for addr in addrs if "/tcp/" in addr]
        suffix = f"/p2p/{gateway.p2p.peer_id}"
        return {"peer_id": gateway.p2p.peer_id, "p2p_port": ports[0] if ports else None,
                "multiaddrs": [addr if addr.endswith(suffix) else addr + suffix for addr in addrs]}

    @app.get("/metrics", response_class=Response, responses={200: METRICS_ANSWER})
    async def metrics() -> Response:
        views = await gateway.provider_views()
        text = gateway.metrics.render(len(views), sum(v.approved for v in views), gateway.directory.pending())
        return Response(text, headers={"content-type": METRICS_CONTENT_TYPE})

    @app.get("/v1/models", response_model=None, openapi_extra=BEARER,
             responses={200: {"model": ModelList, "description": "Models on offer now."}, **errors(401)})
    async def list_models(request: Request) -> dict:
        tenant = await gateway.authenticate(request.headers.get("authorization"))
        # "kind": "instruct" (chat and completions) or "base" (POST /v1/completions only)
        catalog = gateway.catalog.catalog
        return {"object": "list", "data": [model_card(catalog.lookup(model_id))
                                           for model_id in await gateway.offered_models() if tenant.allows(model_id)]}

    @app.get("/v1/catalog", response_model=None,
             responses={200: {"model": CatalogView, "description": "The signed catalog, newest version."}})
    async def signed_catalog() -> dict:
        published = gateway.catalog.published
        return {"version": published.catalog.version, "issued_ms": published.issued_ms,
                "gateway_id": gateway.key.peer_id,
                "document": base64.b64encode(published.document).decode(),
                "entries": [entry_map(entry) for _, entry in sorted(published.catalog.entries.items())]}

    completion_errors = errors(400, 401, 402, 403, 404, 429, 502, 503)

    @app.post("/v1/chat/completions", response_model=None,
              openapi_extra={**BEARER, **request_body(ChatRequest, CHAT_BODY)},
              responses={200: completion_answer(ChatCompletion, ChatCompletionChunk), **completion_errors})
    async def chat_completions(request: Request):
        return await serve_completion(request, ChatRequest)

    @app.post("/v1/completions", response_model=None,
              openapi_extra={**BEARER, **request_body(CompletionRequest, COMPLETION_BODY)},
              responses={200: completion_answer(TextCompletion, TextCompletionChunk), **completion_errors})
    async def text_completions(request: Request):
        return await serve_completion(request, CompletionRequest)

    async def serve_completion(request: Request, shape: type):
        tenant = await gateway.authenticate(request.headers.get("authorization"))
        chat = parse_chat_request(await read_body_capped(request), shape)
        if chat.stream:
            return ChatStreamResponse(gateway, chat, tenant)

        async def ignore(pieces: list[Piece], provider: str) -> None:
            return None

        request_id = new_request_id()
        request.state.request_id = request_id
        results = await unless_the_client_hangs_up(
            request.receive, lambda: gateway.complete_choices(chat.to_domain(), tenant, chat.n, lambda _: ignore,
                                                              request_id))
        if results is HUNG_UP:
            return Response(status_code=CLIENT_CLOSED_REQUEST)       # nobody reads it
        body = completion_body(chat, results, int(time.time()))
        return JSONResponse(body, headers={"x-llorch-provider": body["llorch"]["provider"]})

    @app.post("/v2/platform/providers/register", response_model=None,
              openapi_extra=request_body(RegistrationBody, f"At most {REGISTRATION_BODY_BYTES_MAX} bytes."),
              responses={200: {"model": ProviderRecord, "description": "A newer registration of a known provider."},
                         201: {"model": ProviderRecord, "description": "A new provider: pending approval, or "
                                                                        "approved with a join token."},
                         **errors(400, 403, 429)})
    async def register_provider(request: Request) -> JSONResponse:
        document = parse_json(await read_body_capped(request, REGISTRATION_BODY_BYTES_MAX))
        registration, envelope, invitation = parse_registration_body(document, now_ms(), gateway.key.public_key)
        source = request.client.host if request.client else None
        new = await gateway.providers.get(registration.provider_id) is None
        record = await gateway.providers.register(registration, envelope, now_ms(), source, invitation)
        return JSONResponse(record_json(record), status_code=201 if new or record.status == "pending" else 200)

    @app.get("/v2/platform/providers", response_model=None, openapi_extra=BEARER,
             responses={200: {"model": ProviderList, "description": "Every registration."}, **errors(401)})
    async def list_providers(request: Request) -> dict:
        await gateway.authenticate(request.headers.get("authorization"))
        return {"providers": [record_json(r) for r in await gateway.providers.all()]}

    @app.get("/v2/platform/providers/{provider_id}/capacity", response_model=None, openapi_extra=BEARER,
             responses={200: {"model": ProviderCapacity, "description": "Live capacity."}, **errors(401, 404)})
    async def provider_capacity(provider_id: Annotated[str, Path(description="The provider's peer id.")],
                                request: Request) -> dict:
        await gateway.authenticate(request.headers.get("authorization"))
        record = await gateway.providers.get(provider_id)
        if record is None:
            raise NotFound(f"provider {provider_id} is not registered here")
        attestation = gateway.directory.get(record.provider_key)
        if attestation is None or attestation.expires_ms <= now_ms():
            return {"provider_id": provider_id, "online": False, "available_slots": 0, "total_slots": 0,
                    "queue_depth": 0, "estimated_wait_ms": None}
        return {"provider_id": provider_id, "online": True, "available_slots": attestation.slots_free,
                "total_slots": attestation.slots_total, "queue_depth": attestation.queue_depth,
                "estimated_wait_ms": attestation.wait_ms, "engine_build": attestation.engine_build,
                "as_of_ms": attestation.issued_ms}

    @app.get("/v2/billing/usage", response_model=None, openapi_extra=BEARER,
             responses={200: {"model": Statement, "description": "The statement."}, **errors(400, 401)})
    async def billing_usage(request: Request, period: Annotated[str | None, Query(
            description="YYYY-MM (UTC); the current month when absent.",
            json_schema_extra={"pattern": PERIOD.pattern})] = None) -> dict:
        """The calling tenant's own statement for a period (never another tenant's)."""
        tenant = await gateway.authenticate(request.headers.get("authorization"))
        period = time.strftime("%Y-%m", time.gmtime()) if period is None else period
        if not PERIOD.fullmatch(period):
            raise BadRequest("period must be YYYY-MM", param="period")
        return await gateway.books.statement("tenant", tenant.name, period)

    @app.get("/v2/receipts/{request_id}", response_model=None, openapi_extra=BEARER,
             responses={200: {"model": ReceiptProof, "description": "The receipt and its proof."},
                        **errors(401, 404)})
    async def receipt_lookup(request_id: Annotated[str, Path(description="`llorch.request_id` of a response.")],
                             request: Request) -> dict:
        """A receipt of the calling tenant, with the provider's cosigned checkpoint and the inclusion proof."""
        tenant = await gateway.authenticate(request.headers.get("authorization"))
        document = await gateway.receipt_proof(tenant, request_id)
        if document is None:
            raise NotFound(f"no receipt {request_id} for this API key")
        return document

    async def fast_completion(scope: Scope, receive: Receive, send: Send) -> None:
        try:
            response = await serve_completion(Request(scope, receive), app.completion_routes[scope["path"]][0])
        except GatewayError as error:
            response = error_response(error)
        except StoreError as exc:
            response = error_response(DatabaseUnavailable.of(exc))
        await response(scope, receive, send)

    routes = {route.path: route for route in app.routes if isinstance(route, APIRoute)}
    app.fast_completion = RequestIdMiddleware(fast_completion, gateway)
    app.completion_routes = {path: (shape, routes[path]) for path, shape in
                             (("/v1/chat/completions", ChatRequest), ("/v1/completions", CompletionRequest))}
    mount_pages(app, gateway)      # the customer page and the operator console (HTML, not in the document)

    def openapi() -> dict:
        if app.openapi_schema is None:
            app.openapi_schema = openapi_document(app)
        return app.openapi_schema

    app.openapi = openapi          # type: ignore[method-assign]   # FastAPI's documented way to replace it
    return app


PERIOD = re.compile(r"^[0-9]{4}-(0[1-9]|1[0-2])$")     # fullmatch: no trailing newline, ASCII digits only
CHAT_BODY = (f"OpenAI's chat-completions body, the subset llorch serves: any other field is a 400 naming it. At most "
             f"{limits.HTTP_BODY_BYTES_MAX} bytes, and the prompt at most {PROMPT_BYTES_MAX} bytes encoded.")
COMPLETION_BODY = CHAT_BODY.replace("chat-completions body", "(legacy) completions body: a raw prompt, no template")


REGISTRATION_BODY_BYTES_MAX = 16 * 1024
METRICS_ANSWER = {"description": "Prometheus text format 0.0.4.", "content": {"text/plain": {"schema": {
    "type": "string"}}}}


def completion_answer(model, chunk) -> dict:
    """The 200 of a completion route: JSON, or server-sent events with `stream: true`."""
    return {"model": model, "description": "The completion, or its stream.",
            "content": event_stream(chunk, STREAM_DESCRIPTION),
            "headers": {"X-Llorch-Provider": {"description": "The peer id of the provider that served it.",
                                              "required": True, "schema": {"type": "string"}}}}


class RequestIdMiddleware:
    """Every response carries X-Request-Id (the chat completion id where there is one); 429s carry Retry-After.
    Also counts requests and their latency for /metrics."""

    def __init__(self, app, gateway: Gateway) -> None:
        self.app = app
        self.gateway = gateway

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        fallback_id = "req_" + secrets.token_hex(12)
        status = [500]

        async def send_with_id(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                state = scope.get("state") or {}
                request_id = state.get("request_id") or fallback_id
                headers = [h for h in message.get("headers", []) if h[0].lower() != b"x-request-id"]
                headers.append((b"x-request-id", request_id.encode()))
                if message["status"] == 429 and not any(h[0].lower() == b"retry-after" for h in headers):
                    headers.append((b"retry-after", b"1"))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            # Labelled by the route's template, never by the raw path: a bounded set of series that no request
            # can inject into.
            route = getattr(scope.get("route"), "path", None) or UNMATCHED_ROUTE
            self.gateway.metrics.observe_request(route, status[0], time.perf_counter() - started)
