"""Prices, pure and in integers (minor units; multipliers and margins in basis points, 10,000 = 100%).

  provider price   the provider's attested price per 1M tokens, times the demand multiplier, rounded up:
                   ticket_price = ceil(attested × multiplier_bp / 10,000). The ticket carries it; the provider's
                   receipt amount at these prices is the provider's **payout**.
  customer charge  a margin on the customer price: charge = ceil(payout × 10,000 / (10,000 − margin_bp)),
                   fee = charge − payout. So charge = payout + fee exactly, and the fee share fee/charge is the
                   tier's margin up to one minor unit of rounding (always in the platform's favour).
  demand           utilisation of the providers offering the model (busy slots / all slots, from attestations)
                   picks the multiplier: the seed's PricingEngine raises prices when demand is high and lowers them
                   when it is low.
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
    return -(-attested_per_1m * multiplier_bp // BASIS_POINTS)


@dataclass(frozen=True)
class Charge:
    payout: int        # to the provider: the receipt's amount
    fee: int           # to the platform
    charge: int        # from the tenant; always payout + fee


def customer_charge(payout_minor: int, margin_bp: int) -> Charge:
    check_margin(margin_bp)
    charge = -(-payout_minor * BASIS_POINTS // (BASIS_POINTS - margin_bp))
    return Charge(payout_minor, charge - payout_minor, charge)
