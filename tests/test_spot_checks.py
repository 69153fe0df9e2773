"""Catching a cheating provider with spot-checks (gateway/spot_checks.py, docs/verification.md), against a
real in-process market (real libp2p, real SQLite ledgers and books). The cheaters are the test-only engines of
tests/cheaters.py: each claims the pinned model and the echo engine's class, and each is caught, suspended, its
evidence checks out offline, and the customers it served are credited. Honest echo providers are deterministic like
real ones: they never disagree."""

from __future__ import annotations

import json
import math

import pytest
import trio

from llorch.gateway.books.postings import PLATFORM_ACCOUNT, provider_account, tenant_account
from llorch.gateway.cli import main
from llorch.gateway.spot_checks import evidence_document_of, evidence_list
from llorch.ledger.evidence import verify_evidence
from llorch.node.stream_io import now_ms
from tests.cheaters import (HeldBackEngine, LazyEngine, OtherModelEngine, ResamplingEngine, SchemaIgnoringEngine,
                            SometimesEngine, TruncatingEngine)
from tests.inprocess import market

ALL_PPM = 1_000_000
CONSENTING = {"acme": {"spot_checks": True}}


def body(seed: int) -> dict:
    return {"messages": [{"role": "user", "content": f"tell me about request {seed}"}], "max_tokens": 6,
            "seed": seed}


async def serve(m, count: int, tenant: str = "acme", first_seed: int = 1) -> list:
    """``count`` requests one after another, each followed by its spot-check (if drawn)."""
    completions = []
    for seed in range(first_seed, first_seed + count):
        completions.append(await m.complete(tenant, body(seed)))
        await m.gateway.spot_checks.wait_idle()
    return completions


async def serve_until_suspended(m, cheater, requests_max: int, extra: dict | None = None) -> tuple[int, int, list]:
    """Requests (``body`` and ``extra``) until ``cheater`` is suspended: (requests sent, requests it served, the
    completions)."""
    completions = []
    for seed in range(1, requests_max + 1):
        completions.append(await m.complete("acme", {**body(seed), **(extra or {})}))
        await m.gateway.spot_checks.wait_idle()
        if (await m.gateway.providers.get(cheater.key.peer_id)).status == "suspended":
            served = sum(c.provider_peer_id == cheater.key.peer_id for c in completions)
            return seed, served, completions
    raise AssertionError(f"the cheater was not caught within {requests_max} requests")


async def check_exported_evidence(m, tmp_path, cheater) -> dict:
    """The stored evidence names the cheater, checks out offline, and the CLI says so (exit 0)."""
    (listed,) = await evidence_list(m.database)
    assert listed["suspect"] == cheater.key.peer_id and listed["verdict"] == "suspect"
    document = json.loads(await evidence_document_of(m.database, listed["id"]))
    assert verify_evidence(document).suspect == cheater.key.public_key
    path = tmp_path / "evidence.json"
    path.write_text(json.dumps(document))
    assert main(["ledger", "check-evidence", str(path)]) == 0
    return listed


async def check_customers_credited(m, cheater, served_by_cheater: list) -> None:
    """Every request the cheater served is reversed (payout and fee back to the tenant); nothing else is."""
    cheater_id = cheater.key.peer_id
    credited = await m.rows("SELECT request_id, leg, debit, credit, amount FROM postings "
                            "WHERE leg LIKE 'correction:spot-check-%' ORDER BY request_id, leg")
    assert {r[0] for r in credited} == {c.request_id for c in served_by_cheater}
    for completion in served_by_cheater:
        legs = {leg: (debit, credit, amount) for request_id, leg, debit, credit, amount in credited
                if request_id == completion.request_id}
        assert legs["correction:spot-check-payout"] == (provider_account(cheater_id), tenant_account("acme"),
                                                        completion.charge.payout)
        if completion.charge.fee:           # a fee rounded to 0 has no leg to reverse
            assert legs["correction:spot-check-fee"] == (PLATFORM_ACCOUNT, tenant_account("acme"),
                                                         completion.charge.fee)
        else:
            assert set(legs) == {"correction:spot-check-payout"}
    statement = await m.gateway.books.statement("tenant", "acme", time_period())
    assert sum(-c["amount_minor"] for c in statement["corrections"]) == \
        sum(c.charge.charge for c in served_by_cheater)


