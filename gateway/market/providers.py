"""Provider registration and the operator's decisions (approve, certify the geo claim, suspend), in the gateway
database. Only approved providers are placed on; only certified EU providers count for EU-only tenants."""

from __future__ import annotations


import base64
import json
import math
import secrets
from dataclasses import dataclass, field, replace

import trio

from llorch.gateway import limits
from llorch.gateway.errors import BadRequest, InvitationRefused, RateLimited
from llorch.ledger.errors import EncodingError, SignatureError
from llorch.ledger.objects import VERSION
from llorch.ledger.signing import SigningKey, public_key_of_peer_id
from llorch.ledger.sqlite import Database, IntegrityError
from llorch.node.wire.invitation import Invitation, parse_token, token_of
from llorch.node.wire.registration import Registration

REGISTRATION_CLOCK_SKEW_MS = 5 * 60_000
STATUSES = ("pending", "approved", "suspended")

PROVIDERS_REREAD_S = 1.0          # on a shared database, how stale the provider list may be

SCHEMA = """
CREATE TABLE IF NOT EXISTS providers (
    provider_id    TEXT PRIMARY KEY,
    provider_key   BLOB NOT NULL,
    registration   BLOB NOT NULL,
    status         TEXT NOT NULL,
    geo_certified  INTEGER NOT NULL DEFAULT 0,
    registered_ms  INTEGER NOT NULL,
    issued_ms      INTEGER NOT NULL,
    source         TEXT
);
"""
# Invitations (node/wire/invitation.py): one row per join token the operator made; a token is spent by inserting
# its id into invite_uses, in the transaction that stores the registration, so it is accepted once (the primary key).
INVITES_SCHEMA = """
CREATE TABLE IF NOT EXISTS invites (
    invite_id     BLOB PRIMARY KEY,
    certify_geo   TEXT,
    issued_ms     INTEGER NOT NULL,
    expires_ms    INTEGER NOT NULL,
    note          TEXT NOT NULL,
    revoked_ms    INTEGER
);
CREATE TABLE IF NOT EXISTS invite_uses (
    invite_id     BLOB PRIMARY KEY,
    provider_id   TEXT NOT NULL,
    used_ms       INTEGER NOT NULL
);
"""
# Columns added since the first version (databases from before get them with ALTER TABLE, see gateway/db.py).
PROVIDER_COLUMNS = {"source": "TEXT"}      # the client address a registration came from (pending caps)


class ProviderError(Exception):
    """An operator command names an unknown provider or an impossible change."""


@dataclass(frozen=True)
class ProviderRecord:
    provider_id: str
    provider_key: bytes
    registration: Registration
    status: str
    geo_certified: bool
    envelope: bytes = field(default=b"", compare=False, repr=False)     # the signed registration as stored

    @property
    def approved(self) -> bool:
        return self.status == "approved"


@dataclass(frozen=True)
class InviteRecord:
    invite_id: bytes
    certify_geo: str | None
    issued_ms: int
    expires_ms: int
    note: str
    revoked_ms: int | None
    used_by: str | None
    used_ms: int | None

    def state(self, now_ms: int) -> str:
        if self.used_by is not None:
            return "used"
        if self.revoked_ms is not None:
            return "revoked"
        return "expired" if now_ms >= self.expires_ms else "open"

    def json(self, now_ms: int) -> dict:
        return {"invite_id": self.invite_id.hex(), "state": self.state(now_ms), "certify_geo": self.certify_geo,
                "issued_ms": self.issued_ms, "expires_ms": self.expires_ms, "note": self.note,
                "revoked_ms": self.revoked_ms, "used_by": self.used_by, "used_ms": self.used_ms}


