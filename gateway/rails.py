"""Payout rails: how a payout run's instructions become files (or calls) that move money to providers. The books
decide who is owed what (gateway/books/payouts.py); a rail only renders those decisions in the form one way of paying
takes, so a later rail (Stripe Connect, a bank's API) plugs in without touching the books. Everything here is pure:
no I/O and no clock (the run passes ``created_ms``), and the same inputs give the same bytes.

    check_account(holder, iban, bic, currency) → PayoutAccount   a provider's bank details, parsed once when given
    PayoutInstruction(provider_id, account, amount_minor, …)      one payment of whole cents, > 0
    RunHeader(run_id, created_ms, execution_date, debtor, …)      the run: who pays, from which account, on which day
    PayoutRail.render(header, instructions) → {file name: bytes}  each file already checked

The first rail, ``SepaCreditTransfer``, writes one ISO 20022 pain.001.001.09 file (a SEPA credit transfer batch) that
the operator uploads to the platform's bank. Its ``render`` takes these steps:
  (1) the run's bounds: 1..INSTRUCTIONS_PER_FILE_MAX instructions, end-to-end ids unique within the run
  (2) sepaxml builds the document; message id and payment-information id = the run id, creation time = created_ms in
      UTC (sepaxml itself would write random ids and the machine's local time: ``_DeterministicTransfer``)
  (3) the document is validated against the pain.001.001.09 XSD that sepaxml ships
  (4) the document is read back: NbOfTxs, CtrlSum and every amount, IBAN, BIC and end-to-end id equal the instructions

SEPA rules this module applies (EPC SCT rulebook): amounts in EUR with two decimals, at most 999 999 999.99; names
and texts in the SEPA character set (Latin letters, digits, space and / - ? : ( ) . , ' +); the creditor's BIC is
needed only where a bank outside the EEA takes part (Switzerland, the United Kingdom, Monaco, …), else IBAN-only.
Which countries are in SEPA is schwifty's knowledge (``IBAN.in_sepa_zone``), not a list kept here.

Errors:
    ValueError
    ├── IbanError          a payout account this rail cannot pay (IBAN, BIC, holder or currency; ``field`` names it):
    │                      show the message to the provider, who must correct their details
    └── InstructionError   an instruction or run header that breaks the rail's rules (amount not whole cents, an id
                           outside its grammar): a bug in the payout run, which must compute valid instructions
    RailError              the rail could not produce the file from valid inputs (sepaxml failed, the XSD refused
                           the document, the read-back disagrees): a bug here or a changed sepaxml; nothing was paid
"""

from __future__ import annotations

import datetime as dt
import functools
import re
import unicodedata
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Protocol, Sequence

import schwifty
import sepaxml
import xmlschema
from schwifty import exceptions as schwifty_errors

from llorch.ledger.money import MINOR_DIGITS
from llorch.node.wire.registration import mask_iban

CURRENCY = "EUR"                                  # SEPA credit transfers are in euros only
MINOR_PER_CENT = 10 ** (MINOR_DIGITS - 2)         # 10 000 micro-EUR: banks move whole cents
AMOUNT_MINOR_MAX = 999_999_999_99 * MINOR_PER_CENT  # SEPA's largest single amount, 999 999 999.99 EUR
INSTRUCTIONS_PER_FILE_MAX = 10_000                # payments in one file: well inside what banks' uploads accept
HOLDER_CHARS_MAX = 70                             # Nm of a debtor or creditor (EPC)
REMITTANCE_CHARS_MAX = 140                        # unstructured remittance information, Ustrd (EPC)
ID_CHARS_MAX = 35                                 # MsgId, PmtInfId, EndToEndId (Max35Text)
INPUT_SHOWN_CHARS_MAX = 48                        # how much of a refused input an error message repeats

SCHEMA = "pain.001.001.09"
NAMESPACE = f"urn:iso:std:iso:20022:tech:xsd:{SCHEMA}"
SEPA_CHARACTERS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 /-?:().,'+")
_SEPA_CHARACTERS_SAID = "Latin letters, digits, space and / - ? : ( ) . , ' +"
_ID = re.compile(rf"[A-Za-z0-9-]{{1,{ID_CHARS_MAX}}}")   # ids and the file name: no "/" (EPC forbids "//"), no dots

