import msgpack
import pytest
from hypothesis import given, strategies as st

from llorch.ledger import canonical
from llorch.ledger.errors import EncodingError

values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**63), max_value=2**64 - 1) | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)


@given(values)
def test_round_trip(value):
    data = canonical.encode(value)
    assert canonical.decode(data) == value
    assert canonical.encode(canonical.decode(data)) == data


@given(st.dictionaries(st.text(max_size=8), st.integers(min_value=0, max_value=2**64 - 1), min_size=2, max_size=6))
def test_key_order_does_not_matter_when_encoding(mapping):
    reversed_mapping = dict(reversed(list(mapping.items())))
    assert canonical.encode(mapping) == canonical.encode(reversed_mapping)


def test_keys_sorted_by_utf8_bytes_not_code_points():
    # U+FF5E sorts before U+10000 by code point and by UTF-8 bytes alike; "é" (0xC3 0xA9) sorts after "z".
    data = canonical.encode({"z": 1, "é": 2, "a": 3})
    assert list(msgpack.unpackb(data).keys()) == ["a", "z", "é"]


@pytest.mark.parametrize("bad, why", [
    (msgpack.packb({"b": 1, "a": 2}), "unsorted keys"),
    (b"\xcd\x00\x05", "integer 5 in a 16-bit encoding"),
    (b"\xd9\x03abc", "3-byte str in a str8 header"),
    (b"\xc5\x00\x01x", "1-byte bin in a bin16 header"),
    (msgpack.packb(1.5), "float"),
    (canonical.encode(1) + b"\x00", "trailing bytes"),
    (b"\x82\xa1a\x01", "truncated map"),
    (b"\x81\x01\x02", "non-str key"),
    (b"\x82\xa1a\x01\xa1a\x02", "duplicate key"),
    (b"\xc1", "reserved byte"),
])
def test_rejects_non_canonical(bad, why):
    with pytest.raises(EncodingError):
        canonical.decode(bad)


def test_str_and_bin_are_distinct():
    assert canonical.decode(canonical.encode(b"abc")) == b"abc"
    assert canonical.decode(canonical.encode("abc")) == "abc"
    assert canonical.encode(b"abc") != canonical.encode("abc")


def test_integers_outside_64_bits_are_refused():
    with pytest.raises(EncodingError, match="64 bits"):
        canonical.encode(2**64)


def test_refuses_to_encode_floats_and_unknown_types():
    with pytest.raises(EncodingError, match="floats"):
        canonical.encode({"price": 0.5})
    with pytest.raises(EncodingError):
        canonical.encode({"when": object()})
