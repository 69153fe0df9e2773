"""Pricing and the books' arithmetic, by property: charges = payouts + fees exactly; fee share within the margin."""

import pytest
from hypothesis import given, settings, strategies as st

from llorch.gateway.books.pricing import (BASIS_POINTS, PricingError, customer_charge, demand_multiplier_bp, ticket_price,
                             utilisation_ppm)
from llorch.ledger.objects import amount_minor

margins = st.integers(min_value=2_000, max_value=6_000)


def test_the_seeds_example():
    charge = customer_charge(60, 4_000)
    assert (charge.charge, charge.payout, charge.fee) == (100, 60, 40)


@given(st.integers(min_value=0, max_value=10**12), margins)
def test_charge_is_payout_plus_fee_and_the_share_is_the_margin(payout, margin_bp):
    charge = customer_charge(payout, margin_bp)
    assert charge.charge == charge.payout + charge.fee
    assert all(isinstance(x, int) for x in (charge.charge, charge.payout, charge.fee))
    # charge is the exact payout / (1 - margin) rounded up: the fee share is the margin, up to one minor unit
    assert charge.charge * (BASIS_POINTS - margin_bp) >= payout * BASIS_POINTS
    assert (charge.charge - 1) * (BASIS_POINTS - margin_bp) < payout * BASIS_POINTS


@settings(max_examples=100)
@given(st.lists(st.tuples(st.integers(0, 5_000), st.integers(0, 4_096), st.integers(0, 10**7), st.integers(0, 10**7),
                          margins, st.sampled_from(["EUR", "USD"]), st.sampled_from(["2026-10", "2026-11"])),
                max_size=80))
def test_books_balance_per_currency_and_period(usage):
    totals: dict = {}
    for tokens_in, tokens_out, price_in, price_out, margin_bp, currency, period in usage:
        payout = amount_minor(tokens_in, tokens_out, price_in, price_out)
        charge = customer_charge(payout, margin_bp)
        bucket = totals.setdefault((currency, period), [0, 0, 0])
        bucket[0] += charge.charge
        bucket[1] += charge.payout
        bucket[2] += charge.fee
    for charges, payouts, fees in totals.values():
        assert charges == payouts + fees


def test_demand_multipliers_follow_utilisation():
    assert demand_multiplier_bp(utilisation_ppm(10, 10)) == 9_000        # idle: cheaper
    assert demand_multiplier_bp(utilisation_ppm(10, 5)) == 10_000
    assert demand_multiplier_bp(utilisation_ppm(10, 1)) == 12_000        # 90% busy: dearer
    assert demand_multiplier_bp(utilisation_ppm(20, 0)) == 15_000
    assert ticket_price(100_000, 12_000) == 120_000 and ticket_price(3, 9_000) == 3   # rounds up


@pytest.mark.parametrize("margin_bp", [1_999, 6_001, 0, 10_000])
def test_margins_outside_20_to_60_percent_are_refused(margin_bp):
    with pytest.raises(PricingError):
        customer_charge(100, margin_bp)