# Letters that Unicode decomposition does not reduce to a base Latin letter, written as banks write them.
_LATIN_SPELLED = str.maketrans({"ß": "ss", "ẞ": "SS", "Æ": "AE", "æ": "ae", "Œ": "OE", "œ": "oe", "Ø": "O", "ø": "o",
                                "Ł": "L", "ł": "l", "Đ": "D", "đ": "d", "Ð": "D", "ð": "d", "Þ": "TH", "þ": "th",
                                "ı": "i", "’": "'", "‘": "'", "–": "-", "—": "-"})

# The EEA (EU, Iceland, Liechtenstein, Norway) with the EU's outermost regions that have IBANs of their own code in
# schwifty's registry. A SEPA payment to a bank outside it needs the bank's BIC (EPC SCT rulebook); inside, the IBAN
# is enough.
EEA_COUNTRIES = frozenset({
    "AT", "BE", "BG", "CY", "CZ", "DE", "DK", "EE", "ES", "FI", "FR", "GR", "HR", "HU", "IE", "IT", "LT", "LU", "LV",
    "MT", "NL", "PL", "PT", "RO", "SE", "SI", "SK", "IS", "LI", "NO", "AX", "GF", "GP", "MF", "MQ", "RE", "YT"})

# Territories whose banks hold their country's IBANs: a BIC of one of these may serve an IBAN of another in its group.
_BANKING_AREAS = (frozenset({"FR", "GF", "GP", "MQ", "RE", "YT", "BL", "MF", "PM", "NC", "PF", "WF", "TF"}),
                  frozenset({"GB", "GG", "JE", "IM"}),
                  frozenset({"FI", "AX"}))


class IbanError(ValueError):
    """Raised by ``check_account`` (and ``PayoutAccount``) when bank details cannot be paid by this rail: a wrong
    IBAN or BIC, a BIC of another country, a holder name outside the SEPA character set, a currency other than EUR.
    ``field`` is "holder", "iban", "bic" or "currency"; the message names the value and what is wrong with it. Remedy:
    the provider corrects their payout details."""

    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.field = field


class InstructionError(ValueError):
    """Raised when a ``PayoutInstruction`` or ``RunHeader`` is built with a value this rail cannot send (an amount
    that is not whole cents, an id outside [A-Za-z0-9-]{1,35}, a text outside the SEPA set). The payout run made it:
    fix the run, never the rail."""


class RailError(Exception):
    """Raised by ``PayoutRail.render`` when valid instructions cannot be made into a file: no instruction, too many,
    an end-to-end id twice, or (a bug here or in sepaxml) a document the XSD refuses or whose totals read back differ.
    Nothing was paid; the message says which check failed."""


def _shown(text: str) -> str:
    return text if len(text) <= INPUT_SHOWN_CHARS_MAX else text[:INPUT_SHOWN_CHARS_MAX] + "…"


def _grouped(compact: str) -> str:
    return " ".join(compact[i:i + 4] for i in range(0, len(compact), 4))


def _country(code: str) -> str:
    """'Germany (DE)': the country's name from schwifty's ISO 3166 data, for messages a provider reads."""
    country = schwifty.IBAN(code + "00", allow_invalid=True).country  # the lookup reads only the country code
    return f"{country.name} ({code})" if country is not None else code


def sepa_text(text: str) -> str:
    """``text`` as a SEPA file carries it: Latin letters with diacritics reduced to their base letter (é → e, ß → ss,
    ø → o), whitespace runs made one space, ends trimmed. Characters of other scripts stay, for the check to refuse:
    guessing a Latin spelling of a name would make the bank's name check fail later, not now."""
    decomposed = unicodedata.normalize("NFKD", text.translate(_LATIN_SPELLED))
    return " ".join("".join(c for c in decomposed if not unicodedata.combining(c)).split())


def _require_sepa(text: str, what: str, chars_max: int) -> str | None:
    """Why ``text`` cannot stand in a SEPA file as it is, or None."""
    for c in text:
        if c not in SEPA_CHARACTERS:
            return (f'{what} "{_shown(text)}": character "{c}" (U+{ord(c):04X}) is outside the SEPA character set '
                    f"({_SEPA_CHARACTERS_SAID})")
    if not 1 <= len(text) <= chars_max or text != text.strip():
        return f'{what} "{_shown(text)}": must be 1 to {chars_max} characters, without spaces at either end'
    return None


