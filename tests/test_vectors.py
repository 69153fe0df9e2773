"""The published test vector (docs/protocol.md, tests/fixtures/receipt_vector.json) pins the wire format: these
checks are what an independent verifier does, written from the document, not from our classes."""

import base64
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


def unframe(data: bytes) -> bytes:
    """The body of one frame: an unsigned LEB128 length, then exactly that many bytes."""
    length, shift, offset = 0, 0, 0
    while True:
        byte = data[offset]
        length |= (byte & 0x7F) << shift
        offset, shift = offset + 1, shift + 7
        if byte < 0x80:
            break
    assert length == len(data) - offset
    return data[offset:]


FRAMES = json.loads((Path(__file__).parent / "fixtures" / "frame_vectors.json").read_text())["frames"]


def test_frame_vectors_decode_independently_and_our_code_reproduces_them():
    from llorch.node.wire.frames import FRAME_TYPES, encode_frame
    assert {vector["type"] for vector in FRAMES.values()} == set(FRAME_TYPES)      # one of every type
    for name, vector in FRAMES.items():
        data = bytes.fromhex(vector["hex"])
        body = unframe(data)
        decoded = msgpack.unpackb(body, raw=False)
        expected = {key: bytes.fromhex(value) if key in ("ticket", "salt", "receipt") else value
                    for key, value in vector["fields"].items()}
        assert decoded == {"t": vector["type"], **expected}, name
        assert msgpack.packb(canonical(decoded)) == body, name          # canonical: sorted keys, smallest forms
        frame = FRAME_TYPES[vector["type"]](**expected)
        assert encode_frame(frame) == data, name


LISTING = json.loads((Path(__file__).parent / "fixtures" / "listing_vectors.json").read_text())
PROVIDER_PEER_ID = "12D3KooWA4Xop1JaT3MHxwYMkCepYsv4iPVopMXwCz5iHYdBfeSB"     # of the seed 00 01 ... 1f
T0_MS = 1_795_690_000_000
LISTING_EXPECTED = {        # written from docs/protocol.md §5b, not from our classes
    "ask": {"t": "ask", "provider_id": PROVIDER_PEER_ID},
    "listing_pending": {"t": "listing", "provider_id": PROVIDER_PEER_ID, "status": "pending", "country": "DE",
                         "geo_certified": False, "fork_detected_ms": None, "fork_reason": None,
                         "gateway_ms": T0_MS},
    "listing_excluded": {"t": "listing", "provider_id": PROVIDER_PEER_ID, "status": "approved", "country": "DE",
                          "geo_certified": True, "fork_detected_ms": T0_MS - 60_000,
                          "fork_reason": "two different roots for size 3", "gateway_ms": T0_MS},
    "listing_unregistered": {"t": "listing", "provider_id": PROVIDER_PEER_ID, "status": "unregistered",
                              "country": None, "geo_certified": False, "fork_detected_ms": None,
                              "fork_reason": None, "gateway_ms": T0_MS},
    "refused": {"t": "refused", "code": "not_yourself",
                "message": "this gateway tells a provider only its own listing"},
}


def test_listing_vectors_decode_independently_and_our_code_reproduces_them():
    from llorch.node.wire.listing import AskListing, decode_answer

    assert SigningKey(bytes.fromhex(LISTING["provider_seed_hex"])).peer_id == PROVIDER_PEER_ID
    assert set(LISTING["frames"]) == set(LISTING_EXPECTED)
    for name, hex_frame in LISTING["frames"].items():
        data = bytes.fromhex(hex_frame)
        body = unframe(data)
        decoded = msgpack.unpackb(body, raw=False)
        assert decoded == LISTING_EXPECTED[name], name
        assert msgpack.packb(canonical(decoded)) == body, name      # canonical: sorted keys, smallest forms
        parsed = AskListing.from_bytes(data) if name == "ask" else decode_answer(data)
        assert parsed.to_bytes() == data, name


# --- the connected vectors: ticket, attestation, checkpoint with two cosignatures, bill (make_vectors.py) --------

FIXTURES = Path(__file__).parent / "fixtures"


def load(name):
    return json.loads((FIXTURES / name).read_text())


def public_key_of(seed_hex):
    return Ed25519PrivateKey.from_private_bytes(bytes.fromhex(seed_hex)).public_key().public_bytes_raw()


def peer_id_of(public_key):
    number, text = int.from_bytes(b"\x00\x24\x08\x01\x12\x20" + public_key, "big"), ""
    while number:
        number, digit = divmod(number, 58)
        text = B58[digit] + text
    return "1" + text


