"""`llorch node init`: a provider's first minutes without hand-written TOML.

It creates the node's key (mode 0600), detects the machine's cores and memory and proposes slots × threads (never
more threads than cores: ggml's threads spin, and two busy contexts on the same cores slow each other several-fold),
learns the gateway from one argument (its libp2p multiaddr, or its https URL, which it asks for the gateway's
identity and its signed catalog), proposes the catalog's models this machine can hold and fetches the chosen ones
(``--model ID``, repeatable; default: the default model), offers ``gpu_layers`` when llama.cpp was built with a GPU
backend, writes a commented ``node.toml`` into the user's config directory (XDG), and, given a URL, registers the
node with the gateway. `llorch node start` then needs no flags: it finds that file.

Paths (XDG Base Directory): config ``$XDG_CONFIG_HOME/llorch`` (``~/.config/llorch``) holds node.toml and node.key;
data ``$XDG_DATA_HOME/llorch`` (``~/.local/share/llorch``) holds the ledger.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Callable

import trio
from multiaddr import Multiaddr

from llorch.inference import catalog, sources
from llorch.inference import limits as limits_inference
from llorch.inference.catalog import Catalog, CatalogEntry
from llorch.ledger.errors import EncodingError, SignatureError
from llorch.ledger.money import readable
from llorch.ledger.signing import SigningKey, peer_id_of, write_key_file
from llorch.node import limits
from llorch.node.catalog import keep
from llorch.node.config import config_dir, data_dir
from llorch.node.errors import ConfigError
from llorch.node.wire.attestation import EU_COUNTRIES
from llorch.node.wire.catalog import SignedCatalog
from llorch.node.wire.invitation import Invitation
from llorch.node.wire.registration import COUNTRY

GATEWAY_INFO_TIMEOUT_S = 15
MEMORY_PER_SLOT_BYTES = 1 << 30          # a context of the default model, with room for the OS and a browser
THREADS_PER_SLOT_MAX = 4                 # beyond this a small model gains little from more threads per request
KV_BYTES_PER_SLOT_GUESS = 320 << 20      # KV cache and scratch of one 2048-token context of a 7-8B GQA model
DASHBOARD_PORT_PREFERRED = 8471          # the provider dashboard's port when it is free (else one the kernel picks)
REACH_TIMEOUT_S = 5
TTFT_RUNS = 3                            # measured runs for the SLA proposal (after one warm-up)
TTFT_NETWORK_MS = 250                    # the proposal's allowance for the network between gateway and node
TTFT_PROMPT = "Say hello in one short sentence."


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

    def fits(self, entry: CatalogEntry, slots: int) -> bool:
        """Whether the model can plausibly be held with ``slots`` contexts (`node start` measures it exactly from
        the file): the operator's ``memory_min_bytes``, else the file plus 10% plus a context's share per slot."""
        return need_estimate(entry, slots) <= self.memory_bytes

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


def need_estimate(entry: CatalogEntry, slots: int) -> int:
    if entry.memory_min_bytes:
        return entry.memory_min_bytes + (slots - 1) * KV_BYTES_PER_SLOT_GUESS
    return (entry.size_bytes or 0) * 11 // 10 + slots * KV_BYTES_PER_SLOT_GUESS


def gateway_catalog(contact: GatewayContact) -> tuple[Catalog, bytes]:
    """The catalog the gateway signed (GET /v1/catalog), checked against its peer id; the built-in catalog when
    only a multiaddr was given (the node asks for the signed one over libp2p once it runs)."""
    if contact.url is None:
        return catalog.BUILTIN, b""
    try:
        with urllib.request.urlopen(contact.url + "/v1/catalog", timeout=GATEWAY_INFO_TIMEOUT_S) as response:
            document = base64.b64decode(json.loads(response.read(limits.CATALOG_DOCUMENT_BYTES_MAX * 2))["document"])
        signed = SignedCatalog.from_envelope(document)
    except (urllib.error.URLError, OSError, ValueError, KeyError, TypeError, EncodingError, SignatureError) as exc:
        raise ConfigError(f"cannot read the gateway's signed catalog at {contact.url}/v1/catalog: {exc}") from None
    if peer_id_of(signed.gateway_key) != contact.peer_id:
        raise ConfigError(f"the catalog at {contact.url}/v1/catalog is signed by {peer_id_of(signed.gateway_key)}, "
                          f"not by the gateway {contact.peer_id}: refusing it")
    return signed.catalog(), document


def model_table(served: Catalog, machine: Machine, slots: int) -> list[str]:
    """What `node init` shows: each live model, its size and whether this machine can hold it."""
    lines = []
    for model_id in served.live_ids():
        entry = served.entries[model_id]
        size = f"{entry.size_bytes / 2**30:.1f} GiB" if entry.size_bytes else "size unknown"
        fits = "fits" if machine.fits(entry, slots) else f"needs ~{need_estimate(entry, slots) / 2**30:.1f} GiB"
        lines.append(f"  {model_id:<40} {entry.kind:<8} {size:>14}  {fits}")
    return lines


def gpu_offload() -> bool:
    """Whether this llama.cpp build can offload layers to a GPU."""
    try:
        import llama_cpp
        return bool(llama_cpp.llama_supports_gpu_offload())
    except Exception:  # no llama.cpp at all: nothing to offer
        return False


@dataclass(frozen=True)
class Offer:
    """What the node registers: each from a flag, an answer, or a proposal `node init` showed (never silently)."""

    country: str
    region: str
    price_in_per_1m: int          # minor units (micro-EUR) per 1M tokens
    price_out_per_1m: int
    sla_ttft_ms: int
    sla_uptime_ppm: int
    dashboard_port: int
    payout_holder: str = ""       # where payout runs pay (registered with the gateway, which checks the IBAN)
    payout_iban: str = ""
    payout_bic: str = ""


def region_of(country: str) -> str:
    """A proposal for the registration's informational region."""
    if country in EU_COUNTRIES:
        return "eu-" + next((name for name, members in EU_REGIONS.items() if country in members), "central")
    return country.lower()


