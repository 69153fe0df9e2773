"""C2SP signed notes carrying C2SP tlog-checkpoints, signed by the log (Ed25519, type 0x01) and cosigned by
witnesses (C2SP tlog-cosignature, Ed25519 type 0x04). Standard transparency-log tools can check them.

    <origin>\\n<tree size>\\n<base64 root hash>\\n          checkpoint body (the note text)
    \\n
    — <key name> base64(key ID[4] ‖ signature)\\n        one line per signature

Log signature: Ed25519 over the note text; key ID = SHA-256(name ‖ "\\n" ‖ 0x01 ‖ public key)[:4]; llorch uses the
ledger origin ("llorch/<peer id>") as the key name.
Cosignature: key ID = SHA-256(name ‖ "\\n" ‖ 0x04 ‖ public key)[:4]; the signature bytes are timestamp (u64,
big-endian, seconds) ‖ Ed25519 over "cosignature/v1\\ntime <timestamp>\\n" ‖ note text.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from llorch.ledger.errors import EncodingError
from llorch.ledger.signing import SigningKey, public_key_of_peer_id

NOTE_BYTES_MAX = 16 * 1024
SIGNATURES_MAX = 16
SIGNATURE_TYPE_ED25519 = 0x01
SIGNATURE_TYPE_COSIGNATURE = 0x04
EM_DASH = "\u2014"
WITNESS_NAME_PREFIX = "llorch-witness/"    # a llorch witness signs as llorch-witness/<its peer id>
COSIGNATURE_CLOCK_SLACK_S = 600             # a cosignature time may be this far ahead of the auditor's clock
# Tree sizes are at most 2^63 - 1 (the largest size /llorch/ledger/1 can name); 19 digits.
CHECKPOINT_SIZE_MAX = 2**63 - 1
CHECKPOINT_SIZE_PATTERN = re.compile(r"0|[1-9][0-9]{0,18}")


class NoteError(Exception):
    """Raised when a note or checkpoint is malformed or its signature does not verify; the message says which."""


@dataclass(frozen=True)
class Checkpoint:
    origin: str
    size: int
    root: bytes

    def body(self) -> str:
        return f"{self.origin}\n{self.size}\n{base64.b64encode(self.root).decode()}\n"


@dataclass(frozen=True)
class Signature:
    name: str
    key_id: bytes
    signature: bytes      # for cosignatures: 8-byte timestamp ‖ 64-byte signature

    def line(self) -> str:
        return f"{EM_DASH} {self.name} {base64.b64encode(self.key_id + self.signature).decode()}\n"


@dataclass(frozen=True)
class Note:
    text: str
    signatures: tuple[Signature, ...]

    def to_bytes(self) -> bytes:
        return (self.text + "\n" + "".join(s.line() for s in self.signatures)).encode("utf-8")


def key_id(name: str, signature_type: int, public_key: bytes) -> bytes:
    return hashlib.sha256(name.encode() + b"\n" + bytes([signature_type]) + public_key).digest()[:4]


def sign_checkpoint(checkpoint: Checkpoint, key: SigningKey) -> bytes:
    """The checkpoint as a signed note, signed by the log key under the name ``checkpoint.origin``."""
    text = checkpoint.body()
    signature = key.sign_external(text.encode())
    return Note(text, (Signature(checkpoint.origin, key_id(checkpoint.origin, SIGNATURE_TYPE_ED25519,
                                                             key.public_key), signature),)).to_bytes()


def cosign(note_bytes: bytes, name: str, key: SigningKey, timestamp_s: int) -> bytes:
    """Add a tlog-cosignature line by ``key`` (named ``name``) to a signed checkpoint note."""
    note = parse_note(note_bytes)
    message = f"cosignature/v1\ntime {timestamp_s}\n".encode() + note.text.encode()
    signature = timestamp_s.to_bytes(8, "big") + key.sign_external(message)
    line = Signature(name, key_id(name, SIGNATURE_TYPE_COSIGNATURE, key.public_key), signature)
    return Note(note.text, note.signatures + (line,)).to_bytes()


def parse_note(data: bytes) -> Note:
    if len(data) > NOTE_BYTES_MAX:
        raise NoteError(f"note is {len(data)} bytes, more than {NOTE_BYTES_MAX}")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise NoteError("note is not UTF-8") from None
    if any(ord(c) < 0x20 and c != "\n" for c in text):
        raise NoteError("note contains control characters")
    split = text.rfind("\n\n")
    if split < 0 or not text.endswith("\n"):
        raise NoteError("note has no blank line before its signatures")
    body, signature_block = text[:split + 1], text[split + 2:]
    if not signature_block:
        raise NoteError(f"a note needs 1..{SIGNATURES_MAX} signatures")
    signatures = []
    for line in signature_block[:-1].split("\n"):    # lines end in "\n" only (not U+2028, U+0085, ...)
        prefix = EM_DASH + " "
        parts = line[len(prefix):].split(" ") if line.startswith(prefix) else []
        if len(parts) != 2 or not parts[0]:
            raise NoteError(f"malformed signature line {line[:60]!r}")
        raw = _strict_base64(parts[1], "signature")
        if len(raw) < 5:
            raise NoteError("signature is too short")
        signatures.append(Signature(parts[0], raw[:4], raw[4:]))
    if not signatures or len(signatures) > SIGNATURES_MAX:
        raise NoteError(f"a note needs 1..{SIGNATURES_MAX} signatures")
    return Note(body, tuple(signatures))


def parse_checkpoint_text(text: str) -> Checkpoint:
    """Origin, size and root lines, nothing else: llorch checkpoints carry no extension lines."""
    lines = text.split("\n")
    if len(lines) != 4 or lines[-1] != "" or any(not line for line in lines[:-1]):
        raise NoteError("a checkpoint body is exactly the origin, size and root hash lines, each non-empty")
    origin, size_text, root_text = lines[0], lines[1], lines[2]
    if not CHECKPOINT_SIZE_PATTERN.fullmatch(size_text) or int(size_text) > CHECKPOINT_SIZE_MAX:
        raise NoteError(f"checkpoint size {size_text[:40]!r} is not an ASCII decimal without leading zeros "
                        f"of at most {CHECKPOINT_SIZE_MAX}")
    root = _strict_base64(root_text, "checkpoint root")
    if len(root) != 32:
        raise NoteError("checkpoint root is not 32 bytes")
    return Checkpoint(origin, int(size_text), root)


def _strict_base64(text: str, what: str) -> bytes:
    """Standard base64 (RFC 4648 §4) with padding, in its one canonical spelling (zero padding bits): a note has
    exactly one byte encoding."""
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (UnicodeEncodeError, binascii.Error):
        raise NoteError(f"{what} is not base64") from None
    if base64.b64encode(raw).decode("ascii") != text:
        raise NoteError(f"{what} is not canonical base64 (non-zero padding bits)")
    return raw


def open_checkpoint(data: bytes, origin: str, public_key: bytes) -> Checkpoint:
    """Parse a signed checkpoint and verify the log's signature by ``public_key`` under the name ``origin``."""
    note = parse_note(data)
    checkpoint = parse_checkpoint_text(note.text)
    if checkpoint.origin != origin:
        raise NoteError(f"checkpoint origin {checkpoint.origin!r} is not {origin!r}")
    expected_id = key_id(origin, SIGNATURE_TYPE_ED25519, public_key)
    mine = [s for s in note.signatures if s.name == origin and s.key_id == expected_id]
    if not mine:
        raise NoteError(f"checkpoint carries no signature by {origin}")
    for signature in mine:
        try:
            Ed25519PublicKey.from_public_bytes(public_key).verify(signature.signature, note.text.encode())
        except (InvalidSignature, ValueError):
            raise NoteError(f"checkpoint signature by {origin} does not verify") from None
    return checkpoint