def _iban(given: str) -> schwifty.IBAN:
    compact = re.sub(r"\s+", "", given).upper()
    shown = _grouped(compact) if compact.isascii() and compact.isalnum() else given.strip()
    try:
        iban = schwifty.IBAN(given)
    except schwifty_errors.InvalidChecksumDigits:
        raise IbanError(f"payout IBAN {_shown(shown)}: checksum does not match (a character is mistyped)",
                        "iban") from None
    except schwifty_errors.InvalidCountryCode:
        raise IbanError(f"payout IBAN {_shown(shown)}: {shown[:2]!r} is not the country code of an IBAN",
                        "iban") from None
    except schwifty_errors.InvalidLength:
        length = schwifty.IBAN(compact, allow_invalid=True).spec.iban_length
        raise IbanError(f"payout IBAN {_shown(shown)}: {len(compact)} characters where an IBAN of "
                        f"{_country(compact[:2])} has {length}", "iban") from None
    except schwifty_errors.SchwiftyException as exc:  # the structure: characters, or the country's BBAN format
        raise IbanError(f"payout IBAN {_shown(shown)}: not an IBAN ({exc})", "iban") from None
    if not iban.in_sepa_zone:
        raise IbanError(f"payout IBAN {_shown(shown)}: IBAN of {_country(iban.country_code)} is outside SEPA: this "
                        f"rail pays only SEPA accounts", "iban")
    return iban


def _bic(given: str | None, iban: schwifty.IBAN) -> str | None:
    if given is None or not given.strip():
        if iban.country_code in EEA_COUNTRIES:
            return None
        known = iban.bic
        hint = f" (schwifty's bank registry gives {known} for this IBAN's bank)" if known is not None else ""
        raise IbanError(f"payout BIC: required for an IBAN of {_country(iban.country_code)}, outside the EEA, where "
                        f"SEPA needs the bank's BIC{hint}", "bic")
    try:
        bic = schwifty.BIC(given)
    except schwifty_errors.InvalidLength:
        raise IbanError(f"payout BIC {_shown(given)}: a BIC has 8 or 11 characters", "bic") from None
    except schwifty_errors.InvalidCountryCode:
        raise IbanError(f"payout BIC {_shown(given)}: {given.strip().upper()[4:6]!r} (5th-6th characters) is not a "
                        f"country code", "bic") from None
    except schwifty_errors.SchwiftyException:
        raise IbanError(f"payout BIC {_shown(given)}: not a BIC (4 bank characters, 2 country letters, 2 location "
                        f"characters, optionally 3 branch characters)", "bic") from None
    area = next((area for area in _BANKING_AREAS if iban.country_code in area), frozenset({iban.country_code}))
    if bic.country_code not in area:
        raise IbanError(f"payout BIC {bic}: a bank in {_country(bic.country_code)}, but the payout IBAN is of "
                        f"{_country(iban.country_code)}: correct the BIC or leave it out", "bic")
    return str(bic)


def _account_fields(holder: str, iban: str, bic: str | None, currency: str) -> tuple[str, str, str | None, str]:
    """The normal form of bank details, or IbanError: the one parser behind ``check_account`` and ``PayoutAccount``."""
    if currency.strip().upper() != CURRENCY:
        raise IbanError(f"payout currency {_shown(currency)!r}: SEPA credit transfers are in EUR only", "currency")
    holder_sepa = sepa_text(holder)
    refused = _require_sepa(holder_sepa, "payout account holder", HOLDER_CHARS_MAX)
    if refused is not None:
        raise IbanError(refused if holder_sepa == holder else f"{refused}, from \"{_shown(holder)}\"", "holder")
    parsed = _iban(iban)
    return holder_sepa, str(parsed), _bic(bic, parsed), CURRENCY