def parse_registration_body(body: dict, now_ms: int,
                            gateway_key: bytes | None = None) -> tuple[Registration, bytes, Invitation | None]:
    """Parse `{"registration": base64, "invitation"?: join token}`; verify the signatures (an invitation must be
    this gateway's own, ``gateway_key``); raise BadRequest naming what is wrong."""
    if not isinstance(body, dict) or "registration" not in body or not set(body) <= {"registration", "invitation"} \
            or not isinstance(body["registration"], str):
        raise BadRequest('body must be {"registration": "<base64 of the signed registration>"} (and may have '
                         '"invitation": "<join token>")', "registration")
    try:
        envelope = base64.b64decode(body["registration"], validate=True)
    except ValueError:                 # binascii.Error, or a character outside ASCII
        raise BadRequest("registration is not base64", "registration") from None
    try:
        registration = Registration.from_envelope(envelope)
    except SignatureError as exc:
        raise BadRequest(f"registration signature is invalid: {exc}", "registration") from None
    except EncodingError as exc:
        raise BadRequest(f"registration is malformed: {exc}", "registration") from None
    if abs(registration.issued_ms - now_ms) > REGISTRATION_CLOCK_SKEW_MS:
        raise BadRequest("registration issued_ms is more than 5 minutes from the gateway's clock", "issued_ms")
    _check_payout_account(registration)
    return registration, envelope, _invitation(body.get("invitation"), gateway_key)


def _check_payout_account(registration: Registration) -> None:
    """A payout account is checked where it is given: a damaged IBAN is refused now, naming it, not at the first
    payout run."""
    if registration.payout is None:
        return
    from llorch.gateway.rails import IbanError, check_account     # schwifty's registry: loaded only when needed

    payout = registration.payout
    try:
        check_account(payout["holder"], payout["iban"], payout["bic"], payout["currency"])
    except IbanError as exc:
        raise BadRequest(f"payout.{exc.field}: {exc}", f"payout.{exc.field}") from None


def _invitation(token, gateway_key: bytes | None) -> Invitation | None:
    if token is None:
        return None
    if not isinstance(token, str):
        raise BadRequest("invitation must be a join token (a string starting llorch-join-)", "invitation")
    try:
        invitation = parse_token(token)
    except SignatureError as exc:
        raise BadRequest(f"the join token's signature is invalid: {exc}", "invitation") from None
    except EncodingError as exc:
        raise BadRequest(f"the join token is malformed: {exc}", "invitation") from None
    if invitation.gateway_key != gateway_key:
        raise InvitationRefused(f"this join token was made by the gateway {invitation.gateway_peer_id}, not this one")
    return invitation


