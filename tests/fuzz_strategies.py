"""Hypothesis strategies for fuzzing decoders (tests/test_fuzz_decoders.py, bench/fuzz_decoders.py).

Three families, as every decoder gets all three:
  * ``arbitrary`` bytes or text;
  * ``plausible(valid)``: structurally plausible values derived from a valid one: each field kept, dropped,
    replaced by a near miss of its kind (a boundary integer, a str with a trailing newline, a hash one byte short)
    or by any canonical value, plus unexpected fields; canonically encoded (and signed, for signed objects) so the
    decoder's field checks are reached;
  * ``mutated(data)``: a valid encoding with bit flips, truncations, extensions, insertions and deletions, and
    ``loose_msgpack(value)``: a valid value re-encoded as *valid but non-canonical* msgpack (wider integers and
    headers, str for bin and bin for str, unsorted or duplicated keys, floats for integers).
"""

from __future__ import annotations

import os
import struct

from hypothesis import HealthCheck, settings, strategies as st

from llorch.ledger import canonical
from llorch.ledger.signing import SigningKey

# max_examples per decoder test; bench/fuzz_decoders.py sets LLORCH_FUZZ_EXAMPLES for a long sweep.
EXAMPLES = int(os.environ.get("LLORCH_FUZZ_EXAMPLES", "200"))
# The suite's run is derandomized (the same examples every time, so it never flakes); the long sweep is random.
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=not os.environ.get("LLORCH_FUZZ_RANDOM"),
                database=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                      HealthCheck.filter_too_much])

SIGNER = SigningKey(bytes(range(32)))
OTHER = SigningKey(bytes(range(1, 33)))

U64_MAX = 2**64 - 1
BOUNDARY_INTS = [0, 1, -1, 127, 128, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**63 - 1, 2**63, U64_MAX,
                 -(2**63), -32, -33, 10**12, 10**12 + 1, 1_000_000, 1_000_001, 2_000_000, 2_000_001]

scalars = (st.none() | st.booleans() | st.sampled_from(BOUNDARY_INTS)
           | st.integers(min_value=-(2**63), max_value=U64_MAX) | st.text(max_size=24) | st.binary(max_size=40))
# Any value canonical msgpack can carry (bounded so it stays under the decoder's size and depth limits).
any_value = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=12), children, max_size=5),
    max_leaves=16)

arbitrary_bytes = st.binary(max_size=600)
arbitrary_text = st.text(max_size=400)


# --- structurally plausible values -------------------------------------------------------------------------------

def near(value):
    """Near misses of the same kind as ``value``."""
    if isinstance(value, bool):
        return st.sampled_from([not value, 0, 1, None])
    if isinstance(value, int):
        return st.sampled_from(BOUNDARY_INTS) | st.integers(value - 2, value + 2) | st.just(value * 2 + 1)
    if isinstance(value, str):
        return (st.sampled_from(["", value + "\n", value[:-1], value + "x", value.lower(), value.upper(), " " + value,
                                 value * 3, "x" * 257, "\u00c9" * max(1, len(value))])
                | st.text(min_size=0, max_size=max(8, len(value) + 2)))
    if isinstance(value, bytes):
        return st.sampled_from([value[:-1], value + b"\x00", b"", bytes(len(value))]) | st.binary(
            min_size=len(value), max_size=len(value))
    if isinstance(value, list):
        return st.just([]) | st.lists(plausible(value[0]) if value else any_value, max_size=10)
    return st.just(None)


def plausible(value):
    """Values shaped like ``value``: mostly ``value`` itself or a near miss, sometimes anything."""
    if isinstance(value, dict):
        return plausible_map(value)
    if isinstance(value, list):
        return (st.lists(plausible(value[0]), min_size=0, max_size=max(3, len(value) + 1)) if value
                else st.lists(any_value, max_size=3)) | st.just(value)
    return st.just(value) | near(value) | any_value


@st.composite
def plausible_map(draw, valid: dict):
    """A map with ``valid``'s field names where up to three fields are changed (recursively) or dropped, maybe with
    an extra field: mostly one or two defects at a time, so the checks behind the first one are reached too."""
    out = dict(valid)
    for _ in range(draw(st.integers(0, 3))):
        if not valid:
            break
        name = draw(st.sampled_from(list(valid)))
        if draw(st.integers(0, 7)) == 0:
            out.pop(name, None)
        else:
            out[name] = draw(plausible(valid[name]))
    if draw(st.integers(0, 7)) == 0:
        out[draw(st.sampled_from([*valid, "x", "", "t", "v", "zz"]) | st.text(max_size=8))] = draw(any_value)
    return out


def sealed(signed_type: str, payload: dict, key: SigningKey = SIGNER) -> bytes:
    payload_bytes = canonical.encode(payload)
    return canonical.encode({"p": payload_bytes, "s": key.sign(signed_type, payload_bytes)})


@st.composite
def plausible_envelopes(draw, signed_type: str, valid_payload: dict):
    """Envelopes of plausible payloads, signed by ``SIGNER`` (so checks after the signature are reached too), or
    envelopes whose own shape is off."""
    payload = draw(plausible_map(valid_payload))
    payload_bytes = canonical.encode(payload)
    signature = SIGNER.sign(signed_type, payload_bytes)
    shape = draw(st.sampled_from(["good"] * 6 + ["other_type", "short_sig", "extra", "payload_not_map", "swap"]))
    if shape == "other_type":
        signature = SIGNER.sign("attestation" if signed_type != "attestation" else "ticket", payload_bytes)
    elif shape == "short_sig":
        signature = signature[:-1]
    envelope = {"p": payload_bytes, "s": signature}
    if shape == "extra":
        envelope["x"] = b""
    elif shape == "payload_not_map":
        envelope["p"] = canonical.encode(draw(any_value))
    elif shape == "swap":
        envelope = {"p": signature, "s": payload_bytes}
    return canonical.encode(envelope)


