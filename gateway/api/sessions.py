"""Sessions of the dashboards (gateway/api/pages.py): a pure core, no I/O but the operator token file.

A session is kept server-side (``SessionBook``) under a random id; the browser holds ``<id>.<tag>`` in a Secure,
HttpOnly, SameSite=Strict cookie, where the tag is an HMAC of the id under a key derived from the gateway's own
(so a forged or mangled cookie is refused before any lookup). Expiry is the server's: a session ends
DASHBOARD_SESSION_LIFETIME_MS after sign-in whatever the browser keeps, and at sign-out. Every form that changes
state carries the session's CSRF token (an HMAC of the id under the same key), checked in constant time.

The operator signs in with an operator token, distinct from every tenant's API key: `llorch gateway operator-token`
makes one, prints it once and keeps only its SHA-256, in a file beside the database (mode 0600).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from llorch.gateway import limits
from llorch.gateway.errors import AuthError, BadRequest

SESSION_KEY_INFO = b"llorch/dashboard-sessions/v1"     # HKDF info: the session key, from the gateway's seed
CSRF_TAG = b"llorch/csrf/v1\x00"
OPERATOR_TOKEN_PREFIX = "op-llorch-"
SHA256_HEX = re.compile(r"[0-9a-f]{64}")
KINDS = ("tenant", "operator")


@dataclass(frozen=True)
class Session:
    id: str
    kind: str                      # "tenant" | "operator"
    subject: str                   # the tenant's name, or "operator"
    credential_sha256: str         # what signed in (checked again on every request: a revoked key ends the session)
    expires_ms: int


def session_key(gateway_seed: bytes) -> bytes:
    return HKDF(algorithm=SHA256(), length=32, salt=None, info=SESSION_KEY_INFO).derive(gateway_seed)


class SessionBook:
    """Sessions in memory, at most DASHBOARD_SESSIONS_MAX (the oldest goes first); they end at a gateway restart."""

    def __init__(self, key: bytes, lifetime_ms: int = limits.DASHBOARD_SESSION_LIFETIME_MS,
                 sessions_max: int = limits.DASHBOARD_SESSIONS_MAX) -> None:
        self._key = key
        self._lifetime_ms = lifetime_ms
        self._sessions_max = sessions_max
        self._sessions: OrderedDict[str, Session] = OrderedDict()

    def open(self, kind: str, subject: str, credential_sha256: str, now_ms: int) -> tuple[str, Session]:
        """A new session; returns the cookie value and the session."""
        assert kind in KINDS
        session = Session(secrets.token_urlsafe(24), kind, subject, credential_sha256, now_ms + self._lifetime_ms)
        self._sessions[session.id] = session
        while len(self._sessions) > self._sessions_max:
            self._sessions.popitem(last=False)
        return f"{session.id}.{self._tag(session.id)}", session

    def find(self, cookie: str | None, kind: str, now_ms: int) -> Session | None:
        """The live session of ``kind`` the cookie names, or None (absent, forged, expired, ended, other kind)."""
        session_id, _, tag = (cookie or "").partition(".")
        if not session_id or not hmac.compare_digest(tag, self._tag(session_id)):
            return None
        session = self._sessions.get(session_id)
        if session is None or session.kind != kind:
            return None
        if now_ms >= session.expires_ms:
            del self._sessions[session_id]
            return None
        return session

    def close(self, session: Session) -> None:
        self._sessions.pop(session.id, None)

    def csrf_token(self, session: Session) -> str:
        return hmac.new(self._key, CSRF_TAG + session.id.encode(), "sha256").hexdigest()

    def check_csrf(self, session: Session, presented: str | None) -> None:
        """Raise BadRequest unless ``presented`` is this session's CSRF token."""
        if not presented or not hmac.compare_digest(presented, self.csrf_token(session)):
            raise BadRequest("the form's CSRF token is missing or not this session's: reload the page and try again",
                             param="csrf")

    def _tag(self, session_id: str) -> str:
        return hmac.new(self._key, session_id.encode(), "sha256").hexdigest()[:32]


# The operator token --------------------------------------------------------------------------------------------------
def operator_token_file(db_path: Path) -> Path:
    """Where the operator token's SHA-256 lives: beside the gateway database."""
    return Path(str(db_path) + ".operator-token")


def new_operator_token(db_path: Path) -> str:
    """Make a new operator token (the old one stops working at once); return it: it is shown once."""
    token = OPERATOR_TOKEN_PREFIX + secrets.token_urlsafe(32)
    path = operator_token_file(db_path)
    temporary = path.with_name(path.name + ".tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w", encoding="ascii") as out:
        out.write(hashlib.sha256(token.encode()).hexdigest() + "\n")
        out.flush()
        os.fsync(out.fileno())
    os.replace(temporary, path)
    return token


def check_operator_token(db_path: Path, presented: str) -> str:
    """The SHA-256 of ``presented`` if it is the operator token; AuthError saying why not otherwise."""
    path = operator_token_file(db_path)
    try:
        if path.stat().st_mode & 0o077:
            raise AuthError(f"{path} is readable by others: chmod 600 it, or make a new token with "
                            f"`llorch gateway operator-token`")
        stored = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        raise AuthError("no operator token yet: make one with `llorch gateway operator-token --config "
                        "gateway.toml`") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise AuthError(f"cannot read the operator token file {path}: {exc}") from None
    if not SHA256_HEX.fullmatch(stored):
        raise AuthError(f"{path} does not hold a SHA-256: make a new token with `llorch gateway operator-token`")
    presented_sha256 = hashlib.sha256(presented.strip().encode()).hexdigest()
    if not presented.strip() or not hmac.compare_digest(presented_sha256, stored):
        raise AuthError("incorrect operator token")
    return presented_sha256


def operator_token_current(db_path: Path, credential_sha256: str) -> bool:
    """Whether the token a session signed in with is still the operator token (a new token ends old sessions)."""
    try:
        return hmac.compare_digest(operator_token_file(db_path).read_text(encoding="ascii").strip(),
                                   credential_sha256)
    except (OSError, UnicodeDecodeError):
        return False