class ProviderBook:
    """The providers table, with every record parsed (and signature-checked) once and kept in memory: this
    gateway's own changes update one record; a commit by another connection (an operator command) moves SQLite's
    data_version, and the next read reloads them all."""

    def __init__(self, database: Database) -> None:
        self._database = database
        self._version: int | None = None
        self._approved_at = -math.inf
        self._records: dict[str, ProviderRecord] = {}
        self._sorted: list[ProviderRecord] | None = None
        self._approved: tuple[object, frozenset[bytes]] = (None, frozenset())

    async def register(self, registration: Registration, envelope: bytes, now_ms: int,
                       source: str | None = None, invitation: Invitation | None = None) -> ProviderRecord:
        """Store a new registration (status pending) or a newer one of a known provider. A changed geo claim loses
        its certification; an older registration than the stored one is refused (replay). Registrations awaiting
        review are capped, overall and per ``source`` (the client's address): keys cost nothing to make.

        With an ``invitation`` (its signature already checked as this gateway's), a new or pending provider is
        approved at once, and its geo claim certified when the invitation certifies that country; the invitation
        is spent in the same transaction (a second use is refused, whoever tries it). An approved provider does
        not spend it."""
        known = await self.get(registration.provider_id)
        if known is not None and registration.issued_ms <= known.registration.issued_ms:
            raise BadRequest("a newer registration of this provider is already stored (replayed?)", "issued_ms")
        invited = invitation is not None and (known is None or known.status == "pending")
        if invitation is not None and known is not None and known.status == "suspended":
            raise InvitationRefused(f"provider {known.provider_id} is suspended here: only the operator readmits it")
        if invited:
            assert invitation is not None
            await self._check_invitation(invitation, registration, now_ms)
        elif known is None:
            await self._check_pending_room(source)
        certified = bool(known and known.geo_certified and known.registration.geo == registration.geo) or \
            bool(invited and invitation and invitation.certify_geo)
        status = "approved" if invited else known.status if known else "pending"
        spend = [("INSERT INTO invite_uses (invite_id, provider_id, used_ms) VALUES (?, ?, ?)",
                  [(invitation.invite_id, registration.provider_id, now_ms)])] if invited and invitation else []
        try:
            await self._database.transaction([*spend, (
            "INSERT INTO providers (provider_id, provider_key, registration, status, geo_certified, "
            "registered_ms, issued_ms, source) VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (provider_id) DO UPDATE "
            "SET provider_key = excluded.provider_key, registration = excluded.registration, "
            "status = excluded.status, geo_certified = excluded.geo_certified, "
            "registered_ms = excluded.registered_ms, issued_ms = excluded.issued_ms, source = excluded.source",
            [(registration.provider_id, registration.provider_key, envelope, status, int(certified), now_ms,
              registration.issued_ms, source)])])
        except IntegrityError:
            raise InvitationRefused("this join token was used already: ask the operator for a new one") from None
        record = ProviderRecord(registration.provider_id, registration.provider_key, registration, status, certified,
                                envelope)
        self._keep(record)
        return record

    async def _check_invitation(self, invitation: Invitation, registration: Registration, now_ms: int) -> None:
        invite = await self.invite(invitation.invite_id)
        if invite is None:
            raise InvitationRefused("this join token is not one this gateway's operator made (or its record is "
                                    "gone)")
        state = invite.state(now_ms)
        if state != "open":
            raise InvitationRefused(f"this join token was {state} already: ask the operator for a new one" if
                                    state == "used" else f"this join token is {state}: ask the operator for a new one")
        if invite.certify_geo is not None and invite.certify_geo != registration.geo["country"]:
            raise InvitationRefused(f"this join token certifies a machine in {invite.certify_geo}; the registration "
                                    f"says {registration.geo['country']} (run node init with --country "
                                    f"{invite.certify_geo}, or ask for a token without --certify-geo)")

    async def make_invite(self, key: SigningKey, gateway_url: str, certify_geo: str | None, issued_ms: int,
                          expires_ms: int, note: str) -> str:
        """A new join token, recorded (open) in the database; returned once, like an API key."""
        invitation = Invitation(v=VERSION, gateway_key=key.public_key, invite_id=secrets.token_bytes(16),
                                gateway_url=gateway_url, issued_ms=issued_ms, expires_ms=expires_ms,
                                certify_geo=certify_geo)
        await self._database.transaction([(
            "INSERT INTO invites (invite_id, certify_geo, issued_ms, expires_ms, note) VALUES (?, ?, ?, ?, ?)",
            [(invitation.invite_id, certify_geo, issued_ms, expires_ms, note)])])
        return token_of(invitation.seal(key))

    async def invite(self, invite_id: bytes) -> InviteRecord | None:
        rows = await self._invites("WHERE i.invite_id = ?", (invite_id,))
        return rows[0] if rows else None

    async def invites(self) -> list[InviteRecord]:
        return await self._invites("ORDER BY i.issued_ms, i.invite_id", ())

    async def _invites(self, where: str, params: tuple) -> list[InviteRecord]:
        rows = await self._database.fetchall(
            "SELECT i.invite_id, i.certify_geo, i.issued_ms, i.expires_ms, i.note, i.revoked_ms, u.provider_id, "
            f"u.used_ms FROM invites i LEFT JOIN invite_uses u ON u.invite_id = i.invite_id {where}", params)
        return [InviteRecord(bytes(row[0]), *row[1:]) for row in rows]

    async def revoke_invite(self, invite_hex: str, now_ms: int) -> InviteRecord:
        try:
            invite_id = bytes.fromhex(invite_hex)
        except ValueError:
            raise ProviderError(f"{invite_hex!r} is not an invitation id (32 hex digits)") from None
        invite = await self.invite(invite_id)
        if invite is None:
            raise ProviderError(f"there is no invitation {invite_hex} (`llorch gateway providers invites` lists them)")
        if invite.state(now_ms) == "open":
            await self._database.transaction([("UPDATE invites SET revoked_ms = ? WHERE invite_id = ?",
                                               [(now_ms, invite_id)])])
        found = await self.invite(invite_id)
        assert found is not None
        return found

    async def _check_pending_room(self, source: str | None) -> None:
        row = await self._database.fetchone(
            "SELECT COUNT(*), COALESCE(SUM(CASE WHEN source = ? THEN 1 ELSE 0 END), 0) FROM providers "
            "WHERE status = 'pending'", (source,))
        assert row is not None                   # an aggregate answers one row
        pending, from_source = row
        if pending >= limits.REGISTRATIONS_PENDING_MAX:
            raise RateLimited(f"{pending} registrations are awaiting the operator's review; try again later",
                              "registrations_pending", retry_after_s=3600)
        if source is not None and from_source >= limits.REGISTRATIONS_PENDING_PER_SOURCE_MAX:
            raise RateLimited(f"{from_source} registrations from {source} are awaiting the operator's review; "
                              f"ask the operator to review them first", "registrations_pending", retry_after_s=3600)

    async def get(self, provider_id: str) -> ProviderRecord | None:
        await self._refresh()
        return self._records.get(provider_id)

    async def all(self) -> list[ProviderRecord]:
        """Every registered provider, by provider id. Cheap to call on every request."""
        await self._refresh()
        if self._sorted is None:
            self._sorted = [self._records[key] for key in sorted(self._records)]
        return self._sorted

    async def _refresh(self) -> None:
        if self._database.engine.name == "sqlite":     # changes when another connection (a CLI) committed
            row = await self._database.peek("PRAGMA data_version")
            assert row is not None               # the pragma answers one row
            version = row[0]
        else:     # PostgreSQL: other replicas write too; read again at most once a second
            version = int(trio.current_time() // PROVIDERS_REREAD_S)
        if version == self._version:
            return
        rows = await self._database.fetchall(
            "SELECT provider_id, provider_key, registration, status, geo_certified FROM providers")
        self._records = {row[0]: self._record(row, self._records.get(row[0])) for row in rows}
        self._sorted, self._version = None, version

    def _keep(self, record: ProviderRecord) -> None:
        self._records[record.provider_id] = record
        self._sorted = None

    async def approved_keys(self, recheck_s: float = 0.0) -> frozenset[bytes]:
        """The approved providers' keys (computed once per read of the book). ``recheck_s``: how old the answer may
        be (the gossip path asks for each attestation, 2,000 a second at 10,000 providers: checking the database's
        data_version each time was a third of that path's CPU)."""
        now = trio.current_time()
        if recheck_s and now - self._approved_at < recheck_s and self._approved[0] is self._sorted:
            return self._approved[1]
        self._approved_at = now
        book = await self.all()
        if self._approved[0] is not book:
            self._approved = (book, frozenset(record.provider_key for record in book if record.approved))
        return self._approved[1]

    async def set_status(self, provider_id: str, status: str, together: list | None = None) -> ProviderRecord:
        """Set a provider's status; ``together``: statements written in the same transaction (a suspension's
        evidence and credits: gateway/spot_checks.py)."""
        assert status in STATUSES
        await self._require(provider_id)
        await self._database.transaction([*(together or []), ("UPDATE providers SET status = ? WHERE provider_id = ?",
                                                              [(status, provider_id)])])
        self._keep(replace(await self._known(provider_id), status=status))
        return await self._known(provider_id)

    async def certify_geo(self, provider_id: str) -> ProviderRecord:
        await self._require(provider_id)
        await self._database.transaction([("UPDATE providers SET geo_certified = 1 WHERE provider_id = ?",
                                           [(provider_id,)])])
        self._keep(replace(await self._known(provider_id), geo_certified=True))
        return await self._known(provider_id)

    async def _require(self, provider_id: str) -> None:
        try:
            public_key_of_peer_id(provider_id)
        except EncodingError:
            raise ProviderError(f"{provider_id!r} is not a peer id") from None
        if await self.get(provider_id) is None:
            raise ProviderError(f"provider {provider_id} has not registered with this gateway")

    async def _known(self, provider_id: str) -> ProviderRecord:
        """The record of a provider ``_require`` found: providers are never deleted."""
        record = await self.get(provider_id)
        assert record is not None
        return record

    @staticmethod
    def _record(row, known: ProviderRecord | None = None) -> ProviderRecord:
        """A row as a record; the registration is parsed and its signature checked only when its bytes differ from
        the ``known`` record's (a re-read of 10,000 unchanged providers checks no signature)."""
        provider_id, key, envelope, status, certified = row
        envelope = bytes(envelope)
        if known is not None and known.envelope == envelope:
            return replace(known, status=status, geo_certified=bool(certified))
        return ProviderRecord(provider_id, key, Registration.from_envelope(envelope), status, bool(certified),
                              envelope)


def record_json(record: ProviderRecord) -> dict:
    return {**record.registration.public_view(), "status": record.status, "geo_certified": record.geo_certified,
            "payout": record.registration.payout_view()}


def dumps(document) -> str:
    return json.dumps(document, indent=2)
