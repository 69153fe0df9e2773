"""`llorch gateway models add|list|retire|show`: the operator curates the catalog in the gateway's database
(gateway/catalog.py). A running gateway (every replica) publishes the new version within CATALOG_REFRESH_S, and the
nodes that trust it pick it up at their next question (node.catalog_poll_ms)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from llorch.gateway.catalog import CatalogBook
from llorch.node.models import (KINDS, SHA256_RE, CatalogEntry, CatalogError, entry_map, entry_of, hub_file,
                                split_pin)
from llorch.node.stream_io import now_ms

ADD_HELP = """Add a model to the catalog: either --entry FILE (one entry as JSON, in the form of the catalog file
inference/catalog.json and of `models show`) or the options below. The sha256 pins the whole GGUF file: nodes refuse
a file that does not hash to it, so take it from the publisher (the Hub shows it on the file's page as the LFS
"SHA256"), never from a mirror. Ids are never reused: a receipt names its model by id."""


def add_commands(gateway_subparsers) -> None:
    models = gateway_subparsers.add_parser(
        "models", help="curate the model catalog: add, list, retire, show",
        description="The catalog this gateway places on and publishes, signed, to its nodes (/llorch/catalog/1) "
                    "and at GET /v1/catalog. Every change makes a new version; nodes follow within "
                    "node.catalog_poll_ms.")
    sub = models.add_subparsers(dest="models_command", required=True)
    add = sub.add_parser("add", help="add a model (a new version of the catalog)", description=ADD_HELP)
    add.add_argument("--config", type=Path, required=True, help="gateway.toml")
    add.add_argument("--entry", type=Path, help="the entry as a JSON file (instead of the options below)")
    add.add_argument("--id", help="the model id customers send, e.g. qwen2.5-7b-instruct-q4_k_m")
    add.add_argument("--kind", choices=KINDS, help="instruct (chat and completions) or base (completions only)")
    add.add_argument("--sha256", help="sha256 of the GGUF file (64 hex digits)")
    add.add_argument("--size", type=int, help="size of the GGUF file in bytes")
    add.add_argument("--file-name", help="the file's name in a node's model cache (default: the Hub file's name)")
    add.add_argument("--context-tokens", type=int, help="the model's trained context length")
    add.add_argument("--chat-format", help="llama-cpp-python chat format (e.g. chatml, llama-3, gemma); "
                                           "required for an instruct model, none for a base model")
    add.add_argument("--license", help="e.g. Apache-2.0")
    add.add_argument("--hub", help="Hugging Face source: REPO@COMMIT:FILE (a 40-hex commit, not a branch)")
    add.add_argument("--url", action="append", default=[], help="a plain http(s) source (repeat for more)")
    add.add_argument("--shard", action="append", default=[], metavar="FILE:SHA256[:SIZE]",
                     help="a file of a model split in several (<prefix>-00001-of-00003.gguf, ...), in order, with "
                          "its own sha256 (repeat for each; --hub and --url then name the first file, and --sha256 "
                          "may be left out: it is computed from the shards' hashes)")
    add.add_argument("--memory-min", type=int, help="bytes a node needs for one slot (shown to home labs)")
    add.add_argument("--notes", default="", help="where the pin comes from, what could not be checked")
    add.set_defaults(handler=lambda args: _run(args, models_add))
    listing = sub.add_parser("list", help="every entry with its status (live or retired), newest version")
    listing.add_argument("--config", type=Path, required=True)
    listing.add_argument("--json", action="store_true", help="the entries as JSON")
    listing.set_defaults(handler=lambda args: _run(args, models_list))
    retire = sub.add_parser("retire", help="stop placing a model (kept, so receipts that cite it still verify)")
    retire.add_argument("model_id")
    retire.add_argument("--config", type=Path, required=True)
    retire.set_defaults(handler=lambda args: _run(args, models_retire))
    show = sub.add_parser("show", help="one entry as JSON, with its history (versions, adds, retirement)")
    show.add_argument("model_id")
    show.add_argument("--config", type=Path, required=True)
    show.set_defaults(handler=lambda args: _run(args, models_show))


def _run(args: argparse.Namespace, command) -> int:
    from llorch.gateway.admin_cli import _run as run_on_database

    try:
        return run_on_database(args, command)
    except CatalogError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def entry_from_args(args: argparse.Namespace) -> CatalogEntry:
    """The entry ``add`` was given, checked as strictly as the catalog file's (CatalogError names the problem)."""
    if args.entry is not None:
        try:
            item = json.loads(args.entry.read_text())
        except (OSError, ValueError) as exc:
            raise CatalogError(f"cannot read the entry {args.entry}: {exc}") from None
        return entry_of(item, str(args.entry))
    shards = [shard_of(text) for text in args.shard]
    if shards and args.sha256 is None:
        args.sha256 = split_pin([shard["sha256"] for shard in shards])
    missing = [flag for flag, value in (("--id", args.id), ("--kind", args.kind), ("--sha256", args.sha256),
                                        ("--context-tokens", args.context_tokens), ("--license", args.license))
               if value is None]
    if args.hub is None and not args.url:
        missing.append("--hub or --url")
    if missing:
        raise CatalogError(f"models add needs {', '.join(missing)} (or --entry FILE)")
    hub = hub_file(args.hub) if args.hub else None
    file_name = args.file_name or (hub.filename.rsplit("/", 1)[-1] if hub else args.url[0].rsplit("/", 1)[-1])
    if args.sha256 and not SHA256_RE.fullmatch(args.sha256.lower()):
        raise CatalogError(f"--sha256 must be 64 hex digits, not {args.sha256!r}")
    item = {"id": args.id, "kind": args.kind, "sha256": args.sha256.lower(), "size_bytes": args.size,
            "file_name": file_name, "context_tokens": args.context_tokens, "license": args.license,
            "chat_format": args.chat_format, "hub": None if hub is None else {
                "repo": hub.repo, "revision": hub.revision, "filename": hub.filename},
            "urls": args.url, "notes": args.notes, "memory_min_bytes": args.memory_min, "shards": shards}
    if shards and args.size is None and all(shard["size_bytes"] for shard in shards):
        item["size_bytes"] = sum(shard["size_bytes"] for shard in shards)
    return entry_of(item, "the new entry")