EU_REGIONS = {"north": {"DK", "EE", "FI", "LT", "LV", "SE"}, "west": {"BE", "FR", "IE", "LU", "NL"},
              "south": {"CY", "ES", "GR", "HR", "IT", "MT", "PT", "SI"},
              "east": {"BG", "CZ", "HU", "PL", "RO", "SK"}, "central": {"AT", "DE"}}


def parse_country(text: str, flag: str = "--country") -> str:
    country = text.strip().upper()
    if not COUNTRY.fullmatch(country):
        raise ConfigError(f"{flag} {text.strip()[:20]!r} is not a two-letter ISO 3166-1 code (e.g. DE)")
    return country


def parse_price(text: str, flag: str) -> int:
    """EUR per 1M tokens as a person writes it ("0.20") → minor units (micro-EUR), exactly."""
    try:
        amount = Decimal(text.strip())
    except InvalidOperation:
        raise ConfigError(f"{flag} {text.strip()[:30]!r} is not an amount in EUR (e.g. 0.20)") from None
    if not amount.is_finite() or not 0 <= amount <= 1_000_000 or amount != amount.quantize(Decimal("0.000001")):
        raise ConfigError(f"{flag} {text.strip()[:30]!r} must be 0..1000000 EUR with at most 6 decimals")
    return int(amount.scaleb(6))


def parse_percent(text: str, flag: str) -> int:
    try:
        percent = Decimal(text.strip().rstrip("%"))
    except InvalidOperation:
        raise ConfigError(f"{flag} {text.strip()[:20]!r} is not a percentage (e.g. 95)") from None
    if not percent.is_finite() or not 0 < percent <= 100:
        raise ConfigError(f"{flag} must be a percentage above 0 and at most 100, got {text.strip()[:20]}")
    return int(percent * 10_000)


def parse_int(text: str, flag: str, low: int, high: int) -> int:
    try:
        value = int(text.strip())
    except ValueError:
        raise ConfigError(f"{flag} {text.strip()[:20]!r} is not a whole number") from None
    if not low <= value <= high:
        raise ConfigError(f"{flag} must be in {low}..{high}, got {value}")
    return value


def free_local_port(preferred: int = DASHBOARD_PORT_PREFERRED) -> int:
    """``preferred`` if nothing listens on it on 127.0.0.1, else a free port the kernel picks."""
    for port in (preferred, 0):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return probe.getsockname()[1]
    raise ConfigError("no free TCP port on 127.0.0.1 for the dashboard")


