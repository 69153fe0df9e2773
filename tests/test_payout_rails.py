"""Payout rails (gateway/rails.py): bank details parsed with schwifty, and the SEPA credit transfer file
(pain.001.001.09) checked here independently of the rail: against the XSD sepaxml ships, and by reading it back.

IBANs are the documentation examples of each country's bank association (no real account). The United Kingdom: schwifty
counts it in SEPA (it is in the SEPA schemes' geographic scope) and it is outside the EEA, so a GB IBAN is paid only
with its bank's BIC."""

from __future__ import annotations

import datetime as dt
import re
import xml.etree.ElementTree as ET
from decimal import Decimal
from pathlib import Path

import pytest
import sepaxml
import xmlschema
from hypothesis import given, settings, strategies as st

from llorch.gateway import rails
from llorch.gateway.rails import (IbanError, InstructionError, PayoutAccount, PayoutInstruction, PayoutRail,
                                  RailError, RunHeader, SepaCreditTransfer, check_account)

NS = {"p": "urn:iso:std:iso:20022:tech:xsd:pain.001.001.09"}
DE = "DE89370400440532013000"
FR = "FR1420041010050500013M02606"
NL = "NL91ABNA0417164300"
GB = "GB33BUKB20201555555555"
BR = "BR1800360305000010009795493C1"
CREATED_MS = 1_798_761_600_000          # 2027-01-01T00:00:00Z


@pytest.fixture(scope="module")
def xsd() -> xmlschema.XMLSchema:
    """The pain.001.001.09 schema as sepaxml ships it, loaded here, not through the rail."""
    return xmlschema.XMLSchema(str(Path(sepaxml.__file__).parent / "schemas" / "pain.001.001.09.xsd"))


def platform() -> PayoutAccount:
    return check_account("llorch GmbH", "DE02 1203 0000 0000 2020 51", "BYLADEM1001", "EUR")


def header(run_id: str = "payout-2026-12", created_ms: int = CREATED_MS) -> RunHeader:
    return RunHeader(run_id, created_ms, dt.date(2027, 1, 4), platform(), "llorch GmbH")


def instruction(n: int, account: PayoutAccount, amount_minor: int) -> PayoutInstruction:
    return PayoutInstruction(f"provider-{n}", account, amount_minor, f"llorch-2026-12-{n}",
                             f"llorch payout 2026-12 statement {n}")


def three() -> list[PayoutInstruction]:
    return [instruction(1, check_account("Zoë Müller", DE, None, "EUR"), 12_340_000),
            instruction(2, check_account("Jean Dupont", FR, "PSSTFRPP", "EUR"), 10_000),
            instruction(3, check_account("Piet de Vries", NL, None, "EUR"), 1_000_000_000_000)]


def text(root: ET.Element, path: str) -> str:
    node = root.find(path, NS)
    assert node is not None and node.text is not None, path
    return node.text


# -- accounts ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("typed, compact", [(DE, DE), ("de89 3704 0044 0532 0130 00", DE),
                                            ("FR14 2004 1010 0505 0001 3M02 606", FR), (" nl91abna0417164300 ", NL)])
def test_sepa_ibans_are_accepted_without_a_bic_in_normal_form(typed: str, compact: str) -> None:
    account = check_account("A. Provider", typed, None, "eur")
    assert (account.iban, account.bic, account.currency) == (compact, None, "EUR")


def test_a_bic_is_kept_in_capitals_when_given() -> None:
    assert check_account("Jean", FR, "psst fr pp", "EUR").bic == "PSSTFRPP"


def test_a_damaged_iban_is_refused_naming_it() -> None:
    with pytest.raises(IbanError, match=r"payout IBAN DE89 3704 0044 0532 0130 01: checksum does not match") as caught:
        check_account("A", DE[:-1] + "1", None, "EUR")
    assert caught.value.field == "iban"


def test_an_iban_of_the_wrong_length_says_the_right_one() -> None:
    with pytest.raises(IbanError, match=r"20 characters where an IBAN of Germany \(DE\) has 22"):
        check_account("A", DE[:-2], None, "EUR")


def test_an_iban_outside_sepa_is_refused() -> None:
    with pytest.raises(IbanError, match=r"IBAN of Brazil \(BR\) is outside SEPA: this rail pays only SEPA accounts"):
        check_account("A", BR, None, "EUR")