def time_period() -> str:
    from llorch.gateway.books.postings import period_of
    return period_of(now_ms())


CHEATERS = {"another_model": OtherModelEngine, "truncates": TruncatingEngine, "changes_sampling": ResamplingEngine}


@pytest.mark.parametrize("kind", sorted(CHEATERS))
async def test_a_cheater_is_caught_suspended_its_evidence_checks_out_and_its_customers_are_credited(tmp_path, kind):
    providers = {"honest1": {}, "cheater": {"engine": CHEATERS[kind]}, "honest2": {}}
    async with market(tmp_path, providers, CONSENTING, {"spot_check_rate_ppm": ALL_PPM}) as m:
        cheater = m.providers["cheater"]
        sent, served, completions = await serve_until_suspended(m, cheater, 6)
        # At 100% every request is re-run: the cheater is caught at the first request it serves or re-runs.
        assert served <= 1 and sent <= 3, (sent, served)
        listed = await check_exported_evidence(m, tmp_path, cheater)
        served_by_cheater = [c for c in completions if c.provider_peer_id == cheater.key.peer_id]
        assert listed["credited_requests"] == len(served_by_cheater)
        await check_customers_credited(m, cheater, served_by_cheater)
        # suspended at once: no more requests go to it, as customer or as checker
        later = await serve(m, 4, first_seed=100)
        assert all(c.provider_peer_id != cheater.key.peer_id for c in later)
        assert (await m.gateway.providers.get(cheater.key.peer_id)).status == "suspended"
    await check_operator_cli(tmp_path, cheater, listed["id"])


CITY = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
STRUCTURED = {
    "response_format": {"response_format": {"type": "json_schema", "json_schema": {"name": "city", "schema": CITY}}},
    "tools": {"tools": [{"type": "function", "function": {"name": "find", "parameters": CITY}}],
              "tool_choice": "required"}}


@pytest.mark.parametrize("kind", sorted(STRUCTURED))
async def test_a_provider_that_ignores_the_response_format_or_the_tools_is_caught(tmp_path, kind):
    """The schema (a response_format's, or the one the tools make) is in the ticket's sampling map, so a provider
    that generates as if there were none signs a receipt for a run an honest provider does not reproduce: caught
    like any other cheater."""
    providers = {"honest1": {}, "cheater": {"engine": SchemaIgnoringEngine}, "honest2": {}}
    async with market(tmp_path, providers, CONSENTING, {"spot_check_rate_ppm": ALL_PPM}) as m:
        cheater = m.providers["cheater"]
        sent, served, _ = await serve_until_suspended(m, cheater, 6, STRUCTURED[kind])
        assert served <= 1 and sent <= 3, (sent, served)
        await check_exported_evidence(m, tmp_path, cheater)
        honest = await serve(m, 2, first_seed=50)          # without a schema the honest echo is what it was
        assert all("-j" not in c.text for c in honest)


async def check_operator_cli(tmp_path, cheater, evidence_id: int) -> None:
    """The operator sees the suspension and the evidence, and exports a file that checks out offline."""
    config = tmp_path / "gateway.toml"
    config.write_text(f'[gateway]\nkey_file = "{tmp_path / "gateway.key"}"\ndb_path = "{tmp_path / "gateway.sqlite"}"\n')
    out = tmp_path / "exported.json"

    def operator() -> list:
        return [main(["gateway", "providers", "checks", "--config", str(config)]),
                main(["gateway", "providers", "checks", "--since-hours", "0", "--config", str(config)]),
                main(["gateway", "providers", "evidence", "--config", str(config)]),
                main(["gateway", "providers", "evidence", str(evidence_id), "--out", str(out), "--config",
                      str(config)]),
                main(["gateway", "providers", "evidence", "999", "--out", str(out) + ".x", "--config", str(config)]),
                main(["ledger", "check-evidence", str(out)])]

    assert await trio.to_thread.run_sync(operator) == [0, 2, 0, 0, 2, 0]


