"""An invitation: a gateway's signed, single-use permission for one new provider to join pre-approved (and, when it
says so, with its geo claim certified), so an operator can invite a home lab instead of reviewing each registration
(docs/protocol.md §5e).

The operator makes one with `llorch gateway providers invite`; it travels as one line of text, the *join token*
``llorch-join-<base64url of the envelope, unpadded>``, which the home lab passes to `llorch node init --token`. The
token names the gateway's HTTP URL and key, so `node init` needs nothing else: it checks that the gateway answering at
that URL has that key before it trusts it. The gateway accepts a token once (its id is spent in the same transaction
that stores the registration), before ``expires_ms``, only if it signed it and has not revoked it.
"""

from __future__ import annotations

import base64
import binascii
import re
import urllib.parse
from dataclasses import dataclass
from typing import ClassVar

from llorch.ledger.errors import EncodingError
from llorch.ledger.objects import SignedObject
from llorch.ledger.signing import peer_id_of

TOKEN_PREFIX = "llorch-join-"
INVITATION_BYTES_MAX = 1024
INVITATION_DAYS_MAX = 90
INVITATION_VALIDITY_MS_MAX = INVITATION_DAYS_MAX * 86_400_000
URL_CHARS_MAX = 200
COUNTRY = re.compile(r"[A-Z]{2}")      # with fullmatch


@dataclass(frozen=True)
class Invitation(SignedObject):
    SIGNED_TYPE: ClassVar[str] = "invitation"
    SIGNER_FIELD: ClassVar[str] = "gateway_key"
    BYTES_MAX: ClassVar[int] = INVITATION_BYTES_MAX
    FIELDS: ClassVar[dict[str, str]] = {
        "v": "uint", "gateway_key": "key", "invite_id": "bin16", "gateway_url": "str", "issued_ms": "uint",
        "expires_ms": "uint",
    }
    OPTIONAL_FIELDS: ClassVar[dict[str, str]] = {"certify_geo": "str"}

    v: int
    gateway_key: bytes
    invite_id: bytes          # 16 random bytes: the gateway spends it once
    gateway_url: str          # http(s)://host[:port]: where the node registers; the libp2p port is learnt from it
    issued_ms: int
    expires_ms: int
    certify_geo: str | None = None      # the ISO 3166-1 alpha-2 country the operator vouches for; absent: none

    def _validate(self) -> None:
        url = urllib.parse.urlsplit(self.gateway_url)
        if url.scheme not in ("http", "https") or not url.hostname or len(self.gateway_url) > URL_CHARS_MAX \
                or url.path not in ("", "/") or url.query or url.fragment:
            raise EncodingError(f"gateway_url must be an http(s) URL of a host (at most {URL_CHARS_MAX} characters)")
        if self.certify_geo is not None and not COUNTRY.fullmatch(self.certify_geo):
            raise EncodingError("certify_geo must be an ISO 3166-1 alpha-2 code (e.g. DE)")
        if not self.issued_ms < self.expires_ms <= self.issued_ms + INVITATION_VALIDITY_MS_MAX:
            raise EncodingError(f"an invitation runs from issued_ms for at most {INVITATION_DAYS_MAX} days")

    @property
    def gateway_peer_id(self) -> str:
        return peer_id_of(self.gateway_key)

    @property
    def invite_hex(self) -> str:
        return self.invite_id.hex()


def token_of(envelope: bytes) -> str:
    """The join token: one line a person can paste."""
    return TOKEN_PREFIX + base64.urlsafe_b64encode(envelope).decode("ascii").rstrip("=")


def envelope_of(token: str) -> bytes:
    """The envelope inside a join token; EncodingError saying what is wrong (nothing is verified yet)."""
    token = token.strip()
    if not token.startswith(TOKEN_PREFIX):
        raise EncodingError(f"a join token starts with {TOKEN_PREFIX!r}")
    body = token[len(TOKEN_PREFIX):]
    if len(body) > INVITATION_BYTES_MAX * 2 or not re.fullmatch(r"[A-Za-z0-9_-]*", body):
        raise EncodingError("a join token is base64url (A-Z a-z 0-9 - _) after its prefix")
    try:
        return base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
    except (binascii.Error, ValueError):
        raise EncodingError("the join token is cut short or damaged (not base64url)") from None


def parse_token(token: str) -> Invitation:
    """The invitation a join token holds, its fields and signature checked (not its expiry nor whether it was
    spent: only the gateway knows that)."""
    return Invitation.from_envelope(envelope_of(token))