def test_the_uk_is_in_sepa_but_outside_the_eea_so_its_bic_is_required() -> None:
    with pytest.raises(IbanError, match=r"payout BIC: required for an IBAN of United Kingdom \(GB\)") as caught:
        check_account("A", GB, None, "EUR")
    assert caught.value.field == "bic"
    assert check_account("A", GB, "BUKBGB22", "EUR").bic == "BUKBGB22"


def test_a_bic_of_another_country_is_refused() -> None:
    with pytest.raises(IbanError, match=r"payout BIC ABNANL2A: a bank in Netherlands \(NL\), but the payout IBAN is "
                                        r"of Germany \(DE\)") as caught:
        check_account("A", DE, "ABNANL2A", "EUR")
    assert caught.value.field == "bic"


def test_a_bic_of_a_territory_may_serve_its_countrys_iban() -> None:
    assert check_account("A", FR, "AGRIGPGX", "EUR").bic == "AGRIGPGX"      # a bank in Guadeloupe, French IBAN


@pytest.mark.parametrize("bic, said", [("COBADE", "8 or 11 characters"), ("COBAXXFF", "'XX'"),
                                       ("CO_ADEFF", "not a BIC")])
def test_a_malformed_bic_is_refused(bic: str, said: str) -> None:
    with pytest.raises(IbanError, match=f"payout BIC {bic}: .*{said}"):
        check_account("A", DE, bic, "EUR")


def test_only_euros() -> None:
    with pytest.raises(IbanError, match=r"payout currency 'CHF': SEPA credit transfers are in EUR only"):
        check_account("A", DE, None, "CHF")


def test_a_latin_holder_is_transliterated_to_the_sepa_set() -> None:
    assert check_account("  Zoë  Ærø-Łukasz O’Brien Straße ", DE, None, "EUR").holder == \
        "Zoe AEro-Lukasz O'Brien Strasse"


@pytest.mark.parametrize("holder, character", [("李雷", '"李" (U+674E)'), ("Smith & Sons", '"&" (U+0026)'),
                                               ("Иван Петров", '"И" (U+0418)')])
def test_a_holder_outside_the_sepa_set_is_refused_naming_the_character(holder: str, character: str) -> None:
    with pytest.raises(IbanError, match=f"payout account holder .*character {re.escape(character)} is outside the SEPA"
                       ) as caught:
        check_account(holder, DE, None, "EUR")
    assert caught.value.field == "holder"


@pytest.mark.parametrize("holder", ["", "   ", "x" * 71])
def test_a_holder_of_the_wrong_length_is_refused(holder: str) -> None:
    with pytest.raises(IbanError, match="payout account holder .*must be 1 to 70 characters"):
        check_account(holder, DE, None, "EUR")


def test_masked_shows_only_the_country_check_digits_and_last_four() -> None:
    account = check_account("A", DE, None, "EUR")
    assert account.masked() == "DE89 •••• •••• •••• •••• 3000"
    assert check_account("A", NL, None, "EUR").masked() == "NL91 •••• •••• •••• 4300"
    assert DE not in repr(account) and "0532" not in repr(account) and account.masked() in repr(account)
    assert DE not in repr(instruction(1, account, 10_000))


def test_an_account_built_directly_is_checked_again() -> None:
    assert PayoutAccount("A", DE, None, "EUR") == check_account(" A ", DE.lower(), None, "eur")
    with pytest.raises(IbanError, match="checksum does not match"):
        PayoutAccount("A", DE[:-1] + "1", None, "EUR")
    with pytest.raises(IbanError, match="not in normal form"):
        PayoutAccount("Zoë", DE, None, "EUR")
    with pytest.raises(IbanError, match="not in normal form"):
        PayoutAccount("A", DE.lower(), None, "EUR")


# -- instructions and the run's header ------------------------------------------------------------------------------

@pytest.mark.parametrize("amount_minor, said", [(12_345_678, "not a whole number of cents"),
                                                (9_999, "not a whole number of cents"),
                                                (0, "must be an int from 1"), (-10_000, "must be an int from 1"),
                                                (True, "must be an int from 1"),
                                                (1_000_000_000_000 * 1_000_000, "must be an int from 1")])
