"""Money as a person reads it. Amounts are integer minor units everywhere in llorch (10^-6 of the currency: a
micro-EUR), decided by settlement; this is only how one is shown: the currency's amount with the decimals that
matter, at least two, exactly (no rounding): 8 → "0.000008 EUR", 1_500_000 → "1.50 EUR"."""

from __future__ import annotations

from decimal import Decimal

MINOR_DIGITS = 6


def readable(minor: int, currency: str = "EUR") -> str:
    text = f"{Decimal(minor).scaleb(-MINOR_DIGITS):.{MINOR_DIGITS}f}".rstrip("0")
    whole, _, decimals = text.partition(".")
    return f"{whole}.{decimals.ljust(2, '0')} {currency}"