def shard_of(text: str) -> dict:
    """``FILE:SHA256[:SIZE]`` as a shard map."""
    name, _, rest = text.partition(":")
    digest, _, size = rest.partition(":")
    if not name or not SHA256_RE.fullmatch(digest.lower()) or (size and not size.isdigit()):
        raise CatalogError(f"--shard takes FILE:SHA256[:SIZE] (64 hex digits, a size in bytes), not {text!r}")
    return {"file_name": name, "sha256": digest.lower(), "size_bytes": int(size) if size else None}


async def models_add(database, args) -> int:
    entry = entry_from_args(args)
    version = await CatalogBook(database).add(entry, now_ms())
    print(f"catalog version {version}: added {entry.id} (sha256 {entry.sha256}); running gateways publish it "
          f"within seconds, and nodes that name it in node.models fetch and serve it", file=sys.stderr)
    return 0


async def models_retire(database, args) -> int:
    version = await CatalogBook(database).retire(args.model_id, now_ms())
    print(f"catalog version {version}: retired {args.model_id}; it is no longer placed, and its receipts still "
          f"verify", file=sys.stderr)
    return 0


async def models_list(database, args) -> int:
    catalog, issued_ms = await CatalogBook(database).current()
    if args.json:
        print(json.dumps({"version": catalog.version, "issued_ms": issued_ms,
                          "entries": [entry_map(e) for _, e in sorted(catalog.entries.items())]}, indent=2))
        return 0
    print(f"catalog version {catalog.version} ({_when(issued_ms)})")
    print("id\tstatus\tkind\tsize\tcontext\tlicense\tsources\tsha256")
    for _, entry in sorted(catalog.entries.items()):
        status = "live" if entry.retired_ms is None else f"retired {_when(entry.retired_ms)}"
        size = f"{entry.size_bytes / 2**30:.2f} GiB" if entry.size_bytes else "?"
        print(f"{entry.id}\t{status}\t{entry.kind}\t{size}\t{entry.context_tokens}\t{entry.license}\t"
              f"{_sources(entry)}\t{entry.sha256}")
    return 0


async def models_show(database, args) -> int:
    book = CatalogBook(database)
    catalog, _ = await book.current()
    entry = catalog.lookup(args.model_id)
    history = [{"version": c.version, "action": c.action, "at_ms": c.at_ms} for c in await book.changes(entry.id)]
    print(json.dumps({"entry": entry_map(entry), "history": history}, indent=2))
    return 0


def _sources(entry: CatalogEntry) -> str:
    names = ["registry"] if entry.parts else []
    names += [f"hub {entry.hub.repo}@{entry.hub.revision[:12]}"] if entry.hub else []
    return ", ".join(names + list(entry.urls)) or "-"


def _when(ms: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ms / 1000)) if ms else "built in"
