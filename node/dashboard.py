"""The provider dashboard: an HTML page at ``/`` on the node's admin server (127.0.0.1 only, node/status.py), beside
``GET /status``. It shows the status document `llorch node status` prints (the same function builds both), charts
of requests and tokens per hour and earnings per day counted from the node's own signed receipts, the latest
receipts, the ledger head with its last checkpoint and cosignature, and the warnings a provider must act on.

The admin server answers only requests addressed to the loopback host (``Host: 127.0.0.1`` / ``localhost``): a web
page elsewhere that points a name of its own at 127.0.0.1 (DNS rebinding) gets 421, never the node's figures.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from llorch.inference.catalog import lookup
from llorch.inference.engine import determinism_class
from llorch.ledger.errors import LedgerError
from llorch.ledger.objects import Receipt
from llorch.ledger.signing import open_envelope
from llorch.ledger.store import LedgerStore
from llorch.node.web.charts import buckets
from llorch.node.web.render import environment

HOUR_MS, DAY_MS = 3_600_000, 86_400_000
HOURS_SHOWN = 24
DAYS_SHOWN = 14
LATEST_RECEIPTS_SHOWN = 20
ENTRIES_SCANNED_MAX = 100_000              # receipts read back per page (newest first)
READ_BATCH_ENTRIES = 256
REFRESH_S = 15
COSIGNATURE_STALE_MS = 10 * 60_000         # connected, with receipts, and no cosignature for this long: warn
CLOCK_SKEW_MS_MAX = 5_000                  # a cosignature stamped this far in the node's future: warn
DISK_FREE_BYTES_MIN = 1 << 30              # warn below 1 GiB free beside the ledger ...
DISK_FREE_PPM_MIN = 50_000                 # ... or below 5% free
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "[::1]"})
TEMPLATES = Path(__file__).parent / "templates"


@dataclass
class History:
    """What the node's receipts say, bucketed: hour start → requests and tokens; day start → amount earned."""

    requests_per_hour: dict[int, int] = field(default_factory=dict)
    tokens_per_hour: dict[int, int] = field(default_factory=dict)
    earned_per_day: dict[int, int] = field(default_factory=dict)
    latest: list[Receipt] = field(default_factory=list)
    scanned: int = 0


async def receipt_history(ledger: LedgerStore, now_ms: int) -> History:
    """Read the ledger newest first back to the first day shown (at most ENTRIES_SCANNED_MAX entries). Entries are
    the node's own, checked when written: parsed, not signature-checked again (as node/status.py does)."""
    history = History()
    first_day = now_ms - now_ms % DAY_MS - (DAYS_SHOWN - 1) * DAY_MS
    first_hour = now_ms - now_ms % HOUR_MS - (HOURS_SHOWN - 1) * HOUR_MS
    end = ledger.size
    floor = max(0, end - ENTRIES_SCANNED_MAX)
    while end > floor:
        start = max(floor, end - READ_BATCH_ENTRIES)
        for entry in reversed(await ledger.entries(start, end)):
            history.scanned += 1
            try:
                receipt = Receipt.from_payload(open_envelope(entry)[0])
            except (LedgerError, TypeError):
                continue
            if receipt.finished_ms < first_day:
                return history
            if len(history.latest) < LATEST_RECEIPTS_SHOWN:
                history.latest.append(receipt)
            day = receipt.finished_ms - receipt.finished_ms % DAY_MS
            history.earned_per_day[day] = history.earned_per_day.get(day, 0) + receipt.amount
            if receipt.finished_ms >= first_hour:
                hour = receipt.finished_ms - receipt.finished_ms % HOUR_MS
                history.requests_per_hour[hour] = history.requests_per_hour.get(hour, 0) + 1
                history.tokens_per_hour[hour] = history.tokens_per_hour.get(hour, 0) + receipt.tokens_in + \
                    receipt.tokens_out
        end = start
    return history


