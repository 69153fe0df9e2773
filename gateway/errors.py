"""Errors raised by the gateway package. Each maps to one OpenAI-shaped HTTP error.

    GatewayError (status, type, code)     base: ``to_http()`` gives the status and OpenAI error body
    ├── AuthError                  401  missing, wrong or revoked API key
    ├── BadRequest                 400  malformed body or unsupported parameter (``param`` names it)
    ├── PaymentRequired            402  the tenant's budget cannot cover the request's worst case
    ├── Forbidden                  403  the tenant may not use this model
    ├── InvitationRefused          403  a join token this gateway did not make, or used, revoked or expired
    ├── ModelNotFound              404  model not in the catalog
    ├── NotFound                   404  no such provider, receipt or route
    ├── MethodNotAllowed           405  the route exists, not with this method
    ├── RateLimited                429  request rate or concurrent requests over the tenant's limit
    ├── NoProvider                 503  no eligible provider (EU-only, determinism, price ceiling...) has capacity
    └── ProviderFailed             502  every candidate failed, or a provider broke the protocol mid-stream
        └── ReceiptRejected        502  the provider's receipt does not match the ticket or the relayed output
"""

from __future__ import annotations


class GatewayError(Exception):
    status = 500
    type = "server_error"
    code = "internal_error"

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class AuthError(GatewayError):
    """Raised when the Authorization header is missing or the key is unknown. Remedy: send `Bearer <key>`."""

    status, type, code = 401, "invalid_request_error", "invalid_api_key"


class BadRequest(GatewayError):
    """Raised when the request body is malformed or asks for something unsupported; ``param`` names the field."""

    status, type, code = 400, "invalid_request_error", "invalid_request"


class ModelNotFound(GatewayError):
    """Raised when the requested model is not in the catalog. Remedy: GET /v1/models."""

    status, type, code = 404, "invalid_request_error", "model_not_found"


class NotFound(GatewayError):
    """Raised when a path names no provider, no receipt of the caller, or no route. Remedy: see /openapi.json."""

    status, type, code = 404, "invalid_request_error", "not_found"


class MethodNotAllowed(GatewayError):
    """Raised when a route exists but not with the request's method (the Allow header lists those it takes)."""

    status, type, code = 405, "invalid_request_error", "method_not_allowed"


class NoProvider(GatewayError):
    """Raised when no fresh provider offers the model with a free slot. Retry later."""

    status, type, code = 503, "service_unavailable", "no_provider"


class DatabaseUnavailable(GatewayError):
    """Raised when the gateway's database failed under a request (a PostgreSQL restart or failover dropped the
    connection, the disk is read-only): nothing of the request was written, or what was is settled by `llorch
    billing reconcile --post` as any interrupted ticket. Retry: the next statement reconnects."""

    status, type, code = 503, "service_unavailable", "database_unavailable"
    retry_after_s = 1

    @classmethod
    def of(cls, exc: Exception) -> "DatabaseUnavailable":
        return cls(f"the gateway's database is unavailable for a moment ({exc}); retry")


class AllBusy(NoProvider):
    """Raised when every eligible provider answered busy: the request may wait in the admission queue for a slot
    (only if it cannot, or its deadline passes, does the customer see an error: 429)."""


class ProviderFailed(GatewayError):
    """Raised when every candidate provider failed or one broke the protocol after tokens were sent."""

    status, type, code = 502, "provider_error", "provider_failed"


class ReceiptRejected(ProviderFailed):
    """Raised when a receipt fails the gateway's checks; the request is not billed and the provider is suspect."""

    code = "receipt_rejected"


class Forbidden(GatewayError):
    """Raised when the tenant may not use what it asked for (e.g. a model outside its allowed list)."""

    status, type, code = 403, "permission_error", "model_not_allowed"


class InvitationRefused(GatewayError):
    """Raised when a registration carries a join token this gateway will not honour: another gateway's, or one
    used, revoked or expired, or one certifying another country than the registration claims."""

    status, type, code = 403, "permission_error", "invitation_refused"


class PaymentRequired(GatewayError):
    """Raised when the tenant's remaining budget cannot cover the request's worst case."""

    status, type, code = 402, "insufficient_quota", "budget_exhausted"


class RateLimited(GatewayError):
    """Raised when the tenant exceeds its request rate or its concurrent requests; retry after ``retry_after_s``."""

    status, type, code = 429, "rate_limit_exceeded", "rate_limit_exceeded"

    def __init__(self, message: str, code: str, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.code = code
        self.retry_after_s = retry_after_s
