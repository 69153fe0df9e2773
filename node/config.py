"""Configuration: one small frozen dataclass per role, loaded from TOML with ``LLORCH_<ROLE>_<FIELD>`` env overrides.

``load_config`` is shared by the node and the gateway: it reads one TOML table, applies env overrides, converts
each value to the field's type, resolves relative paths against the config file's directory, and names the field
in every error.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TextIO

from llorch.inference.catalog import DEFAULT_MODEL_ID
from llorch.ledger import limits as ledger_limits
from llorch.node import limits
from multiaddr import Multiaddr

from llorch.node.errors import ConfigError


def config_dir() -> Path:
    """Where `llorch node init` and `llorch gateway init` write their configs and keys (XDG Base Directory)."""
    return Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "llorch"


def data_dir() -> Path:
    """Where ledgers and the gateway's SQLite database go."""
    return Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share") / "llorch"


Ask = Callable[[str, str, "str | None"], str]       # (flag, question, proposal or None) → the answer's text


def asker(lines: TextIO, interactive: bool, prompt: Callable[[str], None]) -> Ask:
    """The init commands' questions, answered from ``lines`` (a terminal or a pipe: `echo DE | llorch node init
    ...`); an empty line or the end of the input takes the proposal. Not interactive: the proposal, or an error
    naming the flag that gives the answer."""
    def ask(flag: str, question: str, proposal: str | None) -> str:
        if interactive:
            prompt(f"{question}" + (f" [{proposal}]" if proposal else "") + ": ")
            answer = lines.readline().strip()
            if answer:
                return answer
        if proposal is None:
            raise ConfigError(f"{flag} is needed: {question[0].lower() + question[1:]} (no answer was given)")
        return proposal
    return ask


@dataclass(frozen=True)
class NodeConfig:
    """``[node]`` in node.toml."""

    key_file: Path
    ledger_path: Path
    bootstrap: tuple[str, ...]               # gateway multiaddrs, /ip4/.../tcp/.../p2p/<peer id>
    trusted_gateways: tuple[str, ...]        # peer ids whose tickets this node accepts
    listen_addr: str = "/ip4/127.0.0.1/tcp/0"
    announce_addrs: tuple[str, ...] = ()     # dialable addresses to announce (a forwarded port); default: see
                                             # node/reachability.py (behind NAT: none, reached over its own link)
    models: tuple[str, ...] = (DEFAULT_MODEL_ID,)    # catalog ids; one not listed yet is served once it is
    catalog_poll_ms: int = limits.CATALOG_POLL_MS_DEFAULT   # how often to ask trusted gateways for a newer catalog
    catalog_file: Path | None = None         # the signed catalog kept between runs (default: <ledger_path>.catalog)
    model_cache_dir: Path | None = None
    engine: str = "llama.cpp"                # "echo" runs a fake engine: for tests and benchmarks only
    echo_token_delay_ms: int = 0             # the echo engine's pause before each token (tests: requests that last)
    slots: int = 1
    threads_per_slot: int = 2
    gpu_layers: int = 0                      # layers llama.cpp offloads to a GPU (needs a CUDA/Metal build)
    memory_max_bytes: int = 0                # how much RAM the node's models may take (0: what is available at start)
    context_tokens: int = 2048
    batch_tokens: int = 512
    attestation_interval_ms: int = limits.ATTESTATION_INTERVAL_MS_DEFAULT
    price_in_per_1m: int = 100_000           # minor units (micro-EUR) per 1M input tokens
    price_out_per_1m: int = 200_000          # minor units per 1M output tokens
    currency: str = "EUR"
    country: str = "DE"
    region: str = "eu-central"
    gpus: int = 0                            # hardware claims for registration (informational)
    vram_gb: int = 0
    sla_uptime_ppm: int = 990_000
    sla_ttft_ms: int = 1_000
    payout_holder: str = ""                  # where payout runs pay you (registered, signed): the account holder,
    payout_iban: str = ""                    # its IBAN (SEPA) and, where your bank needs one, its BIC; "" = none
    payout_bic: str = ""                     # yet: your earnings wait in your balance until you add one
    state_file: Path | None = None           # written once the node is up: peer id and listen addrs (JSON)
    admin_port: int = 0                      # `llorch node status` endpoint on 127.0.0.1 (0: any free port)
    checkpoint_every_entries: int = ledger_limits.CHECKPOINT_EVERY_ENTRIES_DEFAULT   # sign a checkpoint after
    checkpoint_every_ms: int = ledger_limits.CHECKPOINT_EVERY_MS_DEFAULT    # these many entries, or this long

    def __post_init__(self) -> None:
        if self.slots < 1 or self.slots > 64:
            raise ConfigError("node.slots must be in 1..64")
        if self.threads_per_slot < 1:
            raise ConfigError("node.threads_per_slot must be at least 1")
        if not 100 <= self.attestation_interval_ms <= limits.ATTESTATION_INTERVAL_MS_MAX:
            raise ConfigError(f"node.attestation_interval_ms must be 100..{limits.ATTESTATION_INTERVAL_MS_MAX}")
        if self.engine not in ("llama.cpp", "echo"):
            raise ConfigError('node.engine must be "llama.cpp" (or "echo" for tests and benchmarks)')
        if not 1 <= len(self.models) <= limits.ATTESTATION_MODELS_MAX or len(set(self.models)) != len(self.models):
            raise ConfigError(f"node.models must name 1..{limits.ATTESTATION_MODELS_MAX} catalog models, each once")
        if not 100 <= self.catalog_poll_ms <= 3_600_000:
            raise ConfigError("node.catalog_poll_ms must be in 100..3600000 (ms)")
        if not self.trusted_gateways:
            raise ConfigError("node.trusted_gateways is empty: no ticket could ever be accepted")
        for addr in self.announce_addrs:
            self._check_announce_addr(addr)
        if self.memory_max_bytes < 0:
            raise ConfigError("node.memory_max_bytes must be 0 (what the machine has available) or a byte count")
        if not 0 <= self.gpu_layers <= 1000:
            raise ConfigError("node.gpu_layers must be in 0..1000 (0: CPU only)")
        if bool(self.payout_iban) != bool(self.payout_holder):
            raise ConfigError("node.payout_iban and node.payout_holder go together (both, or neither)")
        if not 0 <= self.admin_port <= 65535:
            raise ConfigError("node.admin_port must be in 0..65535 (0: any free port)")

    @property
    def kept_catalog_path(self) -> Path:
        """Where the node keeps the newest signed catalog it took (node/catalog.py)."""
        return self.catalog_file or Path(str(self.ledger_path) + ".catalog")

    def _check_announce_addr(self, addr: str) -> None:
        from llorch.node.reachability import is_unspecified_addr
        from llorch.node.wire.attestation import MULTIADDR_FIRST, MULTIADDR_PROTOCOLS

        try:
            names = [protocol.name for protocol in Multiaddr(addr).protocols()]
        except Exception as exc:  # py-multiaddr raises several types for a bad string
            raise ConfigError(f"node.announce_addrs: {addr!r} is not a multiaddr ({exc})") from None
        if not names or names[0] not in MULTIADDR_FIRST or not set(names) <= MULTIADDR_PROTOCOLS \
                or is_unspecified_addr(addr):
            raise ConfigError(f"node.announce_addrs: {addr!r} is not an address others can dial (ip4/ip6/dns with "
                              f"tcp or udp/quic-v1, never 0.0.0.0 or ::)")


