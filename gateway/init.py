"""`llorch gateway init`: an operator's gateway.toml without writing TOML by hand.

It asks one thing, the public host name (nodes and customers reach the gateway there), creates the gateway's key
(mode 0600), and writes a commented gateway.toml beside it: the HTTP API and the libp2p port listening on every
interface, ``public_url`` (the URL join tokens name), the database, and every setting an operator may want to change
with its default. The two ports must be reachable at that host name: `llorch node init` dials the libp2p port at the
host of the URL it is given and refuses to register if it cannot.

Paths: ``--config`` (default ``$XDG_CONFIG_HOME/llorch/gateway.toml``); the key beside it; the SQLite database in
``$XDG_DATA_HOME/llorch`` (``~/.local/share/llorch``).
"""

from __future__ import annotations

import ipaddress
import os
import re
from pathlib import Path

from llorch.gateway.config import load_gateway_config
from llorch.ledger.signing import SigningKey, load_key_file, write_key_file
from llorch.node.errors import ConfigError
from llorch.node.config import Ask, config_dir, data_dir

HOST_NAME = re.compile(r"(?=.{1,253}$)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}"
                       r"[A-Za-z0-9])?)*")
HTTP_PORT_DEFAULT = 8000
P2P_PORT_DEFAULT = 4001


def default_gateway_config() -> Path:
    return config_dir() / "gateway.toml"


def parse_host(text: str) -> str:
    host = text.strip().lower().removeprefix("https://").removeprefix("http://").rstrip("/")
    try:
        ipaddress.ip_address(host)
        return host
    except ValueError:
        pass
    if not HOST_NAME.fullmatch(host):
        raise ConfigError(f"--host {text.strip()[:60]!r} is not a host name (gateway.example.org) or an IP address")
    return host


def gateway_toml(host: str, key_file: Path, db_path: Path, public_url: str, http_port: int, p2p_port: int) -> str:
    return f"""# llorch gateway, written by `llorch gateway init`. Every key: docs/operating.md ("The gateway").
[gateway]
key_file = "{key_file}"          # the gateway's identity (Ed25519, mode 0600): back it up; nodes trust its peer id
db_path = "{db_path}"            # the books (SQLite); for replicas use database = "postgresql://..."
# database = "postgresql://llorch@db.internal/llorch"   # replicas share one PostgreSQL (docs/scaling.md)

# Where customers and nodes reach this gateway. Both ports must be open at {host}:
#   TCP {http_port}: the HTTP API (or put a TLS proxy in front and set public_url to https://{host})
#   TCP {p2p_port}: libp2p; every node keeps a connection here (`llorch node init` checks it can reach it)
public_url = "{public_url}"
http_host = "0.0.0.0"
http_port = {http_port}
p2p_listen_addr = "/ip4/0.0.0.0/tcp/{p2p_port}"

# Platform margin on the customer price per tier, basis points (2000-6000: 20%-60%).
margin_bp_hobby = 4000
margin_bp_startup = 4000
margin_bp_enterprise = 4000

# Trust: the share of finished requests re-run on another provider (20000 ppm: 2%), and known-answer probes.
spot_check_rate_ppm = 20000
probe_interval_ms = 600000
# Each provider's ledger is witnessed every witness_interval_ms; with many providers the rounds are spread out,
# but every provider is witnessed within witness_period_ms.
witness_interval_ms = 5000
witness_period_ms = 300000

# Requests wait this long for a slot when every provider is busy, then get 429 queue_timeout.
queue_timeout_ms = 30000

# An unlimited tenant for your own use: `python3 -c "import hashlib; print(hashlib.sha256(b'sk-...').hexdigest())"`.
# api_key_sha256 = ""
"""


def initialise(host_answer: Ask, config_path: Path | None, host: str | None, http_port: int, p2p_port: int,
               public_url: str | None, force: bool, log=print) -> Path:
    """Write gateway.toml (and the key, unless one is there); return its path. ConfigError saying what is wrong."""
    path = (config_path or default_gateway_config()).expanduser().resolve()
    if path.exists() and not force:
        raise ConfigError(f"{path} exists: `llorch gateway start --config {path}` uses it (pass --force to write a "
                          f"new one)")
    name = parse_host(host or host_answer("--host", "Public host name of this gateway (customers and nodes reach it "
                                                    "there, e.g. gateway.example.org)", None))
    for flag, port in (("--http-port", http_port), ("--p2p-port", p2p_port)):
        if not 1 <= port <= 65535:
            raise ConfigError(f"{flag} must be in 1..65535")
    shown = f"[{name}]" if ":" in name else name
    url = (public_url or f"http://{shown}:{http_port}").rstrip("/")
    key_file = path.parent / "gateway.key"
    db_path = data_dir() / "gateway.sqlite"
    path.parent.mkdir(parents=True, exist_ok=True)
    db_path.parent.mkdir(parents=True, exist_ok=True)
    if key_file.exists():
        log(f"keeping the key in {key_file} (peer id {load_key_file(key_file).peer_id})")
    else:
        key = SigningKey.generate()
        write_key_file(key_file, key)
        log(f"created {key_file} (mode 0600): the gateway's peer id is {key.peer_id}")
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(gateway_toml(name, key_file, db_path, url, http_port, p2p_port), encoding="utf-8")
    try:
        load_gateway_config(temporary)             # what it wrote, it can start from
    except ConfigError:
        temporary.unlink()
        raise
    os.replace(temporary, path)
    log(f"wrote {path}\n"
        f"Open TCP {http_port} (HTTP) and TCP {p2p_port} (libp2p) at {name}, then:\n"
        f"  llorch gateway start --config {path}\n"
        f"  llorch gateway operator-token --config {path}      # sign in to {url}/operator\n"
        f"  llorch gateway tenants add NAME --config {path}      # a customer's API key\n"
        f"  llorch gateway providers invite --config {path}      # a join token for a home lab")
    return path