def open_signed(envelope_bytes, signed_type, signer_field):
    """protocol.md §2: a canonical {p, s} map, p a canonical map, s = Ed25519(tag ‖ p) by the key in the payload."""
    envelope = msgpack.unpackb(envelope_bytes, raw=False)
    assert list(envelope) == ["p", "s"] and msgpack.packb(envelope, use_bin_type=True) == envelope_bytes
    payload = msgpack.unpackb(envelope["p"], raw=False)
    assert msgpack.packb(canonical(payload), use_bin_type=True) == envelope["p"]
    Ed25519PublicKey.from_public_bytes(payload[signer_field]).verify(
        envelope["s"], b"llorch/" + signed_type.encode() + b"/v1\x00" + envelope["p"])
    return payload


def leaf(entry):
    return hashlib.sha256(b"\x00" + entry).digest()


def root_of(leaves):
    """RFC 9162 §2.1.1, written from the text."""
    if len(leaves) == 1:
        return leaves[0]
    k = 1 << ((len(leaves) - 1).bit_length() - 1)
    return hashlib.sha256(b"\x01" + root_of(leaves[:k]) + root_of(leaves[k:])).digest()


def test_the_ticket_vector_is_the_receipts_ticket():
    vector, receipt_vector = load("ticket_vector.json"), load("receipt_vector.json")
    ticket_bytes = bytes.fromhex(vector["ticket_envelope_hex"])
    ticket = open_signed(ticket_bytes, "ticket", "gateway_key")
    assert ticket["gateway_key"] == public_key_of(vector["gateway_seed_hex"])
    receipt = open_signed(bytes.fromhex(receipt_vector["receipt_envelope_hex"]), "receipt", "provider_key")
    assert receipt["ticket_sha256"] == hashlib.sha256(ticket_bytes).digest()
    assert hashlib.sha256(ticket_bytes).hexdigest() == vector["ticket_envelope_sha256_hex"]
    assert receipt["sampling_sha256"] == hashlib.sha256(msgpack.packb(canonical(ticket["sampling"]),
                                                                      use_bin_type=True)).digest()
    for field in ("request_id", "gateway_key", "provider_key", "tenant", "model_id", "model_sha256", "price_in",
                  "price_out", "currency"):
        assert receipt[field] == ticket[field], field
    assert receipt["seed"] == ticket["sampling"]["seed"]
    assert ticket["issued_ms"] < ticket["expires_ms"]
    assert "response_format" not in ticket["sampling"]                  # plain text: no key at all

    structured = vector["structured_output"]
    committed = open_signed(bytes.fromhex(structured["ticket_envelope_hex"]), "ticket", "gateway_key")["sampling"]
    assert committed["response_format"] == {
        "type": "json_schema", "schema": json.dumps(structured["schema"], separators=(",", ":"), ensure_ascii=False)}
    assert {k: v for k, v in committed.items() if k != "response_format"} == ticket["sampling"]


def test_the_attestation_vector():
    vector = load("attestation_vector.json")
    attestation = open_signed(bytes.fromhex(vector["attestation_envelope_hex"]), "attestation", "provider_key")
    provider = public_key_of(vector["provider_seed_hex"])
    assert attestation["provider_key"] == provider
    assert all(addr.endswith("/p2p/" + peer_id_of(provider)) for addr in attestation["addrs"])
    assert attestation["slots_free"] <= attestation["slots_total"]
    assert 0 < attestation["expires_ms"] - attestation["issued_ms"] <= 180_000
    relayed = open_signed(bytes.fromhex(vector["relayed_attestation_envelope_hex"]), "attestation", "provider_key")
    gateway = peer_id_of(public_key_of(vector["gateway_seed_hex"]))
    [addr] = relayed["addrs"]           # §5: /<ip>/<host>/tcp/<port>/p2p/<relay>/p2p-circuit/p2p/<signer>
    parts = addr.split("/")[1:]
    assert parts[0] in ("ip4", "ip6", "dns", "dns4", "dns6") and parts[2] == "tcp" and int(parts[3]) < 65536
    assert parts[4:] == ["p2p", gateway, "p2p-circuit", "p2p", peer_id_of(provider)]


