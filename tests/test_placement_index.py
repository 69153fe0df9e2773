"""The placement index (gateway/market/index.py) answers as placement's full sort does: on random markets (prices
from a few and from many, standings with failures being forgiven, back-offs, slow and unobserved providers, SLA
misses, EU certification, determinism classes, expiry) and random requests (ceilings, exclusions, the customer's
routing), the index's first candidates equal the first of ``rank_providers`` over the same views, and so do the
reservation's price caps, while the market changes under it and time passes."""

from dataclasses import replace

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llorch.gateway.market.index import PlacementIndex, RangeMin
from llorch.gateway.market.placement import (ProviderView, Requirements, Standing, after_failure, after_success,
                                             customer_prices, rank_providers)
from llorch.ledger.objects import VERSION
from llorch.node.wire.attestation import Attestation
from tests.helpers import MODEL_ID, MODEL_SHA256

NOW = 10_000_000
OTHER_SHA = bytes(32)
BUILDS = ("build-a", "build-b")


def key_of(number: int) -> bytes:
    return number.to_bytes(32, "big")


def make_attestation(number: int, draw) -> Attestation:
    slots_total = draw(st.sampled_from([1, 1, 2, 4, 0]))
    prices = draw(st.sampled_from([(100, 200)] * 6 + [(150, 150), (90, 400), (2000, 1)]) |
                  st.tuples(st.integers(0, 3000), st.integers(0, 3000)))
    models = [{"id": MODEL_ID, "sha256": draw(st.sampled_from([MODEL_SHA256, MODEL_SHA256, OTHER_SHA])),
               "context_tokens": 2048}]
    if draw(st.booleans()):
        models.append({"id": "other-model", "sha256": MODEL_SHA256, "context_tokens": 2048})
    return Attestation(
        v=VERSION, provider_key=key_of(number), seq=1, issued_ms=NOW - 2000,
        expires_ms=NOW + draw(st.integers(-1000, 60_000)), addrs=["/ip4/127.0.0.1/tcp/1"], models=models,
        engine_build=draw(st.sampled_from(BUILDS)), slots_total=slots_total,
        slots_free=draw(st.integers(0, slots_total)), queue_depth=0, wait_ms=0, price_in=prices[0],
        price_out=prices[1], currency=draw(st.sampled_from(["EUR", "EUR", "EUR", "USD"])),
        geo={"country": draw(st.sampled_from(["DE", "DE", "FR", "US"])), "region": "r"},
        sla={"uptime_ppm": 990_000, "ttft_ms": 100})


def make_standing(draw, now: int) -> Standing:
    standing = Standing(last_placed_ms=draw(st.sampled_from([0, 0, now - 5, now - 900, now - 90_000])))
    for event in draw(st.lists(st.tuples(st.sampled_from(["ok", "ok", "ok", "fail"]), st.integers(0, 80_000),
                                         st.sampled_from([0, 80, 120, 240, 250, 260, 499, 700, 1_300, 9_999,
                                                          2_000_000])), max_size=4)):
        kind, ago, ttft = event
        if kind == "ok":
            standing = after_success(standing, ttft, now - ago, draw(st.integers(0, 50)))
        else:
            standing = after_failure(standing, now - ago)
    return standing


@st.composite
def markets(draw):
    count = draw(st.integers(0, 40) | st.integers(15, 40))
    views = []
    for number in range(count):
        views.append(ProviderView(make_attestation(number, draw), draw(st.sampled_from([True, True, True, False])),
                                  draw(st.sampled_from([None, "DE", "DE", "FR", "US"])),
                                  make_standing(draw, NOW), draw(st.sampled_from([True, True, False]))))
    return views


@st.composite
def requests(draw, count: int):
    keys = st.integers(0, max(0, count - 1)).map(key_of)
    routing = draw(st.sampled_from(["plain", "plain", "plain", "only", "order", "sort", "nofallback"]))
    return Requirements(
        MODEL_ID if draw(st.integers(0, 5)) else "other-model", MODEL_SHA256, draw(st.sampled_from(["EUR"] * 4 + ["USD"])),
        prompt_tokens_estimate=draw(st.integers(1, 5000)), max_tokens=draw(st.integers(1, 5000)),
        eu_only=draw(st.sampled_from([False, False, True])), engine_build=draw(st.sampled_from([None, None, *BUILDS])),
        max_price_in=draw(st.sampled_from([None, None, 300]) | st.integers(0, 5000)),
        max_price_out=draw(st.sampled_from([None, None, 300]) | st.integers(0, 5000)),
        exclude=frozenset(draw(st.lists(keys, max_size=3))),
        multiplier_bp=draw(st.sampled_from([10_000, 10_000, 15_000, 33_333])),
        margin_bp=draw(st.sampled_from([2_000, 4_000])),
        only=frozenset(draw(st.lists(keys, max_size=4))) if routing == "only" else None,
        order=tuple(draw(st.lists(keys, max_size=3, unique=True))) if routing == "order" else (),
        fallbacks=routing != "nofallback", sort=draw(st.sampled_from(["price", "latency", "throughput"]))
        if routing == "sort" else None)