def measure_ttft_ms(entry: CatalogEntry, threads: int, runs: int = TTFT_RUNS, log=print) -> list[int]:
    """Time to first token of a short chat request on this machine, ``runs`` times after one warm-up: what the
    proposed SLA is made from. One engine with the node's threads per slot, as one slot of `node start` runs."""
    from llorch.inference.engine import Engine, Sampling

    path = catalog.verified_path(entry)
    started = time.monotonic()
    engine = Engine(entry, path, threads, limits_inference.CONTEXT_TOKENS_DEFAULT,
                    limits_inference.BATCH_TOKENS_DEFAULT)
    log(f"measuring time to first token of {entry.id} on this machine (loaded in "
        f"{time.monotonic() - started:.1f} s, {threads} thread(s))")
    prompt = {"messages": [{"role": "user", "content": TTFT_PROMPT}]} if entry.chat_format else {"text": TTFT_PROMPT}
    timings = []
    for run in range(runs + 1):
        prepared = engine.prepare(prompt, Sampling(run, 0, 1_000_000, 1))
        first: list[float] = []

        async def emit(text, entry=None, first=first) -> None:
            first.append(time.monotonic())
        began = time.monotonic()
        trio.run(engine.generate, prepared, emit)
        if run:                                  # the first run warms caches up: not counted
            timings.append(int(((first[0] if first else time.monotonic()) - began) * 1000))
    return timings