def test_an_amount_that_is_not_positive_whole_cents_is_refused(amount_minor: int, said: str) -> None:
    with pytest.raises(InstructionError, match=f"amount_minor .*{said}"):
        instruction(1, check_account("A", DE, None, "EUR"), amount_minor)


@pytest.mark.parametrize("end_to_end_id", ["", "a/b", "x" * 36, "payout 1", "payout_1"])
def test_an_end_to_end_id_outside_its_grammar_is_refused(end_to_end_id: str) -> None:
    with pytest.raises(InstructionError, match="end_to_end_id must be 1 to 35 characters"):
        PayoutInstruction("p", check_account("A", DE, None, "EUR"), 10_000, end_to_end_id, "llorch payout")


@pytest.mark.parametrize("remittance, said", [("payout € 2026-12", "character \"€\""), ("x" * 141, "1 to 140")])
def test_a_remittance_outside_the_sepa_rules_is_refused(remittance: str, said: str) -> None:
    with pytest.raises(InstructionError, match=f"remittance .*{said}"):
        PayoutInstruction("p", check_account("A", DE, None, "EUR"), 10_000, "e2e-1", remittance)


def test_a_header_that_a_bank_would_refuse_is_refused() -> None:
    with pytest.raises(InstructionError, match="execution_date 2026-12-31 is before the run was made"):
        RunHeader("run-1", CREATED_MS, dt.date(2026, 12, 31), platform(), "llorch GmbH")
    with pytest.raises(InstructionError, match="debtor must be the platform's PayoutAccount with its BIC"):
        RunHeader("run-1", CREATED_MS, dt.date(2027, 1, 4), check_account("llorch", DE, None, "EUR"), "llorch GmbH")
    with pytest.raises(InstructionError, match="run_id must be"):
        RunHeader("run.1", CREATED_MS, dt.date(2027, 1, 4), platform(), "llorch GmbH")
    with pytest.raises(InstructionError, match="must be a datetime.date"):
        RunHeader("run-1", CREATED_MS, dt.datetime(2027, 1, 4), platform(), "llorch GmbH")


# -- the SEPA credit transfer file ----------------------------------------------------------------------------------

def test_a_run_of_three_is_a_valid_pain_001_001_09_file(xsd: xmlschema.XMLSchema) -> None:
    rail: PayoutRail = SepaCreditTransfer()
    files = rail.render(header(), three())
    assert list(files) == ["payout-2026-12.pain.001.001.09.xml"]
    content = files["payout-2026-12.pain.001.001.09.xml"]
    xsd.validate(content.decode())                                      # raises on any schema violation
    root = ET.fromstring(content)
    assert text(root, "p:CstmrCdtTrfInitn/p:GrpHdr/p:MsgId") == "payout-2026-12"
    assert text(root, "p:CstmrCdtTrfInitn/p:GrpHdr/p:CreDtTm") == "2027-01-01T00:00:00Z"
    assert text(root, "p:CstmrCdtTrfInitn/p:GrpHdr/p:NbOfTxs") == "3"
    assert text(root, "p:CstmrCdtTrfInitn/p:GrpHdr/p:CtrlSum") == "1000012.35"   # 12.34 + 0.01 + 1 000 000.00
    assert Decimal(text(root, "p:CstmrCdtTrfInitn/p:GrpHdr/p:CtrlSum")) == \
        sum(Decimal(i.amount_minor) / 10**6 for i in three())
    assert text(root, "p:CstmrCdtTrfInitn/p:PmtInf/p:ReqdExctnDt/p:Dt") == "2027-01-04"
    assert text(root, "p:CstmrCdtTrfInitn/p:PmtInf/p:DbtrAgt/p:FinInstnId/p:BICFI") == "BYLADEM1001"
    payments = root.findall("p:CstmrCdtTrfInitn/p:PmtInf/p:CdtTrfTxInf", NS)
    assert [text(p, "p:Amt/p:InstdAmt") for p in payments] == ["12.34", "0.01", "1000000.00"]
    assert [text(p, "p:CdtrAcct/p:Id/p:IBAN") for p in payments] == [DE, FR, NL]      # whole, in the file only
    assert [text(p, "p:PmtId/p:EndToEndId") for p in payments] == [f"llorch-2026-12-{n}" for n in (1, 2, 3)]
    assert [text(p, "p:Cdtr/p:Nm") for p in payments] == ["Zoe Muller", "Jean Dupont", "Piet de Vries"]
    assert text(payments[0], "p:RmtInf/p:Ustrd") == "llorch payout 2026-12 statement 1"
    bics = [p.find("p:CdtrAgt/p:FinInstnId/p:BICFI", NS) for p in payments]
    assert [None if b is None else b.text for b in bics] == [None, "PSSTFRPP", None]    # IBAN-only where unknown


