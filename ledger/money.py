"""Money as a person reads it. Amounts are integer minor units everywhere in llorch (10^-6 of the currency: a
micro-EUR), decided by settlement; this is only how one is shown: the currency's amount with the decimals that
matter, at least two, exactly (no rounding): 8 → "0.000008 EUR", 1_500_000 → "1.50 EUR"."""

from __future__ import annotations

from decimal import Decimal, InvalidOperation

MINOR_DIGITS = 6


def readable(minor: int, currency: str = "EUR") -> str:
    text = f"{Decimal(minor).scaleb(-MINOR_DIGITS):.{MINOR_DIGITS}f}".rstrip("0")
    whole, _, decimals = text.partition(".")
    return f"{whole}.{decimals.ljust(2, '0')} {currency}"


def parse_cents(text: str) -> int:
    """An amount a person wrote in the currency, in whole cents ("10.00") → minor units, exactly; ValueError naming
    the text otherwise."""
    try:
        amount = Decimal(text.strip())
    except InvalidOperation:
        raise ValueError(f"{text[:30]!r} is not an amount (e.g. 10.00)") from None
    if not amount.is_finite() or not 0 <= amount <= 10**9 or amount != amount.quantize(Decimal("0.01")):
        raise ValueError(f"{text[:30]!r} must be 0..1000000000 in whole cents")
    return int(amount.scaleb(MINOR_DIGITS))
