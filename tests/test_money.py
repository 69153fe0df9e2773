"""Money as a person reads it (ledger/money.py): the currency's amount, exact, with at least two decimals."""

from __future__ import annotations

from decimal import Decimal

from hypothesis import given, strategies as st

from llorch.ledger.money import readable


def test_examples():
    assert readable(8) == "0.000008 EUR"
    assert readable(1_500_000) == "1.50 EUR"
    assert readable(100_000) == "0.10 EUR"
    assert readable(0) == "0.00 EUR"
    assert readable(123_456_789, "CHF") == "123.456789 CHF"


@given(st.integers(min_value=0, max_value=10**15))
def test_readable_is_exact(minor):
    amount, currency = readable(minor).split()
    assert currency == "EUR" and len(amount.split(".")[1]) >= 2
    assert Decimal(amount).scaleb(6) == minor
