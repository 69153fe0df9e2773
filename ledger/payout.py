"""The payout statement: what a gateway's payout run pays one provider for one month, signed by the gateway, and the
offline check a provider runs against its own ledger (`llorch ledger check-payout STATEMENT --ledger LEDGER`).

A statement lists, for every receipt whose earnings the gateway's books credited in the month, the receipt's ledger
index, its request id and the amount credited; the spot-check corrections the provider was charged in the month; the
balance brought forward (earlier statements' carried balance, and transfers returned since), what this run pays and
what is carried forward; and the
provider's ledger checkpoint (size and root) the paid receipts are under. The check (docs/billing.md, "The payout
statement") needs nothing but the statement and the ledger: the signature, the sums, every line against the receipt
at its index (same request, signed by the provider for a ticket of the gateway, credited exactly the receipt's
amount), the ledger's root at the checkpoint's size, and that no receipt for the gateway that finished well inside
the month is missing from the lines.
"""

from __future__ import annotations

import calendar
import re
import time
from dataclasses import dataclass, field
from typing import ClassVar, Iterable

from llorch.ledger import merkle
from llorch.ledger.errors import EncodingError, LedgerError
from llorch.ledger.money import readable
from llorch.ledger.objects import CURRENCY_PATTERN, Receipt, SignedObject
from llorch.ledger.signing import open_envelope, peer_id_of

STATEMENT_BYTES_MAX = 64 << 20          # ~1.3 million lines: a provider's month at scale, in one file
MONTH = re.compile(r"(20[0-9]{2})-(0[1-9]|1[0-2])")
TOTALS = ("brought_forward", "earned", "corrected", "paid", "carried_forward")
MONTH_EDGE_MS = 3_600_000               # a receipt this close to a month's edge may be settled in either month
CENTS_MINOR = 10_000                    # bank transfers move whole cents: 10^4 minor units (micro-EUR)


def month_bounds_ms(month: str) -> tuple[int, int]:
    """[start, end) of a UTC month in ms."""
    match = MONTH.fullmatch(month)
    if match is None:
        raise EncodingError(f"month {month!r} is not YYYY-MM")
    year, number = int(match[1]), int(match[2])
    start = calendar.timegm((year, number, 1, 0, 0, 0))
    end = calendar.timegm((year + number // 12, number % 12 + 1, 1, 0, 0, 0))
    return start * 1000, end * 1000


def _signed_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or abs(value) > 10**18:
        raise EncodingError(f"{name} must be an integer (minor units), got {value!r}")


@dataclass(frozen=True)
class PayoutStatement(SignedObject):
    SIGNED_TYPE: ClassVar[str] = "payout_statement"
    SIGNER_FIELD: ClassVar[str] = "gateway_key"
    BYTES_MAX: ClassVar[int] = STATEMENT_BYTES_MAX
    FIELDS: ClassVar[dict[str, str]] = {
        "v": "uint", "gateway_key": "key", "provider_key": "key", "run_id": "str", "month": "str",
        "currency": "str", "issued_ms": "uint", "ticket_keys": "list", "checkpoint_size": "uint",
        "checkpoint_root": "hash", "lines": "list", "corrections": "list", "totals": "map",
    }
    OPTIONAL_FIELDS: ClassVar[dict[str, str]] = {"account": "str"}

    v: int
    gateway_key: bytes
    provider_key: bytes
    run_id: str
    month: str                 # YYYY-MM (UTC) the books credited these earnings in
    currency: str
    issued_ms: int
    ticket_keys: list          # the gateway keys whose tickets these books settle (every replica's)
    checkpoint_size: int       # the provider's checkpoint the lines are under: every line's index is below it
    checkpoint_root: bytes
    lines: list                # [[index, request_id, amount], ...] ascending by index: earnings credited
    corrections: list          # [[request_id, amount], ...]: spot-check corrections charged in the month
    totals: dict               # TOTALS, minor units: carried_forward = brought_forward + earned - corrected - paid
    account: str | None = None     # where ``paid`` goes, masked ("DE89 •••• 3000"); absent when nothing is paid

    def _validate(self) -> None:
        month_bounds_ms(self.month)
        if not CURRENCY_PATTERN.fullmatch(self.currency):
            raise EncodingError("currency must be an ISO 4217 code")
        if not self.ticket_keys or not all(isinstance(k, bytes) and len(k) == 32 for k in self.ticket_keys):
            raise EncodingError("ticket_keys must be a non-empty list of 32-byte keys")
        previous = -1
        for line in self.lines:
            if not (isinstance(line, list) and len(line) == 3 and isinstance(line[0], int) and
                    not isinstance(line[0], bool) and isinstance(line[1], str) and isinstance(line[2], int)
                    and not isinstance(line[2], bool) and line[2] >= 0):
                raise EncodingError("a line is [index, request_id, amount] (uints and a str)")
            if not previous < line[0] < self.checkpoint_size:
                raise EncodingError(f"line indexes must ascend and stay below checkpoint_size {self.checkpoint_size}")
            previous = line[0]
        for item in self.corrections:
            if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], str) and
                    isinstance(item[1], int) and not isinstance(item[1], bool) and item[1] >= 0):
                raise EncodingError("a correction is [request_id, amount]")
        if set(self.totals) != set(TOTALS):
            raise EncodingError(f"totals must be {{{', '.join(TOTALS)}}}")
        for name in TOTALS:
            _signed_int(f"totals.{name}", self.totals[name])

    @property
    def provider_id(self) -> str:
        return peer_id_of(self.provider_key)


