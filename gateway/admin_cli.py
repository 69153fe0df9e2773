"""`llorch gateway tenants ...` and `llorch gateway providers ...`: the operator's commands, against the gateway's
database (the running gateway sees every change at its next request)."""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import trio

from llorch.gateway.config import load_gateway_config
from llorch.gateway.db import MIGRATIONS, SCHEMA_VERSION, applied_versions, open_gateway_db, upgrade
from llorch.gateway.market.providers import ProviderBook, ProviderError, record_json
from llorch.gateway.books.postings import period_of
from llorch.gateway.market.sla import sla_report
from llorch.gateway.spot_checks import check_outcomes, evidence_document_of, evidence_list
from llorch.gateway.market.tenants import TIERS, TenantBook, TenantError, format_amount, parse_amount
from llorch.gateway.witness.witness import WitnessBook
from llorch.ledger.errors import EncodingError, LedgerError
from llorch.ledger.signing import load_key_file, public_key_of_peer_id
from llorch.node.wire.invitation import INVITATION_DAYS_MAX, INVITATION_VALIDITY_MS_MAX
from llorch.node.errors import NodeError
from llorch.node.stream_io import now_ms


def add_commands(gateway_subparsers) -> None:
    tenants = gateway_subparsers.add_parser("tenants", help="manage tenants (customers) and their API keys")
    tenants_sub = tenants.add_subparsers(dest="tenants_command", required=True)
    add = tenants_sub.add_parser("add", help="create a tenant; prints its API key once (only a hash is stored)")
    add.add_argument("name")
    _tenant_options(add, creating=True)
    add.set_defaults(handler=lambda args: _run(args, tenants_add))
    update = tenants_sub.add_parser("update", help="change a tenant's tier, budget, flags or limits")
    update.add_argument("name")
    _tenant_options(update, creating=False)
    update.set_defaults(handler=lambda args: _run(args, tenants_update))
    listing = tenants_sub.add_parser("list", help="list tenants with limits and spend")
    listing.add_argument("--config", type=Path, required=True)
    listing.set_defaults(handler=lambda args: _run(args, tenants_list))
    revoke = tenants_sub.add_parser("revoke", help="revoke a tenant's API key (takes effect at once)")
    revoke.add_argument("name")
    revoke.add_argument("--config", type=Path, required=True)
    revoke.set_defaults(handler=lambda args: _run(args, tenants_revoke))

    providers = gateway_subparsers.add_parser(
        "providers", help="approve, certify, suspend or readmit registered providers; review fork and spot-check evidence")
    providers_sub = providers.add_subparsers(dest="providers_command", required=True)
    for action, text in (("approve", "allow placement on a registered provider"),
                         ("certify", "certify a provider's geo claim (counts for EU-only tenants)"),
                         ("suspend", "stop placing requests on a provider"),
                         ("list", "list registered providers")):
        parser = providers_sub.add_parser(action, help=text)
        if action != "list":
            parser.add_argument("peer", help="the provider's peer id")
        parser.add_argument("--config", type=Path, required=True)
        parser.set_defaults(handler=lambda args, action=action: _run(args, providers_action, action))
    forks = providers_sub.add_parser("forks", help="list every fork the witness caught, with its evidence")
    forks.add_argument("--config", type=Path, required=True)
    forks.set_defaults(handler=lambda args: _run(args, providers_forks))
    evidence = providers_sub.add_parser(
        "evidence", help="list spot-check evidence against providers, or write one to a file",
        description="Without ID: every disagreement a spot-check found, oldest first (JSON: id, request_id, suspect "
                    "or null when undecided, providers, found_ms, credited_requests). With ID --out FILE: the "
                    "evidence file (docs/verification.md §5), which anyone checks offline with `llorch ledger "
                    "check-evidence FILE`. It holds the customer's prompt and the outputs: share it only with "
                    "the parties to the dispute.")
    evidence.add_argument("id", nargs="?", type=int, help="the evidence to write")
    evidence.add_argument("--out", type=Path, help="where to write it (with ID)")
    evidence.add_argument("--config", type=Path, required=True)
    evidence.set_defaults(handler=lambda args: _run(args, providers_evidence))
    checks = providers_sub.add_parser(
        "checks", help="what became of every spot-check draw: clean, caught, undecided, dropped, expired",
        description="Counts of the spot-check draws decided in the window, by outcome, and the latest draws that "
                    "did not end clean with the reason (docs/verification.md §2). Dropped: nobody could check it "
                    "(the queue was full, or no other provider of the class exists); expired: checkers exist but "
                    "none took the re-run before the deadline.")
    checks.add_argument("--since-hours", type=float, default=24.0, help="the window (default: 24 hours)")
    checks.add_argument("--json", action="store_true", help="the report as JSON")
    checks.add_argument("--config", type=Path, required=True)
    checks.set_defaults(handler=lambda args: _run(args, providers_checks))
    sla = providers_sub.add_parser(
        "sla", help="each provider's month against its registered SLA, from the gateway's own clocks",
        description="Per registered provider (JSON): uptime_ppm (the share of 5-minute buckets with an attestation, "
                    "times the share of probes answered), ttft_ms_p50/p95 and tokens_per_s_p50 over its finished "
                    "tickets, the SLA it registered, and met (true/false; null: too few observations yet). "
                    "Providers that miss it are placed after those that do (docs/verification.md §7).")
    sla.add_argument("--month", help="YYYY-MM (UTC; default: this month)")
    sla.add_argument("--config", type=Path, required=True)
    sla.set_defaults(handler=lambda args: _run(args, providers_sla))
    readmit = providers_sub.add_parser(
        "readmit", help="let a provider excluded for a fork back, after reviewing its evidence",
        description="For a fork its own operator caused (e.g. two node processes on one ledger). The evidence "
                    "stays in the fork history with your note; the witness starts a new epoch on the ledger the "
                    "provider shows now, and a later fork is caught again.")
    readmit.add_argument("peer", help="the provider's peer id")
    readmit.add_argument("--note", required=True, help="what you reviewed and why you readmit (kept with the evidence)")
    readmit.add_argument("--config", type=Path, required=True)
    readmit.set_defaults(handler=lambda args: _run(args, providers_readmit))

    init = gateway_subparsers.add_parser(
        "init", help="write a commented gateway.toml and the gateway's key (asks only for the public host name)",
        description="Creates the gateway's key (0600) and a commented gateway.toml (default ~/.config/llorch/"
                    "gateway.toml) whose HTTP API and libp2p port listen on every interface, with public_url "
                    "http://HOST:8000; the host name is asked (a terminal or a pipe) unless --host gives it. Both "
                    "ports must be reachable at that host: nodes dial the libp2p port at the host of the URL.")
    init.add_argument("--host", help="the public host name (or IP address) customers and nodes reach it at")
    init.add_argument("--config", type=Path, help="where to write gateway.toml (default: ~/.config/llorch/gateway.toml)")
    init.add_argument("--http-port", type=int, default=8000, help="HTTP API port (default 8000)")
    init.add_argument("--p2p-port", type=int, default=4001, help="libp2p TCP port (default 4001)")
    init.add_argument("--public-url", help="the URL customers and nodes use, when a TLS proxy fronts the API "
                                           "(default http://HOST:HTTP_PORT)")
    init.add_argument("--force", action="store_true", help="write a new gateway.toml over an existing one")
    init.add_argument("--non-interactive", action="store_true", help="never ask: fail without --host")
    init.set_defaults(handler=gateway_init)

    invite = providers_sub.add_parser(
        "invite", help="make a single-use join token: a home lab that runs `llorch node init --token TOKEN` joins "
                       "approved, with no step of yours",
        description="Prints a signed, single-use join token (one line). The home lab runs `llorch node init --token "
                    "TOKEN`: its node registers pre-approved, and with --certify-geo its geo claim is certified when "
                    "it claims that country (a claim of another country is refused). The token names this gateway's "
                    "public URL (gateway.public_url) and key; anyone holding it can join once, so send it privately. "
                    "`providers invites` lists tokens and who used them; `providers revoke-invite ID` ends an unused "
                    "one.")
    invite.add_argument("--config", type=Path, required=True)
    invite.add_argument("--certify-geo", metavar="CC", help="certify the node's geo claim if it is this ISO 3166-1 "
                                                             "alpha-2 country (you vouch for where it is)")
    invite.add_argument("--expires", default="7d", help="how long the token can be used: 30m, 12h, 7d (default 7d, "
                                                        "at most 90d)")
    invite.add_argument("--note", default="", help="who it is for (shown in `providers invites`)")
    invite.add_argument("--url", help="the gateway URL the node registers at (default: gateway.public_url, else "
                                      "http://<http_host>:<http_port>)")
    invite.set_defaults(handler=lambda args: _run(args, providers_invite))
    invites = providers_sub.add_parser("invites", help="list the join tokens made (open, used by whom, expired, "
                                                       "revoked)")
    invites.add_argument("--config", type=Path, required=True)
    invites.set_defaults(handler=lambda args: _run(args, providers_invites))
    revoke_invite = providers_sub.add_parser("revoke-invite", help="end an unused join token")
    revoke_invite.add_argument("id", help="its invite_id (from `providers invites`)")
    revoke_invite.add_argument("--config", type=Path, required=True)
    revoke_invite.set_defaults(handler=lambda args: _run(args, providers_revoke_invite))

    token = gateway_subparsers.add_parser(
        "operator-token", help="make the operator console's sign-in token (prints it once; the old one stops working)",
        description="The operator console (/operator on the gateway's HTTP address) signs in with this token, never "
                    "with a tenant's API key. Only its SHA-256 is kept, in <db_path>.operator-token (mode 0600); "
                    "making a new token ends every session signed in with the old one.")
    token.add_argument("--config", type=Path, required=True)
    token.set_defaults(handler=operator_token)

    db = gateway_subparsers.add_parser("db", help="the gateway database's schema version and migrations")
    db_sub = db.add_subparsers(dest="db_command", required=True)
    for action, text in (("status", "print the schema version, the migrations applied (when) and those pending; "
                                    "changes nothing"),
                         ("upgrade", "apply the pending migrations (a starting gateway applies them too)")):
        parser = db_sub.add_parser(action, help=text)
        parser.add_argument("--config", type=Path, required=True, help="gateway.toml (its database setting)")
        parser.set_defaults(handler=lambda args, action=action: _run(args, db_status if action == "status"
                                                                      else db_upgrade, migrate=False))


