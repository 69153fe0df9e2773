"""Placement and standing as pure functions: every filter, the ranking order, and back-off."""

from dataclasses import replace

import pytest

from llorch.gateway.market.placement import (BACKOFF_MS_MAX, ProviderView, Requirements, Standing, after_failure, after_success,
                               rank_providers, why_not)
from llorch.ledger.objects import VERSION
from llorch.ledger.signing import SigningKey
from llorch.node.wire.attestation import Attestation
from tests.helpers import MODEL_ID, MODEL_SHA256

NOW = 10_000_000
BUILD = "llama-cpp-python/0.3.36;ggml-cpu/abc;ctx/2048;batch/512"


def attestation(price_in=100, price_out=200, slots_free=1, slots_total=1, expires_ms=NOW + 5000,
                model_sha256=MODEL_SHA256, currency="EUR", country="DE", engine_build=BUILD, key=None):
    return Attestation(
        v=VERSION, provider_key=(key or SigningKey.generate()).public_key, seq=1, issued_ms=NOW - 1000,
        expires_ms=expires_ms, addrs=["/ip4/127.0.0.1/tcp/1"],
        models=[{"id": MODEL_ID, "sha256": model_sha256, "context_tokens": 2048}], engine_build=engine_build,
        slots_total=slots_total, slots_free=slots_free, queue_depth=0, wait_ms=0, price_in=price_in,
        price_out=price_out, currency=currency, geo={"country": country, "region": "eu"},
        sla={"uptime_ppm": 990_000, "ttft_ms": 100})


def view(approved=True, certified="DE", standing=None, **fields):
    return ProviderView(attestation(**fields), approved, certified, standing or Standing())


def need(**fields):
    return Requirements(**{"model_id": MODEL_ID, "model_sha256": MODEL_SHA256, "currency": "EUR",
                           "prompt_tokens_estimate": 10, "max_tokens": 100, **fields})


def rank(views, **fields):
    return rank_providers(views, need(**fields), NOW)


def test_cheapest_eligible_provider_wins():
    cheap, dear = view(price_out=100), view(price_out=300)
    assert rank([dear, cheap]) == [cheap, dear]


def test_input_price_counts_with_the_prompt_estimate():
    cheap_in, cheap_out = view(price_in=1, price_out=50), view(price_in=1000, price_out=40)
    assert rank([cheap_out, cheap_in], prompt_tokens_estimate=1000, max_tokens=10) == [cheap_in, cheap_out]


@pytest.mark.parametrize("provider, requirements, reason", [
    (dict(expires_ms=NOW), {}, "attestation expired"),
    (dict(model_sha256=bytes(32)), {}, "does not offer the model"),
    (dict(approved=False), {}, "not approved"),
    (dict(currency="USD"), {}, "other currency"),
    (dict(price_in=500), {"max_price_in": 499}, "above the input price ceiling"),
    (dict(price_out=500), {"max_price_out": 499}, "above the output price ceiling"),
    (dict(certified=None), {"eu_only": True}, "not a certified EU provider"),
    (dict(country="US", certified="US"), {"eu_only": True}, "not a certified EU provider"),
    (dict(country="FR", certified="DE"), {"eu_only": True}, "not a certified EU provider"),
    (dict(engine_build="other"), {"engine_build": BUILD}, "other determinism class"),
    (dict(slots_total=0, slots_free=0), {}, "no slots"),
])
def test_each_filter_names_its_reason(provider, requirements, reason):
    candidate = view(**provider)
    assert why_not(candidate, need(**requirements), NOW) == reason
    assert rank([candidate], **requirements) == []


def test_excluded_providers_are_never_placed():
    candidate = view()
    assert rank([candidate], exclude=frozenset({candidate.key})) == []


def test_eu_only_fails_closed_even_when_only_cheaper_non_eu_providers_exist():
    us_cheap = view(country="US", certified="US", price_out=1)
    uncertified_eu = view(country="DE", certified=None, price_out=2)
    certified_eu = view(country="FR", certified="FR", price_out=500)
    assert rank([us_cheap, uncertified_eu, certified_eu], eu_only=True) == [certified_eu]
    assert rank([us_cheap, uncertified_eu], eu_only=True) == []
    assert rank([us_cheap, uncertified_eu, certified_eu])[0] == us_cheap     # without the rule: cheapest


def test_a_provider_with_a_free_slot_comes_before_a_busy_cheaper_one():
    busy_cheap, free_dear = view(price_out=1, slots_free=0), view(price_out=999)
    assert rank([busy_cheap, free_dear]) == [free_dear, busy_cheap]


def test_at_equal_price_reliability_then_ttft_then_load_then_turns():
    reliable = view(standing=Standing(success_ppm=990_000, observed_ms=NOW))
    flaky = view(standing=Standing(success_ppm=500_000, observed_ms=NOW))
    assert rank([flaky, reliable]) == [reliable, flaky]
    fast = view(standing=Standing(ttft_ms=50))
    slow = view(standing=Standing(ttft_ms=900))
    assert rank([slow, fast]) == [fast, slow]
    alike = [view(standing=Standing(ttft_ms=40, last_placed_ms=NOW)), view(standing=Standing(ttft_ms=60))]
    assert rank(alike) == [alike[1], alike[0]]          # 20 ms apart is noise: the one placed longer ago goes
    edge = [view(standing=Standing(ttft_ms=240, last_placed_ms=NOW)), view(standing=Standing(ttft_ms=260))]
    assert rank(edge) == [edge[1], edge[0]]             # across a 250 ms step's edge, still noise (steps from the best)
    idle = view(slots_total=4, slots_free=4)
    loaded = view(slots_total=4, slots_free=1)
    assert rank([loaded, idle]) == [idle, loaded]
    first, second = view(), view()
    order = rank([first, second])
    recent = ProviderView(order[0].attestation, True, "DE", Standing(last_placed_ms=NOW))
    assert rank([recent, order[1]]) == [order[1], recent]