def test_the_checkpoint_vector_with_two_cosignatures():
    vector = load("checkpoint_vector.json")
    provider = public_key_of(vector["provider_seed_hex"])
    entries = [bytes.fromhex(e) for e in vector["entries_hex"]]
    root = root_of([leaf(e) for e in entries])
    assert root.hex() == vector["root_hex"]
    note = vector["note"]
    text, signatures = note.split("\n\n")[0] + "\n", note.split("\n\n")[1]
    origin = "llorch/" + peer_id_of(provider)
    assert text == f"{origin}\n{len(entries)}\n{base64.b64encode(root).decode()}\n"
    lines = signatures.splitlines()
    assert len(lines) == 3 and note.endswith("\n")
    name, blob = lines[0].removeprefix("\u2014 ").split(" ")
    raw = base64.b64decode(blob)
    assert name == origin and raw[:4] == hashlib.sha256(origin.encode() + b"\n\x01" + provider).digest()[:4]
    Ed25519PublicKey.from_public_bytes(provider).verify(raw[4:], text.encode())
    for line, seed in zip(lines[1:], vector["witness_seeds_hex"]):
        witness = public_key_of(seed)
        name, blob = line.removeprefix("\u2014 ").split(" ")
        raw = base64.b64decode(blob)
        assert name == "llorch-witness/" + peer_id_of(witness)
        assert raw[:4] == hashlib.sha256(name.encode() + b"\n\x04" + witness).digest()[:4] and len(raw) == 76
        timestamp = int.from_bytes(raw[4:12], "big")
        assert timestamp == 1_795_690_060
        Ed25519PublicKey.from_public_bytes(witness).verify(
            raw[12:], f"cosignature/v1\ntime {timestamp}\n".encode() + text.encode())


def test_the_bill_vector_proves_the_receipt_under_the_cosigned_checkpoint():
    document = load("bill_vector.json")["document"]
    checkpoint = load("checkpoint_vector.json")
    receipt_bytes = base64.b64decode(document["receipt"])
    assert receipt_bytes.hex() == load("receipt_vector.json")["receipt_envelope_hex"]
    assert document["checkpoint"] == checkpoint["note"]
    index, size = document["leaf_index"], document["tree_size"]
    path = [base64.b64decode(h) for h in document["inclusion_proof"]]
    # RFC 9162 §2.1.3.2, written from the text
    fn, sn, r = index, size - 1, leaf(receipt_bytes)
    for p in path:
        assert sn != 0
        if fn & 1 or fn == sn:
            r = hashlib.sha256(b"\x01" + p + r).digest()
            if not fn & 1:
                while not fn & 1 and fn != 0:
                    fn, sn = fn >> 1, sn >> 1
        else:
            r = hashlib.sha256(b"\x01" + r + p).digest()
        fn, sn = fn >> 1, sn >> 1
    assert sn == 0 and r.hex() == checkpoint["root_hex"]


PUNCH = json.loads((Path(__file__).parent / "fixtures" / "punch_vectors.json").read_text())


def test_punch_vectors_verify_independently_and_our_code_reads_them():
    """docs/protocol.md §5a and §5c: the observation is an envelope signed by the gateway under
    "llorch/observation/v1" 0x00; the dial-back reply and the punch offer carry it as bin."""
    from llorch.node.wire.dialback import DialbackReply, DialbackRequest
    from llorch.node.wire.punch import Offer, decode

    gateway = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(PUNCH["gateway_seed_hex"])).public_key()
    provider = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(PUNCH["provider_seed_hex"])).public_key()
    envelope_bytes = bytes.fromhex(PUNCH["observation_envelope_hex"])
    envelope = msgpack.unpackb(envelope_bytes, raw=False)
    payload = msgpack.unpackb(envelope["p"], raw=False)
    assert msgpack.packb(canonical(payload), use_bin_type=True) == envelope["p"]
    assert payload == {"v": 1, "gateway_key": gateway.public_bytes_raw(), "peer_key": provider.public_bytes_raw(),
                       "ip": "203.0.113.21", "observed_ms": T0_MS}
    gateway.verify(envelope["s"], b"llorch/observation/v1\x00" + envelope["p"])
    frames = {name: bytes.fromhex(hex_frame) for name, hex_frame in PUNCH["frames"].items()}
    expected = {
        "dialback_request": {"ports": [4101]},
        "dialback_request_observation_only": {"ports": []},
        "dialback_reply": {"observed_ip": "203.0.113.21", "reachable": [], "observation": envelope_bytes},
        "punch_offer": {"t": "offer", "observation": envelope_bytes, "ports": [4101]},
        "punch_sync": {"t": "sync"},
    }
    assert set(frames) == set(expected)
    for name, data in frames.items():
        body = unframe(data)
        assert msgpack.unpackb(body, raw=False) == expected[name], name
        assert msgpack.packb(canonical(expected[name]), use_bin_type=True) == body, name
    assert DialbackRequest.from_bytes(frames["dialback_request"]).ports == (4101,)
    assert DialbackRequest.from_bytes(frames["dialback_request_observation_only"]).ports == ()
    assert DialbackReply.from_bytes(frames["dialback_reply"]).observation == envelope_bytes
    assert decode(frames["punch_offer"]) == Offer(envelope_bytes, (4101,)) and decode(frames["punch_sync"]) == "sync"