async def test_honest_providers_never_disagree_and_checks_are_a_platform_cost(tmp_path):
    async with market(tmp_path, {"a": {}, "b": {}, "c": {}}, CONSENTING, {"spot_check_rate_ppm": ALL_PPM}) as m:
        completions = await serve(m, 24)
        stats = m.gateway.spot_checks.statistics
        assert (stats.sampled, stats.clean, stats.mismatched, stats.failed) == (24, 24, 0, 0)
        assert await evidence_list(m.database) == []
        assert all(r.status == "approved" for r in await m.gateway.providers.all())
        legs = await m.rows("SELECT debit, credit, amount FROM postings WHERE leg = 'spot_check'")
        assert len(legs) == 24 and all(d == PLATFORM_ACCOUNT and c.startswith("provider:") and a > 0
                                       for d, c, a in legs)
        # the customer pays for its own requests only; the platform statement shows what the checks cost
        spent = await m.gateway.books.tenant_spent("acme")
        assert spent == sum(c.charge.charge for c in completions)
        statement = await m.gateway.books.statement("platform", None, time_period())
        assert sum(-c["amount_minor"] for c in statement["corrections"]) == sum(a for _, _, a in legs)


async def test_a_tenant_that_did_not_allow_it_is_never_re_run(tmp_path):
    async with market(tmp_path, {"a": {}, "b": {}}, {"acme": {}}, {"spot_check_rate_ppm": ALL_PPM}) as m:
        await serve(m, 6)
        assert m.gateway.spot_checks.statistics.sampled == 0
        assert await m.rows("SELECT * FROM postings WHERE leg = 'spot_check'") == []
        tickets = await m.rows("SELECT COUNT(*) FROM tickets")
        assert tickets == [(6,)]


async def test_an_eu_only_tenants_request_is_re_run_only_on_certified_eu_providers(tmp_path):
    providers = {"eu1": {"certified": True}, "eu2": {"certified": True}, "elsewhere": {}}
    tenants = {"acme": {"spot_checks": True, "eu_only": True}}
    async with market(tmp_path, providers, tenants, {"spot_check_rate_ppm": ALL_PPM}) as m:
        await serve(m, 6)
        assert m.gateway.spot_checks.statistics.clean == 6
        elsewhere = m.providers["elsewhere"].key.public_key
        assert await m.rows("SELECT COUNT(*) FROM tickets WHERE provider_key = ?", (elsewhere,)) == [(0,)]


async def test_with_no_third_provider_a_disagreement_is_stored_undecided_and_nobody_is_suspended(tmp_path):
    providers = {"honest": {}, "cheater": {"engine": OtherModelEngine}}
    async with market(tmp_path, providers, CONSENTING, {"spot_check_rate_ppm": ALL_PPM}) as m:
        await serve(m, 2)
        (listed, *_) = await evidence_list(m.database)
        assert listed["verdict"] == "undecided" and listed["credited_requests"] == 0
        assert all(r.status == "approved" for r in await m.gateway.providers.all())
        assert verify_evidence(json.loads(await evidence_document_of(m.database, listed["id"]))).suspect is None


def requests_to_catch(rate_ppm: int, cheat_ppm: int, miss_probability: float) -> int:
    """The n with 1 - (1 - p·q)^n ≥ 1 - miss_probability (docs/verification.md §3)."""
    pq = rate_ppm / 1e6 * cheat_ppm / 1e6
    return math.ceil(math.log(miss_probability) / math.log(1 - pq))