# --- mutations of valid encodings ---------------------------------------------------------------------------------

@st.composite
def mutated(draw, data: bytes):
    """``data`` with 1-3 byte-level mutations."""
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["flip", "truncate", "extend", "insert", "delete", "set"]))
        position = draw(st.integers(0, max(len(out) - 1, 0)))
        if kind == "flip" and out:
            out[position] ^= 1 << draw(st.integers(0, 7))
        elif kind == "truncate":
            del out[position:]
        elif kind == "extend":
            out += draw(st.binary(min_size=1, max_size=8))
        elif kind == "insert":
            out[position:position] = draw(st.binary(min_size=1, max_size=4))
        elif kind == "delete" and out:
            del out[position:position + draw(st.integers(1, 4))]
        elif kind == "set" and out:
            out[position] = draw(st.sampled_from([0x00, 0x7F, 0x80, 0xC0, 0xC1, 0xC4, 0xCA, 0xCB, 0xCF, 0xD3, 0xD4,
                                                  0xD9, 0xDC, 0xDE, 0xDF, 0xFF]))
    return bytes(out)


def _int_encodings(value: int) -> list[bytes]:
    forms = []
    if 0 <= value <= 0x7F:
        forms.append(bytes([value]))
    if -32 <= value < 0:
        forms.append(struct.pack("b", value))
    for code, fmt, low, high in ((0xCC, ">B", 0, 2**8 - 1), (0xCD, ">H", 0, 2**16 - 1), (0xCE, ">I", 0, 2**32 - 1),
                                 (0xCF, ">Q", 0, U64_MAX), (0xD0, ">b", -(2**7), 2**7 - 1),
                                 (0xD1, ">h", -(2**15), 2**15 - 1), (0xD2, ">i", -(2**31), 2**31 - 1),
                                 (0xD3, ">q", -(2**63), 2**63 - 1)):
        if low <= value <= high:
            forms.append(bytes([code]) + struct.pack(fmt, value))
    forms.append(b"\xcb" + struct.pack(">d", float(value)))      # a float where an integer belongs
    return forms


def _raw_headers(length: int, binary: bool) -> list[bytes]:
    forms = []
    if binary:
        codes = ((0xC4, ">B", 2**8), (0xC5, ">H", 2**16), (0xC6, ">I", 2**32))
    else:
        if length < 32:
            forms.append(bytes([0xA0 | length]))
        codes = ((0xD9, ">B", 2**8), (0xDA, ">H", 2**16), (0xDB, ">I", 2**32))
    forms += [bytes([code]) + struct.pack(fmt, length) for code, fmt, limit in codes if length < limit]
    return forms


def _container_headers(length: int, is_map: bool) -> list[bytes]:
    forms = [bytes([(0x80 if is_map else 0x90) | length])] if length < 16 else []
    forms += [bytes([0xDE if is_map else 0xDC]) + struct.pack(">H", length),
              bytes([0xDF if is_map else 0xDD]) + struct.pack(">I", length)]
    return forms


def loose_pack(value, draw) -> bytes:
    """Encode ``value`` as valid msgpack, choosing every width, header, type and key order freely."""
    if value is None:
        return b"\xc0"
    if isinstance(value, bool):
        return b"\xc3" if value else b"\xc2"
    if isinstance(value, int):
        return draw(st.sampled_from(_int_encodings(value)))
    if isinstance(value, str):
        raw = value.encode("utf-8")
        return draw(st.sampled_from(_raw_headers(len(raw), False) + _raw_headers(len(raw), True)[:1])) + raw
    if isinstance(value, bytes):
        forms = _raw_headers(len(value), True)
        try:
            value.decode("utf-8")
            forms += _raw_headers(len(value), False)[:1]
        except UnicodeDecodeError:
            pass
        return draw(st.sampled_from(forms)) + value
    if isinstance(value, list):
        return draw(st.sampled_from(_container_headers(len(value), False))) + b"".join(
            loose_pack(item, draw) for item in value)
    if isinstance(value, dict):
        items = draw(st.permutations(list(value.items())))
        if items and draw(st.integers(0, 9)) == 0:
            items = [*items, items[0]]                                 # a duplicated key
        return draw(st.sampled_from(_container_headers(len(items), True))) + b"".join(
            loose_pack(key, draw) + loose_pack(item, draw) for key, item in items)
    raise AssertionError(f"cannot loosely pack {type(value).__name__}")


@st.composite
def loose_msgpack(draw, value):
    """``value`` (a canonical value) re-encoded as valid, probably non-canonical msgpack."""
    return loose_pack(value, draw)


@st.composite
def loose_envelopes(draw, envelope: bytes):
    """A valid envelope with its payload and/or the envelope itself re-encoded loosely (signed again, so only the
    encoding is wrong)."""
    outer = canonical.decode(envelope)
    payload = canonical.decode(outer["p"])
    payload_bytes = draw(loose_msgpack(payload)) if draw(st.booleans()) else outer["p"]
    signed_type = draw(st.sampled_from(["ticket", "receipt", "attestation", "registration"]))
    signature = SIGNER.sign(signed_type, payload_bytes)
    return draw(loose_msgpack({"p": payload_bytes, "s": signature}))


def byte_inputs(valid: bytes, value=None):
    """All three families for a decoder of ``valid``-like bytes (``value``: its decoded canonical form)."""
    families = [arbitrary_bytes, mutated(valid)]
    if value is not None:
        families.append(loose_msgpack(value))
    return st.one_of(*families)