def test_the_catalog_vector_verifies_independently():
    """docs/protocol.md §5d: the envelope is canonical, signed by the gateway under the catalog domain tag, and its
    entries are the published maps, every field present, in ascending order of id; the frames carry it."""
    vector = load("catalog_vector.json")
    envelope_bytes = bytes.fromhex(vector["catalog_envelope_hex"])
    envelope = msgpack.unpackb(envelope_bytes, raw=False)
    payload = msgpack.unpackb(envelope["p"], raw=False)
    assert msgpack.packb(canonical(payload), use_bin_type=True) == envelope["p"]
    gateway_key = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(vector["gateway_seed_hex"])).public_key()
    gateway_key.verify(envelope["s"], b"llorch/catalog/v1\x00" + envelope["p"])
    assert set(payload) == {"v", "gateway_key", "version", "issued_ms", "entries"} and payload["version"] == 4
    assert payload["entries"] == vector["entries"]
    assert [e["id"] for e in payload["entries"]] == sorted(e["id"] for e in payload["entries"])
    split = payload["entries"][0]                  # a model in two files: its pin is over the files' hashes
    assert split["sha256"] == hashlib.sha256(b"llorch/gguf-split/v1\x00" + b"".join(
        bytes.fromhex(shard["sha256"]) for shard in split["shards"])).hexdigest()
    assert split["size_bytes"] == sum(shard["size_bytes"] for shard in split["shards"])
    live = [e["id"] for e in payload["entries"] if e["retired_ms"] is None]
    assert live == ["smollm2-135m-instruct-q4_1"]
    frames = {name: bytes.fromhex(value) for name, value in vector["frames"].items()}
    bodies = {}
    for name, frame in frames.items():
        length, shift, at = 0, 0, 0
        while True:
            byte = frame[at]
            length |= (byte & 0x7F) << shift
            at += 1
            shift += 7
            if not byte & 0x80:
                break
        assert len(frame) == at + length, name
        bodies[name] = msgpack.unpackb(frame[at:], raw=False)
        assert bodies[name]["t"] == name
    assert bodies["ask"] == {"t": "ask", "have_version": 0}
    assert bodies["catalog"] == {"t": "catalog", "document": envelope_bytes}
    assert bodies["unchanged"] == {"t": "unchanged", "version": 4}


def test_our_code_reproduces_the_connected_vectors():
    from tests.fixtures import make_vectors

    written = {}
    original = make_vectors.write
    try:
        make_vectors.write = lambda name, document: written.__setitem__(name, json.dumps(document, indent=2) + "\n")
        make_vectors.main()
    finally:
        make_vectors.write = original
    assert sorted(written) == ["attestation_vector.json", "bill_vector.json", "catalog_vector.json",
                               "checkpoint_vector.json", "invitation_vector.json", "listing_vectors.json",
                               "logprobs_vector.json", "payout_statement_vector.json", "punch_vectors.json",
                               "receipt_vector.json", "ticket_vector.json"]
    for name, text in written.items():
        assert text == (FIXTURES / name).read_text(), f"{name} differs from what make_vectors.py writes"
    from llorch.ledger.receipt_proof import verify_receipt_document
    checked = verify_receipt_document(load("bill_vector.json")["document"], now_s=1_795_700_000)
    assert checked.tree_size == 3


