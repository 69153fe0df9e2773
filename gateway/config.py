"""`[gateway]` in gateway.toml: one frozen dataclass, loaded with node.config.load_config."""

from __future__ import annotations

import re
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from llorch.ledger.money import parse_cents
from llorch.node.config import load_config
from llorch.node.errors import ConfigError

SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
PEER_ID = re.compile(r"^12D3KooW[1-9A-HJ-NP-Za-km-z]{44}$")       # an Ed25519 libp2p peer id (base58)
TENANT_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")     # as tenants' names (gateway/market/tenants.py)


@dataclass(frozen=True)
class GatewayConfig:
    key_file: Path
    db_path: Path                             # the SQLite file (and, beside it, the operator token)
    api_key_sha256: str = ""                  # optional bootstrap key (hex sha256) for the unlimited tenant below
    tenant: str = "bootstrap"                 # its name in the books; no real tenant may have it
    determinism_pin: str = ""                 # the engine build tenants with require_determinism are served on
    p2p_listen_addr: str = "/ip4/127.0.0.1/tcp/0"
    http_host: str = "127.0.0.1"
    http_port: int = 8000
    public_url: str = ""                      # where nodes and customers reach the HTTP API (https://gw.example.org);
                                              # "" = http://<http_host>:<http_port>. Join tokens name it.
    state_file: Path | None = None            # written once up: peer id, multiaddrs, base_url (JSON)
    relay_peers: tuple[str, ...] = ()         # other gateways' peer ids whose relayed provider addresses we accept
    witness_interval_ms: int = 5_000          # how often the gateway witnesses each provider's ledger (small market)
    witness_period_ms: int = 300_000          # ...and at least this often, however many providers (stated period)
    queue_timeout_ms: int = 30_000            # how long a request waits for a slot when every provider is busy
    margin_bp_hobby: int = 4_000              # platform margin on the customer price, per tier, in basis points
    margin_bp_startup: int = 4_000            # (20%-60%: 2000-6000)
    margin_bp_enterprise: int = 4_000
    spot_check_rate_ppm: int = 20_000         # share of finished requests re-run on another provider of the class
    probe_interval_ms: int = 600_000          # mean time between two probes (known-answer requests); 0: none
    probe_tenant: str = "platform-probes"     # the platform tenant whose pseudonyms probes carry
    database: str = ""                        # "" (SQLite at db_path), sqlite:///<path> or postgresql://… (storage.py)
    payout_debtor_name: str = ""              # the platform's own account, which payout runs pay providers from
    payout_debtor_iban: str = ""              # (the SEPA file's debtor)
    payout_debtor_bic: str = ""
    payout_min: str = "10.00"                 # EUR: smaller balances are carried to the next run
    payout_day: int = 5                       # the day of the month runs are made (what providers are told)

    def __post_init__(self) -> None:
        if not TENANT_NAME.match(self.tenant):
            raise ConfigError("gateway.tenant must be 1-64 characters of A-Z a-z 0-9 _ . -")
        if self.api_key_sha256 and not SHA256_HEX.match(self.api_key_sha256):
            raise ConfigError("gateway.api_key_sha256 must be 64 lowercase hex characters (sha256 of the key)")
        for tier in ("hobby", "startup", "enterprise"):
            margin = getattr(self, f"margin_bp_{tier}")
            if not 2_000 <= margin <= 6_000:
                raise ConfigError(f"gateway.margin_bp_{tier} must be 2000..6000 (20%-60%), got {margin}")
        if not 0 <= self.spot_check_rate_ppm <= 1_000_000:
            raise ConfigError("gateway.spot_check_rate_ppm must be 0..1000000 (20000: 2% of requests re-run)")
        if not 100 <= self.witness_interval_ms <= self.witness_period_ms <= 86_400_000:
            raise ConfigError("gateway.witness_interval_ms and witness_period_ms must be 100 <= interval <= period <= "
                              "86400000 (5000 and 300000: each provider every 5 s, or every 5 minutes at the most in "
                              "a large market)")
        if not 0 <= self.probe_interval_ms <= 86_400_000 or 0 < self.probe_interval_ms < 1_000:
            raise ConfigError("gateway.probe_interval_ms must be 0 (no probes) or 1000..86400000 (600000: one probe "
                              "every 10 minutes on average)")
        if not TENANT_NAME.match(self.probe_tenant) or self.probe_tenant == self.tenant:
            raise ConfigError("gateway.probe_tenant must be 1-64 characters of A-Z a-z 0-9 _ . -, and not "
                              "gateway.tenant")
        if not 0 <= self.queue_timeout_ms <= 600_000:
            raise ConfigError("gateway.queue_timeout_ms must be 0..600000 (0: never queue, answer 429 at once)")
        for peer in self.relay_peers:
            if not PEER_ID.match(peer):
                raise ConfigError(f"gateway.relay_peers holds {peer[:60]!r}, not a peer id (12D3KooW...)")
        if not 0 <= self.http_port <= 65535:
            raise ConfigError("gateway.http_port must be in 0..65535")
        url = urllib.parse.urlsplit(self.public_url)
        if self.public_url and (url.scheme not in ("http", "https") or not url.hostname or url.path not in ("", "/")
                                or url.query or url.fragment or len(self.public_url) > 200):
            raise ConfigError(f"gateway.public_url {self.public_url[:80]!r} must be http(s)://host[:port], as nodes "
                              "and customers reach this gateway (no path)")
        try:
            parse_cents(self.payout_min)
        except ValueError as exc:
            raise ConfigError(f"gateway.payout_min {exc} (EUR)") from None
        if not 1 <= self.payout_day <= 28:
            raise ConfigError("gateway.payout_day must be 1..28 (the day of the month payout runs are made)")
        self.store()                          # a database URL of another kind is refused at load

    def base_url(self) -> str:
        """The URL nodes and customers use: ``public_url``, else the HTTP listener's address."""
        if self.public_url:
            return self.public_url.rstrip("/")
        host = "127.0.0.1" if self.http_host in ("0.0.0.0", "") else self.http_host
        return f"http://[{host}]:{self.http_port}" if ":" in host else f"http://{host}:{self.http_port}"

    @property
    def payout_min_minor(self) -> int:
        return parse_cents(self.payout_min)

    def store(self):
        """The engine of the gateway's database (gateway/storage.py)."""
        from llorch.gateway.storage import engine_for
        return engine_for(self.database, self.db_path)


def margin_bp(config: GatewayConfig, tier: str) -> int:
    return getattr(config, f"margin_bp_{tier}")


def load_gateway_config(path: Path) -> GatewayConfig:
    return load_config(GatewayConfig, path, "gateway", "LLORCH_GATEWAY_")
