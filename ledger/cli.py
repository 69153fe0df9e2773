"""`llorch ledger ...` and `llorch keys ...`: the auditor's and the key holder's commands."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from llorch.ledger.errors import (BundleError, EvidenceError, EvidenceFormatError, KeyFileError, LedgerError,
                                  StoreError, VerificationError)
from llorch.ledger.limits import EVIDENCE_FILE_BYTES_MAX
from llorch.ledger.evidence import CHECKS as EVIDENCE_CHECKS, load_evidence, result_of, verify_evidence
from llorch.ledger.export import export_ledger
from llorch.ledger.signing import SigningKey, write_key_file
from llorch.ledger.material import load_material
from llorch.ledger.money import readable
from llorch.ledger.verify import CHECKS, load_trusted_keys, verify

EXIT_OK, EXIT_FAILED, EXIT_UNUSABLE = 0, 1, 2


def add_commands(subparsers):
    """Add `keys` and `ledger`; return the `ledger` subcommand group (node adds `ledger replay` to it)."""
    keys = subparsers.add_parser("keys", help="create node and gateway keys")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    new = keys_sub.add_parser("new", help="write a new Ed25519 key file (mode 0600); prints its peer id")
    new.add_argument("path", type=Path)
    new.set_defaults(handler=keys_new)

    ledger = subparsers.add_parser("ledger", help="audit and export a provider's ledger, offline")
    ledger_sub = ledger.add_subparsers(dest="ledger_command", required=True)
    checks = "; ".join(f"{n} {code} {name}" for n, (code, name) in sorted(CHECKS.items()))
    verify_parser = ledger_sub.add_parser(
        "verify", help="run the auditor's numbered checks on a ledger file or bundle",
        description=f"Checks: {checks}. Exit 0 if every check passes; 1 naming the first failed check and the "
                    f"entry (or checkpoint size); 2 if an input cannot be read (a truncated, extended or altered "
                    f"bundle is refused this way before any check runs).")
    verify_parser.add_argument("path", type=Path, help="the node's ledger SQLite file, or a bundle from `export`")
    verify_parser.add_argument("--checkpoint", type=Path,
                               help="a signed checkpoint you hold (e.g. from the gateway): detects forks and rollback")
    verify_parser.add_argument("--trusted-keys", type=Path,
                               help="file of trusted provider peer ids or hex public keys, one per line")
    verify_parser.add_argument("--witness-keys", type=Path,
                               help="file of the witnesses (gateways) you trust, same syntax: every cosignature is "
                                    "checked either way; the report says which are by these keys")
    verify_parser.add_argument("--quorum", type=int, metavar="K",
                               help="require cosignatures by at least K distinct witnesses of --witness-keys (the "
                                    "gateway replicas you trust), check LV13; the report gives the size they vouch for")
    verify_parser.add_argument("--json", action="store_true", help="print a machine-readable report")
    verify_parser.set_defaults(handler=ledger_verify)
    export = ledger_sub.add_parser(
        "export", help="write a portable bundle (entries, checkpoints, cosignatures)",
        description="Streams the ledger into a llorch-ledger-bundle/2 file (docs/ledger.md §7) without holding it in "
                    "memory. --out is replaced only by a complete, fsynced bundle: an export that fails leaves "
                    "nothing there (exit 2), one that is killed leaves a .partial file that verify refuses. A bundle "
                    "of the older format /1 given as PATH is converted.")
    export.add_argument("path", type=Path, help="the node's ledger SQLite file (or a bundle to convert)")
    export.add_argument("--out", type=Path, required=True, help="bundle file to write (verify accepts it)")
    export.add_argument("--jsonl", type=Path, help="also write a human-readable JSON-lines view here")
    export.set_defaults(handler=ledger_export)
    check = ledger_sub.add_parser(
        "verify-receipt", help="check one bill offline: receipt, provider checkpoint, inclusion proof",
        description="FILE is the JSON of GET /v2/receipts/{request_id} (docs/ledger.md §10). Every cosignature on "
                    "its checkpoint is checked. Exit 0 if it checks out, 1 if not, 2 if FILE is not such a "
                    "document.")
    check.add_argument("file", type=Path)
    check.add_argument("--witness", help="the gateway's peer id: also require its cosignature on the checkpoint")
    check.add_argument("--witness-keys", type=Path,
                       help="file of the witnesses you trust (as for verify): the report says which cosignatures "
                            "are by them")
    check.set_defaults(handler=ledger_verify_receipt)
    evidence_checks = "; ".join(f"({n}) {code} {name}" for n, (code, name) in sorted(EVIDENCE_CHECKS.items()))
    evidence = ledger_sub.add_parser(
        "check-evidence", help="check spot-check evidence against a provider offline",
        description=f"FILE is a llorch-evidence/1 document (docs/verification.md §5), as `llorch gateway providers "
                    f"evidence ID --out FILE` writes it: signed tickets and receipts of one request run by providers "
                    f"of one determinism class that disagree. Checks: {evidence_checks}. Exit 0 if the evidence "
                    f"holds (one of the receipts is false; the suspect, if named, is the odd one out); 1 naming the "
                    f"first failed check; 2 if FILE is not such a document.")
    evidence.add_argument("file", type=Path)
    evidence.add_argument("--json", action="store_true", help="print a machine-readable report")
    evidence.set_defaults(handler=ledger_check_evidence)
    payout = ledger_sub.add_parser(
        "check-payout", help="check a payout statement against your own ledger, offline",
        description="STATEMENT is a signed payout statement (docs/billing.md, \"The payout statement\"), as a "
                    "gateway's payout run writes it (statements/<peer id>.statement). Checks its signature and "
                    "sums, every line against the receipt at its index in LEDGER (same request, your key, a ticket "
                    "of the gateway, credited exactly the receipt's amount), the ledger's root at the checkpoint the "
                    "statement names, and that no receipt for the gateway finished well inside the month without a "
                    "line. Exit 0 if it holds, 1 naming each problem, 2 if STATEMENT or LEDGER cannot be read.")
    payout.add_argument("statement", type=Path)
    payout.add_argument("--ledger", type=Path, required=True, help="your ledger (ledger.sqlite) or a bundle of it")
    payout.add_argument("--gateway", help="the gateway's peer id you expect to have signed it")
    payout.add_argument("--month-edge-minutes", type=int, default=60,
                        help="a receipt that finished this close to the month's start or end may be paid in either "
                             "month's statement, so it is not reported missing (default 60)")
    payout.add_argument("--json", action="store_true", help="print a machine-readable report")
    payout.set_defaults(handler=ledger_check_payout)
    return ledger_sub


def ledger_check_payout(args: argparse.Namespace) -> int:
    from llorch.ledger.payout import STATEMENT_BYTES_MAX, check_payout, parse_statement, summary
    from llorch.ledger.signing import peer_id_of

    try:                                     # unreadable input: exit 2
        with open(args.statement, "rb") as handle:
            data = handle.read(STATEMENT_BYTES_MAX + 1)
        statement = parse_statement(data)
        material = load_material(args.ledger)
    except (OSError, LedgerError) as exc:
        _emit(args, {"ok": False, "error": str(exc)}, f"error: cannot use {args.statement} with {args.ledger}: {exc}")
        return EXIT_UNUSABLE
    if args.gateway and peer_id_of(statement.gateway_key) != args.gateway:
        _emit(args, {"ok": False, "problems": [f"signed by {peer_id_of(statement.gateway_key)}, not {args.gateway}"]},
              f"FAIL the statement is signed by {peer_id_of(statement.gateway_key)}, not by {args.gateway}")
        return EXIT_FAILED
    try:
        checked = check_payout(statement, material.entries, max(0, args.month_edge_minutes) * 60_000)
    except (LedgerError, OSError) as exc:
        _emit(args, {"ok": False, "error": str(exc)}, f"error: cannot read {args.ledger}: {exc}")
        return EXIT_UNUSABLE
    document = {"ok": checked.ok, "run_id": statement.run_id, "month": statement.month,
                "gateway": peer_id_of(statement.gateway_key), "provider": statement.provider_id,
                "totals_minor": statement.totals, "lines": len(statement.lines), "receipts_read": checked.receipts_read,
                "problems": checked.problems}
    text = summary(checked)
    _emit(args, document, ("OK: " + text) if checked.ok else
          "FAIL: " + text + "\n" + "\n".join(f"  - {problem}" for problem in checked.problems))
    return EXIT_OK if checked.ok else EXIT_FAILED


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
        material = load_material(args.path)
        trusted = load_trusted_keys(args.trusted_keys) if args.trusted_keys else None
        witnesses = load_trusted_keys(args.witness_keys) if args.witness_keys else None
        held = args.checkpoint.read_bytes() if args.checkpoint else None
        if args.quorum is not None and (args.quorum < 1 or witnesses is None):
            raise OSError("--quorum K needs K >= 1 and --witness-keys naming the witnesses that count")
        report = verify(material, trusted, held, witnesses, quorum=args.quorum)
    except (StoreError, BundleError, OSError) as exc:
        _emit(args, {"ok": False, "error": str(exc)}, f"error: {exc}")
        return EXIT_UNUSABLE
    except VerificationError as exc:
        text = f"FAIL {exc}" + "".join(f"\n--- evidence {i + 1} ---\n{item}" for i, item in enumerate(exc.evidence))
        _emit(args, {"ok": False, "check": exc.check, "code": exc.code, "entry": exc.entry,
                     "checkpoint_size": exc.checkpoint_size, "message": exc.message, "evidence": exc.evidence}, text)
        return EXIT_FAILED
    held_text = f"; agrees with the held checkpoint of size {report.held_checkpoint_size}" \
        if report.held_checkpoint_size is not None else ""
    lines = [f"  cosigned at size {c.size} by {c.witness}: " + (
        ("trusted" if c.trusted else "valid, not a key in --witness-keys" if args.witness_keys else "valid")
        if c.checked else "not checked (the name gives no key)") for c in report.cosignatures]
    _emit(args, {"ok": True, "entries": report.entries, "origin": report.origin,
                 "head_sha256": report.head_sha256.hex(), "root": report.root.hex(),
                 "checkpoints": report.checkpoints, "held_checkpoint_size": report.held_checkpoint_size,
                 "cosignatures": [{"witness": c.witness, "size": c.size, "timestamp_s": c.timestamp_s,
                                   "checked": c.checked, "trusted": c.trusted} for c in report.cosignatures],
                 "quorum": args.quorum, "quorum_size": report.quorum_size,
                 "checks_passed": [CHECKS[n][0] for n in sorted(CHECKS) if n != 13 or args.quorum]},
          f"OK: {report.entries} entries of {report.origin or 'an empty ledger'} verified; "
          f"{report.checkpoints} checkpoints consistent{held_text}; root {report.root.hex()}"
          + (f"; {args.quorum} trusted witnesses vouch for the first {report.quorum_size} entries"
             if args.quorum else "")
          + "".join("\n" + line for line in lines))
    return EXIT_OK


def ledger_verify_receipt(args: argparse.Namespace) -> int:
    from llorch.ledger.receipt_proof import ReceiptProofError, load_document, verify_receipt_document
    from llorch.ledger.signing import public_key_of_peer_id

    try:                                     # unreadable input: exit 2
        document = load_document(args.file.read_text(encoding="utf-8"))
        if args.witness_keys:
            load_trusted_keys(args.witness_keys)
        witness_key = public_key_of_peer_id(args.witness) if args.witness else None
    except (OSError, UnicodeDecodeError, LedgerError, ReceiptProofError) as exc:
        print(f"error: cannot use {args.file}: {exc}", file=sys.stderr)
        return EXIT_UNUSABLE
    try:                                     # a bill that does not check out: exit 1
        checked = verify_receipt_document(document, witness_key,
                                          f"llorch-witness/{args.witness}" if args.witness else None)
    except LedgerError as exc:
        print(f"FAIL {exc}", file=sys.stderr)
        return EXIT_FAILED
    except ReceiptProofError as exc:
        print(f"FAIL {exc}", file=sys.stderr)
        return EXIT_FAILED
    receipt = checked.receipt
    cosigned = f", cosigned by {args.witness} at {checked.cosigned_at_s}" if args.witness else ""
    trusted = load_trusted_keys(args.witness_keys) if args.witness_keys else None
    cosigned += "".join(f"\n  cosigned by {c.name}: " + (("trusted" if c.public_key in trusted else
                                                          "valid, not a key in --witness-keys") if trusted is not None
                                                         else "valid") for c in checked.cosignatures)
    print(f"OK: receipt {receipt.request_id} ({receipt.tokens_in} + {receipt.tokens_out} tokens, "
          f"{readable(receipt.amount, receipt.currency)} to the provider) is entry {receipt.index} of {receipt.origin}, under its "
          f"signed checkpoint of {checked.tree_size} entries{cosigned}")
    return EXIT_OK


def ledger_check_evidence(args: argparse.Namespace) -> int:
    from llorch.ledger.signing import peer_id_of

    try:                                     # unreadable input: exit 2
        with open(args.file, "rb") as handle:
            data = handle.read(EVIDENCE_FILE_BYTES_MAX + 1)     # load_evidence refuses more
        document = load_evidence(data.decode("utf-8"))
    except (OSError, UnicodeDecodeError, EvidenceFormatError) as exc:
        _emit(args, {"ok": False, "error": str(exc)}, f"error: cannot use {args.file}: {exc}")
        return EXIT_UNUSABLE
    try:                                     # evidence that does not hold: exit 1
        checked = verify_evidence(document)
    except EvidenceError as exc:
        _emit(args, {"ok": False, "check": exc.check, "code": exc.code, "message": exc.message}, f"FAIL {exc}")
        return EXIT_FAILED
    runs: list[dict[str, Any]] = [
        {"provider": peer_id_of(r.provider_key), "request_id": r.request_id, "tokens_in": r.tokens_in,
         "tokens_out": r.tokens_out, "finish_reason": r.finish_reason, "output_sha256": r.output_sha256.hex(),
         **({"logprobs_sha256": r.logprobs_sha256.hex()} if r.logprobs_sha256 is not None else {})}
        for r in checked.receipts]
    verdict = (f"the odd one out is {peer_id_of(checked.suspect)}: its signed result differs from the one the "
               f"other {len(runs) - 1} agree on" if checked.suspect else
               "no suspect is named: one of these providers signed a false result, not decided which")
    lines = [f"  {run['provider']}: {run['tokens_in']} + {run['tokens_out']} tokens, {run['finish_reason']}, "
             f"output {run['output_sha256'][:16]}"
             + (f", logprobs {run['logprobs_sha256'][:16]}" if "logprobs_sha256" in run else "") for run in runs]
    _emit(args, {"ok": True, "engine_build": checked.engine_build, "runs": runs,
                 "suspect": peer_id_of(checked.suspect) if checked.suspect else None,
                 "distinct_results": len({result_of(r) for r in checked.receipts}),
                 "checks_passed": [EVIDENCE_CHECKS[n][0] for n in sorted(EVIDENCE_CHECKS)]},
          f"OK: {len(runs)} signed runs of identical inputs in engine build {checked.engine_build!r} disagree; "
          f"{verdict}\n" + "\n".join(lines))
    return EXIT_OK


def ledger_export(args: argparse.Namespace) -> int:
    try:
        count = export_ledger(args.path, args.out, args.jsonl)
    except (StoreError, BundleError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_UNUSABLE
    print(f"exported {count} entries to {args.out}" + (f" and {args.jsonl}" if args.jsonl else ""))
    return EXIT_OK


def _emit(args: argparse.Namespace, document: dict, text: str) -> None:
    if args.json:
        print(json.dumps(document, indent=2))
    else:
        print(text, file=sys.stdout if document.get("ok") else sys.stderr)
