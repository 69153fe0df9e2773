"""The provider dashboard: an HTML page at ``/`` on the node's admin server (127.0.0.1 only, node/status.py), beside
``GET /status``. It shows the status document `llorch node status` prints (the same function builds both), charts
of requests and tokens per hour and earnings per day counted from the node's own signed receipts, the latest
receipts, the ledger head with its last checkpoint and cosignature, what each gateway answered about the node's
listing there, and the warnings a provider must act on (node/warnings.py, in the status document).

The admin server answers only requests addressed to the loopback host (``Host: 127.0.0.1`` / ``localhost``): a web
page elsewhere that points a name of its own at 127.0.0.1 (DNS rebinding) gets 421, never the node's figures.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

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


def page_context(config, status: dict, history: History, now_ms: int) -> dict:
    first_day = now_ms - now_ms % DAY_MS - (DAYS_SHOWN - 1) * DAY_MS
    first_hour = now_ms - now_ms % HOUR_MS - (HOURS_SHOWN - 1) * HOUR_MS
    hour_label = lambda start: time.strftime("%H:00", time.gmtime(start // 1000))      # noqa: E731
    day_label = lambda start: time.strftime("%d %b", time.gmtime(start // 1000))       # noqa: E731
    return {
        "status": status, "now_ms": now_ms, "refresh_s": REFRESH_S, "config": config,
        "determinism_class": determinism_class(status["models"][0]["sha256"], status["engine_build"])
        if status["models"][0]["sha256"] and status["engine_build"] else "(no model served yet)",
        "charts": {"requests": buckets(history.requests_per_hour, first_hour, HOURS_SHOWN, HOUR_MS, hour_label),
                   "tokens": buckets(history.tokens_per_hour, first_hour, HOURS_SHOWN, HOUR_MS, hour_label),
                   "earned": buckets(history.earned_per_day, first_day, DAYS_SHOWN, DAY_MS, day_label)},
        "latest": history.latest, "warnings": status["warnings"],
    }


def dashboard_app(status_app, config, ledger: LedgerStore, status, clock):
    """The admin server's app: ``/`` (this page) in front of ``status_app`` (``GET /status``), both answering only
    requests addressed to the loopback host. ``status()`` builds the status document; ``clock()`` is now in ms."""
    from starlette.responses import HTMLResponse, PlainTextResponse, Response

    templates = environment(TEMPLATES)

    async def app(scope, receive, send) -> None:
        if scope["type"] == "http":
            host = dict(scope["headers"]).get(b"host", b"").decode("latin-1")
            name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
            if name not in LOOPBACK_HOSTS:
                response: Response = PlainTextResponse("the node's admin server answers only http://127.0.0.1", 421)
                await response(scope, receive, send)
                return
            if scope["path"] == "/" and scope["method"] in ("GET", "HEAD"):
                now = clock()
                context = page_context(config, await status(), await receipt_history(ledger, now), now)
                response = HTMLResponse(templates.get_template("provider.html").render(**context), headers={
                    "cache-control": "no-store", "x-frame-options": "DENY",
                    "content-security-policy": "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'"})
                await response(scope, receive, send)
                return
        await status_app(scope, receive, send)

    return app
