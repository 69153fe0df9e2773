from ledger.objects import VERSION
from ledger.signing import SigningKey
from node.attestation import Attestation
from gateway.placement import rank_providers
from tests.helpers import MODEL_ID, MODEL_SHA256

NOW = 10_000_000


def attestation(price_in=100, price_out=200, slots_free=1, expires_ms=NOW + 5000, model_sha256=MODEL_SHA256,
                currency="EUR", key=None):
    return Attestation(
        v=VERSION, provider_key=(key or SigningKey.generate()).public_key, seq=1, issued_ms=NOW - 1000,
        expires_ms=expires_ms, addrs=["/ip4/127.0.0.1/tcp/1"],
        models=[{"id": MODEL_ID, "sha256": model_sha256, "context_tokens": 2048}], engine_build="b",
        slots_total=1, slots_free=slots_free, queue_depth=0, wait_ms=0, price_in=price_in, price_out=price_out,
        currency=currency, geo={"country": "DE", "region": "eu"}, sla={"uptime_ppm": 990_000, "ttft_ms": 100})


def rank(attestations, last_placed=None):
    return rank_providers(attestations, MODEL_ID, MODEL_SHA256, "EUR", NOW, last_placed or {}, 10, 100)


def test_cheapest_first():
    cheap, dear = attestation(price_out=100), attestation(price_out=300)
    assert rank([dear, cheap]) == [cheap, dear]


def test_expired_wrong_model_and_wrong_currency_are_not_eligible():
    good = attestation()
    expired = attestation(expires_ms=NOW)
    other_model = attestation(model_sha256=bytes(32))
    dollars = attestation(currency="USD")
    assert rank([expired, other_model, dollars, good]) == [good]


def test_providers_with_a_free_slot_come_before_busy_ones_even_if_dearer():
    busy_cheap, free_dear = attestation(price_out=1, slots_free=0), attestation(price_out=999)
    assert rank([busy_cheap, free_dear]) == [free_dear, busy_cheap]


def test_equal_providers_take_turns():
    first, second = attestation(), attestation()
    order = rank([first, second])
    assert rank([first, second], {order[0].provider_key: NOW}) == [order[1], order[0]]


def test_input_price_counts_with_the_prompt_estimate():
    cheap_in, cheap_out = attestation(price_in=1, price_out=50), attestation(price_in=1000, price_out=40)
    assert rank_providers([cheap_out, cheap_in], MODEL_ID, MODEL_SHA256, "EUR", NOW, {}, 1000, 10) == \
        [cheap_in, cheap_out]


def test_nothing_eligible_gives_an_empty_list():
    assert rank([]) == []