def test_backed_off_providers_go_last_but_stay_available():
    backed_off = view(price_out=1, standing=Standing(backoff_until_ms=NOW + 1000))
    other = view(price_out=999)
    assert rank([backed_off, other]) == [other, backed_off]
    assert rank([backed_off]) == [backed_off]


def test_standing_after_failures_and_success():
    standing = Standing()
    first = after_failure(standing, NOW)
    assert first.success_ppm < standing.success_ppm and first.backoff_until_ms == NOW + 1000
    second = after_failure(first, NOW)
    assert second.backoff_until_ms == NOW + 2000 and second.success_ppm < first.success_ppm
    many = standing
    for _ in range(20):
        many = after_failure(many, NOW)
    assert many.backoff_until_ms == NOW + BACKOFF_MS_MAX
    recovered = after_success(second, ttft_ms=120, now_ms=NOW)
    assert recovered.backoff_until_ms == 0 and recovered.failures_in_a_row == 0
    assert recovered.success_ppm > second.success_ppm and recovered.ttft_ms == 120
    assert after_success(recovered, 220, NOW).ttft_ms == 140         # moving average, 20% weight


def test_one_old_failure_is_forgiven_with_time_so_a_recovered_provider_gets_its_turn_again():
    """A provider that failed once (it was restarting) used to rank a step below an equal one for good: only
    successes raised its rate, and it never got a request to succeed at while the other had a free slot."""
    failed = view(standing=replace(after_failure(Standing(), NOW - 15_000), last_placed_ms=NOW - 15_000))
    busy_peer = view(standing=Standing(last_placed_ms=NOW - 1_000))
    assert rank([busy_peer, failed])[0] is failed          # 15 s later: equal standing, and it is its turn
    fresh_failure = view(standing=replace(after_failure(Standing(), NOW - 2_000), last_placed_ms=NOW - 15_000))
    assert rank([busy_peer, fresh_failure])[0] is busy_peer   # a failure 2 s ago still counts


def test_a_provider_missing_its_registered_sla_goes_after_those_that_meet_it_even_when_cheaper():
    reliable, unreliable_cheap = view(price_out=300), replace(view(price_out=100), sla_met=False)
    assert rank([unreliable_cheap, reliable]) == [reliable, unreliable_cheap]
    # still placed when it is the only one (ranked last, not excluded)
    assert rank([unreliable_cheap]) == [unreliable_cheap]
    # a free slot still comes first: a busy reliable provider would only answer busy
    busy_reliable = view(price_out=300, slots_free=0)
    assert rank([busy_reliable, unreliable_cheap]) == [unreliable_cheap, busy_reliable]


# --- the customer's routing preferences (OpenRouter's provider object) ------------------------------------------

def test_only_and_ignore_narrow_who_is_eligible():
    a, b, c = view(), view(), view()
    assert rank([a, b, c], only=frozenset({b.key, c.key}), exclude=frozenset({c.key})) == [b]
    assert why_not(a, need(only=frozenset({b.key})), NOW) == "not in the request's provider.only"


def test_order_puts_the_named_first_and_without_fallbacks_nobody_else():
    cheap, middle, dear = view(price_out=100), view(price_out=200), view(price_out=300)
    assert rank([cheap, middle, dear], order=(dear.key, middle.key)) == [dear, middle, cheap]
    assert rank([cheap, middle, dear], order=(dear.key,), fallbacks=False) == [dear]
    assert why_not(cheap, need(order=(dear.key,), fallbacks=False), NOW) == \
        "not in the request's provider.order (allow_fallbacks is false)"


def test_sort_by_price_latency_or_throughput_comes_before_the_markets_own_ranking():
    # The market alone ranks the cheap one first; the customer's sort can ask for speed instead.
    cheap_slow = view(price_out=100, standing=Standing(ttft_ms=900, tokens_per_s=10))
    dear_fast = view(price_out=300, standing=Standing(ttft_ms=100, tokens_per_s=80))
    unknown = view(price_out=200)                                     # never observed: after those observed
    assert rank([dear_fast, unknown, cheap_slow]) == [cheap_slow, unknown, dear_fast]
    assert rank([dear_fast, unknown, cheap_slow], sort="latency") == [dear_fast, cheap_slow, unknown]
    assert rank([dear_fast, unknown, cheap_slow], sort="throughput") == [dear_fast, cheap_slow, unknown]
    assert rank([dear_fast, unknown, cheap_slow], sort="price") == [cheap_slow, unknown, dear_fast]
    busy_fast = view(price_out=300, slots_free=0, standing=Standing(ttft_ms=100, tokens_per_s=80))
    assert rank([busy_fast, cheap_slow], sort="throughput") == [cheap_slow, busy_fast]     # a free slot first


def test_throughput_is_measured_from_what_the_gateway_relayed():
    from llorch.gateway.books.settlement import Metered, State

    metered = Metered(State.FINISHED, frames=21, accepted_ms=1_000, first_token_ms=1_100, ended_ms=1_600)
    assert metered.tokens_per_s == 40                      # 20 frames after the first in 500 ms
    assert Metered(State.FINISHED, frames=1, accepted_ms=0, first_token_ms=10, ended_ms=20).tokens_per_s == 0
    first = after_success(Standing(), 100, NOW, 40)
    assert first.tokens_per_s == 40 and after_success(first, 100, NOW, 0).tokens_per_s == 40
    assert after_success(first, 100, NOW, 90).tokens_per_s == 50          # moves 20% of the way
