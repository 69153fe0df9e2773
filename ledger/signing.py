"""Ed25519 keys, key files and domain-separated signatures.

One key per node: the same 32-byte Ed25519 seed is the node's libp2p identity and the key that signs its
attestations, tickets and receipts. Every signature is over ``b"llorch/<type>/v1\\x00" + payload``, so a signature
made for one type can never be replayed as another.

A signed object travels as an *envelope*: the canonical map ``{"p": payload_bytes, "s": signature_bytes}``, where
``payload_bytes`` is itself canonical msgpack. The exact envelope bytes are what get stored and hashed.
"""

from __future__ import annotations

import functools
import hashlib
import os
import stat
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from llorch.ledger import canonical, limits
from llorch.ledger.errors import EncodingError, KeyFileError, SignatureError

PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64
SIGNED_TYPES = ("attestation", "ticket", "receipt", "registration", "checkpoint", "auditor_grant", "observation",
                "catalog", "invitation", "payout_statement")

_B58_ALPHABET = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
# libp2p peer id of an Ed25519 key: identity multihash (0x00, len 0x24) of the protobuf PublicKey
# {Type: Ed25519 (0x08 0x01), Data: 32 bytes (0x12 0x20)}.
_PEER_ID_PREFIX = b"\x00\x24\x08\x01\x12\x20"


def domain_tag(signed_type: str) -> bytes:
    """The prefix every signature of this type is computed over."""
    if signed_type not in SIGNED_TYPES:
        raise AssertionError(f"unknown signed type {signed_type!r}")
    return b"llorch/" + signed_type.encode() + b"/v1\x00"


def sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


@functools.lru_cache(maxsize=65_536)
def peer_id_of(public_key: bytes) -> str:
    """The libp2p peer id (base58btc, "12D3KooW...") of a raw Ed25519 public key (the last 65,536 are kept: a
    gateway names each provider's peer id at every attestation)."""
    if len(public_key) != PUBLIC_KEY_BYTES:
        raise EncodingError(f"an Ed25519 public key is {PUBLIC_KEY_BYTES} bytes, got {len(public_key)}")
    return _b58encode(_PEER_ID_PREFIX + public_key)


def public_key_of_peer_id(peer_id: str) -> bytes:
    """Inverse of peer_id_of; raise EncodingError for anything that is not an Ed25519 peer id."""
    raw = _b58decode(peer_id)
    if len(raw) != len(_PEER_ID_PREFIX) + PUBLIC_KEY_BYTES or not raw.startswith(_PEER_ID_PREFIX):
        raise EncodingError(f"{peer_id!r} is not the peer id of an Ed25519 key")
    return raw[len(_PEER_ID_PREFIX):]


@dataclass(frozen=True)
class SigningKey:
    """A node's private key. ``public_key`` is the raw 32 bytes that signed objects name."""

    seed: bytes = field(repr=False)   # never in a log line or a traceback

    def __post_init__(self) -> None:
        if len(self.seed) != 32:
            raise KeyFileError(f"an Ed25519 private key is 32 bytes, got {len(self.seed)}")

    @classmethod
    def generate(cls) -> "SigningKey":
        private = Ed25519PrivateKey.generate()
        return cls(private.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                         serialization.NoEncryption()))

    @functools.cached_property
    def public_key(self) -> bytes:
        return self._private().public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)

    @property
    def peer_id(self) -> str:
        return peer_id_of(self.public_key)

    def sign(self, signed_type: str, payload: bytes) -> bytes:
        return self._private().sign(domain_tag(signed_type) + payload)

    def sign_external(self, message: bytes) -> bytes:
        """Sign bytes of a foreign format that carries its own domain separation (C2SP signed notes)."""
        return self._private().sign(message)

    def seal(self, signed_type: str, payload: dict) -> bytes:
        """Encode ``payload`` canonically, sign it and return the envelope bytes."""
        payload_bytes = canonical.encode(payload)
        return canonical.encode({"p": payload_bytes, "s": self.sign(signed_type, payload_bytes)})

    def _private(self) -> Ed25519PrivateKey:
        return self._private_key

    @functools.cached_property
    def _private_key(self) -> Ed25519PrivateKey:
        return Ed25519PrivateKey.from_private_bytes(self.seed)


