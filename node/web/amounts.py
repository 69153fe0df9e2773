"""Money as a person reads it. Amounts are integer minor units everywhere in llorch: micro-units of the currency
(1 EUR = 1_000_000), exact, as machines exchange them; a page shows them in the currency ("0.001234 EUR")."""

from __future__ import annotations

from decimal import Decimal

MINOR_PER_MAJOR = 1_000_000        # money is integer micro-units of the currency everywhere in llorch
DECIMALS_MAX = 6                   # one minor unit: every amount is exact with this many
DECIMALS_MIN = 2                   # cents, however round the amount


def money(minor: int | None, currency: str = "EUR") -> str:
    """Integer minor units as an exact decimal amount: 1234567 → "1.234567 EUR"."""
    if minor is None:
        return "unlimited"
    return f"{Decimal(minor) / MINOR_PER_MAJOR:.{DECIMALS_MAX}f} {currency}"


def money_to(minor: int, decimals: int, currency: str) -> str:
    """``minor`` with ``decimals`` (2..6) decimals and thousands separators, for a scale a person reads at a glance
    (a chart's axis): 1500000 with 2 → "1.50 EUR". Exact when ``minor`` is a multiple of 10^(6 - decimals)."""
    if not DECIMALS_MIN <= decimals <= DECIMALS_MAX:
        raise ValueError(f"an amount has {DECIMALS_MIN}..{DECIMALS_MAX} decimals, not {decimals}")
    return f"{Decimal(minor) / MINOR_PER_MAJOR:,.{decimals}f} {currency}"


def decimals_of_step(step_minor: int) -> int:
    """The decimals that show every multiple of ``step_minor`` exactly, at least DECIMALS_MIN: 500 (0.0005) → 4."""
    if step_minor <= 0:
        raise ValueError(f"a step is a positive number of minor units, not {step_minor}")
    zeros = 0
    while step_minor % 10 == 0 and zeros < DECIMALS_MAX:
        step_minor //= 10
        zeros += 1
    return max(DECIMALS_MIN, DECIMALS_MAX - zeros)
