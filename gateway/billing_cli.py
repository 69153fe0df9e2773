"""`llorch billing reconcile` and `llorch billing statement`: the operator's view of the books, offline from the
running gateway (they read its database)."""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import trio

from llorch.gateway.books.postings import Books, BooksError, statement_csv
from llorch.gateway.config import load_gateway_config
from llorch.gateway.db import open_gateway_db
from llorch.gateway.books.reconcile import GRACE_MS, reconcile
from llorch.ledger.errors import LedgerError
from llorch.ledger.signing import load_key_file
from llorch.node.errors import NodeError
from llorch.node.stream_io import now_ms

PERIOD = re.compile(r"^\d{4}-(0[1-9]|1[0-2])$")


def add_commands(subparsers) -> None:
    billing = subparsers.add_parser("billing", help="reconcile receipts with tickets; statements")
    billing_sub = billing.add_subparsers(dest="billing_command", required=True)
    rec = billing_sub.add_parser(
        "reconcile", help="match every ticket with its witnessed receipt, by ticket hash (incremental)",
        description="Examines what the witness added since the last run and reports every open finding. Exit 0 when "
                    "nothing is wrong (an 'unpaid' late receipt is informational), 1 otherwise. With --post, "
                    "tickets the gateway never settled (it stopped mid-request) are settled: a witnessed receipt is "
                    "paid by the platform, the customer is not charged.")
    rec.add_argument("--config", type=Path, required=True)
    rec.add_argument("--period", type=_period, help="YYYY-MM (UTC); default: everything")
    rec.add_argument("--grace-s", type=float, default=GRACE_MS / 1000,
                     help="how long after a ticket a witness round must have seen the provider's ledger before a "
                          "ticket without a receipt is reported (default %(default)s s)")
    rec.add_argument("--post", action="store_true",
                     help="settle tickets that were never settled live (each exactly once)")
    rec.set_defaults(handler=billing_reconcile)
    stmt = billing_sub.add_parser("statement", help="a tenant's invoice, a provider's payouts or the platform's fees")
    stmt.add_argument("--config", type=Path, required=True)
    who = stmt.add_mutually_exclusive_group(required=True)
    who.add_argument("--tenant")
    who.add_argument("--provider", help="provider peer id")
    who.add_argument("--platform", action="store_true")
    stmt.add_argument("--period", type=_period, default=time.strftime("%Y-%m", time.gmtime()))
    stmt.add_argument("--format", choices=("json", "csv"), default="json")
    stmt.set_defaults(handler=billing_statement)
    fix = billing_sub.add_parser("correct", help="post a correction of a billed request (a new entry, never an edit)")
    fix.add_argument("--config", type=Path, required=True)
    fix.add_argument("--request-id", required=True)
    fix.add_argument("--from", dest="debit", required=True,
                     help="account debited: tenant:<name>, provider:<peer id> or platform:fees")
    fix.add_argument("--to", dest="credit", required=True, help="account credited")
    fix.add_argument("--amount", type=int, required=True, help="minor units (micro-EUR)")
    fix.set_defaults(handler=billing_correct)
    from llorch.gateway import payouts_cli
    payouts_cli.add_commands(billing_sub)


def _period(text: str) -> str:
    if not PERIOD.match(text):
        raise argparse.ArgumentTypeError("a period is YYYY-MM")
    return text


def billing_reconcile(args: argparse.Namespace) -> int:
    try:
        config = load_gateway_config(args.config)
        key = load_key_file(config.key_file)
        report = trio.run(_reconcile, config.store(), key.public_key, args.period, int(args.grace_s * 1000),
                          args.post)
    except (NodeError, LedgerError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    document = report.as_json()
    print(json.dumps(document, indent=2))
    return 0 if document["ok"] else 1


async def _reconcile(path, gateway_key, period, grace_ms, post):
    async with open_gateway_db(path) as database:
        return await reconcile(database, gateway_key, period, now_ms(), grace_ms, post)


def billing_statement(args: argparse.Namespace) -> int:
    kind, subject = (("tenant", args.tenant) if args.tenant else ("provider", args.provider) if args.provider
                     else ("platform", None))
    try:
        config = load_gateway_config(args.config)
        statement = trio.run(_statement, config.store(), kind, subject, args.period)
    except (NodeError, LedgerError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(statement_csv(statement) if args.format == "csv" else json.dumps(statement, indent=2), end="" if
          args.format == "csv" else "\n")
    return 0


def billing_correct(args: argparse.Namespace) -> int:
    try:
        config = load_gateway_config(args.config)
        leg = trio.run(_correct, config.store(), args)
    except (NodeError, LedgerError, BooksError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"posted {leg} of {args.request_id}: {args.amount} from {args.debit} to {args.credit}")
    return 0


async def _correct(path, args):
    async with open_gateway_db(path) as database:
        return await Books(database).post_correction(args.request_id, args.debit, args.credit, args.amount,
                                                     int(time.time() * 1000))


async def _statement(path, kind, subject, period):
    async with open_gateway_db(path) as database:
        return await Books(database).statement(kind, subject, period)
