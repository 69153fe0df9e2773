"""OpenRouter's ``provider`` routing object, accepted as it is, against a real in-process market (real libp2p, real
SQLite; echo engines, test-only: placement is what is tested): only, ignore, order with and without fallbacks,
max_price, data_collection "deny" (the prompt goes to no second provider), and unknown or malformed keys refused
naming them, with nothing written."""

from __future__ import annotations

import pytest

from llorch.gateway.errors import BadRequest, NoProvider
from tests.inprocess import market

ALL_PPM = 1_000_000
CONSENTING = {"acme": {"spot_checks": True}}
PROVIDERS = {"cheap": {"price_out": 100_000}, "middle": {"price_out": 200_000}, "dear": {"price_out": 300_000}}


def body(seed: int, **provider) -> dict:
    return {"messages": [{"role": "user", "content": f"route request {seed}"}], "max_tokens": 3, "seed": seed,
            "provider": provider}


async def served_by(m, count: int, **provider) -> set[str]:
    names = {p.key.peer_id: name for name, p in m.providers.items()}
    return {names[(await m.complete("acme", body(seed, **provider))).provider_peer_id] for seed in range(count)}


async def test_only_ignore_and_order_decide_who_serves(tmp_path):
    async with market(tmp_path, PROVIDERS, CONSENTING) as m:
        peer = {name: p.key.peer_id for name, p in m.providers.items()}
        assert await served_by(m, 3) == {"cheap"}                               # the market alone: the cheapest
        assert await served_by(m, 3, only=[peer["dear"]]) == {"dear"}
        assert await served_by(m, 3, ignore=[peer["cheap"]]) == {"middle"}
        assert await served_by(m, 3, order=[peer["dear"], peer["middle"]]) == {"dear"}
        assert await served_by(m, 3, sort="price", ignore=[peer["cheap"], peer["middle"]]) == {"dear"}
        with pytest.raises(NoProvider, match="not in the request's provider.only"):
            await m.complete("acme", body(1, only=[m.key.peer_id]))             # a peer that offers nothing
        with pytest.raises(NoProvider, match=r"allow_fallbacks is false"):
            await m.complete("acme", body(2, order=[m.key.peer_id], allow_fallbacks=False))
        # max_price is read in EUR per 1M tokens, after the platform's margin: below every customer price, none
        with pytest.raises(NoProvider, match="above the output price ceiling"):
            await m.complete("acme", body(3, max_price={"completion": 0.05}))
        assert await served_by(m, 2, max_price={"completion": 0.4}, ignore=[peer["cheap"]]) == {"middle"}


async def test_data_collection_deny_keeps_the_prompt_from_any_second_provider(tmp_path):
    async with market(tmp_path, PROVIDERS, CONSENTING, {"spot_check_rate_ppm": ALL_PPM}) as m:
        await m.complete("acme", body(1, data_collection="deny"))
        await m.gateway.spot_checks.wait_idle()
        assert await m.rows("SELECT COUNT(*) FROM spot_check_draws") == [(0,)]
        await m.complete("acme", body(2))                                      # allowed: drawn at 100%
        await m.gateway.spot_checks.wait_idle()
        assert await m.rows("SELECT COUNT(*) FROM spot_check_draws") == [(1,)]


@pytest.mark.parametrize("provider, message", [
    ({"quantizations": ["int4"]}, "provider.quantizations"),
    ({"zdr": True}, "provider.zdr"),
    ({"only": ["openai"]}, "'openai' is not a provider's peer id"),
    ({"sort": "cost"}, "provider.sort"),
    ({"max_price": {"prompt": -1}}, "a price must be 0..1000000"),
    ({"max_price": {"prompt": 0.0000001}}, "at most 6 decimals"),
    ({"max_price": {"request": 1}}, "provider.max_price.request"),
    ({"data_collection": "never"}, "provider.data_collection"),
])
async def test_an_unknown_or_malformed_routing_key_is_refused_by_name(tmp_path, provider, message):
    async with market(tmp_path, {"one": {}}, CONSENTING) as m:
        before = await m.rows("SELECT COUNT(*) FROM tickets")
        with pytest.raises(BadRequest, match=message):
            await m.complete("acme", {"messages": [{"role": "user", "content": "x"}], "provider": provider})
        assert await m.rows("SELECT COUNT(*) FROM tickets") == before