def test_a_uk_creditor_is_paid_with_its_bic(xsd: xmlschema.XMLSchema) -> None:
    content, = SepaCreditTransfer().render(header(), [instruction(1, check_account("A", GB, "BUKBGB22", "EUR"),
                                                                  50_000)]).values()
    xsd.validate(content.decode())
    assert b"<BICFI>BUKBGB22</BICFI>" in content and GB.encode() in content


def test_the_same_run_renders_the_same_bytes() -> None:
    first = SepaCreditTransfer().render(header(), three())
    assert SepaCreditTransfer().render(header(), three()) == first
    later = SepaCreditTransfer().render(header(created_ms=CREATED_MS + 90_000), three())
    assert list(later.values())[0] == list(first.values())[0].replace(b"T00:00:00Z", b"T00:01:30Z")


def test_a_run_the_rail_cannot_send_is_refused() -> None:
    with pytest.raises(RailError, match="0 instructions, where one file holds 1 to"):
        SepaCreditTransfer().render(header(), [])
    twice = three()[:1] * 2
    with pytest.raises(RailError, match="end_to_end_id llorch-2026-12-1 is used twice"):
        SepaCreditTransfer().render(header(), twice)


def test_a_sepaxml_that_stops_calling_the_hooks_fails_loudly(monkeypatch: pytest.MonkeyPatch) -> None:
    """If sepaxml's internals change so that its random payment-information id survives, render refuses."""
    monkeypatch.setattr(rails._DeterministicTransfer, "_finalize_batch", sepaxml.SepaTransfer._finalize_batch)
    with pytest.raises(RailError, match=r"reads back PmtInf/PmtInfId = 'llorchGmbH-[0-9a-f]{12}', where the "
                                        r"instructions say 'payout-2026-12'"):
        SepaCreditTransfer().render(header(), three())


def test_a_document_the_xsd_refuses_is_never_returned(monkeypatch: pytest.MonkeyPatch) -> None:
    def bad_time(self: rails._DeterministicTransfer) -> None:
        sepaxml.SepaTransfer._create_header(self)
        self._xml.find("CstmrCdtTrfInitn/GrpHdr/CreDtTm").text = "yesterday"

    monkeypatch.setattr(rails._DeterministicTransfer, "_create_header", bad_time)
    with pytest.raises(RailError, match="does not validate against its XSD: .*CreDtTm"):
        SepaCreditTransfer().render(header(), three())


ACCOUNTS = [check_account("Zoe", DE, None, "EUR"), check_account("Jean", FR, "PSSTFRPP", "EUR"),
            check_account("Piet", NL, "ABNANL2A", "EUR"), check_account("Ann", GB, "BUKBGB22", "EUR")]


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(ACCOUNTS), st.integers(min_value=1, max_value=99_999_999_999)),
                min_size=1, max_size=25))
def test_the_control_sum_is_the_exact_sum_of_the_instructions(payments: list[tuple[PayoutAccount, int]]) -> None:
    instructions = [instruction(n, account, cents * 10_000) for n, (account, cents) in enumerate(payments)]
    content, = SepaCreditTransfer().render(header(), instructions).values()
    root = ET.fromstring(content)
    total = sum(Decimal(i.amount_minor) / 10**6 for i in instructions)
    assert Decimal(text(root, "p:CstmrCdtTrfInitn/p:GrpHdr/p:CtrlSum")) == total
    assert text(root, "p:CstmrCdtTrfInitn/p:GrpHdr/p:CtrlSum") == f"{total:.2f}"
    assert text(root, "p:CstmrCdtTrfInitn/p:GrpHdr/p:NbOfTxs") == str(len(instructions))
    amounts = [text(p, "p:Amt/p:InstdAmt") for p in root.findall("p:CstmrCdtTrfInitn/p:PmtInf/p:CdtTrfTxInf", NS)]
    assert [Decimal(a) for a in amounts] == [Decimal(i.amount_minor) / 10**6 for i in instructions]
