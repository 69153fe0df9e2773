"""Every decoder of another party's bytes, text or JSON, fuzzed: each input is accepted or refused with the module's
own error type, and nothing else escapes. Where an encoding is canonical, whatever is accepted re-encodes to exactly
the bytes it came from (so no object has two accepted encodings).

Strategies (tests/fuzz_strategies.py): arbitrary bytes/text; structurally plausible inputs (the right field names
with near-miss values, wrong types, missing and extra fields, canonically encoded and signed); mutations of a valid
encoding (bit flips, truncation, extension) and valid-but-non-canonical msgpack re-encodings (wide integers and
headers, str for bin, unsorted or duplicated keys, floats). ``LLORCH_FUZZ_EXAMPLES`` sets examples per decoder
(bench/fuzz_decoders.py runs a long sweep).

    decoder                                              input from               refuses with
    ledger.canonical.decode                              anyone                   EncodingError
    ledger.signing.open_envelope                         anyone                   EncodingError
    ledger.signing.public_key_of_peer_id                 CLI, trusted-keys file   EncodingError
    ledger.signing.load_key_file                         operator's key file      KeyFileError
    ledger.objects.Ticket.from_envelope                  gateway → provider       EncodingError, SignatureError
    ledger.objects.Receipt.from_envelope                 provider                 EncodingError, SignatureError
    ledger.chain.inspect_entry                           a ledger entry           never raises (names check 1)
    ledger.export.readable                               a ledger entry           never raises
    ledger.note.parse_note                               provider, witness        NoteError
    ledger.note.parse_checkpoint_text                    provider                 NoteError
    ledger.note.open_checkpoint                          provider                 NoteError
    ledger.note.verify_cosignature                       witness                  NoteError
    ledger.merkle.verify_inclusion, verify_consistency   provider, customer file  ProofError
    ledger.receipt_proof.load_document                   verify-receipt's file    ReceiptProofError
    ledger.receipt_proof.verify_receipt_document         verify-receipt's file    ReceiptProofError
    ledger.verify.load_trusted_keys                      auditor's file           StoreError
    node.wire.frames.decode_uvarint                      peer                     ProtocolError
    node.wire.frames.decode_frame: request accepted busy tokens more final cancel error   peer   ProtocolError
    node.wire.ledger_protocol (decode_frame): get_checkpoint get_entries get_consistency get_inclusion
        put_cosigned checkpoint entries proof ack error  peer                     ProtocolError
    node.wire.infer_protocol.InferProtocol (byte stream, both roles)      peer    ProtocolError
    node.wire.ledger_protocol.LedgerProtocol (byte stream, both roles)    peer    ProtocolError
    node.wire.listing.AskListing.from_bytes, decode_answer   peer (both ends)   ProtocolError
    node.wire.attestation.parse_attestation              gossip                   AttestationRejected
    node.wire.attestation.check_multiaddr                gossip                   EncodingError
    node.wire.registration.Registration.from_envelope    provider                 EncodingError, SignatureError
    node.replay.load_request                             customer's request file  ReplayInputError
    gateway registration body (api.body.parse_json → parse_registration_body)  provider (HTTP body)  BadRequest
    gateway.api.openai_api.parse_chat_request            customer (HTTP body)     BadRequest
    gateway.books.receipts.check_receipt                 provider                 ReceiptRejected
    gateway.witness.witness.check_checkpoint             provider                 BadView, ForkDetected
    gateway.witness.witness.check_consistency            provider                 ForkDetected
    gateway.witness.witness.extend                       provider                 BadView, ForkDetected
    gateway.witness.witness.request_ids_of               provider                 never raises
    gateway.market.tenants.parse_amount                  operator's CLI           TenantError

Not here: the ledger bundle reader (ledger/verify.py read_bundle, load_material), which is being reworked.
"""

from __future__ import annotations

import base64
import json
import os
import re
import tempfile
from decimal import Decimal
from pathlib import Path

import pytest
from hypothesis import assume, example, given, strategies as st

from llorch.gateway.api.openai_api import ChatRequest, CompletionRequest, parse_chat_request
from llorch.gateway.books.receipts import check_receipt
from llorch.gateway.errors import BadRequest, ReceiptRejected
from llorch.gateway.api.body import parse_json
from llorch.gateway.market.providers import parse_registration_body
from llorch.gateway.market.tenants import TenantError, parse_amount, validate
from llorch.gateway.witness.witness import (BadView, ForkDetected, WitnessedState, check_checkpoint, check_consistency,
                                            extend, request_ids_of)
from llorch.ledger import canonical, merkle, signing
from llorch.ledger.chain import inspect_entry
from llorch.ledger.errors import EncodingError, KeyFileError, SignatureError, StoreError
from llorch.ledger.export import readable
from llorch.ledger.note import (Checkpoint, NoteError, cosign, open_checkpoint, parse_checkpoint_text, parse_note,
                                sign_checkpoint, verify_cosignature)
from llorch.ledger.objects import (VERSION, ZERO_HASH, Receipt, Ticket, ledger_origin, prompt_commitment,
                                   receipt_fields_of, sampling_sha256)
from llorch.ledger.receipt_proof import ReceiptProofError, load_document, proof_document, verify_receipt_document
from llorch.ledger.signing import (SigningKey, load_key_file, open_envelope, peer_id_of, public_key_of_peer_id,
                                   sha256, write_key_file)
