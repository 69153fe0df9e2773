"""Admission arithmetic: token buckets, concurrency, budget reservations (pure)."""

import pytest
from hypothesis import given, settings, strategies as st

from llorch.gateway.market.quota import QuotaExceeded, TenantQuota, TokenBucket, prompt_tokens_upper_bound, worst_case_minor
from llorch.gateway.market.tenants import TenantError, format_amount, parse_amount


def test_token_bucket_allows_bursts_then_the_rate():
    bucket = TokenBucket(rate_per_s=2, capacity=2)
    bucket.take(0)
    bucket.take(0)
    with pytest.raises(QuotaExceeded) as caught:
        bucket.take(0)
    assert caught.value.kind == "rate" and caught.value.retry_after_ms == 500
    bucket.take(500)                     # half a second later one token is back
    with pytest.raises(QuotaExceeded):
        bucket.take(600)


def test_concurrency_limit_and_release():
    quota = TenantQuota(max_concurrent=1, budget_minor=None)
    quota.admit("a", 5, 0)
    with pytest.raises(QuotaExceeded) as caught:
        quota.admit("b", 5, 0)
    assert caught.value.kind == "concurrency"
    quota.settle("a", 3)
    quota.admit("b", 5, 0)


def test_budget_counts_reservations_and_settles_to_the_actual_amount():
    quota = TenantQuota(max_concurrent=None, budget_minor=100)
    quota.admit("a", 60, 0)
    with pytest.raises(QuotaExceeded) as caught:
        quota.admit("b", 60, 0)              # 60 reserved + 60 > 100
    assert caught.value.kind == "budget"
    assert quota.settle("a", 25) == 25 and quota.spent_minor == 25
    quota.admit("b", 60, 0)
    assert quota.settle("b", None) == 0      # nothing served: nothing charged


def test_a_charge_never_exceeds_its_reservation():
    quota = TenantQuota(None, 100)
    quota.admit("a", 10, 0)
    assert quota.settle("a", 50) == 10 and quota.spent_minor == 10


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=0, max_value=1000), st.lists(
    st.tuples(st.integers(min_value=0, max_value=200), st.integers(min_value=0, max_value=200),
              st.booleans()), max_size=60))
def test_concurrent_requests_can_never_overspend(budget, requests):
    """Admit everything that fits, in any interleaving of settlements, with actual charges that may exceed their
    reservation (a claim nobody bounded): spent never exceeds the budget."""
    quota = TenantQuota(None, budget)
    admitted = []
    for n, (worst, actual, served) in enumerate(requests):
        try:
            quota.admit(str(n), worst, 0)
            admitted.append((str(n), actual if served else None))
        except QuotaExceeded:
            pass
        if admitted and n % 3 == 0:
            request_id, amount = admitted.pop(0)
            quota.settle(request_id, amount)
        assert quota.spent_minor + sum(quota.reserved.values()) <= budget
    for request_id, amount in admitted:
        quota.settle(request_id, amount)
    assert quota.spent_minor <= budget


def test_worst_case_is_an_upper_bound():
    assert worst_case_minor(1000, 100, 100_000, 200_000) == 120   # ceil(100000000 + 20000000) / 1e6
    assert worst_case_minor(1, 1, 1, 1) == 1                      # never rounds down to free
    assert prompt_tokens_upper_bound(100, 2) == 148


@pytest.mark.parametrize("text, minor", [("0", 0), ("12.50", 12_500_000), ("0.000001", 1), ("1e3", 1_000_000_000)])
def test_amounts_are_parsed_exactly(text, minor):
    assert parse_amount(text) == minor
    assert parse_amount(format_amount(minor)) == minor


@pytest.mark.parametrize("text", ["-1", "0.0000001", "abc", "NaN", "Infinity", "1e12"])
def test_bad_amounts_are_refused(text):
    with pytest.raises(TenantError):
        parse_amount(text)
