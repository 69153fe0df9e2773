"""`llorch ledger export`: a portable bundle of a ledger (docs/ledger.md §7, ``llorch-ledger-bundle/2``) that
`llorch ledger verify` accepts like the SQLite file, and a human-readable JSON-lines view.

The ledger is read from one SQLite snapshot in pages and written record by record, so memory does not grow with
the ledger. Each output is written to a temporary file beside it, fsynced, renamed over the output path, and the
directory fsynced: a reader of ``--out`` sees the old file or the whole new one, never part of one. An export that
fails (disk full) removes its temporary files; one that is killed leaves a ``.partial`` file that verify refuses
as truncated.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Iterator

from llorch.ledger.bundle import Counts, encode_bundle
from llorch.ledger.errors import BundleError, LedgerError
from llorch.ledger.material import load_material
from llorch.ledger.objects import Receipt, receipt_fields_of


def export_ledger(path: Path, out: Path, jsonl: Path | None = None) -> int:
    """Write the bundle of the ledger at ``path`` (a SQLite file, or a bundle of either format) to ``out``, and its
    JSON-lines view to ``jsonl``; return the number of entries. Raises StoreError or BundleError."""
    path, out = Path(path), Path(out)
    outputs = [out] if jsonl is None else [out, Path(jsonl)]
    for output in outputs:
        if output.exists() and path.exists() and os.path.samefile(output, path):
            raise BundleError(f"cannot write {output}: it is the ledger being exported")
    if jsonl is not None and Path(jsonl).resolve() == out.resolve():
        raise BundleError(f"cannot write {out} twice: --out and --jsonl name the same file")
    material = load_material(path)
    assert material.entry_count is not None
    counts = Counts(len(material.checkpoints), len(material.cosigned), material.entry_count)
    with _replacing(outputs) as handles:
        view = handles[1] if jsonl is not None else None

        def entries() -> Iterator[bytes]:
            for entry in material.entries:
                if view is not None:
                    view.write((json.dumps(readable(entry), sort_keys=True) + "\n").encode())
                yield entry

        for record in encode_bundle(counts, material.checkpoints, material.cosigned, entries(), str(out)):
            handles[0].write(record)
    return counts.entries


def write_bundle_file(out: Path, entries: list[bytes], checkpoints: list[bytes], cosigned: list[bytes]) -> None:
    """Write a bundle of entries and notes already in memory (e.g. fetched from a provider) at ``out``, the same
    way as an export: a reader of ``out`` sees the old file or the whole bundle. Raises BundleError."""
    counts = Counts(len(checkpoints), len(cosigned), len(entries))
    with _replacing([Path(out)]) as handles:
        for record in encode_bundle(counts, checkpoints, cosigned, entries, str(out)):
            handles[0].write(record)


def readable(entry: bytes) -> dict:
    """One entry as JSON: bin fields in hex. An entry that does not parse is shown as its hex bytes."""
    try:
        fields = receipt_fields_of(Receipt.from_envelope(entry))
    except LedgerError as exc:
        return {"unreadable": str(exc), "bytes": entry.hex()}
    return {name: value.hex() if isinstance(value, bytes) else value for name, value in fields.items()}


@contextlib.contextmanager
def _replacing(paths: list[Path]) -> Iterator[list[BinaryIO]]:
    """Files to write that replace ``paths`` only once all of them are complete and durable.

    Each is a temporary ``<name>.<random>.partial`` beside its path. On success: flush and fsync each, rename each
    over its path, fsync each directory. On any failure: remove every temporary file; ``paths`` are untouched. A
    failed write is reported as BundleError naming the path and the cause (e.g. no space left on device).
    """
    temporaries: list[tuple[Path, BinaryIO]] = []
    mode = _default_file_mode()
    try:
        for path in paths:
            descriptor, name = tempfile.mkstemp(prefix=path.name + ".", suffix=".partial", dir=path.parent)
            temporaries.append((Path(name), os.fdopen(descriptor, "wb")))
            os.fchmod(descriptor, mode)
        yield [handle for _, handle in temporaries]
        for _, handle in temporaries:
            handle.flush()
            os.fsync(handle.fileno())
            handle.close()
        for (temporary, _), path in zip(temporaries, paths):
            os.replace(temporary, path)
            _fsync_directory(path.parent)
    except OSError as exc:
        _discard(temporaries)
        names = " and ".join(str(path) for path in paths)
        raise BundleError(f"cannot write {names}: {exc.strerror or exc}; nothing was written there") from None
    except BaseException:
        _discard(temporaries)
        raise


def _discard(temporaries: list[tuple[Path, BinaryIO]]) -> None:
    for temporary, handle in temporaries:
        with contextlib.suppress(OSError):
            handle.close()           # may fail again (the buffer cannot be flushed to a full disk)
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()


def _default_file_mode() -> int:
    """The mode open() would give a new file (0666 less the umask): mkstemp's 0600 would surprise whoever shares
    the bundle."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def _fsync_directory(directory: Path) -> None:
    descriptor = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