from llorch.ledger.verify import load_trusted_keys
from llorch.node.errors import AttestationRejected, ProtocolError
from llorch.node.replay import ReplayInputError, load_request
from llorch.node.wire import ledger_protocol as lp
from llorch.node.wire.attestation import Attestation, check_multiaddr, parse_attestation
from llorch.node.wire.frames import (FRAME_TYPES, Accepted, Busy, Cancel, Error, Final, More, Request, Tokens,
                                     decode_frame, decode_uvarint, encode_frame, encode_uvarint)
from llorch.node.wire.infer_protocol import InferProtocol, Role
from llorch.node.wire.ledger_protocol import LedgerProtocol, witness_name
from llorch.node.wire import listing
from llorch.node.wire.registration import Registration
from llorch.node.wire.sampling import chat_request_prompt, chat_request_sampling
from tests.fuzz_strategies import (FUZZ, OTHER, SIGNER, any_value, arbitrary_bytes, arbitrary_text, byte_inputs,
                                   loose_envelopes, loose_msgpack, mutated, near, plausible_envelopes,
                                   plausible_map, sealed)
from tests.helpers import MODEL_ID, MODEL_SHA256, SAMPLING, receipt_fields


def parse_registration_request(body: bytes, now_ms: int):
    """What `POST /v2/platform/providers/register` does with its body (after the size cap)."""
    return parse_registration_body(parse_json(body), now_ms)

NOW_MS = 1_700_000_000_000
ORIGIN = ledger_origin(SIGNER.public_key)
SALT = bytes(16)
PROMPT = {"messages": [{"role": "user", "content": "hi"}]}
OUTPUT = "hello"


# --- valid objects every strategy starts from ---------------------------------------------------------------------

def _ticket_payload() -> dict:
    return dict(v=VERSION, request_id="chatcmpl-000000000000000000000001", gateway_key=SIGNER.public_key,
                provider_key=OTHER.public_key, tenant="t_000000000000000000000000", model_id=MODEL_ID,
                model_sha256=MODEL_SHA256, sampling=dict(SAMPLING, stop=["\n\n"]), price_in=100_000,
                price_out=200_000, currency="EUR", issued_ms=NOW_MS, expires_ms=NOW_MS + 60_000)


TICKET_PAYLOAD = _ticket_payload()
TICKET = Ticket(**TICKET_PAYLOAD)
TICKET_BYTES = TICKET.seal(SIGNER)


def _receipts(count: int) -> list[bytes]:
    entries, previous = [], ZERO_HASH
    for index in range(count):
        fields = receipt_fields(SIGNER, f"chatcmpl-{index:024x}", v=VERSION, origin=ORIGIN, index=index,
                                prev_hash=previous)
        entries.append(Receipt(**fields).seal(SIGNER))
        previous = sha256(entries[-1])
    return entries