@dataclass(frozen=True, repr=False)
class PayoutAccount:
    """A bank account a payout may go to, in normal form: the holder in the SEPA character set, the IBAN without
    spaces in capitals, the BIC or None (a SEPA bank in the EEA needs none), the currency. Build it with
    ``check_account``; building it directly re-checks it, so an account loaded from storage is as trusted as a new
    one. ``repr`` and ``masked`` hide the IBAN: only the run's file carries it whole."""

    holder: str
    iban: str
    bic: str | None
    currency: str

    def __post_init__(self) -> None:
        normal = _account_fields(self.holder, self.iban, self.bic, self.currency)
        if normal != (self.holder, self.iban, self.bic, self.currency):
            raise IbanError(f"payout account {self.masked()}: not in normal form (holder {normal[0]!r}, BIC "
                            f"{normal[2]!r}): build it with check_account", "iban")

    def masked(self) -> str:
        """The IBAN as logs, pages and e-mails show it: country, check digits and the last 4 characters
        ("DE89 •••• •••• •••• •••• 3000")."""
        return mask_iban(self.iban)

    def __repr__(self) -> str:
        return f"PayoutAccount(holder={self.holder!r}, iban={self.masked()!r}, bic={self.bic!r}, " \
               f"currency={self.currency!r})"


def check_account(holder: str, iban: str, bic: str | None, currency: str) -> PayoutAccount:
    """Parse a provider's payout details as they typed them: the IBAN's country, length, structure and checksum
    (spaces and case do not matter), the country in SEPA, the BIC when given (and then of the IBAN's country), a BIC
    where SEPA needs one, the holder's name transliterated to the SEPA character set (``sepa_text``) or refused with the
    character named, the currency EUR. Raises IbanError naming the field."""
    return PayoutAccount(*_account_fields(holder, iban, bic, currency))


@dataclass(frozen=True)
class PayoutInstruction:
    """Pay ``amount_minor`` micro-EUR to ``account``. Banks move whole cents, so the payout run rounds (down, in the
    provider's books) before it instructs: an amount that is not whole cents is refused here, never rounded."""

    provider_id: str
    account: PayoutAccount
    amount_minor: int                 # micro-EUR, a multiple of MINOR_PER_CENT, > 0
    end_to_end_id: str                # [A-Za-z0-9-]{1,35}: returned by the bank with the payment, for reconciliation
    remittance: str                   # what the provider's statement shows, e.g. "llorch payout 2026-12 statement 17"

    def __post_init__(self) -> None:
        what = f"payout instruction {_shown(self.end_to_end_id)!r} (provider {_shown(self.provider_id)})"
        if not _ID.fullmatch(self.end_to_end_id):
            raise InstructionError(f"{what}: end_to_end_id must be 1 to {ID_CHARS_MAX} characters of [A-Za-z0-9-]")
        if not self.provider_id:
            raise InstructionError(f"{what}: provider_id is empty")
        if not isinstance(self.account, PayoutAccount):
            raise InstructionError(f"{what}: account is a {type(self.account).__name__}, not a PayoutAccount")
        if type(self.amount_minor) is not int or not 0 < self.amount_minor <= AMOUNT_MINOR_MAX:
            raise InstructionError(f"{what}: amount_minor {self.amount_minor!r} must be an int from 1 to "
                                   f"{AMOUNT_MINOR_MAX} micro-EUR")
        if self.amount_minor % MINOR_PER_CENT:
            raise InstructionError(f"{what}: amount_minor {self.amount_minor} is not a whole number of cents "
                                   f"(divisible by {MINOR_PER_CENT}): round it in the payout run")
        refused = _require_sepa(self.remittance, f"{what}: remittance", REMITTANCE_CHARS_MAX)
        if refused is not None:
            raise InstructionError(refused)

    @property
    def amount_cents(self) -> int:
        return self.amount_minor // MINOR_PER_CENT


@dataclass(frozen=True)
class RunHeader:
    """One payout run as the bank sees it: its id (the file's message id, unique per upload), when it was made (the
    run's clock, UTC), the day the bank is to pay, and the platform's own account with its BIC."""

    run_id: str                       # [A-Za-z0-9-]{1,35}: message id, payment-information id and file name
    created_ms: int
    execution_date: dt.date           # the day the bank is asked to pay; not before created_ms's day (UTC)
    debtor: PayoutAccount
    debtor_name: str                  # the platform as the file names it (initiating party and debtor)

    def __post_init__(self) -> None:
        what = f"payout run {_shown(self.run_id)!r}"
        if not _ID.fullmatch(self.run_id):
            raise InstructionError(f"{what}: run_id must be 1 to {ID_CHARS_MAX} characters of [A-Za-z0-9-]")
        if type(self.created_ms) is not int or self.created_ms < 0:
            raise InstructionError(f"{what}: created_ms {self.created_ms!r} must be an int ≥ 0")
        if isinstance(self.execution_date, dt.datetime) or not isinstance(self.execution_date, dt.date):
            raise InstructionError(f"{what}: execution_date {self.execution_date!r} must be a datetime.date")
        created_day = _created_utc(self.created_ms).date()
        if self.execution_date < created_day:
            raise InstructionError(f"{what}: execution_date {self.execution_date} is before the run was made "
                                   f"({created_day}): a bank refuses to pay in the past")
        if not isinstance(self.debtor, PayoutAccount) or self.debtor.bic is None:
            raise InstructionError(f"{what}: debtor must be the platform's PayoutAccount with its BIC")
        refused = _require_sepa(self.debtor_name, f"{what}: debtor_name", HOLDER_CHARS_MAX)
        if refused is not None:
            raise InstructionError(refused)