@dataclass(frozen=True)
class Cosignature:
    name: str
    public_key: bytes | None      # None: the name is not llorch-witness/<peer id>, so the key is unknown (unchecked)
    timestamp_s: int | None


def witness_key_of_name(name: str) -> bytes | None:
    """The Ed25519 key a cosignature name stands for (``llorch-witness/<peer id>``), or None for any other name."""
    if not name.startswith(WITNESS_NAME_PREFIX):
        return None
    try:
        return public_key_of_peer_id(name[len(WITNESS_NAME_PREFIX):])
    except EncodingError:
        return None


def check_cosignatures(data: bytes, origin: str, now_s: int) -> list[Cosignature]:
    """Check every signature line of a cosigned checkpoint other than the log's own (the lines named ``origin``):
    each named ``llorch-witness/<peer id>`` must be a valid tlog-cosignature by that peer's key (key ID, 72 bytes,
    time after 0 and at most COSIGNATURE_CLOCK_SLACK_S past ``now_s``, Ed25519). Lines under other names cannot be
    checked and are returned with no key. Raises NoteError naming the first bad line, or if there is none."""
    note = parse_note(data)
    lines = [line for line in note.signatures if line.name != origin]
    if not lines:
        raise NoteError("a cosigned checkpoint carries no cosignature")
    found = []
    for line in lines:
        key = witness_key_of_name(line.name)
        if key is None:
            found.append(Cosignature(line.name, None, None))
            continue
        expected = key_id(line.name, SIGNATURE_TYPE_COSIGNATURE, key)
        if line.key_id != expected:
            raise NoteError(f"cosignature by {line.name} has key ID {line.key_id.hex()}, its key gives "
                            f"{expected.hex()}")
        if len(line.signature) != 72:
            raise NoteError(f"cosignature by {line.name} is not 8 bytes of time and 64 of signature")
        timestamp = int.from_bytes(line.signature[:8], "big")
        if not 0 < timestamp <= now_s + COSIGNATURE_CLOCK_SLACK_S:
            raise NoteError(f"cosignature by {line.name} has time {timestamp}: not after 0 or in the future")
        message = f"cosignature/v1\ntime {timestamp}\n".encode() + note.text.encode()
        try:
            Ed25519PublicKey.from_public_bytes(key).verify(line.signature[8:], message)
        except (InvalidSignature, ValueError):
            raise NoteError(f"cosignature by {line.name} does not verify") from None
        found.append(Cosignature(line.name, key, timestamp))
    return found


def verify_cosignature(data: bytes, name: str, public_key: bytes) -> int:
    """Verify the cosignature of ``name``/``public_key`` on a note; return its timestamp (seconds)."""
    note = parse_note(data)
    expected_id = key_id(name, SIGNATURE_TYPE_COSIGNATURE, public_key)
    lines = [s for s in note.signatures if s.name == name and s.key_id == expected_id]
    if not lines:
        raise NoteError(f"note carries no cosignature by {name}")
    for line in lines:
        if len(line.signature) != 72:
            raise NoteError("a cosignature is 8 bytes of timestamp and 64 bytes of signature")
        timestamp = int.from_bytes(line.signature[:8], "big")
        message = f"cosignature/v1\ntime {timestamp}\n".encode() + note.text.encode()
        try:
            Ed25519PublicKey.from_public_bytes(public_key).verify(line.signature[8:], message)
        except (InvalidSignature, ValueError):
            raise NoteError(f"cosignature by {name} does not verify") from None
    return timestamp
