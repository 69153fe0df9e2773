"""The gateway's OpenAPI document (GET /openapi.json): every operation's request body, responses and security.

The handlers read their bodies themselves (a size cap first, then strict parsing with the gateway's own error
messages), so FastAPI does not see the body models: each route names its body with ``request_body(Model)``, and
``openapi_document`` adds those models to the components. Responses are declared per route with ``errors(...)``
and the models below; tests/test_schemathesis.py holds the live gateway to the document.
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import JsonSchemaMode

from llorch.gateway.api.openai_api import ErrorBody
from llorch.node.wire.registration import PRICE_PER_1M_MAX

SECURITY_SCHEME = "apiKey"
BEARER: dict[str, Any] = {"security": [{SECURITY_SCHEME: []}]}
REF = "#/components/schemas/{model}"

ERROR_MEANINGS = {
    400: "invalid_request: malformed body or unsupported parameter (`param` names it)",
    401: "invalid_api_key: missing, unknown or revoked API key",
    402: "budget_exhausted: the tenant's budget cannot cover the request's worst case",
    403: "model_not_allowed: the tenant may not use this model",
    404: "not_found / model_not_found",
    429: "rate_limit_exceeded / too_many_concurrent (with Retry-After)",
    502: "provider_failed / receipt_rejected: every candidate failed, or a provider broke the protocol",
    503: "no_provider: no eligible provider has capacity right now; retry shortly",
}


def errors(*statuses: int) -> dict:
    """The ``responses`` entries of a route for these error statuses, all in OpenAI's error shape."""
    return {status: {"model": ErrorBody, "description": ERROR_MEANINGS[status]} for status in statuses}


_COMPONENTS: dict[str, tuple[type[BaseModel], JsonSchemaMode]] = {}     # name → (model, its schema mode)


def component(model: type[BaseModel], mode: JsonSchemaMode = "serialization") -> dict:
    """A reference to ``model`` in the document's components, for schemas FastAPI does not see (bodies the
    handlers parse themselves, server-sent events)."""
    _COMPONENTS[model.__name__] = (model, mode)
    return {"$ref": REF.format(model=model.__name__)}


def request_body(model: type[BaseModel], description: str) -> dict:
    """A route's ``openapi_extra`` naming its JSON request body (required)."""
    return {"requestBody": {"required": True, "description": description, "content": {
        "application/json": {"schema": component(model, "validation")}}}}


def event_stream(chunk: type[BaseModel], description: str) -> dict:
    """The ``text/event-stream`` content of a streamed completion: each event's data is a chunk, an error body
    (an error after the first token) or the final ``[DONE]``."""
    return {"text/event-stream": {"schema": {
        "type": "object", "description": description, "required": ["data"],
        "properties": {"data": {"anyOf": [
            {"const": "[DONE]"},
            {"type": "string", "contentMediaType": "application/json",
             "contentSchema": {"anyOf": [component(chunk), component(ErrorBody)]}}]}}}}}


def openapi_document(app: FastAPI) -> dict:
    """FastAPI's document plus the body models, the bearer scheme and the X-Request-Id header on every response;
    without FastAPI's 422 (a parameter the signature refuses is a 400 in OpenAI's shape: http_api.py)."""
    document = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    for name, (model, mode) in _COMPONENTS.items():
        definition = model.model_json_schema(ref_template=REF, mode=mode)
        for defined, schema in definition.pop("$defs", {}).items():
            schemas.setdefault(defined, schema)
        schemas[name] = definition
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    document["components"]["securitySchemes"] = {SECURITY_SCHEME: {
        "type": "http", "scheme": "bearer", "description": "The tenant's API key: `Authorization: Bearer <key>`."}}
    for operations in document["paths"].values():
        for operation in operations.values():
            operation["responses"].pop("422", None)
            for status, response in operation["responses"].items():
                headers = response.setdefault("headers", {})
                headers["X-Request-Id"] = {"description": "The completion id where there is one, else a fresh id.",
                                           "required": True, "schema": {"type": "string"}}
                if status == "429":
                    headers["Retry-After"] = {"description": "Seconds.", "required": True,
                                              "schema": {"type": "string", "pattern": "^[0-9]+$"}}
    return document


# /v2 and operational shapes ---------------------------------------------------------------------------------------
class CatalogView(BaseModel):
    """The gateway's signed catalog (docs/protocol.md §5d): ``document`` is the base64 of the signed envelope, the
    only part to trust (check its signature with the gateway's key); ``entries`` is its content, for reading."""

    version: int
    issued_ms: int
    gateway_id: str = Field(description="The gateway's peer id: the key that signs the document.")
    document: str
    entries: list[dict[str, Any]]