ENTRIES = _receipts(3)
RECEIPT_BYTES = ENTRIES[0]
RECEIPT_PAYLOAD = receipt_fields_of(Receipt.from_envelope(RECEIPT_BYTES))
TREE = merkle.MemoryTree([merkle.leaf_hash(entry) for entry in ENTRIES])
CHECKPOINT = Checkpoint(ORIGIN, len(ENTRIES), TREE.root())
NOTE = sign_checkpoint(CHECKPOINT, SIGNER)
WITNESS_NAME = witness_name(OTHER.public_key)
COSIGNED = cosign(NOTE, WITNESS_NAME, OTHER, NOW_MS // 1000)

# The receipt the gateway expects for TICKET (signed by the ticket's provider, OTHER).
GATEWAY_RECEIPT_PAYLOAD = dict(
    v=VERSION, origin=ledger_origin(OTHER.public_key), index=0, prev_hash=ZERO_HASH,
    request_id=TICKET.request_id, ticket_sha256=sha256(TICKET_BYTES), gateway_key=SIGNER.public_key,
    tenant=TICKET.tenant, provider_key=OTHER.public_key, model_id=MODEL_ID, model_sha256=MODEL_SHA256,
    engine_build="test-build", seed=SAMPLING["seed"], sampling_sha256=sampling_sha256(TICKET.sampling),
    tokens_in=3, tokens_out=2, accepted_ms=NOW_MS, first_token_ms=NOW_MS + 10, finished_ms=NOW_MS + 20,
    price_in=100_000, price_out=200_000, currency="EUR", amount=1, prompt_commitment=prompt_commitment(SALT, PROMPT),
    output_sha256=sha256(OUTPUT.encode()), finish_reason="stop")
GATEWAY_RECEIPT_BYTES = Receipt(**GATEWAY_RECEIPT_PAYLOAD).seal(OTHER)

SIGNER_PEER = peer_id_of(SIGNER.public_key)
ATTESTATION_PAYLOAD = dict(
    v=VERSION, provider_key=SIGNER.public_key, seq=NOW_MS, issued_ms=NOW_MS, expires_ms=NOW_MS + 15_000,
    addrs=["/ip4/127.0.0.1/tcp/4101", f"/dns4/node.example/tcp/4101/p2p/{SIGNER_PEER}"],
    models=[{"context_tokens": 2048, "id": MODEL_ID, "sha256": MODEL_SHA256}], engine_build="echo/1",
    slots_total=4, slots_free=2, queue_depth=0, wait_ms=0, price_in=100_000, price_out=200_000, currency="EUR",
    geo={"country": "DE", "region": "Hessen"}, sla={"ttft_ms": 100, "uptime_ppm": 990_000})
ATTESTATION_BYTES = Attestation(**ATTESTATION_PAYLOAD).seal(SIGNER)

REGISTRATION_PAYLOAD = dict(
    v=VERSION, provider_key=SIGNER.public_key, provider_id=SIGNER_PEER, endpoint="/ip4/127.0.0.1/tcp/4101",
    pricing={"currency": "EUR", "input_per_1m": 100_000, "output_per_1m": 200_000},
    capacity={"gpus": 1, "slots": 4, "vram_gb": 24}, sla={"ttft_ms": 100, "uptime_ppm": 990_000},
    geo={"country": "DE", "region": "Hessen"}, issued_ms=NOW_MS)
REGISTRATION_BYTES = Registration(**REGISTRATION_PAYLOAD).seal(SIGNER)

INFER_FRAMES = [Request(TICKET_BYTES, SALT, PROMPT), Request(TICKET_BYTES, SALT, {"text": "once upon"}), Accepted(),
                Busy("all 4 slots are busy"), Tokens(0, ["hel"]), Tokens(7, ["", "lo", " wor"]), More(3),
                Final(RECEIPT_BYTES), Cancel(),
                Error("bad_ticket", "ticket is invalid")]
LEDGER_REQUEST_FRAMES = [lp.GetCheckpoint(), lp.GetEntries(0, 3), lp.GetConsistency(1, 3), lp.GetInclusion(2, 3),
                         lp.PutCosigned(COSIGNED)]
LEDGER_REPLY_FRAMES = [lp.CheckpointReply(NOTE), lp.EntriesReply(0, ENTRIES), lp.ProofReply([bytes(32)] * 2),
                       lp.Ack(), Error("range_beyond_size", "the ledger has 3 entries; 4 asked for")]


def _body(framed: bytes) -> bytes:
    length, used = decode_uvarint(framed)
    return framed[used:used + length]


# --- helpers ------------------------------------------------------------------------------------------------------

def accepted_or_refused(decode, data, errors):
    """``decode(data)``, or None if it raised one of ``errors``; anything else escapes and fails the test."""
    try:
        return decode(data)
    except errors:
        return None


def reencoded_envelope(obj, data: bytes) -> bytes:
    """The canonical envelope of ``obj`` with the signature ``data`` carries."""
    return canonical.encode({"p": canonical.encode(obj.to_payload()), "s": canonical.decode(data)["s"]})


def _encodable(value) -> bytes:
    try:
        return canonical.encode(value)
    except EncodingError:
        assume(False)


# --- ledger: canonical msgpack and envelopes ------------------------------------------------------------------------

@FUZZ
@given(byte_inputs(canonical.encode({"a": [1, -1, b"x", "y", None, True]}),
                   {"a": [1, -1, b"x", "y", None, True], "b": {"c": 2**64 - 1, "d": -(2**63)}})
       | any_value.flatmap(loose_msgpack) | st.builds(_encodable, any_value))
@example(b"\xc1")                      # the one byte msgpack never assigned
@example(b"\xd4\x00\x00")              # fixext 1
@example(b"\x91" * 200 + b"\xc0")      # nested deeper than msgpack's own stack
def test_canonical_decode_accepts_only_canonical_bytes(data):
    value = accepted_or_refused(canonical.decode, data, EncodingError)
    if value is not None or data == b"\xc0":
        assert canonical.encode(value) == data


surrogate_text = st.text(alphabet=st.characters(categories=["Cs", "Ll", "Nd"]), max_size=4)


@FUZZ
@given(st.recursive(any_value | surrogate_text, lambda children: st.lists(children, max_size=3) | st.dictionaries(
    st.text(max_size=4) | surrogate_text, children, max_size=3), max_leaves=8))
@example({"\ud800": 1})                 # UnicodeEncodeError while sorting keys
@example(["\udfff"])                    # UnicodeEncodeError from msgpack
def test_canonical_encode_refuses_what_has_no_encoding(value):
    data = accepted_or_refused(canonical.encode, value, EncodingError)
    if data is not None:
        assert canonical.decode(data) == value


@FUZZ
@given(byte_inputs(RECEIPT_BYTES, canonical.decode(RECEIPT_BYTES)) | loose_envelopes(RECEIPT_BYTES)
       | plausible_envelopes("receipt", RECEIPT_PAYLOAD))
def test_open_envelope(data):
    opened = accepted_or_refused(open_envelope, data, EncodingError)
    if opened is not None:
        payload, payload_bytes, signature = opened
        assert canonical.encode({"p": payload_bytes, "s": signature}) == data
        assert canonical.encode(payload) == payload_bytes


@FUZZ
@given(arbitrary_text | near(SIGNER_PEER) | st.text(alphabet=signing._B58_ALPHABET, max_size=60))
def test_public_key_of_peer_id(text):
    key = accepted_or_refused(public_key_of_peer_id, text, EncodingError)
    if key is not None:
        assert peer_id_of(key) == text


# --- ledger: signed objects --------------------------------------------------------------------------------------

GRAMMARS = {"request_id": r"[A-Za-z0-9_-]{8,64}", "currency": r"[A-Z]{3}", "country": r"[A-Z]{2}"}


def _grammars_hold(fields: dict) -> None:
    """Every field with a documented grammar (protocol.md) matches it as a whole, nested maps included."""
    for name, value in fields.items():
        if isinstance(value, dict):
            _grammars_hold(value)
        elif name in GRAMMARS:
            assert re.fullmatch(GRAMMARS[name], value), (name, value)


def _signed_object_property(cls, data: bytes) -> None:
    obj = accepted_or_refused(cls.from_envelope, data, (EncodingError, SignatureError))
    if obj is not None:
        assert reencoded_envelope(obj, data) == data
        assert cls.from_envelope(reencoded_envelope(obj, data)) == obj
        _grammars_hold(obj.to_payload())


@pytest.mark.parametrize("cls, payload, field, value", [
    (Ticket, TICKET_PAYLOAD, "request_id", TICKET_PAYLOAD["request_id"] + "\n"),
    (Ticket, TICKET_PAYLOAD, "currency", "EUR\n"),
    (Receipt, RECEIPT_PAYLOAD, "request_id", RECEIPT_PAYLOAD["request_id"] + "\n"),
    (Receipt, RECEIPT_PAYLOAD, "currency", "EUR\n"),
    (Attestation, ATTESTATION_PAYLOAD, "currency", "\u00c9UR"),
    (Attestation, ATTESTATION_PAYLOAD, "geo", {"country": "DE\n", "region": "Hessen"}),
    (Registration, REGISTRATION_PAYLOAD, "geo", {"country": "DE\n", "region": "Hessen"}),
    (Registration, REGISTRATION_PAYLOAD, "pricing", {**REGISTRATION_PAYLOAD["pricing"], "currency": "EUR\n"}),
])
def test_a_grammar_matches_the_whole_field(cls, payload, field, value):
    """Regression: "^...$" patterns used with re.match also matched before a trailing newline, and the attestation
    took any three upper-case letters (str.isupper) as a currency; so "EUR\n" was a currency, "DE\n" a country and
    "<request id>\n" a second request id for the same request."""
    with pytest.raises(EncodingError):
        cls.from_envelope(sealed(cls.SIGNED_TYPE, {**payload, field: value}))


def test_a_tenant_name_is_matched_whole():
    """Regression: the same "$" let the operator create a tenant "acme\n" next to "acme"."""
    validate(name="acme")
    with pytest.raises(TenantError):
        validate(name="acme\n")


@FUZZ
@given(byte_inputs(TICKET_BYTES, canonical.decode(TICKET_BYTES)) | loose_envelopes(TICKET_BYTES)
       | plausible_envelopes("ticket", TICKET_PAYLOAD))
def test_ticket_from_envelope(data):
    _signed_object_property(Ticket, data)


@FUZZ
@given(byte_inputs(RECEIPT_BYTES, canonical.decode(RECEIPT_BYTES)) | loose_envelopes(RECEIPT_BYTES)
       | plausible_envelopes("receipt", RECEIPT_PAYLOAD))
def test_receipt_from_envelope(data):
    _signed_object_property(Receipt, data)


@FUZZ
@given(byte_inputs(REGISTRATION_BYTES, canonical.decode(REGISTRATION_BYTES)) | loose_envelopes(REGISTRATION_BYTES)
       | plausible_envelopes("registration", REGISTRATION_PAYLOAD))
def test_registration_from_envelope(data):
    _signed_object_property(Registration, data)


@FUZZ
@given(byte_inputs(RECEIPT_BYTES) | plausible_envelopes("receipt", RECEIPT_PAYLOAD))
def test_inspect_entry_and_readable_never_raise(data):
    facts = inspect_entry(data)
    view = readable(data)
    if facts.malformed is not None:
        assert "unreadable" in view
    else:
        assert facts.entry_sha256 == sha256(data)
        assert ("unreadable" in view) != facts.signature_valid


def test_valid_objects_round_trip():
    for cls, data in ((Ticket, TICKET_BYTES), (Receipt, RECEIPT_BYTES), (Attestation, ATTESTATION_BYTES),
                      (Registration, REGISTRATION_BYTES)):
        _signed_object_property(cls, data)
        assert cls.from_envelope(data).seal(SIGNER) == data


# --- ledger: notes, checkpoints, cosignatures ---------------------------------------------------------------------

@st.composite
def note_texts(draw) -> bytes:
    """Notes assembled from plausible parts: origin, size, root and signature lines."""
    origin = draw(st.just(ORIGIN) | near(ORIGIN))
    size = draw(st.sampled_from(["3", "0", "03", "-1", "+3", "3.0", " 3", "\u0663", "\u00b3", "9" * 25,
                                 "18446744073709551616", "9223372036854775807"]) | st.text(max_size=6))
    root = draw(st.sampled_from([base64.b64encode(CHECKPOINT.root).decode(), base64.b64encode(bytes(31)).decode(),
                                 base64.b64encode(CHECKPOINT.root).decode().rstrip("="),
                                 base64.b64encode(CHECKPOINT.root).decode()[:-2] + "B=", "\u00e9" * 44])
                | st.text(max_size=48))
    lines = []
    for _ in range(draw(st.integers(0, 3))):
        name = draw(st.just(ORIGIN) | st.just(WITNESS_NAME) | st.text(max_size=12))
        blob = draw(st.binary(max_size=80))
        encoded = draw(st.sampled_from([base64.b64encode(blob).decode(), base64.b64encode(blob).decode() + "=",
                                        "\u00e9", base64.b64encode(blob).decode().rstrip("=")]) | st.text(max_size=8))
        separator = draw(st.sampled_from([" ", "  ", "\t", "\u00a0"]))
        lines.append(draw(st.sampled_from(["\u2014 ", "- ", "\u2014"])) + name + separator + encoded)
    end = draw(st.sampled_from(["\n", "\u2028", "\r\n", "\x85", ""]))
    text = f"{origin}\n{size}\n{root}\n\n" + "".join(line + end for line in lines)
    return text.encode("utf-8", "surrogatepass")


def note_inputs(valid: bytes):
    return st.one_of(arbitrary_bytes, mutated(valid), note_texts(),
                     st.builds(lambda t: t.encode("utf-8", "surrogatepass"), arbitrary_text))


@FUZZ
@given(note_inputs(COSIGNED))
@example("o\n1\nAAAA\n\n\u2014 n \u00e9\n".encode())                            # non-ASCII base64
@example(COSIGNED.replace(b"\n\xe2\x80\x94 llorch-w", b"\xe2\x80\xa8\xe2\x80\x94 llorch-w"))   # U+2028 between lines
def test_parse_note(data):
    note = accepted_or_refused(parse_note, data, NoteError)
    if note is not None:
        assert note.to_bytes() == data


@FUZZ
@given(arbitrary_text | st.builds(lambda b: b.decode("utf-8", "replace"), note_texts())
       | st.builds(lambda parts: "\n".join(parts) + "\n", st.lists(st.text(max_size=50), max_size=4)))
@example("o\n\u0663\nAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\n")          # an Arabic-Indic digit
@example("o\n\u00b2\nAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\n")          # a superscript digit
@example("o\n" + "9" * 5000 + "\nAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\n")   # a size Python refuses to parse
@example("o\n1\nAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAB=\n")                # non-zero padding bits
@example("o\n1\nAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\nextension\n")     # a line the parser dropped
def test_parse_checkpoint_text(text):
    checkpoint = accepted_or_refused(parse_checkpoint_text, text, NoteError)
    if checkpoint is not None:
        assert checkpoint.body() == text
        assert 0 <= checkpoint.size < 2**63


@FUZZ
@given(note_inputs(NOTE))
def test_open_checkpoint(data):
    checkpoint = accepted_or_refused(lambda d: open_checkpoint(d, ORIGIN, SIGNER.public_key), data, NoteError)
    if checkpoint is not None:
        assert checkpoint.body() == parse_note(data).text


@FUZZ
@given(note_inputs(COSIGNED))
def test_verify_cosignature(data):
    timestamp = accepted_or_refused(lambda d: verify_cosignature(d, WITNESS_NAME, OTHER.public_key), data, NoteError)
    if timestamp is not None:
        assert 0 <= timestamp < 2**64


def test_valid_notes_parse():
    assert open_checkpoint(NOTE, ORIGIN, SIGNER.public_key) == CHECKPOINT
    assert open_checkpoint(COSIGNED, ORIGIN, SIGNER.public_key) == CHECKPOINT
    assert verify_cosignature(COSIGNED, WITNESS_NAME, OTHER.public_key) == NOW_MS // 1000
    assert parse_note(COSIGNED).to_bytes() == COSIGNED


# --- ledger: Merkle proofs ----------------------------------------------------------------------------------------

proof_lists = st.lists(st.binary(min_size=31, max_size=33) | st.just(bytes(32)) | st.sampled_from(
    [TREE.subtree(1, 1), TREE.subtree(0, 2), TREE.subtree(2, 1)]), max_size=6) | st.just(
    merkle.inclusion_proof(TREE.subtree, 1, 3))
sizes = st.integers(min_value=-3, max_value=10) | st.sampled_from([2**63 - 1, 2**64, -(2**64)])


@FUZZ
@given(proof_lists, sizes, sizes)
def test_verify_inclusion(proof, index, size):
    accepted_or_refused(lambda p: merkle.verify_inclusion(merkle.leaf_hash(ENTRIES[1]), index, size, p, TREE.root()),
                        proof, merkle.ProofError)


@FUZZ
@given(proof_lists, sizes, sizes)
def test_verify_consistency(proof, old_size, new_size):
    accepted_or_refused(lambda p: merkle.verify_consistency(old_size, new_size, TREE.root(1), TREE.root(), p), proof,
                        merkle.ProofError)


# --- ledger: the receipt proof document verify-receipt reads --------------------------------------------------------

PROOF_DOCUMENT = proof_document(Receipt.from_envelope(ENTRIES[1]).request_id, ENTRIES[1], 1, 3,
                                merkle.inclusion_proof(TREE.subtree, 1, 3), COSIGNED)
PROOF_JSON = json.dumps(PROOF_DOCUMENT)
json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
                           lambda children: st.lists(children, max_size=4) | st.dictionaries(
                               st.text(max_size=12), children, max_size=4), max_leaves=12)


