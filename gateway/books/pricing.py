"""Prices, pure and in integers (minor units per 1M tokens; multipliers and margins in basis points, 10,000 = 100%).

  provider price   what the ticket pays the provider: its attested price, raised (never lowered) by the demand
                   multiplier: ticket_price = max(attested, ceil(attested × multiplier_bp / 10,000)). The provider
                   refuses any ticket below its attested price; its receipt at these prices is its **payout**.
  customer price   what the customer pays per 1M tokens: the demand-adjusted price with the tier's margin on top,
                   customer_price = ceil(ceil(attested × multiplier_bp / 10,000) × 10,000 / (10,000 − margin_bp)),
                   and never below the ticket price. The customer's ``max_price_*`` ceilings compare with this.
  charge           tokens × customer prices, rounded up once; fee = charge − payout ≥ 0, so charge = payout + fee
                   exactly, and the fee share is the margin up to rounding (gateway/books/settlement.py).
  demand           utilisation of the providers offering the model (busy slots / all slots, from attestations)
                   picks the multiplier: the seed's PricingEngine raises prices when demand is high and lowers them
                   when it is low (the discount comes out of the margin, never out of the provider's price).
"""

from __future__ import annotations

from dataclasses import dataclass

BASIS_POINTS = 10_000
MARGIN_BP_MIN, MARGIN_BP_MAX, MARGIN_BP_DEFAULT = 2_000, 6_000, 4_000
# (utilisation in ppm at least, multiplier in bp): the first row that applies, from the top.
DEMAND_TABLE = ((950_000, 15_000), (800_000, 12_000), (200_000, 10_000), (0, 9_000))


class PricingError(Exception):
    """A margin or multiplier outside its allowed range (a configuration error)."""


def check_margin(margin_bp: int) -> int:
    if not MARGIN_BP_MIN <= margin_bp <= MARGIN_BP_MAX:
        raise PricingError(f"a margin must be {MARGIN_BP_MIN}..{MARGIN_BP_MAX} basis points (20%-60%), "
                           f"got {margin_bp}")
    return margin_bp


def demand_multiplier_bp(utilisation_ppm: int) -> int:
    for threshold, multiplier in DEMAND_TABLE:
        if utilisation_ppm >= threshold:
            return multiplier
    raise AssertionError("the demand table covers 0")


def utilisation_ppm(slots_total: int, slots_free: int) -> int:
    return 0 if slots_total <= 0 else (slots_total - slots_free) * 1_000_000 // slots_total


def ticket_price(attested_per_1m: int, multiplier_bp: int) -> int:
    """The provider's pay per 1M tokens: never below what it attested."""
    return max(attested_per_1m, _demand_price(attested_per_1m, multiplier_bp))


def customer_price(attested_per_1m: int, multiplier_bp: int, margin_bp: int) -> int:
    """The customer's price per 1M tokens after the demand multiplier and the tier's margin."""
    check_margin(margin_bp)
    with_margin = -(-_demand_price(attested_per_1m, multiplier_bp) * BASIS_POINTS // (BASIS_POINTS - margin_bp))
    return max(with_margin, ticket_price(attested_per_1m, multiplier_bp))


def _demand_price(attested_per_1m: int, multiplier_bp: int) -> int:
    return -(-attested_per_1m * multiplier_bp // BASIS_POINTS)


@dataclass(frozen=True)
class Charge:
    payout: int        # to the provider
    fee: int           # to the platform
    charge: int        # from the tenant; always payout + fee