@dataclass
class PayoutCheck:
    """What `check-payout` found: ``problems`` empty means the statement holds against the ledger."""

    statement: PayoutStatement
    problems: list[str] = field(default_factory=list)
    receipts_read: int = 0
    lines_checked: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


def parse_statement(data: bytes) -> PayoutStatement:
    """The statement in a file, its fields and signature checked; EncodingError or SignatureError otherwise."""
    return PayoutStatement.from_envelope(data)


def check_sums(statement: PayoutStatement) -> list[str]:
    """The statement's own arithmetic (needs no ledger)."""
    totals, problems = statement.totals, []
    earned = sum(line[2] for line in statement.lines)
    corrected = sum(item[1] for item in statement.corrections)
    if totals["earned"] != earned:
        problems.append(f"totals.earned is {totals['earned']}, but the lines add up to {earned}")
    if totals["corrected"] != corrected:
        problems.append(f"totals.corrected is {totals['corrected']}, but the corrections add up to {corrected}")
    expected = totals["brought_forward"] + totals["earned"] - totals["corrected"] - totals["paid"]
    if totals["carried_forward"] != expected:
        problems.append(f"totals.carried_forward is {totals['carried_forward']}, not brought_forward + earned - "
                        f"corrected - paid = {expected}")
    if totals["paid"] < 0 or totals["paid"] % CENTS_MINOR:
        problems.append(f"totals.paid {totals['paid']} is not a whole number of cents")
    if totals["paid"] and not statement.account:
        problems.append("totals.paid is above 0 but the statement names no account")
    return problems