def _json_dumps(value) -> str:
    """JSON of a plausible value (bytes in it, which JSON lacks, become hex strings)."""
    return json.dumps(value, default=bytes.hex)


proof_texts = st.one_of(
    arbitrary_text,
    st.builds(lambda b: b.decode("utf-8", "replace"), mutated(PROOF_JSON.encode())),
    st.builds(_json_dumps, plausible_map(PROOF_DOCUMENT)),
    st.builds(_json_dumps, json_values),
    st.sampled_from(['{"leaf_index": Infinity}', "[" * 100_000, "1" * 5000, "NaN", "-Infinity"]))


@FUZZ
@given(proof_texts)
@example(PROOF_JSON.replace('"leaf_index": 1', '"leaf_index": Infinity'))      # int(inf): OverflowError
@example(PROOF_JSON.replace('"leaf_index": 1', '"leaf_index": 1.9'))           # a float index read as 1
@example(PROOF_JSON.replace('"leaf_index": 1', '"leaf_index": true'))          # a bool index read as 1
@example(PROOF_JSON.replace('"tree_size": 3', '"tree_size": ' + "3" * 5000))  # a number Python will not convert
@example("[" * 100_000)                                                          # deeper than the JSON parser goes
@example(PROOF_JSON.replace('"checkpoint": "', '"checkpoint": "\\ud800'))       # a lone surrogate: UnicodeEncodeError
def test_receipt_proof_document(text):
    document = accepted_or_refused(load_document, text, ReceiptProofError)
    if document is not None:
        checked = accepted_or_refused(verify_receipt_document, document, ReceiptProofError)
        if checked is not None:
            assert type(document["leaf_index"]) is int and type(document["tree_size"]) is int
            assert (checked.receipt.index, checked.tree_size) == (document["leaf_index"], document["tree_size"])
        accepted_or_refused(lambda d: verify_receipt_document(d, OTHER.public_key, WITNESS_NAME), document,
                            ReceiptProofError)