class Health(BaseModel):
    status: Literal["ok", "unready", "draining"]
    providers: int = Field(ge=0, description="Approved providers with a fresh attestation.")
    models: list[str] = Field(description="Catalog models some fresh provider offers.")
    reason: str | None = Field(default=None, description="Why not ready (with 503).")


class Liveness(BaseModel):
    status: Literal["alive"]


class GatewayInfo(BaseModel):
    """What `llorch node init --gateway https://…` needs to join: the gateway's libp2p identity and port."""

    peer_id: str = Field(description="The gateway's peer id: a node trusts tickets signed by it.")
    p2p_port: int | None = Field(ge=1, le=65535, description="The TCP port its libp2p host listens on.")
    multiaddrs: list[str] = Field(description="Its libp2p listen addresses, each ending in /p2p/<peer id>.")


class RegistrationBody(BaseModel):
    """`llorch node register` sends this: the provider's registration, signed with its own key."""

    model_config = ConfigDict(extra="forbid", strict=True)
    registration: str = Field(description="Base64 of the signed registration envelope (docs/protocol.md).",
                              json_schema_extra={"contentEncoding": "base64"})
    invitation: str | None = Field(None, description="A join token of this gateway's operator (`llorch gateway "
                                   "providers invite`): the provider is approved at once (docs/protocol.md §9).")


class Pricing(BaseModel):
    currency: str = Field(pattern="^[A-Z]{3}$")
    input_per_1m: int = Field(ge=0, le=PRICE_PER_1M_MAX)
    output_per_1m: int = Field(ge=0, le=PRICE_PER_1M_MAX)


class Capacity(BaseModel):
    slots: int = Field(ge=1)
    gpus: int = Field(ge=0)
    vram_gb: int = Field(ge=0)


class Sla(BaseModel):
    uptime_ppm: int = Field(ge=0, le=1_000_000)
    ttft_ms: int = Field(ge=0)


class Geo(BaseModel):
    country: str = Field(pattern="^[A-Z]{2}$")
    region: str


class ProviderRecord(BaseModel):
    """A provider's registration as the gateway stored it, with the operator's decisions."""

    provider_id: str
    endpoint: str
    pricing: Pricing
    capacity: Capacity
    sla: Sla
    geo: Geo
    issued_ms: int = Field(ge=0)
    status: Literal["pending", "approved", "suspended"]
    geo_certified: bool


class ProviderList(BaseModel):
    providers: list[ProviderRecord]


class ProviderCapacity(BaseModel):
    """Live capacity from the provider's latest attestation; all zero when it has none that is fresh."""

    provider_id: str
    online: bool
    available_slots: int = Field(ge=0)
    total_slots: int = Field(ge=0)
    queue_depth: int = Field(ge=0)
    estimated_wait_ms: int | None = Field(ge=0)
    engine_build: str | None = Field(default=None, description="Only when online.")
    as_of_ms: int | None = Field(default=None, ge=0, description="Only when online: the attestation's time.")


class StatementLine(BaseModel):
    currency: str
    model: str
    provider: str
    requests: int = Field(ge=0)
    tokens_in: int = Field(ge=0)
    tokens_out: int = Field(ge=0)
    amount_minor: int


class Correction(BaseModel):
    request_id: str
    leg: str
    currency: str
    amount_minor: int


class Statement(BaseModel):
    """The calling tenant's own statement for one month (docs/billing.md)."""

    kind: Literal["tenant"]
    subject: str
    period: str = Field(pattern="^[0-9]{4}-(0[1-9]|1[0-2])$")
    lines: list[StatementLine]
    corrections: list[Correction]
    totals_minor: dict[str, int] = Field(description="Currency → amount owed, in minor units.")


class ReceiptProof(BaseModel):
    """A receipt with the provider's cosigned checkpoint and its inclusion proof: the input of
    `llorch ledger verify-receipt` (docs/ledger.md)."""

    request_id: str
    receipt: str = Field(description="Base64 of the signed receipt envelope.")
    leaf_index: int = Field(ge=0)
    tree_size: int = Field(ge=0)
    inclusion_proof: list[str] = Field(description="Base64 hashes, RFC 9162 order.")
    checkpoint: str | None = Field(description="The cosigned checkpoint note; null until a witness round covers "
                                               "the receipt.")
