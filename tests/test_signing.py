import os
import stat

import pytest

from llorch.ledger.errors import EncodingError, KeyFileError, SignatureError
from llorch.ledger.objects import Receipt, Ticket
from llorch.ledger.signing import (SigningKey, domain_tag, load_key_file, open_envelope, peer_id_of, public_key_of_peer_id,
                            verify_signature, write_key_file)
from llorch.ledger import canonical
from tests.helpers import make_ticket


def test_key_file_is_written_0600_and_loads(tmp_path):
    key = SigningKey.generate()
    path = tmp_path / "node.key"
    write_key_file(path, key)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert load_key_file(path) == key


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o644])
def test_group_or_world_readable_key_is_refused(tmp_path, mode):
    path = tmp_path / "node.key"
    write_key_file(path, SigningKey.generate())
    os.chmod(path, mode)
    with pytest.raises(KeyFileError, match="chmod 600"):
        load_key_file(path)


def test_existing_key_is_never_overwritten(tmp_path):
    path = tmp_path / "node.key"
    write_key_file(path, SigningKey.generate())
    with pytest.raises(KeyFileError, match="already exists"):
        write_key_file(path, SigningKey.generate())


def test_example_key_file_parses_but_is_refused_until_0600(tmp_path):
    example = (os.path.join(os.path.dirname(__file__), "..", "keys.example"))
    path = tmp_path / "copy.key"
    path.write_text(open(example).read())
    os.chmod(path, 0o644)
    with pytest.raises(KeyFileError, match="chmod 600"):
        load_key_file(path)
    os.chmod(path, 0o600)
    assert len(load_key_file(path).public_key) == 32


def test_mismatched_peer_id_in_key_file_is_refused(tmp_path):
    path = tmp_path / "node.key"
    write_key_file(path, SigningKey.generate())
    text = path.read_text().replace("peer_id = \"12D3KooW", "peer_id = \"12D3KooX")
    path.write_text(text)
    with pytest.raises(KeyFileError, match="peer_id does not match"):
        load_key_file(path)


def test_peer_id_matches_libp2p():
    from libp2p.peer.id import ID
    from llorch.node.p2p import key_pair_of

    key = SigningKey.generate()
    libp2p_id = ID.from_pubkey(key_pair_of(key).public_key)
    assert libp2p_id.to_base58() == key.peer_id == peer_id_of(key.public_key)
    assert public_key_of_peer_id(key.peer_id) == key.public_key


def test_signatures_are_domain_separated():
    key = SigningKey.generate()
    payload = canonical.encode({"x": 1})
    signature = key.sign("ticket", payload)
    verify_signature("ticket", key.public_key, payload, signature)
    with pytest.raises(SignatureError):
        verify_signature("receipt", key.public_key, payload, signature)
    assert domain_tag("ticket") == b"llorch/ticket/v1\x00"


def test_tampered_payload_or_signature_is_caught():
    gateway, provider = SigningKey.generate(), SigningKey.generate()
    _, envelope = make_ticket(gateway, provider.public_key, 1_000_000)
    assert Ticket.from_envelope(envelope).provider_key == provider.public_key
    payload, payload_bytes, signature = open_envelope(envelope)
    forged_payload = canonical.encode({**payload, "price_out": payload["price_out"] + 1})
    with pytest.raises(SignatureError):
        Ticket.from_envelope(canonical.encode({"p": forged_payload, "s": signature}))
    flipped = bytes([signature[0] ^ 1]) + signature[1:]
    with pytest.raises(SignatureError):
        Ticket.from_envelope(canonical.encode({"p": payload_bytes, "s": flipped}))


def test_envelope_of_wrong_type_or_shape_is_malformed():
    gateway, provider = SigningKey.generate(), SigningKey.generate()
    _, envelope = make_ticket(gateway, provider.public_key, 1_000_000)
    with pytest.raises(EncodingError):
        Receipt.from_envelope(envelope)   # a ticket is not a receipt: fields differ
    with pytest.raises(EncodingError):
        open_envelope(canonical.encode({"p": b"x", "s": b"y", "extra": 1}))
    with pytest.raises(EncodingError, match="limit"):
        open_envelope(b"\x00" * 70_000)


@pytest.mark.parametrize("override, message", [
    ({"request_id": "bad id!"}, "request_id"),
    ({"currency": "euro"}, "currency"),
    ({"expires_ms": 0}, "expires_ms"),
    ({"sampling": {"seed": 1}}, "sampling"),
    ({"price_in": -1}, "price_in"),
])
def test_ticket_invariants_checked_when_built(override, message):
    gateway, provider = SigningKey.generate(), SigningKey.generate()
    with pytest.raises(EncodingError, match=message):
        make_ticket(gateway, provider.public_key, 1_000_000, **override)
