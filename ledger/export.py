"""`llorch ledger export`: a portable bundle of a ledger (canonical msgpack: entries, checkpoints, cosigned
checkpoints) that `llorch ledger verify` accepts like the SQLite file, and a human-readable JSON-lines view."""

from __future__ import annotations

import json
import os
from pathlib import Path

from llorch.ledger.errors import LedgerError
from llorch.ledger.objects import Receipt, receipt_fields_of
from llorch.ledger.verify import LedgerMaterial, load_material, write_bundle


def export_ledger(path: Path, out: Path, jsonl: Path | None = None) -> int:
    material = load_material(path)
    entries = list(material.entries)
    _write_atomically(out, write_bundle(LedgerMaterial(entries, material.checkpoints, material.cosigned)))
    if jsonl is not None:
        _write_atomically(jsonl, "".join(json.dumps(readable(entry), sort_keys=True) + "\n"
                                         for entry in entries).encode())
    return len(entries)


def write_bundle_file(out: Path, material: LedgerMaterial) -> None:
    """Write ``material`` as a bundle at ``out``, atomically (a crash leaves no partial bundle at ``out``)."""
    _write_atomically(out, write_bundle(material))


def readable(entry: bytes) -> dict:
    """One entry as JSON: bin fields in hex. An entry that does not parse is shown as its hex bytes."""
    try:
        fields = receipt_fields_of(Receipt.from_envelope(entry))
    except LedgerError as exc:
        return {"unreadable": str(exc), "bytes": entry.hex()}
    return {name: value.hex() if isinstance(value, bytes) else value for name, value in fields.items()}


def _write_atomically(path: Path, data: bytes) -> None:
    temporary = Path(str(path) + ".partial")
    with open(temporary, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
