"""`llorch node init`: a provider's first minutes without hand-written TOML.

It creates the node's key (mode 0600), detects the machine's cores and memory and proposes slots × threads (never
more threads than cores: ggml's threads spin, and two busy contexts on the same cores slow each other several-fold),
fetches the default model, learns the gateway from one argument (its libp2p multiaddr, or its https URL, which it
asks for the gateway's identity), writes a commented ``node.toml`` into the user's config directory (XDG), and, given
a URL, registers the node with the gateway. `llorch node start` then needs no flags: it finds that file.

Paths (XDG Base Directory): config ``$XDG_CONFIG_HOME/llorch`` (``~/.config/llorch``) holds node.toml and node.key;
data ``$XDG_DATA_HOME/llorch`` (``~/.local/share/llorch``) holds the ledger.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from multiaddr import Multiaddr

from llorch.inference import catalog
from llorch.ledger.signing import SigningKey, write_key_file
from llorch.node.errors import ConfigError

GATEWAY_INFO_TIMEOUT_S = 15
MEMORY_PER_SLOT_BYTES = 1 << 30          # a context of the default model, with room for the OS and a browser
THREADS_PER_SLOT_MAX = 4                 # beyond this a small model gains little from more threads per request


def config_dir() -> Path:
    return Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "llorch"


def data_dir() -> Path:
    return Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share") / "llorch"


def default_config_path() -> Path:
    return config_dir() / "node.toml"


@dataclass(frozen=True)
class Machine:
    cores: int
    memory_bytes: int

    @classmethod
    def detect(cls) -> Machine:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        try:
            memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            memory = MEMORY_PER_SLOT_BYTES
        return cls(max(1, cores), memory)

    def proposal(self) -> tuple[int, int]:
        """(slots, threads per slot): slots × threads ≤ cores, one slot per GiB of memory at most."""
        threads = min(self.cores, THREADS_PER_SLOT_MAX)
        slots = max(1, min(self.cores // threads, self.memory_bytes // MEMORY_PER_SLOT_BYTES))
        return slots, threads


@dataclass(frozen=True)
class GatewayContact:
    peer_id: str
    multiaddr: str            # /ip4|dns4/…/tcp/…/p2p/<peer id>: the node dials it and keeps the connection
    url: str | None           # for registration over HTTP; None when given only a multiaddr


def gateway_contact(gateway: str) -> GatewayContact:
    """The gateway from ``--gateway``: a multiaddr ending in /p2p/<peer id>, or an http(s) URL whose
    /v2/platform/gateway names its peer id and libp2p port. Raises ConfigError saying what is wrong."""
    if gateway.startswith("/"):
        try:
            parsed = Multiaddr(gateway)
            peer_id = parsed.value_for_protocol("p2p")
        except Exception as exc:  # py-multiaddr raises several types for a bad string
            raise ConfigError(f"--gateway {gateway!r} is not a multiaddr ending in /p2p/<peer id> ({exc})") from None
        return GatewayContact(peer_id, gateway, None)
    url = urllib.parse.urlsplit(gateway)
    if url.scheme not in ("http", "https") or not url.hostname:
        raise ConfigError(f"--gateway {gateway!r} is neither a multiaddr (/ip4/…/p2p/…) nor an http(s) URL")
    base = gateway.rstrip("/")
    try:
        with urllib.request.urlopen(base + "/v2/platform/gateway", timeout=GATEWAY_INFO_TIMEOUT_S) as response:
            info = json.loads(response.read(1 << 16))
        peer_id, port = str(info["peer_id"]), int(info["p2p_port"])
    except (urllib.error.URLError, OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"cannot learn the gateway's identity from {base}/v2/platform/gateway: {exc}") from None
    host = url.hostname
    kind = "ip6" if ":" in host else "ip4" if host.replace(".", "").isdigit() else "dns"
    return GatewayContact(peer_id, f"/{kind}/{host}/tcp/{port}/p2p/{peer_id}", base)


def node_toml(contact: GatewayContact, machine: Machine, slots: int, threads: int, country: str, key_file: Path,
              ledger_path: Path, listen_port: int) -> str:
    return f"""# llorch provider node, written by `llorch node init`. Every key: docs/operating.md.
[node]
key_file = "{key_file}"                   # your identity (Ed25519, mode 0600): back it up
ledger_path = "{ledger_path}"             # your signed receipts: your earnings
bootstrap = ["{contact.multiaddr}"]
trusted_gateways = ["{contact.peer_id}"]  # gateways whose tickets this node serves
listen_addr = "/ip4/0.0.0.0/tcp/{listen_port}"
# announce_addrs = ["/ip4/<public ip>/tcp/{listen_port}"]   # only if you forward this port; behind NAT leave it out

# This machine: {machine.cores} cores, {machine.memory_bytes / 2**30:.1f} GiB. slots × threads_per_slot must not exceed the
# cores: llama.cpp's threads spin, and two busy requests on the same cores slow each other several-fold.
slots = {slots}
threads_per_slot = {threads}
models = ["{catalog.DEFAULT_MODEL_ID}"]

# What customers pay you, in minor units (micro-EUR) per 1M tokens; the gateway never pays less.
price_in_per_1m = 100000
price_out_per_1m = 200000
currency = "EUR"

# Where this machine is (a claim the gateway operator certifies before EU-only customers are sent here).
country = "{country}"
"""


def initialise(gateway: str, country: str, slots: int | None, threads: int | None, force: bool,
               listen_port: int, log=print, progress=None) -> tuple[Path, SigningKey, GatewayContact]:
    """Do everything `llorch node init` does but the registration; return (config path, key, gateway)."""
    config_path = default_config_path()
    if config_path.exists() and not force:
        raise ConfigError(f"{config_path} exists: `llorch node start` uses it (pass --force to write a new one)")
    contact = gateway_contact(gateway)
    machine = Machine.detect()
    proposed_slots, proposed_threads = machine.proposal()
    slots, threads = slots or proposed_slots, threads or proposed_threads
    if slots * threads > machine.cores:
        raise ConfigError(f"{slots} slots × {threads} threads is more than this machine's {machine.cores} cores")
    config_path.parent.mkdir(parents=True, exist_ok=True)
    data_dir().mkdir(parents=True, exist_ok=True)
    key_file = config_dir() / "node.key"
    if key_file.exists():
        from llorch.ledger.signing import load_key_file
        key = load_key_file(key_file)
        log(f"keeping the key in {key_file} (peer id {key.peer_id})")
    else:
        key = SigningKey.generate()
        write_key_file(key_file, key)
        log(f"created {key_file} (mode 0600): peer id {key.peer_id}")
    log(f"this machine: {machine.cores} cores, {machine.memory_bytes / 2**30:.1f} GiB -> {slots} slot(s) × "
        f"{threads} thread(s)")
    catalog.fetch(catalog.lookup(catalog.DEFAULT_MODEL_ID), log=log, progress=progress)
    text = node_toml(contact, machine, slots, threads, country, key_file, data_dir() / "ledger.sqlite", listen_port)
    temporary = config_path.with_suffix(".toml.tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, config_path)
    log(f"wrote {config_path}")
    return config_path, key, contact