@FUZZ
@given(plausible_map(PROOF_DOCUMENT) | json_values)
def test_verify_receipt_document(document):
    accepted_or_refused(verify_receipt_document, document, ReceiptProofError)


def test_valid_receipt_proof_document_verifies():
    checked = verify_receipt_document(load_document(PROOF_JSON), OTHER.public_key, WITNESS_NAME)
    assert (checked.receipt.index, checked.tree_size, checked.cosigned_at_s) == (1, 3, NOW_MS // 1000)


# --- ledger: files an operator or auditor hands in --------------------------------------------------------------

def _with_file(text: str, mode: int, read):
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "input"
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
        os.chmod(path, mode)
        return read(path)


TRUSTED_TEXT = f"# the providers I trust\n{SIGNER_PEER}\n{OTHER.public_key.hex()}  # by hex key\n"


@FUZZ
@given(arbitrary_text | st.builds(lambda b: b.decode("utf-8", "replace"), mutated(TRUSTED_TEXT.encode())))
def test_load_trusted_keys(text):
    keys = _with_file(text, 0o600, lambda path: accepted_or_refused(load_trusted_keys, path, StoreError))
    assert keys is None or all(len(key) == 32 for key in keys)


def _key_file_text() -> str:
    with tempfile.TemporaryDirectory() as directory:
        write_key_file(Path(directory) / "key", SIGNER)
        return (Path(directory) / "key").read_text()


KEY_FILE_TEXT = _key_file_text()


@FUZZ
@given(arbitrary_text | st.builds(lambda b: b.decode("utf-8", "replace"), mutated(KEY_FILE_TEXT.encode())))
def test_load_key_file(text):
    key = _with_file(text, 0o600, lambda path: accepted_or_refused(load_key_file, path, KeyFileError))
    assert key is None or isinstance(key, SigningKey)


# --- node: frames and the two stream protocols --------------------------------------------------------------------

@FUZZ
@given(st.binary(max_size=8) | st.sampled_from([encode_uvarint(n) for n in (0, 127, 128, 2**21, 2**28 - 1)]))
def test_decode_uvarint(data):
    decoded = accepted_or_refused(decode_uvarint, data, ProtocolError)
    if decoded is not None:
        value, used = decoded
        assert encode_uvarint(value) == data[:used]


def frame_inputs(frames):
    bodies = [_body(encode_frame(frame)) for frame in frames]
    return st.one_of(
        arbitrary_bytes,
        st.sampled_from(bodies).flatmap(mutated),
        st.sampled_from(bodies).flatmap(lambda body: loose_msgpack(canonical.decode(body))),
        st.sampled_from([canonical.decode(body) for body in bodies]).flatmap(plausible_map).map(_encodable),
        st.builds(_encodable, any_value))


def _frame_property(body: bytes, types: dict) -> None:
    frame = accepted_or_refused(lambda b: decode_frame(b, types), body, ProtocolError)
    if frame is not None:
        assert encode_frame(frame) == encode_uvarint(len(body)) + body


@FUZZ
@given(frame_inputs(INFER_FRAMES))
def test_decode_infer_frame(body):
    _frame_property(body, FRAME_TYPES)


@FUZZ
@given(frame_inputs(LEDGER_REQUEST_FRAMES))
def test_decode_ledger_request_frame(body):
    _frame_property(body, lp.REQUESTS)


@FUZZ
@given(frame_inputs(LEDGER_REPLY_FRAMES))
def test_decode_ledger_reply_frame(body):
    _frame_property(body, lp.REPLIES)


LISTING_FRAMES = [bytes.fromhex(hex_frame) for hex_frame in json.loads(
    (Path(__file__).parent / "fixtures" / "listing_vectors.json").read_text())["frames"].values()]


@FUZZ
@given(st.sampled_from([_body(frame) for frame in LISTING_FRAMES]).flatmap(
    lambda body: st.one_of(mutated(body), loose_msgpack(canonical.decode(body)), plausible_map(canonical.decode(body))
                           .map(_encodable))) | arbitrary_bytes | st.builds(_encodable, any_value))
def test_decode_listing_frames(body):
    data = encode_uvarint(len(body)) + body
    for decode in (listing.AskListing.from_bytes, listing.decode_answer):
        frame = accepted_or_refused(decode, data, ProtocolError)
        if frame is not None:
            assert frame.to_bytes() == data


def _drive(protocol, stream: bytes, chunk_sizes: list[int]) -> list:
    """Feed ``stream`` to a protocol in chunks; the frames it yields until it refuses (ProtocolError) or runs dry."""
    frames, position = [], 0
    try:
        for size in [*chunk_sizes, len(stream)]:
            protocol.receive_data(stream[position:position + size])
            position += size
            while (frame := protocol.next_frame()) is not None:
                frames.append(frame)
            if position >= len(stream):
                break
    except ProtocolError:
        pass
    return frames


SERVER_STREAM = b"".join(encode_frame(f) for f in (Accepted(), Tokens(0, ["hel"]), Tokens(1, ["lo", " w"]),
                                                   Final(RECEIPT_BYTES)))
CLIENT_STREAM = encode_frame(INFER_FRAMES[0]) + encode_frame(Cancel())
chunks = st.lists(st.integers(1, 400), max_size=6)


@FUZZ
@given(st.one_of(arbitrary_bytes, mutated(CLIENT_STREAM), mutated(SERVER_STREAM)), chunks)
def test_infer_protocol_server_reads_any_stream(stream, chunk_sizes):
    _drive(InferProtocol(Role.SERVER), stream, chunk_sizes)


@FUZZ
@given(st.one_of(arbitrary_bytes, mutated(SERVER_STREAM), mutated(CLIENT_STREAM)), chunks)
def test_infer_protocol_client_reads_any_stream(stream, chunk_sizes):
    client = InferProtocol(Role.CLIENT)
    client.send(INFER_FRAMES[0])
    frames = _drive(client, stream, chunk_sizes)
    if stream == SERVER_STREAM:
        assert [type(f) for f in frames] == [Accepted, Tokens, Tokens, Final]


@FUZZ
@given(st.one_of(arbitrary_bytes, *[mutated(encode_frame(f)) for f in LEDGER_REQUEST_FRAMES]), chunks)
def test_ledger_protocol_server_reads_any_stream(stream, chunk_sizes):
    _drive(LedgerProtocol(Role.SERVER), stream, chunk_sizes)


@FUZZ
@given(st.sampled_from(range(len(LEDGER_REQUEST_FRAMES))).flatmap(
    lambda i: st.tuples(st.just(i), st.one_of(arbitrary_bytes, mutated(encode_frame(LEDGER_REPLY_FRAMES[min(i, 3)]))))),
    chunks)
def test_ledger_protocol_client_reads_any_stream(request_and_stream, chunk_sizes):
    index, stream = request_and_stream
    client = LedgerProtocol(Role.CLIENT)
    client.send(LEDGER_REQUEST_FRAMES[index])
    _drive(client, stream, chunk_sizes)


# --- node: gossip, registration, replay input -------------------------------------------------------------------

@FUZZ
@given(byte_inputs(ATTESTATION_BYTES, canonical.decode(ATTESTATION_BYTES)) | loose_envelopes(ATTESTATION_BYTES)
       | plausible_envelopes("attestation", ATTESTATION_PAYLOAD), st.sampled_from([None, SIGNER.public_key]))
def test_parse_attestation(data, sender):
    attestation = accepted_or_refused(lambda d: parse_attestation(d, sender, NOW_MS + 1_000), data,
                                      AttestationRejected)
    if attestation is not None:
        assert reencoded_envelope(attestation, data) == data
        _grammars_hold(attestation.to_payload())


MULTIADDR_PARTS = ["", "ip4", "ip6", "dns", "dns4", "dns6", "tcp", "udp", "quic-v1", "p2p", "p2p-circuit", "unix",
                   "127.0.0.1", "::1", "4101", "99999", "-1", "node.example", SIGNER_PEER, peer_id_of(OTHER.public_key),
                   "Qm", "\u00e9", "%", "ws", "ipfs", "onion3", "dnsaddr"]


@FUZZ
@given(st.lists(st.sampled_from(MULTIADDR_PARTS) | st.text(max_size=6), max_size=8).map(lambda p: "/" + "/".join(p))
       | arbitrary_text)
def test_check_multiaddr(addr):
    accepted_or_refused(lambda a: check_multiaddr(a, SIGNER_PEER), addr, EncodingError)


REQUEST_BODY = {"model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}], "seed": 7, "temperature": 0.5}


@FUZZ
@given(arbitrary_text | st.builds(_json_dumps, plausible_map(REQUEST_BODY)) | st.builds(_json_dumps, json_values)
       | st.sampled_from(['"hello"', "[" * 100_000, "1" * 5000, "{\"messages\": 5}"]))
@example('"hello"')                        # a JSON str: 'str' object has no attribute 'get'
@example("[" * 100_000)                    # RecursionError
@example('{"messages": [{"role": "user", "content": "hi"}], "temperature": "0.5"}')   # str * 10^6, then TypeError
@example('{"messages": [{"role": "user", "content": "hi"}], "temperature": 1' + "0" * 400 + "}")   # too big to hash
@example('{"messages": [{"role": "user", "content": "\\ud800"}]}')    # a lone surrogate: UnicodeEncodeError
@example('{"messages": [null]}')                                       # 'NoneType' object has no attribute 'get'
@example('{"messages": [{"role": "user", "content": "x"}], "tools": [1]}')
@example('{"messages": [{"role": "user", "content": "x"}], "tools": [{"function": {"name": "f"}}], '
         '"tool_choice": {"function": 1}}')
@example('{"messages": [{"role": "assistant", "content": null, "tool_calls": [{"function": {"name": "f", '
         '"arguments": "[1"}}]}]}')                                   # arguments that are not JSON
@example('{"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_schema"}}')
@example('{"messages": [{"role": "user", "content": "x"}], "frequency_penalty": NaN}')
@example('{"messages": [{"role": "user", "content": "x"}], "presence_penalty": 1e400}')
def test_replay_load_request(text):
    body = _with_file(text, 0o600, lambda path: accepted_or_refused(load_request, path, ReplayInputError))
    if body is not None:                     # accepted means replay can hash it
        prompt_commitment(SALT, chat_request_prompt(body))
        sampling_sha256(chat_request_sampling(body, 0))


# --- gateway: HTTP bodies, receipts, witness ----------------------------------------------------------------------

REGISTRATION_BODY = json.dumps({"registration": base64.b64encode(REGISTRATION_BYTES).decode()}).encode()


@st.composite
def registration_bodies(draw):
    envelope = draw(st.one_of(st.just(REGISTRATION_BYTES), plausible_envelopes("registration", REGISTRATION_PAYLOAD),
                              mutated(REGISTRATION_BYTES)))
    document = draw(plausible_map({"registration": base64.b64encode(envelope).decode()}) | json_values)
    return _json_dumps(document).encode()


@FUZZ
@given(arbitrary_bytes | registration_bodies() | mutated(REGISTRATION_BODY)
       | st.sampled_from([b"[" * 100_000, b"1" * 5000, b'{"registration": "\xc3\xa9"}']))
@example(b"1" * 5000)                    # ValueError from int(): the handler answered 500
@example(b"[" * 100_000)                 # RecursionError: the handler answered 500
@example(b'{"registration":"\xc2\x80"}')  # non-ASCII base64: ValueError, not binascii.Error
def test_parse_registration_request(body):
    parsed = accepted_or_refused(lambda b: parse_registration_request(b, NOW_MS), body, BadRequest)
    if parsed is not None:
        registration, envelope, invitation = parsed
        assert invitation is None                      # no body here carries a join token this gateway made
        assert Registration.from_envelope(envelope) == registration


def test_valid_registration_request_parses():
    registration, envelope, invitation = parse_registration_request(REGISTRATION_BODY, NOW_MS)
    assert invitation is None
    assert envelope == REGISTRATION_BYTES and registration.provider_id == SIGNER_PEER


@FUZZ
@given(arbitrary_bytes | st.builds(lambda v: _json_dumps(v).encode(), plausible_map(REQUEST_BODY) | json_values)
       | mutated(json.dumps(REQUEST_BODY).encode()), st.sampled_from([ChatRequest, CompletionRequest]))
@example(b"1" * 5000, ChatRequest)        # ValueError from int(): answered 500
@example(b"[" * 100_000, ChatRequest)     # RecursionError: answered 500
def test_parse_chat_request(body, shape):
    chat = accepted_or_refused(lambda b: parse_chat_request(b, shape), body, BadRequest)
    if chat is not None:                     # accepted means a ticket and a prompt commitment can be made of it
        prompt_commitment(SALT, chat.prompt())
        sampling_sha256(chat.sampling(7))


@FUZZ
@given(byte_inputs(GATEWAY_RECEIPT_BYTES) | plausible_envelopes("receipt", GATEWAY_RECEIPT_PAYLOAD),
       st.booleans())
def test_check_receipt(data, cancelled):
    receipt = accepted_or_refused(lambda d: check_receipt(d, TICKET, TICKET_BYTES, SALT, PROMPT, OUTPUT, cancelled),
                                  data, ReceiptRejected)
    if receipt is not None:
        assert reencoded_envelope(receipt, data) == data


def test_valid_receipt_passes_the_gateway():
    assert check_receipt(GATEWAY_RECEIPT_BYTES, TICKET, TICKET_BYTES, SALT, PROMPT, OUTPUT).tokens_out == 2


@FUZZ
@given(note_inputs(NOTE))
def test_witness_check_checkpoint(note):
    accepted_or_refused(lambda n: check_checkpoint(WitnessedState.empty(), n, SIGNER.public_key), note,
                        (BadView, ForkDetected))


@FUZZ
@given(proof_lists)
def test_witness_check_consistency(proof):
    state = extend(WitnessedState.empty(), Checkpoint(ORIGIN, 1, TREE.root(1)), NOTE, ENTRIES[:1],
                   SIGNER.public_key)
    accepted_or_refused(lambda p: check_consistency(state, CHECKPOINT, NOTE, p), proof, ForkDetected)


entry_lists = st.lists(st.sampled_from(ENTRIES) | mutated(ENTRIES[1]) | arbitrary_bytes
                       | plausible_envelopes("receipt", RECEIPT_PAYLOAD), max_size=4)


@FUZZ
@given(entry_lists)
def test_witness_extend_and_request_ids_of(entries):
    ids = request_ids_of(entries)
    assert all(isinstance(i, str) for i in ids)
    state = accepted_or_refused(lambda e: extend(WitnessedState.empty(), CHECKPOINT, NOTE, e, SIGNER.public_key),
                                entries, (BadView, ForkDetected))
    if state is not None:
        assert entries == ENTRIES and state.root == CHECKPOINT.root


# --- gateway: operator input --------------------------------------------------------------------------------------

@FUZZ
@given(arbitrary_text | st.sampled_from(["12.50", "0", "1e999999999", "sNaN", "NaN", "-Infinity", "1e-999999999",
                                         "0.0000001", "1_000", " 1 ", "\u0661"]))
@example("1e999999999")     # decimal.Overflow escaped
@example("sNaN")            # decimal.InvalidOperation escaped
@example("1e-999999999")    # underflowed to 0 when multiplied by 10^6, and was accepted as 0
def test_parse_amount(text):
    amount = accepted_or_refused(parse_amount, text, TenantError)
    if amount is not None:
        assert 0 <= amount <= 10**15
        assert Decimal(amount).scaleb(-6) == Decimal(text)       # exactly the amount written, in minor units