def proposed_ttft_ms(timings: list[int]) -> int:
    """Twice the slowest measured run (requests queue behind each other on busy slots) plus the network's share,
    rounded up to 100 ms."""
    need = 2 * max(timings) + TTFT_NETWORK_MS
    return min(3_600_000, -(-need // 100) * 100)


def check_reachable(contact: GatewayContact, timeout_s: float = REACH_TIMEOUT_S) -> None:
    """A TCP connection to the gateway's libp2p address, before registering: the node keeps one open there, and a
    closed port would leave a registered node that never gets work. ConfigError saying what to open."""
    parsed = Multiaddr(contact.multiaddr)
    host = next((parsed.value_for_protocol(kind) for kind in ("ip4", "ip6", "dns", "dns4", "dns6")
                 if kind in {protocol.name for protocol in parsed.protocols()}), None)
    port = int(parsed.value_for_protocol("tcp"))
    if host is None:
        return
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as exc:
        raise ConfigError(
            f"cannot reach the gateway's libp2p port: TCP {host}:{port} ({exc.strerror or exc}). The node keeps a "
            f"connection open there: the gateway's operator must let TCP port {port} through to {host} (the port of "
            f"gateway.p2p_listen_addr, reachable at the host of the URL nodes are given); nothing was registered")


def node_toml(contact: GatewayContact, machine: Machine, slots: int, threads: int, offer: Offer, key_file: Path,
              ledger_path: Path, listen_port: int, models: tuple[str, ...] = (catalog.DEFAULT_MODEL_ID,),
              gpu: bool = False) -> str:
    gpu_line = ("gpu_layers = 1000                          # this llama.cpp can offload to a GPU: every layer "
                "(0: CPU only)\n" if gpu else "")
    return f"""# llorch provider node, written by `llorch node init`. Every key: docs/operating.md.
[node]
key_file = "{key_file}"                   # your identity (Ed25519, mode 0600): back it up
ledger_path = "{ledger_path}"             # your signed receipts: your earnings
bootstrap = ["{contact.multiaddr}"]
trusted_gateways = ["{contact.peer_id}"]  # gateways whose tickets this node serves
listen_addr = "/ip4/0.0.0.0/tcp/{listen_port}"
# announce_addrs = ["/ip4/<public ip>/tcp/{listen_port}"]   # only if you forward this port; behind NAT leave it out
admin_port = {offer.dashboard_port}      # your dashboard and `llorch node status`: http://127.0.0.1:{offer.dashboard_port}/

# This machine: {machine.cores} cores, {machine.memory_bytes / 2**30:.1f} GiB. slots × threads_per_slot must not exceed the
# cores: llama.cpp's threads spin, and two busy requests on the same cores slow each other several-fold.
slots = {slots}
threads_per_slot = {threads}
models = {json.dumps(list(models))}   # `llorch models list --config <this file>`; see docs/operating.md
{gpu_line}
# What customers pay you per 1M tokens, in minor units (1 = 0.000001 EUR): {readable(offer.price_in_per_1m)} in,
# {readable(offer.price_out_per_1m)} out. The gateway never pays less.
price_in_per_1m = {offer.price_in_per_1m}
price_out_per_1m = {offer.price_out_per_1m}
currency = "EUR"

# Where this machine is (a claim the gateway operator certifies before EU-only customers are sent here).
country = "{offer.country}"
region = "{offer.region}"

# What you promise (registered with the gateway, which measures you against it: `llorch gateway providers sla`).
sla_ttft_ms = {offer.sla_ttft_ms}                  # time to first token; `node init` proposed it from a measured run
sla_uptime_ppm = {offer.sla_uptime_ppm}          # share of the time you serve, parts per million ({offer.sla_uptime_ppm / 10_000:g}%)

# Where the gateway's monthly payout runs pay your earnings (SEPA credit transfer); registered with your key. Change
# it here and run `llorch node register --gateway <its URL>`: the next run pays the new account. Until one is set,
# your earnings wait in your balance.
{payout_lines(offer)}"""


def payout_lines(offer: Offer) -> str:
    if not offer.payout_iban:
        return '# payout_holder = "Your Name"\n# payout_iban = "DE89 3704 0044 0532 0130 00"\n# payout_bic = ""\n'
    return (f"payout_holder = {json.dumps(offer.payout_holder)}\npayout_iban = {json.dumps(offer.payout_iban)}\n"
            f"payout_bic = {json.dumps(offer.payout_bic)}\n")


def initialise(gateway: str, offer_of: Callable[[Machine, CatalogEntry, int], Offer], slots: int | None,
               threads: int | None, force: bool, listen_port: int, log=print, progress=None,
               models: tuple[str, ...] = (), invitation: Invitation | None = None
               ) -> tuple[Path, SigningKey, GatewayContact]:
    """Do everything `llorch node init` does but the registration; return (config path, key, gateway).
    ``offer_of(machine, first model, threads)`` settles what is registered once the model is here to measure."""
    config_path = default_config_path()
    if config_path.exists() and not force:
        raise ConfigError(f"{config_path} exists: `llorch node start` uses it (pass --force to write a new one)")
    contact = gateway_contact(gateway)
    if invitation is not None and invitation.gateway_peer_id != contact.peer_id:
        raise ConfigError(f"the gateway at {gateway} is {contact.peer_id}, but the join token was made by "
                          f"{invitation.gateway_peer_id}: refusing to trust it")
    if contact.url is not None:
        check_reachable(contact)
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
    served, document = gateway_catalog(contact)
    log(f"models in the {'gateway' if document else 'built-in'} catalog (version {served.version}) for "
        f"{slots} slot(s) on this machine:")
    for line in model_table(served, machine, slots):
        log(line)
    chosen = models or (catalog.DEFAULT_MODEL_ID,)
    for model_id in chosen:
        entry = served.live(model_id)
        if entry is None:
            raise ConfigError(f"--model {model_id} is not a live model of that catalog (known: "
                              f"{', '.join(served.live_ids())})")
        if not machine.fits(entry, slots):
            raise ConfigError(f"--model {model_id} needs about {need_estimate(entry, slots) / 2**30:.1f} GiB for "
                              f"{slots} slot(s); this machine has {machine.memory_bytes / 2**30:.1f} GiB")
    for model_id in chosen:
        entry = served.entries[model_id]
        if entry.parts:
            catalog.fetch(entry, log=log, progress=progress)
        else:
            sources.fetch_any(entry, log=log, progress=sources.DownloadProgress(entry.id))
    offer = offer_of(machine, served.entries[chosen[0]], threads)
    gpu = gpu_offload()
    if gpu:
        log("this llama.cpp can offload to a GPU: node.toml sets gpu_layers = 1000 (every layer)")
    ledger_path = data_dir() / "ledger.sqlite"
    if document:
        keep(Path(str(ledger_path) + ".catalog"), document)     # node start serves from it at once
    text = node_toml(contact, machine, slots, threads, offer, key_file, ledger_path, listen_port, chosen, gpu)
    temporary = config_path.with_suffix(".toml.tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, config_path)
    log(f"wrote {config_path}")
    return config_path, key, contact