async def test_a_provider_cheating_on_10_percent_is_caught_within_the_sampling_math(tmp_path):
    import random
    rate_ppm = 500_000
    bound = requests_to_catch(rate_ppm, SometimesEngine.CHEAT_PPM, 1e-4)       # 180 requests served by it
    providers = {"honest1": {}, "cheater": {"engine": SometimesEngine}, "honest2": {}}
    async with market(tmp_path, providers, CONSENTING, {"spot_check_rate_ppm": rate_ppm}) as m, \
            trio.open_nursery() as nursery:
        nursery.start_soon(m.attest_forever)
        m.gateway.spot_checks.rng = random.Random(1)
        cheater = m.providers["cheater"]
        sent, served, completions = await serve_until_suspended(m, cheater, 3 * bound)
        assert served <= bound, f"caught after it served {served}; the formula gives {bound} at 99.99%"
        await check_exported_evidence(m, tmp_path, cheater)
        # credited: what it served after the last run of its that a check found clean (settled on the gateway's
        # clock), and not what it served before
        last_clean_ms = (await m.rows("SELECT COALESCE(MAX(served_ms), 0) FROM spot_checks WHERE provider_key = ? "
                                      "AND verdict = 'clean'", (cheater.key.public_key,)))[0][0]
        settled = dict(await m.rows("SELECT request_id, settled_ms FROM tickets WHERE provider_key = ?",
                                    (cheater.key.public_key,)))
        ours = [c for c in completions if c.provider_peer_id == cheater.key.peer_id]
        expected = [c for c in ours if settled[c.request_id] > last_clean_ms]
        # Which provider serves and checks which request depends on timing, so the cheater may have been caught
        # checking another's request: then what it served after its last clean check may be nothing at all.
        assert last_clean_ms == 0 or len(expected) < len(ours)
        await check_customers_credited(m, cheater, expected)
        nursery.cancel_scope.cancel()


async def test_the_operator_console_shows_the_evidence_and_serves_the_same_file_to_the_operator_only(tmp_path):
    import httpx

    from llorch.gateway.api.sessions import new_operator_token
    from tests.inprocess import serving_http

    providers = {"honest1": {}, "cheater": {"engine": TruncatingEngine}, "honest2": {}}
    async with market(tmp_path, providers, CONSENTING, {"spot_check_rate_ppm": ALL_PPM}) as m, \
            serving_http(m.gateway) as base_url:
        cheater = m.providers["cheater"]
        await serve_until_suspended(m, cheater, 6)
        (listed,) = await evidence_list(m.database)
        token = new_operator_token(m.gateway.config.db_path)
        async with httpx.AsyncClient(base_url=base_url, timeout=30) as browser:
            refused = await browser.get(f"/operator/evidence/{listed['id']}")
            assert refused.status_code == 401 and "sign in" in refused.text
            signed_in = await browser.post("/operator/sign-in", data={"token": token})
            assert signed_in.status_code == 303
            browser.cookies.set("llorch_operator", signed_in.cookies["llorch_operator"])
            page = await browser.get("/operator")
            assert f'data-evidence-id="{listed["id"]}"' in page.text and cheater.key.peer_id in page.text
            download = await browser.get(f"/operator/evidence/{listed['id']}")
            assert download.status_code == 200
            assert download.text == await evidence_document_of(m.database, listed["id"]) + "\n"
            assert (await browser.get("/operator/evidence/99999")).status_code == 404


async def test_an_honest_run_ending_in_held_back_text_passes_a_spot_check(tmp_path):
    """max_tokens token frames and one more with the held-back text (docs/protocol.md §6) is an honest run: the
    customer's request was served that way, and the re-run on another provider must be accepted the same way."""
    providers = {"a": {"engine": HeldBackEngine}, "b": {"engine": HeldBackEngine}}
    async with market(tmp_path, providers, CONSENTING, {"spot_check_rate_ppm": ALL_PPM}) as m:
        completions = await serve(m, 3)
        stats = m.gateway.spot_checks.statistics
        assert all(c.settlement.tokens_out == 6 for c in completions)
        assert (stats.sampled, stats.clean, stats.mismatched) == (3, 3, 0), stats
        assert await evidence_list(m.database) == []


LAZY_RUNS = 20
STEADY_CLIENTS = 3


