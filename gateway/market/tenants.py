"""Tenants: the customers of the gateway, their API keys (stored as SHA-256 only), limits and budgets, in the
gateway's SQLite database. `llorch gateway tenants ...` manages them; the running gateway reads them per request,
so a revoked key stops working at once."""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

from llorch.gateway.errors import AuthError
from llorch.ledger.sqlite import Database

TIERS = ("hobby", "startup", "enterprise")
NAME_PATTERN = re.compile(r"[A-Za-z0-9_.-]{1,64}")      # with fullmatch
MINOR_PER_MAJOR = 1_000_000          # micro-euros
API_KEY_PREFIX = "sk-llorch-"

SCHEMA = """
CREATE TABLE IF NOT EXISTS tenants (
    name               TEXT PRIMARY KEY,
    api_key_sha256     TEXT NOT NULL UNIQUE,
    tier               TEXT NOT NULL,
    budget_minor       INTEGER,
    eu_only            INTEGER NOT NULL DEFAULT 0,
    require_determinism INTEGER NOT NULL DEFAULT 0,
    models             TEXT,
    rps                INTEGER,
    max_concurrent     INTEGER,
    revoked            INTEGER NOT NULL DEFAULT 0,
    created_ms         INTEGER NOT NULL
);
"""
# spent is the tenant's account balance, kept by the books (gateway/books/postings.py) with every posting
COLUMNS = ("name", "tier", "budget_minor",
           "COALESCE((SELECT debits - credits FROM account_balances WHERE account = 'tenant:' || tenants.name), 0)",
           "eu_only", "require_determinism", "models", "rps", "max_concurrent", "revoked", "spot_checks")
# Columns added since the first version (databases from before get them with ALTER TABLE, see gateway/db.py).
TENANT_COLUMNS = {"spot_checks": "INTEGER NOT NULL DEFAULT 0"}   # may a request be re-run on a second provider


class TenantError(Exception):
    """A tenant command or value is invalid; the message says which field and why."""


@dataclass(frozen=True)
class Tenant:
    name: str
    tier: str
    budget_minor: int | None
    spent_minor: int
    eu_only: bool
    require_determinism: bool
    models: tuple[str, ...] | None       # None: every catalog model
    rps: int | None
    max_concurrent: int | None
    revoked: bool
    spot_checks: bool = False            # its requests may be re-run on a second provider (docs/verification.md)

    @property
    def limited(self) -> bool:
        """A concurrency limit or a budget: admission must reserve against them."""
        return self.max_concurrent is not None or self.budget_minor is not None

    def allows(self, model: str) -> bool:
        return self.models is None or model in self.models


def key_hash(api_key: str) -> str:
    return hashlib.sha256(api_key.encode()).hexdigest()


def new_api_key() -> str:
    return API_KEY_PREFIX + secrets.token_urlsafe(32)


def parse_amount(text: str) -> int:
    """A money amount in major units ("12.50") as integer minor units, exactly; refuses negatives and over-precision."""
    try:
        amount = Decimal(text)
    except InvalidOperation:
        raise TenantError(f"amount {text!r} is not a number") from None
    # Range first (NaN, infinities and exponents like 1e999999999 never reach arithmetic), then exactness, checked
    # without rounding: 1e-999999999 times 10^6 would underflow to 0 and pass as a whole number of minor units.
    exponent = amount.as_tuple().exponent          # an int for a finite amount ('n', 'N', 'F' otherwise)
    if not amount.is_finite() or not 0 <= amount <= 10**9 or isinstance(exponent, int) and exponent < -6 and \
            amount != amount.quantize(Decimal(1).scaleb(-6)):
        raise TenantError(f"amount {text!r} must be 0..1e9 with at most 6 decimals")
    return int(amount.scaleb(6))


def format_amount(minor: int | None) -> str:
    return "unlimited" if minor is None else f"{Decimal(minor) / MINOR_PER_MAJOR:.6f}"


def _row_to_tenant(row) -> Tenant:
    name, tier, budget, spent, eu_only, determinism, models, rps, concurrent, revoked, spot_checks = row
    return Tenant(name, tier, budget, spent, bool(eu_only), bool(determinism),
                  tuple(models.split(",")) if models else None, rps, concurrent, bool(revoked), bool(spot_checks))


def validate(tier: str | None = None, rps: int | None = None, max_concurrent: int | None = None,
             models: list[str] | None = None, name: str | None = None) -> None:
    if name is not None and not NAME_PATTERN.fullmatch(name):
        raise TenantError("tenant name must be 1-64 characters of A-Z a-z 0-9 _ . -")
    if tier is not None and tier not in TIERS:
        raise TenantError(f"tier must be one of {', '.join(TIERS)}")
    for label, value in (("rps", rps), ("max-concurrent", max_concurrent)):
        if value is not None and not 1 <= value <= 100_000:
            raise TenantError(f"{label} must be in 1..100000")
    if models is not None and (not models or any(not m for m in models)):
        raise TenantError("models must be a non-empty comma-separated list")


