"""Canonical msgpack: the one byte encoding of everything llorch signs.

Rules (docs/protocol.md, "Canonical msgpack"):
  * maps have str keys, sorted by their UTF-8 bytes, no duplicates;
  * integers use msgpack's smallest encoding (msgpack-python always does);
  * text is str, hashes and keys are bin; arrays are arrays;
  * no floats, no extension types, no NaN anywhere: money, times and probabilities are integers.

``decode`` parses strictly and then re-encodes: bytes that differ from the re-encoding are rejected, so every
value has exactly one accepted encoding and a signature over it can never be "the same object, other bytes".
"""

from __future__ import annotations

from typing import Any

import msgpack

from llorch.ledger import limits
from llorch.ledger.errors import EncodingError

Value = None | bool | int | str | bytes | list[Any] | dict[str, Any]


def encode(value: Value) -> bytes:
    """Return the canonical bytes of ``value``; raise EncodingError for values that have no canonical form."""
    try:
        return msgpack.packb(_canonicalise(value, 0), use_bin_type=True)
    except UnicodeEncodeError:      # from JSON, a str can hold a lone surrogate: it has no UTF-8 encoding
        raise EncodingError("a str holds a lone surrogate (\\ud800 in JSON, say): it has no UTF-8 encoding") from None


def decode(data: bytes, bytes_max: int = 0) -> Any:
    """Parse canonical bytes; raise EncodingError if they are malformed, oversized or not canonical. ``bytes_max``:
    a document allowed to be larger than the usual limits (a payout statement's lines) may hold bins and arrays
    as large as its size allows, never more (an array item takes at least one byte)."""
    if not isinstance(data, (bytes, bytearray)):
        raise EncodingError(f"expected bytes, got {type(data).__name__}")
    try:
        value = msgpack.unpackb(
            bytes(data),
            raw=False,
            use_list=True,
            strict_map_key=False,  # we check key types ourselves, with a clearer message
            max_str_len=limits.CANONICAL_STR_BYTES_MAX,
            max_bin_len=max(limits.CANONICAL_BIN_BYTES_MAX, bytes_max),
            max_array_len=max(limits.CANONICAL_ARRAY_LEN_MAX, bytes_max),
            max_map_len=limits.CANONICAL_MAP_LEN_MAX,
            max_ext_len=0,
        )
    except (msgpack.ExtraData, msgpack.FormatError, msgpack.StackError, ValueError, TypeError) as exc:
        raise EncodingError(f"not valid msgpack: {exc}") from None
    except Exception as exc:  # msgpack raises a few undocumented types on truncated input
        raise EncodingError(f"not valid msgpack: {type(exc).__name__}: {exc}") from None
    _check_canonical_shape(value)
    # Re-encoding in the decoded key order checks integer widths, header sizes and str/bin types; the walk above
    # checked key order and types. Together: the bytes are exactly encode(value).
    if msgpack.packb(value, use_bin_type=True) != bytes(data):
        raise EncodingError("msgpack is valid but not canonical (integer width, header size or str/bin type)")
    return value


def _check_canonical_shape(value: Any) -> None:
    """Iteratively check decoded msgpack: maps have sorted unique str keys, no floats, depth is bounded."""
    stack = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            if depth > limits.CANONICAL_DEPTH_MAX:
                raise EncodingError(f"nesting deeper than {limits.CANONICAL_DEPTH_MAX}")
            previous = None
            for key, child in item.items():
                if not isinstance(key, str):
                    raise EncodingError(f"map key {key!r} is not a str")
                encoded = key.encode("utf-8")
                if previous is not None and encoded <= previous:
                    raise EncodingError("msgpack is valid but not canonical (map keys not in sorted order)")
                previous = encoded
                if isinstance(child, (dict, list)):
                    stack.append((child, depth + 1))
                elif isinstance(child, float):
                    raise EncodingError("floats are not allowed")
        elif isinstance(item, list):
            if depth > limits.CANONICAL_DEPTH_MAX:
                raise EncodingError(f"nesting deeper than {limits.CANONICAL_DEPTH_MAX}")
            for child in item:
                if isinstance(child, (dict, list)):
                    stack.append((child, depth + 1))
                elif isinstance(child, float):
                    raise EncodingError("floats are not allowed")
        elif isinstance(item, float):
            raise EncodingError("floats are not allowed")


_PLAIN_TYPES = frozenset({str, bytes, bool, type(None)})


def _plain(items: list | tuple) -> bool:
    """Whether every item is already canonical as it is: a str, bytes, bool, None or a 64-bit int."""
    for item in items:
        kind = type(item)
        if kind is int:
            if not -(2**63) <= item < 2**64:
                return False
        elif kind not in _PLAIN_TYPES:
            return False
    return True


def _canonicalise(value: Any, depth: int) -> Any:
    if depth > limits.CANONICAL_DEPTH_MAX:
        raise EncodingError(f"nesting deeper than {limits.CANONICAL_DEPTH_MAX}")
    if value is None or isinstance(value, (bool, str, bytes)):
        return value
    if isinstance(value, int):
        if not -(2**63) <= value < 2**64:
            raise EncodingError(f"integer {value} does not fit in 64 bits")
        return value
    if isinstance(value, float):
        raise EncodingError("floats have no canonical form here: use integers (minor units, ms, ppm)")
    if isinstance(value, bytearray):
        return bytes(value)
    if isinstance(value, (list, tuple)):
        if _plain(value):                     # scalars only (a statement's line): nothing to change, no recursion
            return list(value)
        return [_canonicalise(item, depth + 1) for item in value]
    if isinstance(value, dict):
        for key in value:
            if not isinstance(key, str):
                raise EncodingError(f"map key {key!r} is not a str")
        keys = sorted(value, key=lambda k: k.encode("utf-8"))
        return {key: _canonicalise(value[key], depth + 1) for key in keys}
    raise EncodingError(f"type {type(value).__name__} has no canonical msgpack form")