async def catch_a_lazy_cheater_under_load(workdir, seed: int, rate_ppm: int) -> tuple[object, list, int]:
    """Three 1-slot providers, one of them lazy (tests/cheaters.py LazyEngine), kept busy by STEADY_CLIENTS clients
    until the cheater is suspended (or each sent 60 requests); the draw seeded with ``seed``. Asserts what must
    hold whatever the seed (suspended, no draw dropped, expired or undecided, no honest provider suspended, every
    request it settled credited); returns (the checker's statistics, the completions it served, requests sent)."""
    import random

    providers = {"honest1": {"delay_s": 0.002}, "cheater": {"engine": LazyEngine, "delay_s": 0.002},
                 "honest2": {"delay_s": 0.002}}
    async with market(workdir, providers, CONSENTING, {"spot_check_rate_ppm": rate_ppm}) as m:
        m.gateway.spot_checks.rng = random.Random(seed)
        cheater = m.providers["cheater"]
        served_by_cheater: list = []
        sent = 0

        async def client(first_seed: int) -> None:
            nonlocal sent
            for n in range(60):
                if (await m.gateway.providers.get(cheater.key.peer_id)).status == "suspended":
                    return
                completion = await m.complete("acme", body(first_seed + n))
                sent += 1
                if completion.provider_peer_id == cheater.key.peer_id:
                    served_by_cheater.append(completion)

        async with trio.open_nursery() as nursery:
            for c in range(STEADY_CLIENTS):
                nursery.start_soon(client, 1_000 * c)
        stats = m.gateway.spot_checks.statistics
        status = (await m.gateway.providers.get(cheater.key.peer_id)).status
        assert status == "suspended", f"seed {seed}: not caught after {sent} requests ({stats})"
        assert stats.dropped == 0 and stats.expired == 0 and stats.undecided == 0, f"seed {seed}: {stats}"
        assert all(r.status == "approved" for r in await m.gateway.providers.all()
                   if r.provider_key != cheater.key.public_key)
        await check_customers_credited(m, cheater, served_by_cheater)
        return stats, served_by_cheater, sent


async def test_a_lazy_cheater_under_steady_load_is_caught_within_the_bound_in_every_seeded_run(tmp_path):
    """docs/verification.md §3 at p = 0.5, P = 0.999 (q = 1: it cheats on every request): caught within n = 10 of
    its requests, in 20 of 20 seeded runs, on 1-slot nodes kept busy by 3 clients. Checkers are often busy then: a
    drawn check and a tie-breaker wait for a slot instead of being dropped or left undecided, and every request the
    cheater settled (those in flight when it was caught included) is credited. bench/spot_checks.py --lazy-runs N
    runs more seeds."""
    rate_ppm = 500_000
    bound = requests_to_catch(rate_ppm, ALL_PPM, 1e-3)
    assert bound == 10
    for seed in range(LAZY_RUNS):
        workdir = tmp_path / f"run{seed}"
        workdir.mkdir()
        _, served_by_cheater, _ = await catch_a_lazy_cheater_under_load(workdir, seed, rate_ppm)
        assert len(served_by_cheater) <= bound, f"seed {seed}: caught after it served {len(served_by_cheater)}"


async def test_every_draw_ends_in_one_outcome_counted_in_the_metrics_and_the_books(tmp_path):
    """Draws that end clean, caught, and dropped (no other provider of the class is left once the cheater is
    suspended): each counted once in llorch_spot_checks_total{outcome} and stored in spot_check_draws."""
    from llorch.gateway.spot_checks import check_outcomes

    providers = {"honest1": {}, "cheater": {"engine": OtherModelEngine}, "honest2": {}}
    async with market(tmp_path, providers, CONSENTING, {"spot_check_rate_ppm": ALL_PPM}) as m:
        await serve_until_suspended(m, m.providers["cheater"], 6)
        await m.gateway.providers.set_status(m.providers["honest2"].key.peer_id, "suspended")
        await serve(m, 2, first_seed=50)              # honest1 alone: nobody can check it
        stats = m.gateway.spot_checks.statistics
        report = await check_outcomes(m.database)
        outcomes = report["outcomes"]
        assert outcomes["caught"] == stats.suspects == 1 and outcomes["dropped"] == stats.dropped == 2
        assert outcomes["clean"] == stats.clean and outcomes["expired"] == outcomes["undecided"] == 0
        assert report["drawn"] == stats.sampled == sum(outcomes.values())
        assert {row["outcome"] for row in report["not_clean"]} == {"caught", "dropped"}
        metrics = m.gateway.metrics.render(0, 0, 0).decode()
        for outcome, count in {**outcomes, "drawn": stats.sampled}.items():
            assert f'llorch_spot_checks_total{{outcome="{outcome}"}} {float(count)}' in metrics, outcome


