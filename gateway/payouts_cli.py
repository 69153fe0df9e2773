"""`llorch billing payouts run|list|show|mark-paid|mark-failed`: paying providers, from the gateway's database.

`run` plans the month (gateway/books/payouts.py: balances, signed statements), has the rail (gateway/rails.py: a
SEPA credit transfer file, validated against the XSD) render its files, writes them into a temporary directory,
records the run whole in one transaction, then moves the directory into place: killed at any point, either nothing
happened (run it again) or the run is recorded and its files are written from the database by the next `run` or by
`show RUN --out DIR`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import sys
import time
from pathlib import Path

import trio

from llorch.gateway.books import payouts
from llorch.gateway.books.payouts import Account, PayoutError
from llorch.gateway.books.reconcile import replica_keys
from llorch.gateway.config import GatewayConfig, load_gateway_config
from llorch.gateway.db import open_gateway_db
from llorch.gateway.market.providers import ProviderBook
from llorch.gateway import rails
from llorch.ledger.errors import LedgerError
from llorch.ledger.money import parse_cents, readable
from llorch.ledger.signing import load_key_file
from llorch.node.errors import NodeError
from llorch.node.stream_io import now_ms


def add_commands(billing_sub) -> None:
    payout = billing_sub.add_parser("payouts", help="pay providers: monthly runs, SEPA files, signed statements")
    sub = payout.add_subparsers(dest="payouts_command", required=True)
    run = sub.add_parser(
        "run", help="pay every provider's unpaid balance at the month's end (at or above --min); carry the rest",
        description="Computes each provider's unpaid balance from the books (earnings minus corrections, minus what "
                    "earlier runs paid), pays every balance of at least --min to the provider's registered payout "
                    "account, and writes into --out/<run id>/: the SEPA credit transfer file (pain.001.001.09, "
                    "validated against the XSD), one signed statement per provider (statements/<peer id>."
                    "statement: the provider checks it with `llorch ledger check-payout`) and run.json. The postings "
                    "move the paid amounts to platform:payouts-outgoing in the same transaction that records the "
                    "run. Running a month again pays only what arrived since.")
    run.add_argument("--config", type=Path, required=True)
    run.add_argument("--month", required=True, help="YYYY-MM (UTC)")
    run.add_argument("--min", dest="minimum", help="the smallest balance paid, EUR (default gateway.payout_min)")
    run.add_argument("--out", type=Path, required=True, help="directory for the run's files")
    run.add_argument("--execution-date", help="the date the bank executes the transfers, YYYY-MM-DD "
                                              "(default: tomorrow)")
    run.add_argument("--dry-run", action="store_true", help="show what would be paid; write and record nothing")
    run.add_argument("--settled-s", type=int, help="cover only postings at least this old (default: 0 on SQLite; 60 on "
                                                   "PostgreSQL, where replicas' commits may land out of id order)")
    run.set_defaults(handler=lambda args: _run(args, payouts_run))
    listing = sub.add_parser("list", help="every run: month, total, state")
    listing.add_argument("--config", type=Path, required=True)
    listing.set_defaults(handler=lambda args: _run(args, payouts_list))
    show = sub.add_parser("show", help="one run's statements (IBANs masked); --out writes its files again")
    show.add_argument("run_id")
    show.add_argument("--config", type=Path, required=True)
    show.add_argument("--out", type=Path, help="write the run's files (as the run wrote them) into OUT/<run id>/")
    show.set_defaults(handler=lambda args: _run(args, payouts_show))
    paid = sub.add_parser("mark-paid", help="the bank confirmed the run's transfers")
    paid.add_argument("run_id")
    paid.add_argument("--config", type=Path, required=True)
    paid.set_defaults(handler=lambda args: _run(args, payouts_mark_paid))
    failed = sub.add_parser("mark-failed", help="the bank returned one transfer: its amount goes back to the "
                                                "provider's balance, paid by the next run")
    failed.add_argument("run_id")
    failed.add_argument("provider", help="the provider's peer id")
    failed.add_argument("--config", type=Path, required=True)
    failed.set_defaults(handler=lambda args: _run(args, payouts_mark_failed))


def _run(args: argparse.Namespace, command) -> int:
    try:
        config = load_gateway_config(args.config)
        return trio.run(_with_db, config, command, args)
    except (NodeError, LedgerError, PayoutError, rails.RailError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


async def _with_db(config: GatewayConfig, command, args) -> int:
    async with open_gateway_db(config.store()) as database:
        return await command(database, config, args)


def parse_eur(text: str, what: str) -> int:
    try:
        return parse_cents(text)
    except ValueError as exc:
        raise PayoutError(f"{what} {exc}") from None


async def accounts_of(database) -> dict[str, Account]:
    """Each provider's payout account from its newest signed registration (checked again: a registration stored
    before the check existed is held to it here)."""
    found = {}
    for record in await ProviderBook(database).all():
        payout = record.registration.payout
        if payout is None:
            continue
        try:
            account = rails.check_account(payout["holder"], payout["iban"], payout["bic"], payout["currency"])
        except rails.IbanError:
            continue
        found[record.provider_id] = Account(account.holder, account.iban, account.bic, account.masked())
    return found


def debtor_of(config: GatewayConfig) -> rails.PayoutAccount:
    if not config.payout_debtor_iban:
        raise PayoutError("gateway.payout_debtor_name, payout_debtor_iban and payout_debtor_bic (the platform's own "
                          "account, which the transfers are paid from) are not set in the gateway's config")
    try:
        return rails.check_account(config.payout_debtor_name, config.payout_debtor_iban,
                                   config.payout_debtor_bic or None, "EUR")
    except rails.IbanError as exc:
        raise PayoutError(f"gateway.payout_debtor_*: {exc}") from None


async def payouts_run(database, config: GatewayConfig, args) -> int:
    minimum = parse_eur(args.minimum if args.minimum is not None else config.payout_min, "--min")
    key = load_key_file(config.key_file)
    out = Path(args.out)
    await _complete_written_runs(database, out, args.month)
    now = now_ms()
    plan = await payouts.plan_run(database, key, args.month, minimum, await accounts_of(database),
                                  sorted(await replica_keys(database)), now, args.settled_s)
    for provider, reason in sorted(plan.waiting.items()):
        print(f"waiting: {provider}: {reason}", file=sys.stderr)
    print(_plan_text(plan), file=sys.stderr)
    if not plan.items:
        print(f"nothing new to state or pay for {args.month}", file=sys.stderr)
        return 0
    execution = datetime.date.fromisoformat(args.execution_date) if args.execution_date else \
        datetime.datetime.fromtimestamp(now / 1000, datetime.timezone.utc).date() + datetime.timedelta(days=1)
    rail = rails.SepaCreditTransfer()
    files: dict[str, bytes] = {}
    if plan.paying:
        header = rails.RunHeader(run_id=f"llorch-{plan.run_id}", created_ms=plan.created_ms,
                                 execution_date=execution, debtor=debtor_of(config),
                                 debtor_name=config.payout_debtor_name)
        instructions = [rails.PayoutInstruction(
            provider_id=item.provider_id, account=rails.check_account(item.account.holder, item.account.iban,
                                                                      item.account.bic, "EUR"),
            amount_minor=item.amount, end_to_end_id=f"{plan.run_id}-{index + 1}",
            remittance=f"llorch payout {plan.month} run {plan.run_id}") for index, item in enumerate(plan.paying)
            if item.account is not None]
        files = rail.render(header, instructions)
    if args.dry_run:
        print(json.dumps({"run_id": plan.run_id, "dry_run": True, "items": _items_json(plan)}, indent=2,
                         ensure_ascii=False))
        return 0
    staging = out / f".{plan.run_id}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    _write_files(staging, {**files, **{f"statements/{item.provider_id}.statement": item.envelope
                                       for item in plan.items}})
    await payouts.record_run(database, plan, rail.name, files)
    (staging / "run.json").write_bytes((await payouts.run_files(database, plan.run_id))["run.json"])
    os.replace(staging, out / plan.run_id)
    print(json.dumps({"run_id": plan.run_id, "directory": str(out / plan.run_id), "items": _items_json(plan)},
                     indent=2, ensure_ascii=False))
    return 0


async def _complete_written_runs(database, out: Path, month: str) -> None:
    """Every recorded run of ``month`` has its directory in ``out``: one whose files never got there (the command
    was killed after the run was recorded) is written from the database, through a temporary directory."""
    for run in await payouts.runs(database):
        target = out / run["run_id"]
        if run["month"] != month or target.exists():
            continue
        partial = out / f".{run['run_id']}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        _write_files(partial, await payouts.run_files(database, run["run_id"]))
        os.replace(partial, target)
        print(f"completed run {run['run_id']}: its files were not in {out}; written from the database",
              file=sys.stderr)


def _write_files(directory: Path, files: dict[str, bytes]) -> None:
    for name, content in files.items():
        path = directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)


def _items_json(plan: payouts.Plan) -> list[dict]:
    return [{"provider_id": item.provider_id, "paid": readable(item.amount), "carried": readable(item.carried),
             "paid_minor": item.amount, "carried_minor": item.carried, "account": item.account.masked
             if item.account else None, "receipts": item.receipts} for item in plan.items]


def _plan_text(plan: payouts.Plan) -> str:
    return (f"run {plan.run_id}: {len(plan.paying)} of {len(plan.items)} provider(s) paid, "
            f"{readable(plan.total)} in all; {len(plan.waiting)} waiting")


async def payouts_list(database, config, args) -> int:
    print(json.dumps([{**run, "total": readable(run["total_minor"]), "created": _utc(run["created_ms"])}
                      for run in await payouts.runs(database)], indent=2, ensure_ascii=False))
    return 0


async def payouts_show(database, config, args) -> int:
    items = await payouts.run_items(database, args.run_id)
    print(json.dumps([{**item, "amount": readable(item["amount_minor"]), "carried": readable(item["carried_minor"])}
                      for item in items], indent=2, ensure_ascii=False))
    if args.out:
        target = Path(args.out) / args.run_id
        _write_files(target, await payouts.run_files(database, args.run_id))
        print(f"wrote {target}", file=sys.stderr)
    return 0


async def payouts_mark_paid(database, config, args) -> int:
    run = await payouts.mark_paid(database, args.run_id, now_ms())
    print(json.dumps(run, indent=2, ensure_ascii=False))
    return 0


async def payouts_mark_failed(database, config, args) -> int:
    result = await payouts.mark_failed(database, args.run_id, args.provider, now_ms())
    print(json.dumps({**result, "returned": readable(result["returned_minor"])}, indent=2, ensure_ascii=False))
    return 0


def _utc(ms: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ms // 1000))
