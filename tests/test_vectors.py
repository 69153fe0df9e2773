"""The published test vector (docs/protocol.md, tests/fixtures/receipt_vector.json) pins the wire format: these
checks are what an independent verifier does, written from the document, not from our classes."""

import hashlib
import json
import math
from pathlib import Path

import msgpack
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from llorch.ledger.objects import Receipt
from llorch.ledger.signing import SigningKey

VECTOR = json.loads((Path(__file__).parent / "fixtures" / "receipt_vector.json").read_text())
B58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"


def canonical(value):
    if isinstance(value, dict):
        return {k: canonical(value[k]) for k in sorted(value, key=lambda k: k.encode())}
    if isinstance(value, list):
        return [canonical(v) for v in value]
    return value


def test_independent_verification_of_the_vector():
    envelope_bytes = bytes.fromhex(VECTOR["receipt_envelope_hex"])
    envelope = msgpack.unpackb(envelope_bytes, raw=False)
    assert list(envelope) == ["p", "s"] and len(envelope["s"]) == 64
    payload = msgpack.unpackb(envelope["p"], raw=False)
    assert msgpack.packb(canonical(payload), use_bin_type=True) == envelope["p"]      # canonical
    public_key = bytes.fromhex(VECTOR["public_key_hex"])
    assert payload["provider_key"] == public_key
    Ed25519PublicKey.from_public_bytes(public_key).verify(envelope["s"], b"llorch/receipt/v1\x00" + envelope["p"])
    # peer id = base58btc(0x00 0x24 0x08 0x01 0x12 0x20 || key); origin = "llorch/" + peer id
    number = int.from_bytes(b"\x00\x24\x08\x01\x12\x20" + public_key, "big")
    peer_id = ""
    while number:
        number, digit = divmod(number, 58)
        peer_id = B58[digit] + peer_id
    assert payload["origin"] == "llorch/1" + peer_id == "llorch/" + VECTOR["peer_id"]
    salt = bytes.fromhex(VECTOR["salt_hex"])
    prompt_bytes = msgpack.packb(canonical(VECTOR["prompt"]), use_bin_type=True)
    assert payload["prompt_commitment"] == hashlib.sha256(b"llorch/prompt/v1\x00" + salt + prompt_bytes).digest()
    assert payload["output_sha256"] == hashlib.sha256(VECTOR["output_text"].encode()).digest()
    sampling_bytes = msgpack.packb(canonical(VECTOR["sampling"]), use_bin_type=True)
    assert payload["sampling_sha256"] == hashlib.sha256(sampling_bytes).digest()
    expected_amount = math.ceil((payload["tokens_in"] * payload["price_in"]
                                 + payload["tokens_out"] * payload["price_out"]) / 1_000_000)
    assert payload["amount"] == expected_amount == VECTOR["amount"]
    assert payload["index"] == 0 and payload["prev_hash"] == bytes(32)
    assert hashlib.sha256(envelope_bytes).hexdigest() == VECTOR["receipt_envelope_sha256_hex"]


def test_our_code_reproduces_the_vector_exactly():
    key = SigningKey(bytes.fromhex(VECTOR["private_key_seed_hex"]))
    envelope_bytes = bytes.fromhex(VECTOR["receipt_envelope_hex"])
    receipt = Receipt.from_envelope(envelope_bytes)
    assert receipt.seal(key) == envelope_bytes          # Ed25519 is deterministic: same bytes, same signature
    assert Ed25519PrivateKey.from_private_bytes(key.seed).public_key().public_bytes_raw().hex() == \
        VECTOR["public_key_hex"]


FRAMES = json.loads((Path(__file__).parent / "fixtures" / "frame_vectors.json").read_text())["frames"]


def test_frame_vectors_decode_independently_and_our_code_reproduces_them():
    from llorch.node.wire.frames import FRAME_TYPES, encode_frame
    assert {vector["type"] for vector in FRAMES.values()} == set(FRAME_TYPES)      # one of every type
    for name, vector in FRAMES.items():
        data = bytes.fromhex(vector["hex"])
        length, shift, offset = 0, 0, 0
        while True:                                     # unsigned LEB128
            byte = data[offset]
            length |= (byte & 0x7F) << shift
            offset, shift = offset + 1, shift + 7
            if byte < 0x80:
                break
        body = data[offset:]
        assert length == len(body), name
        decoded = msgpack.unpackb(body, raw=False)
        expected = {key: bytes.fromhex(value) if key in ("ticket", "salt", "receipt") else value
                    for key, value in vector["fields"].items()}
        assert decoded == {"t": vector["type"], **expected}, name
        assert msgpack.packb(canonical(decoded)) == body, name          # canonical: sorted keys, smallest forms
        frame = FRAME_TYPES[vector["type"]](**expected)
        assert encode_frame(frame) == data, name