class TenantBook:
    def __init__(self, database: Database) -> None:
        self._database = database

    async def add(self, name: str, tier: str, budget_minor: int | None, eu_only: bool, require_determinism: bool,
                  models: list[str] | None, rps: int | None, max_concurrent: int | None, now_ms: int,
                  spot_checks: bool = False) -> str:
        """Create a tenant; return its API key (shown once, stored only as a hash). ``spot_checks``: the tenant
        allows its requests to be re-run on a second provider to check the first (off unless it says so)."""
        validate(tier, rps, max_concurrent, models, name)
        if await self.get(name) is not None:
            raise TenantError(f"tenant {name!r} already exists")
        api_key = new_api_key()
        await self._database.transaction([(
            "INSERT INTO tenants (name, api_key_sha256, tier, budget_minor, eu_only, require_determinism, models, "
            "rps, max_concurrent, created_ms, spot_checks) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [(name, key_hash(api_key), tier, budget_minor, int(eu_only), int(require_determinism),
              ",".join(models) if models else None, rps, max_concurrent, now_ms, int(spot_checks))])])
        return api_key

    async def get(self, name: str) -> Tenant | None:
        row = await self._database.fetchone(f"SELECT {', '.join(COLUMNS)} FROM tenants WHERE name = ?", (name,))
        return None if row is None else _row_to_tenant(row)

    async def by_key_hash(self, digest: str) -> Tenant | None:
        row = await self._database.peek(f"SELECT {', '.join(COLUMNS)} FROM tenants WHERE api_key_sha256 = ?", (digest,))
        return None if row is None else _row_to_tenant(row)

    async def list(self) -> list[Tenant]:
        rows = await self._database.fetchall(f"SELECT {', '.join(COLUMNS)} FROM tenants ORDER BY name")
        return [_row_to_tenant(row) for row in rows]

    async def update(self, name: str, **changes) -> Tenant:
        """Change tier, budget_minor, eu_only, require_determinism, models, rps, max_concurrent or spot_checks."""
        if await self.get(name) is None:
            raise TenantError(f"no tenant {name!r}")
        validate(changes.get("tier"), changes.get("rps"), changes.get("max_concurrent"), changes.get("models"))
        allowed = {"tier", "budget_minor", "eu_only", "require_determinism", "models", "rps", "max_concurrent",
                   "spot_checks"}
        if set(changes) - allowed:
            raise TenantError(f"cannot change {sorted(set(changes) - allowed)}")
        values = {k: (",".join(v) if k == "models" and v else int(v) if isinstance(v, bool) else v)
                  for k, v in changes.items()}
        if values:
            assignments = ", ".join(f"{column} = ?" for column in values)
            await self._database.transaction([(f"UPDATE tenants SET {assignments} WHERE name = ?",
                                               [(*values.values(), name)])])
        tenant = await self.get(name)
        if tenant is None:
            raise TenantError(f"no tenant named {name!r}")
        return tenant

    async def revoke(self, name: str) -> None:
        if await self.get(name) is None:
            raise TenantError(f"no tenant {name!r}")
        await self._database.transaction([("UPDATE tenants SET revoked = 1 WHERE name = ?", [(name,)])])



class Authenticator:
    """Step (1): the tenant of an ``Authorization: Bearer <key>`` header. The bootstrap key (the config's
    ``api_key_sha256``) belongs to an unlimited tenant named by the config: run_gateway refuses to start if a real
    tenant has the name, and `tenants add` refuses it, so the two never share an account."""

    def __init__(self, tenants: TenantBook, bootstrap_key_sha256: str | None, bootstrap_name: str) -> None:
        self._tenants = tenants
        self._bootstrap_key_sha256 = bootstrap_key_sha256
        self.bootstrap_tenant = Tenant(bootstrap_name, "enterprise", None, 0, False, False, None, None, None, False)

    async def authenticate(self, authorization: str | None) -> Tenant:
        """The tenant of a valid header; raises AuthError otherwise (a revoked key included)."""
        scheme, _, credentials = (authorization or "").strip().partition(" ")
        if scheme.lower() != "bearer" or not credentials.strip():
            raise AuthError("missing API key: send the header `Authorization: Bearer <api key>`")
        presented = hashlib.sha256(credentials.strip().encode()).hexdigest()
        if self._bootstrap_key_sha256 and hmac.compare_digest(presented, self._bootstrap_key_sha256):
            return self.bootstrap_tenant
        tenant = await self._tenants.by_key_hash(presented)
        if tenant is None:
            raise AuthError("incorrect API key")
        if tenant.revoked:
            raise AuthError(f"the API key of tenant {tenant.name} has been revoked")
        return tenant