def _created_utc(created_ms: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(created_ms // 1000, dt.timezone.utc)


class PayoutRail(Protocol):
    """A way of paying providers. ``render`` turns one run into what the operator hands to the payment provider
    (file name → content), each file already validated; it raises RailError when it cannot, and pays nothing
    itself."""

    name: str

    def render(self, header: RunHeader, instructions: Sequence[PayoutInstruction]) -> dict[str, bytes]: ...


class _DeterministicTransfer(sepaxml.SepaTransfer):
    """sepaxml's SepaTransfer, with the ids and the time it would invent given instead: sepaxml writes a random
    message id (time + 12 hex digits), a random payment-information id and ``datetime.now()`` in local time without
    an offset. These hooks (sepaxml 2.7's ``_create_header`` and ``_finalize_batch``) run before its export computes
    the totals; ``render`` reads the ids back, so a sepaxml that stops calling them fails loudly, not randomly."""

    def __init__(self, config: dict[str, object], message_id: str, created: str) -> None:
        self._message_id = message_id
        self._created = created
        super().__init__(config, schema=SCHEMA, clean=False)  # clean=False: texts are checked here, never rewritten

    def _create_header(self) -> None:
        self.msg_id = self._message_id
        super()._create_header()
        self._xml.find("CstmrCdtTrfInitn/GrpHdr/CreDtTm").text = self._created

    def _finalize_batch(self) -> None:
        super()._finalize_batch()
        for node in self._xml.iter("PmtInfId"):
            node.text = self._message_id


@functools.cache
def _schema() -> xmlschema.XMLSchema:
    """The pain.001.001.09 XSD sepaxml ships, loaded once (0.4 s; sepaxml's own ``validate=True`` reloads it for
    every file)."""
    return xmlschema.XMLSchema(str(Path(sepaxml.__file__).parent / "schemas" / f"{SCHEMA}.xsd"))


def _eur(minor: int) -> str:
    """micro-EUR as the file writes euros: exactly two decimals (callers hold whole cents)."""
    return f"{Decimal(minor).scaleb(-MINOR_DIGITS):.2f}"


class SepaCreditTransfer:
    """A SEPA credit transfer file (pain.001.001.09) with one batch: every instruction paid on the run's execution
    date from the platform's account, the creditor's BIC written when known and left out otherwise (the file is then
    IBAN-only for that payment, as SEPA allows in the EEA). See the module docstring for the steps of ``render``."""

    name = "sepa-credit-transfer"

    def render(self, header: RunHeader, instructions: Sequence[PayoutInstruction]) -> dict[str, bytes]:
        # (1) the run's bounds
        if not 1 <= len(instructions) <= INSTRUCTIONS_PER_FILE_MAX:
            raise RailError(f"payout run {header.run_id}: {len(instructions)} instructions, where one file holds 1 "
                            f"to {INSTRUCTIONS_PER_FILE_MAX}")
        seen: set[str] = set()
        for instruction in instructions:
            if instruction.end_to_end_id in seen:
                raise RailError(f"payout run {header.run_id}: end_to_end_id {instruction.end_to_end_id} is used "
                                f"twice: the bank reports payments by it")
            seen.add(instruction.end_to_end_id)
        content = self._document(header, instructions)
        root = ET.fromstring(content)
        # (3) the XSD sepaxml ships
        error = next(iter(_schema().iter_errors(root)), None)
        if error is not None:
            raise RailError(f"payout run {header.run_id}: the {SCHEMA} file does not validate against its XSD: "
                            f"{error.reason} at {error.path}")
        # (4) read back what the bank will read
        _check_read_back(root, header, instructions)
        return {f"{header.run_id}.{SCHEMA}.xml": content}

    @staticmethod
    def _document(header: RunHeader, instructions: Sequence[PayoutInstruction]) -> bytes:
        """(2) sepaxml builds the document; its failures (plain ``Exception`` for a missing field) become RailError."""
        created = _created_utc(header.created_ms).strftime("%Y-%m-%dT%H:%M:%SZ")
        config: dict[str, object] = {"name": header.debtor_name, "IBAN": header.debtor.iban, "BIC": header.debtor.bic,
                                     "batch": True, "currency": CURRENCY}
        try:
            transfer = _DeterministicTransfer(config, header.run_id, created)
            for instruction in instructions:
                account = instruction.account
                payment: dict[str, object] = {
                    "name": account.holder, "IBAN": account.iban, "amount": instruction.amount_cents,
                    "execution_date": header.execution_date, "description": instruction.remittance,
                    "endtoend_id": instruction.end_to_end_id}
                if account.bic is not None:
                    payment["BIC"] = account.bic
                transfer.add_payment(payment)
            content = transfer.export(validate=False)  # validated in step (3) against the same XSD, loaded once
        except Exception as exc:
            raise RailError(f"payout run {header.run_id}: sepaxml could not build the {SCHEMA} file: {exc}") from exc
        assert isinstance(content, bytes), type(content)
        return content


def _check_read_back(root: ET.Element, header: RunHeader, instructions: Sequence[PayoutInstruction]) -> None:
    """The document says what the instructions say: counts, totals, each payment in order. Raises RailError."""
    ns = {"p": NAMESPACE}
    total = _eur(sum(instruction.amount_minor for instruction in instructions))
    count = str(len(instructions))

    def text(node: ET.Element, path: str) -> str | None:
        found = node.find(path, ns)
        return None if found is None else found.text

    batches = root.findall("p:CstmrCdtTrfInitn/p:PmtInf", ns)
    expected: list[tuple[str, str | None, str | None]] = [
        ("GrpHdr/MsgId", text(root, "p:CstmrCdtTrfInitn/p:GrpHdr/p:MsgId"), header.run_id),
        ("GrpHdr/NbOfTxs", text(root, "p:CstmrCdtTrfInitn/p:GrpHdr/p:NbOfTxs"), count),
        ("GrpHdr/CtrlSum", text(root, "p:CstmrCdtTrfInitn/p:GrpHdr/p:CtrlSum"), total),
        ("PmtInf count", str(len(batches)), "1")]
    if len(batches) == 1:
        batch = batches[0]
        payments = batch.findall("p:CdtTrfTxInf", ns)
        expected += [("PmtInf/PmtInfId", text(batch, "p:PmtInfId"), header.run_id),
                     ("PmtInf/NbOfTxs", text(batch, "p:NbOfTxs"), count),
                     ("PmtInf/CtrlSum", text(batch, "p:CtrlSum"), total),
                     ("CdtTrfTxInf count", str(len(payments)), count)]
        for i, (payment, instruction) in enumerate(zip(payments, instructions)):
            amount = payment.find("p:Amt/p:InstdAmt", ns)
            expected += [(f"CdtTrfTxInf[{i}]/EndToEndId", text(payment, "p:PmtId/p:EndToEndId"),
                          instruction.end_to_end_id),
                         (f"CdtTrfTxInf[{i}]/InstdAmt", None if amount is None else amount.text,
                          _eur(instruction.amount_minor)),
                         (f"CdtTrfTxInf[{i}]/InstdAmt@Ccy", None if amount is None else amount.get("Ccy"), CURRENCY),
                         (f"CdtTrfTxInf[{i}]/IBAN", text(payment, "p:CdtrAcct/p:Id/p:IBAN"), instruction.account.iban),
                         (f"CdtTrfTxInf[{i}]/BICFI", text(payment, "p:CdtrAgt/p:FinInstnId/p:BICFI"),
                          instruction.account.bic)]
    for where, found, wanted in expected:
        if found != wanted:
            raise RailError(f"payout run {header.run_id}: the {SCHEMA} file reads back {where} = {found!r}, where the "
                            f"instructions say {wanted!r}")


_SEPA_IS_A_RAIL: PayoutRail = SepaCreditTransfer()   # the type checker holds SepaCreditTransfer to the protocol
