"""Pricing by property: the provider is never paid below its attested price, the customer's price is never below
the provider's (so the fee is never negative), and the fee share is the tier's margin up to rounding."""

import pytest
from hypothesis import given, strategies as st

from llorch.gateway.books.pricing import (BASIS_POINTS, DEMAND_TABLE, PricingError, customer_price, demand_multiplier_bp,
                                          ticket_price, utilisation_ppm)

margins = st.integers(min_value=2_000, max_value=6_000)
multipliers = st.sampled_from([multiplier for _, multiplier in DEMAND_TABLE])
prices = st.integers(min_value=0, max_value=10**9)


def test_the_seeds_example():
    # a provider price of 60 per 1M tokens at a 40% margin costs the customer 100: 60 payout + 40 fee
    assert ticket_price(60, 10_000) == 60 and customer_price(60, 10_000, 4_000) == 100


@given(prices, multipliers)
def test_the_provider_is_never_paid_below_its_attested_price(attested, multiplier_bp):
    paid = ticket_price(attested, multiplier_bp)
    assert paid >= attested
    if multiplier_bp >= BASIS_POINTS:       # high demand reaches the provider, rounded up
        assert paid * BASIS_POINTS >= attested * multiplier_bp > (paid - 1) * BASIS_POINTS


@given(prices, multipliers, margins)
def test_the_customer_price_carries_the_margin_and_never_undercuts_the_provider(attested, multiplier_bp, margin_bp):
    price = customer_price(attested, multiplier_bp, margin_bp)
    assert price >= ticket_price(attested, multiplier_bp)
    demand = -(-attested * multiplier_bp // BASIS_POINTS)
    # price ≈ demand / (1 − margin), rounded up: the margin's share of the price, up to one minor unit
    assert price * (BASIS_POINTS - margin_bp) >= demand * BASIS_POINTS
    if price > ticket_price(attested, multiplier_bp):
        assert (price - 1) * (BASIS_POINTS - margin_bp) < demand * BASIS_POINTS


def test_demand_multipliers_follow_utilisation():
    assert demand_multiplier_bp(utilisation_ppm(10, 10)) == 9_000        # idle: cheaper for the customer
    assert demand_multiplier_bp(utilisation_ppm(10, 5)) == 10_000
    assert demand_multiplier_bp(utilisation_ppm(10, 1)) == 12_000        # 90% busy: dearer
    assert demand_multiplier_bp(utilisation_ppm(20, 0)) == 15_000
    assert ticket_price(100_000, 12_000) == 120_000 and ticket_price(3, 15_000) == 5     # rounds up
    assert ticket_price(100_000, 9_000) == 100_000          # the low-demand discount comes out of the margin
    assert customer_price(100_000, 9_000, 4_000) == 150_000 < customer_price(100_000, 10_000, 4_000)


@pytest.mark.parametrize("margin_bp", [1_999, 6_001, 0, 10_000])
def test_margins_outside_20_to_60_percent_are_refused(margin_bp):
    with pytest.raises(PricingError):
        customer_price(100, 10_000, margin_bp)