async def test_a_request_in_flight_when_its_provider_is_caught_is_credited_as_it_settles(tmp_path):
    """The cheater streams a long answer (for a tenant whose requests are never re-run, so only this mechanism can
    credit it) on one slot while a short request it served on its other slot is checked and it is caught: the
    long one settles after the suspension and is credited in that same settlement (before: the credits read the
    books once, at detection, and missed it)."""
    providers = {"honest1": {"delay_s": 0.01, "price_out": 300_000}, "honest2": {"delay_s": 0.01, "price_out": 300_000},
                 "cheater": {"engine": TruncatingEngine, "delay_s": 0.1, "slots": 2, "price_out": 100_000}}
    tenants = {"acme": {"spot_checks": True}, "quiet": {}}
    async with market(tmp_path, providers, tenants, {"spot_check_rate_ppm": ALL_PPM}) as m:
        cheater = m.providers["cheater"]
        streaming = trio.Event()
        results: dict = {}

        async def on_text(pieces: list, provider: str) -> None:
            streaming.set()

        async def long_request() -> None:
            results["long"] = await m.complete("quiet", {**body(1), "max_tokens": 40}, on_text)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(long_request)
            await streaming.wait()
            results["short"] = await m.complete("acme", body(2))
            with trio.fail_after(30):
                while (await m.gateway.providers.get(cheater.key.peer_id)).status != "suspended":
                    await trio.sleep(0.01)
            assert "long" not in results, "the long request ended before the cheater was caught"
        await m.gateway.spot_checks.wait_idle()
        long, short = results["long"], results["short"]
        assert {long.provider_peer_id, short.provider_peer_id} == {cheater.key.peer_id}
        for completion, tenant in ((short, "acme"), (long, "quiet")):
            legs = {leg: (debit, credit, amount) for leg, debit, credit, amount in await m.rows(
                "SELECT leg, debit, credit, amount FROM postings WHERE request_id = ? AND leg LIKE 'correction:%'",
                (completion.request_id,))}
            assert legs["correction:spot-check-payout"] == (provider_account(cheater.key.peer_id),
                                                            tenant_account(tenant), completion.charge.payout)
        assert await m.gateway.books.tenant_spent("quiet") == 0          # charged, then repaid in full


def occupying_order(m, provider_name: str, max_tokens: int = 40):
    """An order that keeps one slot of ``provider_name`` busy (the platform pays; nobody's request)."""
    from llorch.gateway.books.settlement import Payer
    from llorch.gateway.ticket_runner import Order, new_request_id

    model = m.providers[provider_name].attestation.models[0]
    sampling = {"seed": 9, "temperature_ppm": 0, "top_p_ppm": 1_000_000, "max_tokens": max_tokens, "stop": []}
    return Order(new_request_id(), "acme", Payer.PROBE, model["id"], model["sha256"], sampling, bytes(16),
                 {"messages": [{"role": "user", "content": "keep busy"}]}, 64, 10_000)


async def keep_busy(m, provider_name: str, started: trio.Event, max_tokens: int = 40) -> None:
    from llorch.gateway.ticket_runner import Keep

    class Signal(Keep):
        async def send(self, pieces: list, provider_peer_id: str) -> None:
            started.set()

    await m.gateway.runner.run(occupying_order(m, provider_name, max_tokens), m.providers[provider_name].attestation,
                               Signal())


async def test_a_check_whose_only_checker_is_busy_waits_for_it_instead_of_being_dropped(tmp_path):
    """The one other provider of the class is busy when the draw is made: the check waits for its slot and ends
    clean (before: counted no_checker and thrown away)."""
    providers = {"served": {}, "checker": {"delay_s": 0.05}}
    async with market(tmp_path, providers, CONSENTING, {"spot_check_rate_ppm": ALL_PPM}) as m, \
            trio.open_nursery() as nursery:
        busy = trio.Event()
        nursery.start_soon(keep_busy, m, "checker", busy)
        await busy.wait()
        completion = await m.complete("acme", body(1))
        assert completion.provider_peer_id == m.providers["served"].key.peer_id
        await m.gateway.spot_checks.wait_idle()
        stats = m.gateway.spot_checks.statistics
        assert (stats.sampled, stats.clean, stats.dropped, stats.expired) == (1, 1, 0, 0), stats
        (verdict,) = m.gateway.spot_checks.verdicts
        assert [r.provider_key for r in verdict.receipts] == [m.providers["served"].key.public_key,
                                                              m.providers["checker"].key.public_key]