def load_config(cls, path: Path, section: str, env_prefix: str):
    """Build ``cls`` from table ``section`` of the TOML file at ``path``, with env overrides."""
    path = Path(path)
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    table = dict(document.get(section, {}))
    hints = typing.get_type_hints(cls)
    known = {field.name for field in dataclasses.fields(cls)}
    unknown = set(table) - known
    if unknown:
        raise ConfigError(f"{path}: unknown keys in [{section}]: {sorted(unknown)}")
    for name in known:
        override = os.environ.get(f"{env_prefix}{name.upper()}")
        if override is not None:
            table[name] = override
    values = {}
    for name, raw in table.items():
        values[name] = _convert(f"{section}.{name}", hints[name], raw, path.parent)
    try:
        return cls(**values)
    except TypeError as exc:
        raise ConfigError(f"{path}: [{section}] {exc}") from None


def _convert(name: str, hint, raw, base: Path):
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)) and type(None) in args:
        if raw in (None, ""):
            return None
        hint = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is tuple:
        items = raw.split(",") if isinstance(raw, str) else raw
        if not isinstance(items, list):
            raise ConfigError(f"{name} must be a list")
        return tuple(_convert(name, args[0], item.strip() if isinstance(item, str) else item, base)
                     for item in items if item != "")
    if hint is Path:
        if not isinstance(raw, str):
            raise ConfigError(f"{name} must be a path string")
        candidate = Path(raw).expanduser()
        return candidate if candidate.is_absolute() else base / candidate
    if hint is bool:
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and raw.lower() in ("1", "true", "yes", "0", "false", "no"):
            return raw.lower() in ("1", "true", "yes")
        raise ConfigError(f"{name} must be true or false")
    if hint is int:
        if isinstance(raw, bool):
            raise ConfigError(f"{name} must be an integer")
        try:
            return int(raw)
        except (TypeError, ValueError):
            raise ConfigError(f"{name} must be an integer, got {raw!r}") from None
    if hint is str:
        if not isinstance(raw, str):
            raise ConfigError(f"{name} must be a string")
        return raw
    raise AssertionError(f"config field {name} has unsupported type {hint}")