def check_payout(statement: PayoutStatement, entries: Iterable[bytes], month_edge_ms: int = MONTH_EDGE_MS
                 ) -> PayoutCheck:
    """Check ``statement`` against the provider's ledger ``entries`` (in index order, read once). A receipt that
    finished within ``month_edge_ms`` of the month's start or end may be paid by either month's statement."""
    result = PayoutCheck(statement, check_sums(statement))
    lines = {line[0]: line for line in statement.lines}
    ticket_keys = set(statement.ticket_keys)
    start, end = month_bounds_ms(statement.month)
    tree = merkle.CompactRange()
    root_at_checkpoint: bytes | None = merkle.EMPTY_ROOT if statement.checkpoint_size == 0 else None
    for index, entry in enumerate(entries):
        tree.append(merkle.leaf_hash(entry))
        if tree.size == statement.checkpoint_size:
            root_at_checkpoint = tree.root()
        result.receipts_read += 1
        line = lines.get(index)
        try:
            receipt = Receipt.from_payload(open_envelope(entry)[0])
        except (LedgerError, TypeError) as exc:
            if line is not None:
                result.problems.append(f"line for index {index} ({line[1]}): the ledger's entry is not a receipt "
                                       f"({exc})")
            continue
        if line is not None:
            result.lines_checked += 1
            result.problems += _line_problems(line, receipt, statement, ticket_keys)
        elif receipt.gateway_key in ticket_keys and receipt.amount > 0 and receipt.finish_reason != "cancelled" and \
                start + month_edge_ms <= receipt.finished_ms < end - month_edge_ms and index < statement.checkpoint_size:
            result.problems.append(f"receipt {index} ({receipt.request_id}, {readable(receipt.amount, receipt.currency)}"
                                   f") finished in {statement.month} for this gateway's ticket but no line pays it")
    missing = sorted(set(lines) - set(range(result.receipts_read)))
    if missing:
        result.problems.append(f"{len(missing)} line(s) name entries this ledger does not have (first: index "
                               f"{missing[0]}, {lines[missing[0]][1]})")
    if root_at_checkpoint is None:
        result.problems.append(f"the statement is under checkpoint size {statement.checkpoint_size}; this ledger has "
                               f"only {tree.size} entries")
    elif root_at_checkpoint != statement.checkpoint_root:
        result.problems.append(f"the ledger's root at size {statement.checkpoint_size} is {root_at_checkpoint.hex()}, "
                               f"not the statement's {statement.checkpoint_root.hex()}: not this ledger, or a fork")
    return result


def _line_problems(line: list, receipt: Receipt, statement: PayoutStatement, ticket_keys: set[bytes]) -> list[str]:
    index, request_id, amount = line
    where = f"line for index {index} ({request_id})"
    if receipt.request_id != request_id:
        return [f"{where}: the receipt at that index is {receipt.request_id}"]
    problems = []
    if receipt.provider_key != statement.provider_key:
        problems.append(f"{where}: the receipt is signed by {peer_id_of(receipt.provider_key)}, not this provider")
    if receipt.gateway_key not in ticket_keys:
        problems.append(f"{where}: the receipt answers a ticket of {peer_id_of(receipt.gateway_key)}, not of this "
                        f"gateway")
    if receipt.currency != statement.currency:
        problems.append(f"{where}: the receipt is in {receipt.currency}, the statement in {statement.currency}")
    if amount > receipt.amount:
        problems.append(f"{where}: credits {readable(amount, statement.currency)}, more than the receipt's "
                        f"{readable(receipt.amount, receipt.currency)}")
    elif amount < receipt.amount:
        problems.append(f"{where}: credits {readable(amount, statement.currency)}, less than the receipt's "
                        f"{readable(receipt.amount, receipt.currency)} (the gateway billed fewer tokens than the "
                        f"receipt counts: ask its operator)")
    return problems


def summary(check: PayoutCheck) -> str:
    statement, totals = check.statement, check.statement.totals
    when = time.strftime("%Y-%m-%d", time.gmtime(statement.issued_ms // 1000))
    money = lambda minor: readable(minor, statement.currency)    # noqa: E731
    return (f"payout statement {statement.run_id} of {when} for {statement.month}, gateway "
            f"{peer_id_of(statement.gateway_key)}: {len(statement.lines)} receipts earned {money(totals['earned'])}"
            f", corrections {money(totals['corrected'])}, brought forward {money(totals['brought_forward'])}, paid "
            f"now {money(totals['paid'])}"
            + (f" to {statement.account}" if statement.account else "")
            + f", carried forward {money(totals['carried_forward'])}; under checkpoint size "
            f"{statement.checkpoint_size}")