def verify_signature(signed_type: str, public_key: bytes, payload: bytes, signature: bytes) -> None:
    """Raise SignatureError unless ``signature`` is ``public_key``'s signature of this type over ``payload``."""
    if len(public_key) != PUBLIC_KEY_BYTES or len(signature) != SIGNATURE_BYTES:
        raise SignatureError(f"{signed_type} signature or key has the wrong length")
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, domain_tag(signed_type) + payload)
    except InvalidSignature:
        raise SignatureError(f"{signed_type} signature does not verify under key {peer_id_of(public_key)}") from None


def open_envelope(data: bytes, bytes_max: int = limits.SIGNED_OBJECT_BYTES_MAX) -> tuple[dict, bytes, bytes]:
    """Parse envelope bytes into (payload map, payload bytes, signature). Does NOT verify the signature."""
    if len(data) > bytes_max:
        raise EncodingError(f"signed object is {len(data)} bytes, the limit is {bytes_max}")
    large = bytes_max if bytes_max > limits.SIGNED_OBJECT_BYTES_MAX else 0
    envelope = canonical.decode(data, large)
    if not isinstance(envelope, dict) or set(envelope) != {"p", "s"}:
        raise EncodingError("a signed envelope is a map with exactly the keys 'p' and 's'")
    payload_bytes, signature = envelope["p"], envelope["s"]
    if not isinstance(payload_bytes, bytes) or not isinstance(signature, bytes):
        raise EncodingError("envelope fields 'p' and 's' must be bin")
    payload = canonical.decode(payload_bytes, large)
    if not isinstance(payload, dict):
        raise EncodingError("a signed payload must be a map")
    return payload, payload_bytes, signature


# --- key files -------------------------------------------------------------------------------------------------

KEY_FILE_HEADER = "# llorch node key: Ed25519. Secret. Keep this file mode 0600.\n"


def write_key_file(path: Path, key: SigningKey) -> None:
    """Create a new key file with mode 0600; refuse to overwrite an existing file."""
    text = (KEY_FILE_HEADER + 'type = "ed25519"\n' + f'private_key = "{key.seed.hex()}"\n'
            + f'peer_id = "{key.peer_id}"\n')
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise KeyFileError(f"{path} already exists: refusing to overwrite a key") from None
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def load_key_file(path: Path) -> SigningKey:
    """Load a key file; refuse files readable or writable by group or others."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise KeyFileError(f"key file {path} does not exist: create one with `llorch keys new {path}`") from None
    if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyFileError(
            f"key file {path} has mode {stat.S_IMODE(info.st_mode):04o}: it must not be accessible by group or "
            f"others; run `chmod 600 {path}`")
    if info.st_size > limits.KEY_FILE_BYTES_MAX:
        raise KeyFileError(f"key file {path} is {info.st_size} bytes: not a llorch key file")
    try:
        fields = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise KeyFileError(f"key file {path} is not valid TOML: {exc}") from None
    if fields.get("type") != "ed25519":
        raise KeyFileError(f"key file {path}: type must be \"ed25519\"")
    try:
        seed = bytes.fromhex(str(fields.get("private_key", "")))
    except ValueError:
        raise KeyFileError(f"key file {path}: private_key must be 64 hex characters") from None
    if len(seed) != 32:
        raise KeyFileError(f"key file {path}: private_key must be 64 hex characters")
    key = SigningKey(seed)
    if "peer_id" in fields and fields["peer_id"] != key.peer_id:
        raise KeyFileError(f"key file {path}: peer_id does not match private_key (file edited by hand?)")
    return key


# --- base58btc ---------------------------------------------------------------------------------------------------

def _b58encode(data: bytes) -> str:
    number = int.from_bytes(data, "big")
    out = ""
    while number:
        number, rem = divmod(number, 58)
        out = _B58_ALPHABET[rem] + out
    pad = len(data) - len(data.lstrip(b"\x00"))
    return "1" * pad + out


def _b58decode(text: str) -> bytes:
    if not text or len(text) > 128:
        raise EncodingError("peer id is empty or too long")
    number = 0
    for char in text:
        index = _B58_ALPHABET.find(char)
        if index < 0:
            raise EncodingError(f"{text!r} is not base58")
        number = number * 58 + index
    body = number.to_bytes((number.bit_length() + 7) // 8, "big") if number else b""
    pad = len(text) - len(text.lstrip("1"))
    return b"\x00" * pad + body
