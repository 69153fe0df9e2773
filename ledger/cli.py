"""`llorch ledger ...` and `llorch keys ...`: the auditor's and the key holder's commands."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ledger.errors import KeyFileError, StoreError, VerificationError
from ledger.signing import SigningKey, write_key_file
from ledger.verify import verify_ledger_file

EXIT_OK, EXIT_FAILED, EXIT_UNUSABLE = 0, 1, 2


def add_commands(subparsers) -> None:
    keys = subparsers.add_parser("keys", help="create node and gateway keys")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    new = keys_sub.add_parser("new", help="write a new Ed25519 key file (mode 0600); prints its peer id")
    new.add_argument("path", type=Path)
    new.set_defaults(handler=keys_new)

    ledger = subparsers.add_parser("ledger", help="audit a provider's ledger offline")
    ledger_sub = ledger.add_subparsers(dest="ledger_command", required=True)
    verify = ledger_sub.add_parser(
        "verify", help="check every receipt's encoding, signature, index, chain link, uniqueness and amount",
        description="Exit 0 if every entry passes; 1 naming the first bad entry and the failed check; "
                    "2 if the file cannot be read.")
    verify.add_argument("path", type=Path, help="the node's ledger SQLite file")
    verify.add_argument("--json", action="store_true", help="print a machine-readable report")
    verify.set_defaults(handler=ledger_verify)


def keys_new(args: argparse.Namespace) -> int:
    key = SigningKey.generate()
    try:
        write_key_file(args.path, key)
    except (KeyFileError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_UNUSABLE
    print(key.peer_id)
    return EXIT_OK


def ledger_verify(args: argparse.Namespace) -> int:
    try:
        report = verify_ledger_file(args.path)
    except StoreError as exc:
        _emit(args, {"ok": False, "error": str(exc)}, f"error: {exc}")
        return EXIT_UNUSABLE
    except VerificationError as exc:
        _emit(args, {"ok": False, "check": exc.check, "code": exc.code, "entry": exc.entry, "message": exc.message},
              f"FAIL {exc}")
        return EXIT_FAILED
    _emit(args, {"ok": True, "entries": report.entries, "origin": report.origin,
                 "head_sha256": report.head_sha256.hex()},
          f"OK: {report.entries} entries of {report.origin or 'an empty ledger'} verified; "
          f"head {report.head_sha256.hex()}")
    return EXIT_OK


def _emit(args: argparse.Namespace, document: dict, text: str) -> None:
    if args.json:
        print(json.dumps(document, indent=2))
    else:
        print(text, file=sys.stdout if document.get("ok") else sys.stderr)