def gateway_init(args: argparse.Namespace) -> int:
    from llorch.gateway.init import initialise
    from llorch.node.config import asker

    say = lambda message: print(message, file=sys.stderr)    # noqa: E731 - the path goes to stdout
    ask = asker(sys.stdin, not args.non_interactive,
                lambda question: print(question, end="", file=sys.stderr, flush=True))
    try:
        path = initialise(ask, args.config, args.host, args.http_port, args.p2p_port, args.public_url, args.force,
                          log=say)
    except (NodeError, LedgerError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(path)
    return 0


def operator_token(args: argparse.Namespace) -> int:
    from llorch.gateway.api.sessions import new_operator_token, operator_token_file

    try:
        config = load_gateway_config(args.config)
        token = new_operator_token(config.db_path)
    except (NodeError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(token)
    print(f"operator token made; the token above is shown once and only its SHA-256 is kept "
          f"({operator_token_file(config.db_path)}); sign in at /operator", file=sys.stderr)
    return 0


def _tenant_options(parser, creating: bool) -> None:
    parser.add_argument("--config", type=Path, required=True, help="gateway.toml")
    parser.add_argument("--tier", choices=TIERS, default="hobby" if creating else None)
    parser.add_argument("--budget", help="budget in EUR, e.g. 25.00 (exact; default unlimited)")
    flag = argparse.BooleanOptionalAction
    parser.add_argument("--eu-only", action=flag, default=False if creating else None,
                        help="serve only on operator-certified EU providers; never elsewhere")
    parser.add_argument("--require-determinism", action=flag, default=False if creating else None,
                        help="serve only on providers in the pinned determinism class")
    parser.add_argument("--spot-checks", action=flag, default=False if creating else None,
                        help="allow a sample of this tenant's requests (prompt included) to be re-run on a second "
                             "provider of the same determinism class to catch a cheating provider (default: off; "
                             "an EU-only tenant's are re-run only on certified EU providers)")
    parser.add_argument("--models", help="comma-separated catalog model ids (default: all)")
    parser.add_argument("--rps", type=int, help="requests per second (token bucket)")
    parser.add_argument("--max-concurrent", type=int, help="requests in flight at once")


def _run(args: argparse.Namespace, command, *extra, migrate: bool = True) -> int:
    try:
        config = load_gateway_config(args.config)
        args.gateway_config = config
        args.bootstrap_tenant = config.tenant if config.api_key_sha256 else None
        args.probe_tenant = config.probe_tenant
        return trio.run(_with_db, config.store(), command, args, migrate, *extra)
    except (TenantError, ProviderError, NodeError, LedgerError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


async def _with_db(where, command, args, migrate: bool, *extra) -> int:
    async with open_gateway_db(where, migrate=migrate) as database:
        return await command(database, args, *extra)


async def db_status(database, args) -> int:
    applied = await applied_versions(database)
    where = database.engine.where
    print(f"database {where} ({database.engine.name}): schema version {max(applied, default=0)}; this gateway "
          f"speaks {SCHEMA_VERSION}")
    for migration in MIGRATIONS:
        at = applied.get(migration.version)
        when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(at / 1000)) if at else "pending"
        print(f"  {migration.version}  {when:<23}  {migration.description}")
    return 0


async def db_upgrade(database, args) -> int:
    done = await upgrade(database)
    for migration in done:
        print(f"applied {migration.version}: {migration.description}")
    print(f"schema version {SCHEMA_VERSION}" + ("" if done else " (nothing to do)"))
    return 0


async def tenants_add(database, args) -> int:
    if args.name == args.bootstrap_tenant:
        raise TenantError(f"{args.name!r} is the bootstrap key's tenant (gateway.tenant): pick another name")
    models = args.models.split(",") if args.models else None
    budget = parse_amount(args.budget) if args.budget is not None else None
    key = await TenantBook(database).add(args.name, args.tier, budget, args.eu_only, args.require_determinism,
                                         models, args.rps, args.max_concurrent, now_ms(), args.spot_checks)
    print(key)
    print(f"tenant {args.name} created; the API key above is shown once and stored only as a hash",
          file=sys.stderr)
    return 0


async def tenants_update(database, args) -> int:
    changes = {name: value for name, value in (
        ("tier", args.tier), ("budget_minor", parse_amount(args.budget) if args.budget is not None else None),
        ("eu_only", args.eu_only), ("require_determinism", args.require_determinism),
        ("models", args.models.split(",") if args.models else None), ("rps", args.rps),
        ("max_concurrent", args.max_concurrent), ("spot_checks", args.spot_checks)) if value is not None}
    tenant = await TenantBook(database).update(args.name, **changes)
    print(json.dumps(_tenant_json(tenant), indent=2))
    return 0


async def tenants_list(database, args) -> int:
    print(json.dumps([_tenant_json(t) for t in await TenantBook(database).list()], indent=2))
    return 0


async def tenants_revoke(database, args) -> int:
    await TenantBook(database).revoke(args.name)
    print(f"tenant {args.name}: API key revoked")
    return 0


def _tenant_json(tenant) -> dict:
    return {"name": tenant.name, "tier": tenant.tier, "budget": format_amount(tenant.budget_minor),
            "spent": format_amount(tenant.spent_minor), "eu_only": tenant.eu_only,
            "require_determinism": tenant.require_determinism, "models": list(tenant.models or []) or "all",
            "rps": tenant.rps, "max_concurrent": tenant.max_concurrent, "spot_checks": tenant.spot_checks,
            "revoked": tenant.revoked}


async def providers_forks(database, args) -> int:
    print(json.dumps(await WitnessBook(database).fork_history(), indent=2))
    return 0


async def providers_evidence(database, args) -> int:
    if args.id is None:
        print(json.dumps(await evidence_list(database), indent=2))
        return 0
    if args.out is None:
        raise ProviderError("give --out FILE to write evidence ID to")
    document = await evidence_document_of(database, args.id)
    if document is None:
        raise ProviderError(f"there is no evidence {args.id} (`llorch gateway providers evidence` lists them)")
    try:
        args.out.write_text(document + "\n", encoding="utf-8")
    except OSError as exc:
        raise ProviderError(f"cannot write {args.out}: {exc}") from None
    print(f"evidence {args.id} written to {args.out}; check it with `llorch ledger check-evidence {args.out}`")
    return 0


async def providers_checks(database, args) -> int:
    if not 0 < args.since_hours <= 24 * 366:
        raise ProviderError("--since-hours must be above 0 and at most a year")
    report = await check_outcomes(database, now_ms() - int(args.since_hours * 3_600_000))
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    outcomes = ", ".join(f"{name} {count}" for name, count in report["outcomes"].items())
    print(f"spot-check draws decided in the last {args.since_hours:g} h: {report['drawn']} ({outcomes})")
    for row in report["not_clean"]:
        print(f"  {row['outcome']:9s} {row['request_id']} {row['provider'] or '-'}: {row['reason']}")
    return 0


async def providers_sla(database, args) -> int:
    now = now_ms()
    month = args.month if args.month is not None else period_of(now)
    report = await sla_report(database, month, now, args.probe_tenant)
    print(json.dumps([figures.to_json() for figures in report], indent=2))
    return 0


async def providers_readmit(database, args) -> int:
    if not args.note.strip():
        raise ProviderError("--note must say what was reviewed")
    try:
        key = public_key_of_peer_id(args.peer)
    except EncodingError:
        raise ProviderError(f"{args.peer!r} is not a peer id") from None
    await WitnessBook(database).readmit(key, args.note.strip(), now_ms())
    print(f"provider {args.peer} readmitted; the fork evidence stays in `llorch gateway providers forks`")
    return 0


DURATION = re.compile(r"([1-9][0-9]{0,5})([mhd])")
DURATION_MS = {"m": 60_000, "h": 3_600_000, "d": 86_400_000}


def parse_duration_ms(text: str) -> int:
    match = DURATION.fullmatch(text.strip())
    if match is None:
        raise ProviderError(f"--expires {text!r}: give a number and m, h or d (30m, 12h, 7d)")
    milliseconds = int(match[1]) * DURATION_MS[match[2]]
    if milliseconds > INVITATION_VALIDITY_MS_MAX:
        raise ProviderError(f"--expires {text}: a join token lasts at most {INVITATION_DAYS_MAX} days")
    return milliseconds


async def providers_invite(database, args) -> int:
    config = args.gateway_config
    country = (args.certify_geo or "").strip().upper() or None
    if country is not None and not re.fullmatch(r"[A-Z]{2}", country):
        raise ProviderError(f"--certify-geo {args.certify_geo!r} is not a two-letter ISO 3166-1 code (e.g. DE)")
    lasts_ms = parse_duration_ms(args.expires)
    url = (args.url or config.base_url()).rstrip("/")
    issued = now_ms()
    try:
        token = await ProviderBook(database).make_invite(load_key_file(config.key_file), url, country, issued,
                                                         issued + lasts_ms, args.note[:200])
    except EncodingError as exc:
        raise ProviderError(f"cannot make that token: {exc}") from None
    print(token)
    until = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime((issued + lasts_ms) / 1000))
    print(f"join token made: single use, until {until}" + (f", certifies a machine in {country}" if country else "")
          + f", registers at {url}.\nThe home lab runs:  llorch node init --token <the token above>", file=sys.stderr)
    return 0


async def providers_invites(database, args) -> int:
    now = now_ms()
    print(json.dumps([invite.json(now) for invite in await ProviderBook(database).invites()], indent=2))
    return 0


async def providers_revoke_invite(database, args) -> int:
    invite = await ProviderBook(database).revoke_invite(args.id, now_ms())
    print(json.dumps(invite.json(now_ms()), indent=2))
    if invite.state(now_ms()) != "revoked":
        print(f"error: invitation {args.id} is {invite.state(now_ms())}: nothing to revoke", file=sys.stderr)
        return 1
    return 0


async def providers_action(database, args, action: str) -> int:
    book = ProviderBook(database)
    if action == "list":
        print(json.dumps([record_json(r) for r in await book.all()], indent=2, ensure_ascii=False))
        return 0
    record = await (book.certify_geo(args.peer) if action == "certify" else
                    book.set_status(args.peer, {"approve": "approved", "suspend": "suspended"}[action]))
    print(json.dumps(record_json(record), indent=2, ensure_ascii=False))
    return 0
