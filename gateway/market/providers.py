"""Provider registration and the operator's decisions (approve, certify the geo claim, suspend), in the gateway
database. Only approved providers are placed on; only certified EU providers count for EU-only tenants."""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass

from llorch.gateway.errors import BadRequest
from llorch.ledger.errors import EncodingError, SignatureError
from llorch.ledger.signing import public_key_of_peer_id
from llorch.ledger.sqlite import Database
from llorch.node.wire.registration import Registration

REGISTRATION_CLOCK_SKEW_MS = 5 * 60_000
STATUSES = ("pending", "approved", "suspended")

SCHEMA = """
CREATE TABLE IF NOT EXISTS providers (
    provider_id    TEXT PRIMARY KEY,
    provider_key   BLOB NOT NULL,
    registration   BLOB NOT NULL,
    status         TEXT NOT NULL,
    geo_certified  INTEGER NOT NULL DEFAULT 0,
    registered_ms  INTEGER NOT NULL,
    issued_ms      INTEGER NOT NULL
);
"""


class ProviderError(Exception):
    """An operator command names an unknown provider or an impossible change."""


@dataclass(frozen=True)
class ProviderRecord:
    provider_id: str
    provider_key: bytes
    registration: Registration
    status: str
    geo_certified: bool

    @property
    def approved(self) -> bool:
        return self.status == "approved"


def parse_registration_request(body: bytes, now_ms: int) -> tuple[Registration, bytes]:
    """Parse the HTTP body of `POST /v2/platform/providers/register`; raise BadRequest naming what is wrong."""
    try:
        document = json.loads(body)
    except RecursionError:
        raise BadRequest("request body is not valid JSON: nested too deeply") from None
    except ValueError as exc:       # not JSON, not UTF-8, or a number with more digits than Python converts
        raise BadRequest(f"request body is not valid JSON: {exc}") from None
    return parse_registration_body(document, now_ms)


def parse_registration_body(body: dict, now_ms: int) -> tuple[Registration, bytes]:
    """Parse `{"registration": base64}`; verify the signature; raise BadRequest naming what is wrong."""
    if not isinstance(body, dict) or set(body) != {"registration"} or not isinstance(body["registration"], str):
        raise BadRequest('body must be {"registration": "<base64 of the signed registration>"}', "registration")
    try:
        envelope = base64.b64decode(body["registration"], validate=True)
    except ValueError:              # binascii.Error, or a str with non-ASCII characters
        raise BadRequest("registration is not base64", "registration") from None
    try:
        registration = Registration.from_envelope(envelope)
    except SignatureError as exc:
        raise BadRequest(f"registration signature is invalid: {exc}", "registration") from None
    except EncodingError as exc:
        raise BadRequest(f"registration is malformed: {exc}", "registration") from None
    if abs(registration.issued_ms - now_ms) > REGISTRATION_CLOCK_SKEW_MS:
        raise BadRequest("registration issued_ms is more than 5 minutes from the gateway's clock", "issued_ms")
    return registration, envelope


class ProviderBook:
    def __init__(self, database: Database) -> None:
        self._database = database
        self._cache: tuple[int, list[ProviderRecord]] | None = None   # (data_version, records)

    async def register(self, registration: Registration, envelope: bytes, now_ms: int) -> ProviderRecord:
        """Store a new registration (status pending) or a newer one of a known provider. A changed geo claim loses
        its certification; an older registration than the stored one is refused (replay)."""
        known = await self.get(registration.provider_id)
        if known is not None and registration.issued_ms <= known.registration.issued_ms:
            raise BadRequest("a newer registration of this provider is already stored (replayed?)", "issued_ms")
        certified = bool(known and known.geo_certified and known.registration.geo == registration.geo)
        status = known.status if known else "pending"
        await self._database.transaction([(
            "INSERT OR REPLACE INTO providers (provider_id, provider_key, registration, status, geo_certified, "
            "registered_ms, issued_ms) VALUES (?, ?, ?, ?, ?, ?, ?)",
            [(registration.provider_id, registration.provider_key, envelope, status, int(certified), now_ms,
              registration.issued_ms)])])
        self._dirty = True
        return await self.get(registration.provider_id)

    async def get(self, provider_id: str) -> ProviderRecord | None:
        row = await self._database.fetchone(
            "SELECT provider_id, provider_key, registration, status, geo_certified FROM providers "
            "WHERE provider_id = ?", (provider_id,))
        return None if row is None else self._record(row)

    async def all(self) -> list[ProviderRecord]:
        """Every registered provider. Read on each request, but parsed (and signature-checked) again only when the
        database changed: SQLite's data_version moves when any connection, e.g. an operator command, commits."""
        version = (await self._database.fetchone("PRAGMA data_version"))[0]
        if self._cache is None or self._cache[0] != version or self._dirty:
            rows = await self._database.fetchall(
                "SELECT provider_id, provider_key, registration, status, geo_certified FROM providers "
                "ORDER BY provider_id")
            self._cache, self._dirty = (version, [self._record(row) for row in rows]), False
        return self._cache[1]

    _dirty = False

    async def approved_keys(self) -> set[bytes]:
        return {record.provider_key for record in await self.all() if record.approved}

    async def set_status(self, provider_id: str, status: str) -> ProviderRecord:
        assert status in STATUSES
        await self._require(provider_id)
        await self._database.transaction([("UPDATE providers SET status = ? WHERE provider_id = ?",
                                           [(status, provider_id)])])
        self._dirty = True
        return await self.get(provider_id)

    async def certify_geo(self, provider_id: str) -> ProviderRecord:
        await self._require(provider_id)
        await self._database.transaction([("UPDATE providers SET geo_certified = 1 WHERE provider_id = ?",
                                           [(provider_id,)])])
        self._dirty = True
        return await self.get(provider_id)

    async def _require(self, provider_id: str) -> None:
        try:
            public_key_of_peer_id(provider_id)
        except EncodingError:
            raise ProviderError(f"{provider_id!r} is not a peer id") from None
        if await self.get(provider_id) is None:
            raise ProviderError(f"provider {provider_id} has not registered with this gateway")

    @staticmethod
    def _record(row) -> ProviderRecord:
        provider_id, key, envelope, status, certified = row
        return ProviderRecord(provider_id, key, Registration.from_envelope(envelope), status, bool(certified))


def record_json(record: ProviderRecord) -> dict:
    return {**record.registration.public_view(), "status": record.status, "geo_certified": record.geo_certified}


def dumps(document) -> str:
    return json.dumps(document, indent=2)
