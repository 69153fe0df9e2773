"""SLA from the gateway's own evidence (gateway/market/sla.py, docs/verification.md §7): the pure figures, the
month's bounds, and the report from a real in-process market's books (real libp2p, real SQLite, echo engines)."""

from __future__ import annotations

import json
import random

import pytest
import trio

from llorch.gateway.books.postings import period_of
from llorch.gateway.cli import main
from llorch.gateway.market.providers import ProviderError
from llorch.gateway.market.sla import (SLA_BUCKET_MS, SLA_BUCKETS_MIN, SLA_REQUESTS_MIN, AttestationClock, Timing,
                                       figures, missed_sla, month_bounds_ms, percentile, sla_report)
from llorch.node.stream_io import now_ms
from tests.inprocess import market
from tests.test_probes import prober_for
from tests.test_spot_checks import body

REGISTERED = {"uptime_ppm": 990_000, "ttft_ms": 100}


def timings(ttfts_ms: list[int], frames: int = 11, generation_ms: int = 500) -> list[Timing]:
    return [Timing(1_000, 1_000 + t, 1_000 + t + generation_ms, frames) for t in ttfts_ms]


def test_figures_from_buckets_probes_and_timings():
    f = figures("p", "2026-11", REGISTERED, 95, 100, 10, 9, timings([50] * 19 + [400]))
    assert f.uptime_ppm == 950_000 * 9 // 10 and f.requests == 20
    assert (f.ttft_ms_p50, f.ttft_ms_p95, f.tokens_per_s_p50) == (50, 50, 20)     # 10 frames after the first in 0.5 s
    assert f.met is False                                   # uptime 85.5% < 99%
    good = figures("p", "2026-11", REGISTERED, 100, 100, 0, 0, timings([50] * 20))
    assert (good.uptime_ppm, good.met) == (1_000_000, True)
    slow = figures("p", "2026-11", REGISTERED, 100, 100, 0, 0, timings([50] * 18 + [150] * 2))
    assert (slow.ttft_ms_p95, slow.met) == (150, False)      # p95 over the registered 100 ms


def test_too_few_observations_judge_nothing():
    few = figures("p", "2026-11", REGISTERED, 1, SLA_BUCKETS_MIN - 1, 1, 0, timings([900] * (SLA_REQUESTS_MIN - 1)))
    assert few.met is None and few.uptime_ppm == 0
    empty = figures("p", "2026-11", REGISTERED, 0, 0, 0, 0, [])
    assert (empty.uptime_ppm, empty.ttft_ms_p50, empty.tokens_per_s_p50, empty.met) == (None, None, None, None)


def test_percentile_is_nearest_rank():
    assert percentile([], 500_000) is None
    assert percentile([3, 1, 2], 500_000) == 2 and percentile(list(range(1, 101)), 950_000) == 95
    assert percentile([7], 950_000) == 7


def test_month_bounds_and_bad_months():
    assert month_bounds_ms("2026-12") == (1_796_083_200_000, 1_798_761_600_000)
    start, end = month_bounds_ms("2024-02")
    assert (end - start) // 86_400_000 == 29
    for bad in ("2026-13", "2026-1", "26-11", "1969-12", "2026-11-01", ""):
        with pytest.raises(ProviderError, match="YYYY-MM"):
            month_bounds_ms(bad)


async def test_the_report_reads_the_gateways_own_clocks_and_a_missing_provider_is_ranked_last(tmp_path):
    async with market(tmp_path, {"a": {}, "b": {}}, {"acme": {}}) as m:
        for seed in range(1, 25):
            await m.complete("acme", body(seed))
        prober = prober_for(m.gateway, "platform-probes", 1)
        await prober.probe(m.providers["a"].attestation)
        now = now_ms()
        report = {f.provider_id: f for f in await sla_report(m.database, period_of(now), now, "platform-probes")}
        served = dict(await m.rows("SELECT provider_key, COUNT(*) FROM tickets WHERE outcome = 'finished' "
                                   "GROUP BY provider_key"))
        a, b = m.providers["a"].key, m.providers["b"].key
        for key in (a, b):
            assert report[key.peer_id].requests == served[key.public_key]
        assert (report[a.peer_id].probes_sent, report[a.peer_id].probes_answered) == (1, 1)
        # uptime, on a fixed clock in another month (mid-March 2026, no tickets then): a attested in every bucket
        # of the last two hours, b only two hours ago and now
        clock, march_ms = AttestationClock(m.database), month_bounds_ms("2026-03")[0] + 14 * 86_400_000
        for bucket in range(SLA_BUCKETS_MIN * 2 + 1):
            await clock.observe(a.public_key, march_ms - bucket * SLA_BUCKET_MS)
        for at in (march_ms - 2 * SLA_BUCKETS_MIN * SLA_BUCKET_MS, march_ms, march_ms):   # the same bucket twice
            await clock.observe(b.public_key, at)
        march = {f.provider_id: f for f in await sla_report(m.database, "2026-03", march_ms, "platform-probes")}
        assert (march[b.peer_id].buckets_attested, march[b.peer_id].buckets_total) == (2, 2 * SLA_BUCKETS_MIN + 1)
        assert march[b.peer_id].met is False and march[b.peer_id].requests == 0
        assert (march[a.peer_id].uptime_ppm, march[a.peer_id].met) == (1_000_000, True)
        missed = await missed_sla(m.database, march_ms, "platform-probes")
        assert missed == {b.public_key}
        m.gateway.market.sla_missed_now(missed)
        assert {v.key: v.sla_met for v in await m.gateway.provider_views()} == {a.public_key: True,
                                                                               b.public_key: False}


async def test_the_operator_cli_prints_the_report_and_refuses_a_bad_month(tmp_path, capsys):
    async with market(tmp_path, {"a": {}}, {"acme": {}}) as m:
        await m.complete("acme", body(1))
    config = tmp_path / "gateway.toml"
    config.write_text(f'[gateway]\nkey_file = "{tmp_path / "gateway.key"}"\ndb_path = "{tmp_path / "gateway.sqlite"}"\n')
    codes = await trio.to_thread.run_sync(lambda: [
        main(["gateway", "providers", "sla", "--config", str(config)]),
        main(["gateway", "providers", "sla", "--month", "2026-13", "--config", str(config)])])
    assert codes == [0, 2]
    out, err = capsys.readouterr()
    (row,) = json.loads(out)
    assert row["requests"] == 1 and row["registered_ttft_ms"] > 0 and "YYYY-MM" in err
