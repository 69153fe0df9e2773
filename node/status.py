"""`llorch node status`: what a provider wants to know at a glance, from a local admin endpoint.

The running node serves ``GET /status`` (JSON) on 127.0.0.1 only, at ``admin_port`` (node.toml; 0 picks a free port,
and the state file records the URL). `llorch node status` reads node.toml, asks that endpoint and prints:

- each trusted gateway, whether the node is connected to it (behind NAT, that connection, which the node
  opened, carries every request and witness round), and what it last answered about the node's listing there
  (node/listing.py: approved or not, geo certified, excluded for a fork, the clock offset);
- how others reach the node: outbound (its own connections only), direct (a gateway's dial-back reached an announced
  address), relayed (through a trusted gateway's Circuit Relay v2, with the reservation's expiry), hole-punched
  (relayed, and a hole punch turned some peers' relayed connections direct: each with its address) or announced
  (announce_addrs from node.toml), and the addresses it announces;
- slots free and total, the last attestation (seq and age);
- the ledger: entries, head, the last signed checkpoint and the last cosignature (witness, size, age);
- requests and tokens served today (UTC), counted from the node's own signed receipts;
- the free disk beside the ledger, and the warnings a provider must act on (node/warnings.py), which the dashboard
  shows too.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import trio
from libp2p.peer.id import ID

from llorch.ledger.errors import LedgerError
from llorch.ledger.money import readable
from llorch.ledger.note import parse_checkpoint_text, parse_note
from llorch.ledger.objects import Receipt
from llorch.ledger.signing import open_envelope
from llorch.ledger.store import LedgerStore
from llorch.node.errors import ConfigError
from llorch.node.hole_punch import direct_addr_to
from llorch.node.reachability import announced_addrs
from llorch.node.listing import Listings
from llorch.node.warnings import warnings

DAY_MS = 86_400_000
TODAY_ENTRIES_SCANNED_MAX = 100_000      # receipts read back to count today's (newest first)
STATUS_TIMEOUT_S = 5
PUNCHES_SHOWN_MS = 3_600_000             # status lists the hole punches of the last hour


@dataclass
class Counters:
    """What the node did since it started, kept by the running node."""
    last_attestation_seq: int = 0
    last_attestation_ms: int = 0
    started_ms: int = field(default_factory=lambda: int(time.time() * 1000))


HOW = {
    "outbound": "its own outbound connections only (behind NAT, no relay reservation yet)",
    "direct": "its announced addresses (a gateway's dial-back reached them), and its own connections",
    "relayed": "a relay on its gateway for peers without a connection, and its own connections",
    "hole-punched": "direct connections a hole punch opened (below), a relay on its gateway for other peers, and its "
                    "own connections",
    "announced": "the announced addresses from node.toml, and its own connections",
}


def reachability(config, p2p, reach, now_ms: int) -> dict:
    """How others reach the node: ``how`` is outbound, direct, relayed, hole-punched (relayed, with a punched
    connection open) or announced (node.toml's announce_addrs); each relay reservation with its expiry; each hole
    punch of the last hour, and whether its connection is still open."""
    announced = announced_addrs(config, p2p.addrs(), p2p.peer_id, reach, now_ms // 1000)
    how = "announced" if config.announce_addrs else (reach.how if reach is not None else "outbound")
    if how == "outbound" and announced:       # a node on a local network, its listen address dialable as it is
        how = "direct"
    reservations = [] if reach is None or config.announce_addrs else [
        {"addr": addr, "expires_in_s": expires - now_ms // 1000}
        for addr, expires in sorted(reach.reservations.items()) if expires > now_ms // 1000]
    punched = [] if reach is None else [
        {"peer_id": peer, "addr": addr, "age_ms": now_ms - at_ms,
         "connected": direct_addr_to(p2p, ID.from_base58(peer)) is not None}
        for peer, (addr, at_ms) in sorted(reach.punched.items()) if now_ms - at_ms < PUNCHES_SHOWN_MS]
    if how == "relayed" and any(punch["connected"] for punch in punched):
        how = "hole-punched"
    return {"how": how, "description": HOW[how], "announced": announced, "reservations": reservations,
            "punched": punched}


async def status_document(config, p2p, models, ledger: LedgerStore, counters: Counters, now_ms: int,
                          reach=None, listings: Listings | None = None) -> dict:
    """``models``: node/model_loader.py ``NodeModels`` (the pool, what is offered, what waits and why)."""
    pool = models.pool
    connected = set(str(peer) for peer in p2p.host.get_network().connections)
    listings = listings or Listings()
    disk = shutil.disk_usage(Path(config.ledger_path).resolve().parent)
    document = {
        "peer_id": p2p.peer_id,
        "model": config.models[0],
        "models": [model_status(model_id, models) for model_id in config.models],
        "catalog": models.held.status(),
        "engine_build": pool.fingerprint,
        "country": config.country,
        "gateways": [{"peer_id": peer, "connected": peer in connected, **listings.document(peer, now_ms)}
                     for peer in config.trusted_gateways],
        "reachability": reachability(config, p2p, reach, now_ms),
        "slots": {"total": pool.total, "free": len(pool.free)},
        "last_attestation": {"seq": counters.last_attestation_seq,
                             "age_ms": now_ms - counters.last_attestation_ms if counters.last_attestation_ms else None},
        "ledger": await ledger_summary(ledger, now_ms),
        "today": {**await served_today(ledger, now_ms), "currency": config.currency},
        "uptime_ms": now_ms - counters.started_ms,
        "disk": {"free_bytes": disk.free, "total_bytes": disk.total},
    }
    document["warnings"] = warnings(document)
    return document


def model_status(model_id: str, models) -> dict:
    """One configured model: served or not (and why not), with its pin when the catalog lists it."""
    entry = models.held.catalog.entries.get(model_id)
    return {"id": model_id, "serving": model_id in models.offered, "sha256": entry.sha256 if entry else None,
            "waiting": models.waiting.get(model_id)}


async def ledger_summary(ledger: LedgerStore, now_ms: int) -> dict:
    latest = ledger.latest_checkpoint
    summary: dict[str, object] = {"entries": ledger.size, "checkpoint_size": latest[0].size if latest else None,
                                  "last_cosignature": None, "uncosigned_ms": None}
    cosigned = await ledger.cosigned()
    covered = 0
    if cosigned:
        note = parse_note(cosigned[-1])
        size = parse_checkpoint_text(note.text).size
        witnesses = [s for s in note.signatures if s.name.startswith("llorch-witness/")]
        if witnesses:
            covered = size
            stamp = int.from_bytes(witnesses[-1].signature[:8], "big")
            summary["last_cosignature"] = {"witness": witnesses[-1].name, "size": size,
                                           "age_ms": now_ms - stamp * 1000}
    if covered < ledger.size:        # how long the oldest receipt no cosignature covers has waited for one
        try:
            (first,) = await ledger.entries(covered, covered + 1)
            summary["uncosigned_ms"] = max(0, now_ms - Receipt.from_envelope(first).finished_ms)
        except (LedgerError, ValueError):
            summary["uncosigned_ms"] = None
    return summary


async def served_today(ledger: LedgerStore, now_ms: int) -> dict:
    """Requests and tokens whose receipts finished since midnight UTC, read newest first from the ledger."""
    midnight = now_ms - now_ms % DAY_MS
    requests = tokens_in = tokens_out = amount = 0
    end = ledger.size
    floor = max(0, end - TODAY_ENTRIES_SCANNED_MAX)
    while end > floor:
        start = max(floor, end - 256)
        for entry in reversed(await ledger.entries(start, end)):
            try:      # the node's own entries, checked when written: parse only, no signature check per status call
                receipt = Receipt.from_payload(open_envelope(entry)[0])
            except (LedgerError, TypeError):
                continue
            if receipt.finished_ms < midnight:
                return {"requests": requests, "tokens_in": tokens_in, "tokens_out": tokens_out,
                        "earned_minor": amount}
            requests, tokens_in, tokens_out = requests + 1, tokens_in + receipt.tokens_in, tokens_out + receipt.tokens_out
            amount += receipt.amount
        end = start
    return {"requests": requests, "tokens_in": tokens_in, "tokens_out": tokens_out, "earned_minor": amount}


def admin_url_file(config) -> Path:
    """Where the running node leaves its admin URL for `llorch node status` (beside its ledger)."""
    return Path(str(config.ledger_path) + ".admin-url")


def write_admin_url(config, url: str) -> None:
    path = admin_url_file(config)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(url + "\n", encoding="utf-8")
    os.replace(temporary, path)


def admin_url_of(config) -> str:
    if config.admin_port:
        return f"http://127.0.0.1:{config.admin_port}"
    try:
        return admin_url_file(config).read_text(encoding="utf-8").strip()
    except OSError:
        raise ConfigError(f"no {admin_url_file(config)}: is `llorch node start` running with this config?") from None


async def serve_admin(port: int, app, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Serve ``app`` on 127.0.0.1:``port`` (never another interface) until cancelled; report the URL."""
    from hypercorn.config import Config
    from hypercorn.trio import serve

    http = Config()
    http.bind = [f"127.0.0.1:{port}"]
    http.accesslog = None
    http.graceful_timeout = 1.0

    async with trio.open_nursery() as nursery:
        bound = await nursery.start(functools.partial(serve, app, http))
        task_status.started(bound[0] if bound else f"http://127.0.0.1:{port}")


def admin_app(document):
    """A Starlette app with ``GET /status``; ``document()`` builds the JSON."""
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def status(request):
        return JSONResponse(await document())

    return Starlette(routes=[Route("/status", status)])


def fetch_status(admin_url: str) -> dict:
    try:
        with urllib.request.urlopen(admin_url.rstrip("/") + "/status", timeout=STATUS_TIMEOUT_S) as response:
            return json.loads(response.read(1 << 20))
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise ConfigError(f"the node's admin endpoint {admin_url} does not answer ({exc}): is `llorch node start` "
                          f"running with this config?") from None


def render(status: dict, admin_url: str | None = None) -> str:
    def age(ms):
        return "never" if ms is None else f"{ms / 1000:.0f} s ago"

    lines = [f"node {status['peer_id']}  model {status['model']}  up {status['uptime_ms'] / 3_600_000:.1f} h"]
    if admin_url:
        lines.append(f"dashboard: {admin_url.rstrip('/')}/ (this machine only)")
    for gateway in status["gateways"]:
        lines.append(f"gateway {gateway['peer_id']}: {'connected' if gateway['connected'] else 'NOT CONNECTED'}; "
                     f"{listing_line(gateway)}")
        if gateway["listing"] and gateway["listing"].get("payouts"):
            lines.append("  " + payouts_line(gateway["listing"]["payouts"], status["today"].get("currency", "EUR")))
    reach = status["reachability"]
    lines.append(f"reached: {reach['how']}: {reach['description']}")
    for addr in reach["announced"]:
        lines.append(f"  announced {addr}")
    for reservation in reach["reservations"]:
        lines.append(f"  relay reservation expires in {reservation['expires_in_s']} s: {reservation['addr']}")
    for punched in reach["punched"]:
        lines.append(f"  hole punch {punched['age_ms'] / 1000:.0f} s ago: {punched['peer_id']} at {punched['addr']} "
                     f"({'connected' if punched['connected'] else 'closed since'})")
    lines.append(f"slots: {status['slots']['free']} free of {status['slots']['total']}; last attestation "
                 f"{age(status['last_attestation']['age_ms'])}")
    ledger = status["ledger"]
    cosign = ledger["last_cosignature"]
    checkpoint = "no checkpoint yet" if ledger["checkpoint_size"] is None else \
        f"checkpoint at {ledger['checkpoint_size']}"
    lines.append(f"ledger: {ledger['entries']} receipts; {checkpoint}; " + (
        f"last cosigned at {cosign['size']} by {cosign['witness']} {age(cosign['age_ms'])}" if cosign else
        "not cosigned yet"))
    today = status["today"]
    lines.append(f"today (UTC): {today['requests']} requests, {today['tokens_in']} + {today['tokens_out']} tokens, "
                 f"{readable(today['earned_minor'], today.get('currency', 'EUR'))} earned")
    disk = status["disk"]
    lines.append(f"disk beside the ledger: {disk['free_bytes'] >> 20} MiB free of {disk['total_bytes'] >> 20} MiB")
    if status["warnings"]:
        lines.append("to act on:")
        lines += [f"  - {warning}" for warning in status["warnings"]]
    return "\n".join(lines)


def payouts_line(payouts: dict, currency: str) -> str:
    """What a gateway says about paying this node: unpaid balance, minimum, next run, account, last statements."""
    next_run = time.strftime("%Y-%m-%d", time.gmtime(payouts["next_run_ms"] // 1000))
    account = f"to {payouts['account']}" if payouts["account"] else "NO PAYOUT ACCOUNT (set payout_iban in node.toml " \
        "and run `llorch node register`)"
    shown = "; ".join(f"{s['run_id']} {s['state']} {readable(s['paid'], currency)}" for s in payouts["statements"][:3])
    return (f"payouts: {readable(payouts['balance'], currency)} unpaid; next run {next_run} pays balances of at least "
            f"{readable(payouts['minimum'], currency)} {account}" + (f"; statements: {shown}" if shown else ""))


def listing_line(gateway: dict) -> str:
    """What a gateway last answered about the node's listing there, in one line."""
    listing = gateway["listing"]
    if listing is None:
        return f"listing unknown ({gateway['listing_error'] or 'not asked yet'})"
    geo = "not registered" if listing["country"] is None else \
        f"geo {listing['country']} {'certified' if listing['geo_certified'] else 'not certified'}"
    fork = "not excluded" if listing["fork_detected_ms"] is None else \
        f"EXCLUDED for fork evidence ({listing['fork_reason']})"
    offset = listing["clock_offset_ms"]
    return (f"{listing['status']}, {geo}, {fork}, clock {'+' if offset >= 0 else '-'}{abs(offset) / 1000:.1f} s "
            f"(±{listing['round_trip_ms'] // 2} ms); asked {listing['age_ms'] // 1000} s ago")