def test_the_logprobs_vector():
    """protocol.md §3, §4, §6: the ticket's sampling asks for logprobs, each tokens frame carries one entry per
    text in the documented shape, and the receipt's logprobs_sha256 is SHA-256 of the canonical list of those entries; a
    receipt for a ticket without logprobs has no such field (receipt_vector.json)."""
    from llorch.ledger.objects import Receipt
    from llorch.node.wire.frames import decode_frame

    vector = json.loads((Path(__file__).parent / "fixtures" / "logprobs_vector.json").read_text())
    ticket_bytes = bytes.fromhex(vector["ticket_envelope_hex"])
    ticket = open_signed(ticket_bytes, "ticket", "gateway_key")
    top = ticket["sampling"]["logprobs"]
    assert top == 2
    entries = []
    for hex_frame in vector["tokens_frames_hex"]:
        body = unframe(bytes.fromhex(hex_frame))
        frame = msgpack.unpackb(body, raw=False)
        assert msgpack.packb(canonical(frame), use_bin_type=True) == body
        assert frame["t"] == "tokens" and set(frame) == {"t", "index", "texts", "logprobs"}
        assert frame["index"] == len(entries) and len(frame["logprobs"]) == len(frame["texts"])
        for entry in frame["logprobs"]:
            assert set(entry) == {"token", "logprob", "top"} and len(entry["top"]) == top
            assert isinstance(entry["token"], bytes) and -9_999_000_000 <= entry["logprob"] <= 0
            assert [pair[1] for pair in entry["top"]] == sorted((pair[1] for pair in entry["top"]), reverse=True)
        entries += frame["logprobs"]
        assert decode_frame(body).logprobs == frame["logprobs"]        # our code reads what the document says
    receipt = open_signed(bytes.fromhex(vector["receipt_envelope_hex"]), "receipt", "provider_key")
    expected = hashlib.sha256(msgpack.packb(canonical(entries), use_bin_type=True)).digest()
    assert receipt["logprobs_sha256"] == expected == bytes.fromhex(vector["logprobs_sha256_hex"])
    assert receipt["tokens_out"] == len(entries)
    assert receipt["ticket_sha256"] == hashlib.sha256(ticket_bytes).digest()
    assert receipt["sampling_sha256"] == hashlib.sha256(
        msgpack.packb(canonical(ticket["sampling"]), use_bin_type=True)).digest()
    assert Receipt.from_envelope(bytes.fromhex(vector["receipt_envelope_hex"])).logprobs_sha256 == expected
    plain = msgpack.unpackb(msgpack.unpackb(bytes.fromhex(VECTOR["receipt_envelope_hex"]), raw=False)["p"], raw=False)
    assert "logprobs_sha256" not in plain


def test_the_invitation_vector_verifies_independently():
    """docs/protocol.md §5e: the token is the prefix and the unpadded base64url of a canonical envelope, signed by
    the gateway under the invitation domain tag, with exactly the documented fields."""
    import base64

    vector = load("invitation_vector.json")
    assert vector["token"].startswith("llorch-join-") and "=" not in vector["token"]
    body = vector["token"].removeprefix("llorch-join-")
    envelope_bytes = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
    assert envelope_bytes.hex() == vector["invitation_envelope_hex"]
    envelope = msgpack.unpackb(envelope_bytes, raw=False)
    payload = msgpack.unpackb(envelope["p"], raw=False)
    assert msgpack.packb(canonical(payload), use_bin_type=True) == envelope["p"]
    gateway_key = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(vector["gateway_seed_hex"])).public_key()
    gateway_key.verify(envelope["s"], b"llorch/invitation/v1\x00" + envelope["p"])
    assert set(payload) == {"v", "gateway_key", "invite_id", "gateway_url", "issued_ms", "expires_ms", "certify_geo"}
    assert len(payload["invite_id"]) == 16 and payload["certify_geo"] == "DE"
    assert payload["expires_ms"] - payload["issued_ms"] == 7 * 86_400_000


def test_the_payout_statement_vector_checks_against_the_checkpoint_vectors_ledger():
    """docs/billing.md, "The payout statement": the envelope is canonical and signed by the gateway under the
    payout_statement domain tag; each line names the receipt at its index of the ledger of checkpoint_vector.json
    and credits exactly its amount; the sums hold; the checkpoint is that ledger's root at its size."""
    vector = load("payout_statement_vector.json")
    envelope = msgpack.unpackb(bytes.fromhex(vector["statement_envelope_hex"]), raw=False)
    payload = msgpack.unpackb(envelope["p"], raw=False)
    assert msgpack.packb(canonical(payload), use_bin_type=True) == envelope["p"]
    gateway_key = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(vector["gateway_seed_hex"])).public_key()
    gateway_key.verify(envelope["s"], b"llorch/payout_statement/v1\x00" + envelope["p"])
    ledger = load("checkpoint_vector.json")
    entries = [bytes.fromhex(e) for e in ledger["entries_hex"]]
    receipts = [msgpack.unpackb(msgpack.unpackb(e, raw=False)["p"], raw=False) for e in entries]
    assert payload["lines"] == [[r["index"], r["request_id"], r["amount"]] for r in receipts]
    assert payload["checkpoint_size"] == len(entries) and payload["checkpoint_root"].hex() == ledger["root_hex"]
    totals = payload["totals"]
    assert totals["earned"] == sum(r["amount"] for r in receipts) and totals["corrected"] == 0
    assert totals["carried_forward"] == totals["brought_forward"] + totals["earned"] - totals["corrected"] - \
        totals["paid"] and totals["paid"] % 10_000 == 0 and payload["account"].endswith("3000")