async def test_a_disagreement_waits_for_a_busy_tie_breaker_and_catches_the_cheater(tmp_path):
    """The cheater's run and the first checker's disagree while the only other provider is busy: the check waits
    for it, and the majority catches the cheater (before: stored undecided, nobody suspended)."""
    providers = {"cheater": {"engine": TruncatingEngine, "price_out": 100_000}, "checker": {"price_out": 200_000},
                 "tie_breaker": {"delay_s": 0.05, "price_out": 300_000}}
    async with market(tmp_path, providers, CONSENTING, {"spot_check_rate_ppm": ALL_PPM}) as m, \
            trio.open_nursery() as nursery:
        busy = trio.Event()
        nursery.start_soon(keep_busy, m, "tie_breaker", busy)
        await busy.wait()
        completion = await m.complete("acme", body(1))
        cheater = m.providers["cheater"]
        assert completion.provider_peer_id == cheater.key.peer_id
        await m.gateway.spot_checks.wait_idle()
        stats = m.gateway.spot_checks.statistics
        assert (stats.suspects, stats.undecided, stats.dropped, stats.expired) == (1, 0, 0, 0), stats
        assert (await m.gateway.providers.get(cheater.key.peer_id)).status == "suspended"
        await check_customers_credited(m, cheater, [completion])


async def test_a_check_no_checker_takes_before_the_deadline_expires_and_says_so(tmp_path):
    """Checkers exist but stay busy past the deadline: the draw ends "expired" (counted, stored with its reason),
    and nobody is suspended."""
    from llorch.gateway.spot_checks import check_outcomes

    providers = {"served": {}, "checker": {"delay_s": 0.1}}
    async with market(tmp_path, providers, CONSENTING, {"spot_check_rate_ppm": ALL_PPM}) as m, \
            trio.open_nursery() as nursery:
        m.gateway.spot_checks.deadline_s = 0.5
        busy = trio.Event()
        nursery.start_soon(keep_busy, m, "checker", busy, 40)          # busy for ~4 s
        await busy.wait()
        await m.complete("acme", body(1))
        await m.gateway.spot_checks.wait_idle()
        stats = m.gateway.spot_checks.statistics
        assert (stats.sampled, stats.expired, stats.clean, stats.dropped) == (1, 1, 0, 0), stats
        report = await check_outcomes(m.database)
        assert report["outcomes"]["expired"] == 1
        assert "busy until the deadline" in report["not_clean"][0]["reason"]
        assert all(r.status == "approved" for r in await m.gateway.providers.all())
        nursery.cancel_scope.cancel()


async def test_a_check_waiting_for_its_checker_never_takes_a_customers_turn(tmp_path):
    """Customers queue for the one free provider while a check queues for another, busy one: a turn the check is
    handed but cannot use (its checker is still busy) goes on to the next waiter, so every customer is served
    within the queue deadline (without that, a freed slot could wake only the check and the customers time out)."""
    providers = {"a": {"delay_s": 0.05}, "checker": {"delay_s": 0.1}}
    async with market(tmp_path, providers, CONSENTING, {"spot_check_rate_ppm": ALL_PPM,
                                                        "queue_timeout_ms": 3_000}) as m, \
            trio.open_nursery() as nursery:
        busy = trio.Event()
        nursery.start_soon(keep_busy, m, "checker", busy, 60)          # busy for ~6 s
        await busy.wait()
        served = []

        async def customer(seed: int) -> None:
            served.append(await m.complete("acme", body(seed)))

        async with trio.open_nursery() as customers:
            for seed in range(4):
                customers.start_soon(customer, seed)
        assert len(served) == 4 and {c.provider_peer_id for c in served} == {m.providers["a"].key.peer_id}
        nursery.cancel_scope.cancel()