def warnings(status: dict, disk_free_bytes: int, disk_total_bytes: int) -> list[str]:
    """What the provider must act on, each with what to do; pure (the status document and the disk figures)."""
    found = []
    for gateway in status["gateways"]:
        if not gateway["connected"]:
            found.append(f"not connected to gateway {gateway['peer_id']}: no requests reach you from it; check the "
                         f"network and node.bootstrap")
    ledger = status["ledger"]
    cosigned = ledger["last_cosignature"]
    if ledger["entries"] and any(g["connected"] for g in status["gateways"]) and \
            (cosigned is None or cosigned["age_ms"] > COSIGNATURE_STALE_MS):
        found.append("the gateway has not cosigned your ledger for over 10 minutes: it witnesses only providers it "
                     "has approved and not excluded for a fork. Ask its operator whether you are approved (a new "
                     "registration waits for approval; a geo claim also waits for certification)")
    if cosigned is not None and cosigned["age_ms"] < -CLOCK_SKEW_MS_MAX:
        found.append(f"clock skew: the gateway's last cosignature is stamped {-cosigned['age_ms'] // 1000} s in "
                     f"your future; set your clock by NTP (tickets and attestations are refused when clocks differ)")
    if disk_total_bytes and (disk_free_bytes < DISK_FREE_BYTES_MIN or
                             disk_free_bytes * 1_000_000 < disk_total_bytes * DISK_FREE_PPM_MIN):
        found.append(f"disk nearly full beside the ledger: {disk_free_bytes >> 20} MiB free; a full disk stops "
                     f"receipts from being written, and so every request")
    return found


def page_context(config, status: dict, history: History, disk, now_ms: int) -> dict:
    first_day = now_ms - now_ms % DAY_MS - (DAYS_SHOWN - 1) * DAY_MS
    first_hour = now_ms - now_ms % HOUR_MS - (HOURS_SHOWN - 1) * HOUR_MS
    hour_label = lambda start: time.strftime("%H:00", time.gmtime(start // 1000))      # noqa: E731
    day_label = lambda start: time.strftime("%m-%d", time.gmtime(start // 1000))       # noqa: E731
    return {
        "status": status, "now_ms": now_ms, "refresh_s": REFRESH_S, "config": config,
        "determinism_class": determinism_class(lookup(status["model"]).sha256, status["engine_build"]),
        "charts": {"requests": buckets(history.requests_per_hour, first_hour, HOURS_SHOWN, HOUR_MS, hour_label),
                   "tokens": buckets(history.tokens_per_hour, first_hour, HOURS_SHOWN, HOUR_MS, hour_label),
                   "earned": buckets(history.earned_per_day, first_day, DAYS_SHOWN, DAY_MS, day_label)},
        "latest": history.latest, "warnings": warnings(status, disk.free, disk.total),
    }


def dashboard_app(status_app, config, ledger: LedgerStore, status, clock):
    """The admin server's app: ``/`` (this page) in front of ``status_app`` (``GET /status``), both answering only
    requests addressed to the loopback host. ``status()`` builds the status document; ``clock()`` is now in ms."""
    from starlette.responses import HTMLResponse, PlainTextResponse

    templates = environment(TEMPLATES)

    async def app(scope, receive, send) -> None:
        if scope["type"] == "http":
            host = dict(scope["headers"]).get(b"host", b"").decode("latin-1")
            name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
            if name not in LOOPBACK_HOSTS:
                response = PlainTextResponse("the node's admin server answers only http://127.0.0.1", 421)
                await response(scope, receive, send)
                return
            if scope["path"] == "/" and scope["method"] in ("GET", "HEAD"):
                now = clock()
                context = page_context(config, await status(), await receipt_history(ledger, now),
                                       shutil.disk_usage(Path(config.ledger_path).resolve().parent), now)
                response = HTMLResponse(templates.get_template("provider.html").render(**context), headers={
                    "cache-control": "no-store", "x-frame-options": "DENY",
                    "content-security-policy": "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'"})
                await response(scope, receive, send)
                return
        await status_app(scope, receive, send)

    return app
