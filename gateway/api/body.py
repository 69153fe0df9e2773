"""The first half of step (1): a request body, read under a size cap and parsed as strict JSON.

Strict means RFC 8259 and nothing more: UTF-8, no NaN or Infinity, and a parse failure of any kind (an integer
longer than Python converts, nesting deeper than the parser recurses) is the customer's BadRequest, never a 500.
"""

from __future__ import annotations

import json

import trio
from starlette.requests import Request

from llorch.gateway import limits
from llorch.gateway.errors import BadRequest


async def read_body_capped(request: Request, bytes_max: int = limits.HTTP_BODY_BYTES_MAX) -> bytes:
    """The request body, refused with BadRequest once it is known to exceed ``bytes_max``. The rest of an oversized
    body is read and dropped first (at most HTTP_BODY_DRAIN_BYTES_MAX, for HTTP_BODY_DRAIN_TIMEOUT_S), so a client
    still sending it reads the error instead of a reset connection; anything bigger or slower is cut off."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > bytes_max:
        if int(declared) <= limits.HTTP_BODY_DRAIN_BYTES_MAX:
            await _drain(request, 0)
        raise BadRequest(f"request body is {declared} bytes; the limit is {bytes_max}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > bytes_max:
            await _drain(request, len(body))
            raise BadRequest(f"request body exceeds {bytes_max} bytes")
    return bytes(body)


async def _drain(request: Request, already: int) -> None:
    with trio.move_on_after(limits.HTTP_BODY_DRAIN_TIMEOUT_S):
        async for chunk in request.stream():
            already += len(chunk)
            if already > limits.HTTP_BODY_DRAIN_BYTES_MAX:
                return


def parse_json(body: bytes):
    """The JSON value in ``body``; BadRequest saying what is wrong otherwise."""
    try:
        return json.loads(body.decode("utf-8"), parse_constant=_not_a_number)
    except ValueError as exc:          # JSONDecodeError, UnicodeDecodeError, too many digits, NaN/Infinity
        raise BadRequest(f"request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise BadRequest("request body nests JSON deeper than the gateway parses; a request nests a few levels") \
            from None


def parse_json_object(body: bytes) -> dict:
    """The JSON object in ``body``; BadRequest saying what is wrong otherwise."""
    document = parse_json(body)
    if not isinstance(document, dict):
        raise BadRequest("request body must be a JSON object")
    return document


def _not_a_number(constant: str):
    raise ValueError(f"{constant} is not a JSON number")
