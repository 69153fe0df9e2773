"""Errors raised by the ledger package.

    LedgerError                      base of everything below
    ├── EncodingError                bytes are not canonical msgpack, or a field is missing/mistyped
    ├── SignatureError               an Ed25519 signature does not verify under the claimed key
    ├── KeyFileError                 a key file is missing, malformed or readable by others
    ├── StoreError                   the SQLite store could not do what was asked (translated sqlite3 errors)
    │   └── ConflictError            a request_id is already in the ledger with different bytes
    ├── BundleError                  a bundle file cannot be read (truncated, extended, corrupted, not a bundle) or
    │                                written (disk full): nothing in it was audited
    ├── ChainBreak                   an entry does not continue its ledger (carries the auditor's check number)
    ├── VerificationError            the offline auditor found a bad entry (carries check number, code, entry index)
    ├── EvidenceFormatError          a file is not a spot-check evidence document (nothing in it was checked)
    └── EvidenceError                a spot-check evidence document fails a numbered check (carries check and code)

Everything here describes a problem with *data* (a file, a peer's bytes); bugs in our own code are
``AssertionError``s and are never caught.
"""

from __future__ import annotations


class LedgerError(Exception):
    """Base class of every error the ledger package raises on purpose."""


class EncodingError(LedgerError):
    """Raised when bytes are not canonical msgpack or an object's fields are missing or of the wrong type.

    The bytes came from someone else (a peer, a file): reject them, change nothing, and report the message.
    """


class SignatureError(LedgerError):
    """Raised when a signature does not verify under the key the object names.

    The object was forged or altered in transit or at rest: never trust any of its fields.
    """


class ChainBreak(LedgerError):
    """Raised when an entry does not continue its ledger (ledger/chain.py): wrong owner or origin, bad signature,
    index gap, broken hash chain, repeated request_id or wrong amount. ``check`` is the auditor's check number
    (docs/ledger.md §8). The ledger that holds it is not to be trusted past the entry before it.
    """

    def __init__(self, check: int, message: str) -> None:
        super().__init__(message)
        self.check = check


class KeyFileError(LedgerError):
    """Raised when a key file cannot be used: missing, malformed, or readable by group/others.

    The message says which; the remedy for permissions is ``chmod 600 PATH``.
    """


class StoreError(LedgerError):
    """Raised when the SQLite store fails (disk full, read-only file, corrupt database).

    Nothing partial is left behind: the append that raised was rolled back.
    """


class ConflictError(StoreError):
    """Raised when an append reuses a request_id that is already stored with different bytes."""


class BundleError(LedgerError):
    """Raised when a ledger bundle (docs/ledger.md §7) cannot be read: it is truncated, extended, corrupted, over a
    record limit or not a bundle at all; or when one cannot be written (disk full, no permission).

    A bundle refused this way says nothing about the ledger in it (no audit check ran, nothing is reported as a
    shorter ledger): export the ledger again from its SQLite file. A failed export leaves nothing at its output path.
    """


class VerificationError(LedgerError):
    """Raised by the auditor when a ledger fails one of the numbered checks (docs/ledger.md).

    ``check`` is the step number, ``code`` the stable error code; ``entry`` is the ledger index of the bad entry, or
    ``checkpoint_size`` the size of the checkpoint at fault; ``evidence`` holds texts to print (e.g. both checkpoints
    of a fork).
    """

    def __init__(self, check: int, code: str, entry: int | None, message: str, checkpoint_size: int | None = None,
                 evidence: list[str] | None = None) -> None:
        self.check = check
        self.code = code
        self.entry = entry
        self.checkpoint_size = checkpoint_size
        self.message = message
        self.evidence = evidence or []
        if entry is not None:
            where = f"entry {entry}"
        elif checkpoint_size is not None:
            where = f"checkpoint of size {checkpoint_size}"
        else:
            where = "checkpoint"
        super().__init__(f"{code} (check {check}) at {where}: {message}")


class EvidenceFormatError(LedgerError):
    """Raised when a file is not a spot-check evidence document (docs/verification.md §5): not JSON, a field missing
    or of the wrong type, too large. Nothing in it was checked, so it says nothing for or against any provider: ask
    the gateway operator for the file again (`llorch gateway providers evidence ID --out FILE`)."""


class EvidenceError(LedgerError):
    """Raised when a spot-check evidence document fails one of its numbered checks (docs/verification.md §5).

    ``check`` is the step number, ``code`` the stable code (EV01...). The document does not prove what it claims:
    whoever produced it (a gateway) sent a forgery, a damaged file, or evidence of nothing.
    """

    def __init__(self, check: int, code: str, message: str) -> None:
        self.check = check
        self.code = code
        self.message = message
        super().__init__(f"{code} (check {check}): {message}")


def sole_exception(error: BaseException) -> BaseException:
    """The one exception inside (nested) single-member exception groups, or ``error`` itself.

    trio nurseries wrap what escapes them in ExceptionGroups; at the edges (a context manager, a command) callers
    want the error itself so they can catch it by type and print its message.
    """
    while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
        error = error.exceptions[0]
    return error