def agree(index: PlacementIndex, views: list[ProviderView], need: Requirements, now: int, count: int = 4) -> None:
    full = rank_providers(views, need, now)
    ranking = index.rank(need, now, count)
    assert [v.key for v in ranking.candidates] == [v.key for v in full[:count]]
    expected = None if not full else (max(customer_prices(v.attestation, need)[0] for v in full),
                                      max(customer_prices(v.attestation, need)[1] for v in full))
    assert ranking.price_caps == expected


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.data())
def test_the_index_chooses_as_the_full_sort_does_while_the_market_changes(data):
    views = data.draw(markets())
    index = PlacementIndex()
    for view in views:
        index.put(view, NOW)
    now = NOW
    for _ in range(data.draw(st.integers(1, 6))):
        for _ in range(data.draw(st.integers(1, 3))):
            agree(index, views, data.draw(requests(len(views))), now)
        # the market changes: a placement, a failure, a success, a new attestation, an approval withdrawn
        if views:
            number = data.draw(st.integers(0, len(views) - 1))
            view = views[number]
            change = data.draw(st.sampled_from(["placed", "failed", "succeeded", "attested", "renewed", "suspended",
                                                "sla"]))
            if change == "placed":
                view = replace(view, standing=replace(view.standing, last_placed_ms=now))
            elif change == "failed":
                view = replace(view, standing=after_failure(view.standing, now))
            elif change == "succeeded":
                view = replace(view, standing=after_success(view.standing, data.draw(st.integers(0, 3000)), now))
            elif change == "attested":
                view = replace(view, attestation=make_attestation(number, data.draw))
            elif change == "renewed":                 # a heartbeat: the same offer, later expiry
                a = view.attestation
                view = replace(view, attestation=replace(a, seq=a.seq + 1, issued_ms=now,
                                                         expires_ms=max(a.expires_ms, now + 1) + 5_000))
            elif change == "suspended":
                view = replace(view, approved=not view.approved)
            else:
                view = replace(view, sla_met=not view.sla_met)
            views[number] = view
            index.put(view, now)
        now += data.draw(st.sampled_from([0, 1, 999, 2_000, 7_777, 30_000]))


def test_a_range_minimum_tree_answers_as_a_scan_does():
    import random
    rng = random.Random(7)
    tree, entries = RangeMin(), []
    for step in range(3000):
        if entries and rng.random() < 0.4:
            entry = entries.pop(rng.randrange(len(entries)))
            tree.remove(*entry)
        else:
            entry = (rng.choice([0, 1, rng.randrange(2_000), rng.randrange(1 << 20)]),
                     (rng.randrange(-3, 1), rng.randrange(5), bytes([rng.randrange(256)])))
            if entry not in entries:
                entries.append(entry)
                tree.add(*entry)
        low = rng.randrange(2_100)
        high = low + rng.choice([1, 250, 1 << 21])
        inside = [rest for ttft, rest in entries if low <= ttft < high]
        assert tree.least(low, high) == (min(inside) if inside else None), step


def test_cold_providers_rank_by_ttft_step_from_the_best_then_by_load():
    """Steps are counted from the best TTFT (130 ms here), not on a fixed grid: 379 ms is in the first step, 381 ms
    in the second, so the busier provider at 379 ms goes first; within a step the freer one does."""
    def cold(number, ttft, free):
        attestation = Attestation(
            v=VERSION, provider_key=key_of(number), seq=1, issued_ms=NOW - 2000, expires_ms=NOW + 9000,
            addrs=[], models=[{"id": MODEL_ID, "sha256": MODEL_SHA256, "context_tokens": 2048}],
            engine_build=BUILDS[0], slots_total=4, slots_free=free, queue_depth=0, wait_ms=0, price_in=100,
            price_out=200, currency="EUR", geo={"country": "DE", "region": "r"},
            sla={"uptime_ppm": 990_000, "ttft_ms": 100})
        return ProviderView(attestation, True, "DE", after_success(Standing(), ttft, NOW - 60_000))
    need = Requirements(MODEL_ID, MODEL_SHA256, "EUR", 10, 10)
    views = [cold(1, 130, 1), cold(2, 381, 4), cold(3, 379, 2), cold(4, 379, 3)]
    index = PlacementIndex()
    for view in views:
        index.put(view, NOW)
    assert [v.key for v in index.rank(need, NOW, 4).candidates] == [key_of(4), key_of(3), key_of(1), key_of(2)]
    agree(index, views, need, NOW)
