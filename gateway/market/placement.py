"""Placement as pure functions: which providers may serve a request, best first, and how observed behaviour
updates a provider's standing. No I/O and no clocks: the caller passes everything, including ``now_ms``.

Eligible (``why_not`` returns the first reason a provider is not):
  fresh attestation · offers the model with the catalog's sha256 · approved by the operator · priced in the
  request's currency · under the request's price ceiling (compared with the customer's price: after the demand
  multiplier and the tier's margin) · for EU-only tenants: geo certified by the operator, an
  EU country, and attesting the certified country (fails closed: no fallback outside the EU) · for tenants that
  require determinism (and for resuming a stream): the pinned engine build · not excluded (forked, or already tried).
Ranked by: a free slot in the latest attestation, then meeting its registered SLA this month as the gateway measured
it (gateway/market/sla.py: providers that miss it go after those that meet it or are not judged yet), then the
worst-case customer price of this request, then observed success
rate (in 5% steps below the best), observed time to first token (in 250 ms steps above the best), load (free
share of slots), least recently
placed, provider key. Providers in back-off after a failure go last.

The customer's routing preferences (OpenRouter's ``provider`` object, gateway/request.py ``Routing``) narrow and
reorder this: ``only`` and ``ignore`` are eligibility (``why_not``); ``sort`` puts its measure first after back-off
and free slots (price: the worst-case customer price; latency: observed time to first token; throughput: observed
tokens per second, fastest first; a provider not yet observed counts as neither fast nor slow: after those observed);
``order`` puts the named providers first, in that order, and without fallbacks no other provider is used.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterable

from llorch.gateway.books.pricing import MARGIN_BP_DEFAULT, customer_price
from llorch.node.wire.attestation import EU_COUNTRIES, Attestation

SUCCESS_PPM_INITIAL = 1_000_000
EWMA_WEIGHT_PPM = 200_000                  # each observation moves the average 20% of the way
BACKOFF_MS_INITIAL = 1_000
BACKOFF_MS_MAX = 60_000
SUCCESS_STEP_PPM = 50_000                  # success rates within 5% rank alike
TTFT_STEP_MS = 250                         # times to first token within 250 ms rank alike
FORGIVE_HALF_LIFE_MS = 2_000               # without new evidence, a shortfall in success rate halves this often


@dataclass(frozen=True)
class Requirements:
    model_id: str
    model_sha256: bytes
    currency: str
    prompt_tokens_estimate: int
    max_tokens: int
    eu_only: bool = False
    engine_build: str | None = None          # required determinism class (pin), or the class of a stream to resume
    max_price_in: int | None = None
    max_price_out: int | None = None
    exclude: frozenset[bytes] = frozenset()
    multiplier_bp: int = 10_000               # demand multiplier and the tenant's margin: what the customer pays
    margin_bp: int = MARGIN_BP_DEFAULT
    only: frozenset[bytes] | None = None      # the customer's routing (gateway/request.py Routing): only these
    order: tuple[bytes, ...] = ()             # ... these first, in this order
    fallbacks: bool = True                    # ... and, when False, none but those in ``order``
    sort: str | None = None                   # ... "price", "latency" or "throughput" first


@dataclass(frozen=True)
class Standing:
    """What the gateway has observed of one provider."""

    success_ppm: int = SUCCESS_PPM_INITIAL
    ttft_ms: int = 0
    tokens_per_s: int = 0                    # observed output rate (tokens per second after the first; 0: unknown)
    failures_in_a_row: int = 0
    backoff_until_ms: int = 0
    last_placed_ms: int = 0
    observed_ms: int = 0                     # when success_ppm last changed

    def success_now_ppm(self, now_ms: int) -> int:
        """The success rate as evidence ages: the shortfall from 100% halves every FORGIVE_HALF_LIFE_MS without a
        new observation, so a provider that failed while restarting gets its turn again instead of ranking a step
        below an equal provider for good (only successes could raise it, and it got no request to succeed at)."""
        halvings = max(0, now_ms - self.observed_ms) // FORGIVE_HALF_LIFE_MS
        return 1_000_000 - ((1_000_000 - self.success_ppm) >> min(halvings, 40))


@dataclass(frozen=True)
class ProviderView:
    attestation: Attestation
    approved: bool
    certified_country: str | None            # the geo claim the operator certified, if any
    standing: Standing = Standing()
    sla_met: bool = True                     # False: this month's measured figures miss its registered SLA

    @property
    def key(self) -> bytes:
        return self.attestation.provider_key


def why_not(view: ProviderView, need: Requirements, now_ms: int) -> str | None:
    a = view.attestation
    if a.expires_ms <= now_ms:
        return "attestation expired"
    if not a.offers(need.model_id, need.model_sha256):
        return "does not offer the model"
    if not view.approved:
        return "not approved"
    if view.key in need.exclude:
        return "excluded"
    if need.only is not None and view.key not in need.only:
        return "not in the request's provider.only"
    if not need.fallbacks and view.key not in need.order:
        return "not in the request's provider.order (allow_fallbacks is false)"
    if a.currency != need.currency:
        return "other currency"
    price_in, price_out = customer_prices(a, need)
    if need.max_price_in is not None and price_in > need.max_price_in:
        return "above the input price ceiling"
    if need.max_price_out is not None and price_out > need.max_price_out:
        return "above the output price ceiling"
    if need.eu_only and not (view.certified_country in EU_COUNTRIES and a.geo["country"] == view.certified_country):
        return "not a certified EU provider"
    if need.engine_build is not None and a.engine_build != need.engine_build:
        return "other determinism class"
    if a.slots_total == 0:
        return "no slots"
    return None


def customer_prices(a: Attestation, need: Requirements) -> tuple[int, int]:
    """What the customer would pay per 1M input and output tokens at this provider."""
    return (customer_price(a.price_in, need.multiplier_bp, need.margin_bp),
            customer_price(a.price_out, need.multiplier_bp, need.margin_bp))


def worst_case_cost(a: Attestation, need: Requirements) -> int:
    return cost_at((a.price_in, a.price_out), need)


def cost_at(prices: tuple[int, int], need: Requirements) -> int:
    """The worst-case customer price of the request at attested prices (per 1M input, output tokens)."""
    return (need.prompt_tokens_estimate * customer_price(prices[0], need.multiplier_bp, need.margin_bp) +
            need.max_tokens * customer_price(prices[1], need.multiplier_bp, need.margin_bp))


def rank_key(v: ProviderView, need: Requirements, now_ms: int, best_success: int, best_ttft: int,
             cost: int | None = None) -> tuple:
    """The market's own order of an eligible provider, given the best success rate and TTFT among the eligible.
    Observations are compared in coarse steps from the best one, so noise (a few ms of TTFT around a step's edge)
    does not pin all traffic to one of two equivalent providers; within a step, load and turns decide.
    gateway/market/index.py keeps providers in this order as it changes. ``cost``: its worst-case cost, if known."""
    a, s = v.attestation, v.standing
    free_share_ppm = a.slots_free * 1_000_000 // a.slots_total
    return (s.backoff_until_ms > now_ms, a.slots_free == 0, not v.sla_met,
            worst_case_cost(a, need) if cost is None else cost,
            (best_success - s.success_now_ppm(now_ms)) // SUCCESS_STEP_PPM, (s.ttft_ms - best_ttft) // TTFT_STEP_MS,
            -free_share_ppm, s.last_placed_ms, v.key)


def rank_providers(views: Iterable[ProviderView], need: Requirements, now_ms: int) -> list[ProviderView]:
    """Every eligible provider, best first: the full sort (gateway/market/index.py gives its first few without one)."""
    eligible = [v for v in views if why_not(v, need, now_ms) is None]
    best_success = max((v.standing.success_now_ppm(now_ms) for v in eligible), default=0)
    best_ttft = min((v.standing.ttft_ms for v in eligible), default=0)

    def order(v: ProviderView):
        return rank_key(v, need, now_ms, best_success, best_ttft)

    def preferred(v: ProviderView):
        """The customer's sort and order, before the market's own ranking."""
        a, s = v.attestation, v.standing
        named = need.order.index(v.key) if v.key in need.order else len(need.order)
        measure: tuple = ()
        if need.sort == "price":
            measure = (worst_case_cost(a, need),)
        elif need.sort == "latency":
            measure = (s.ttft_ms == 0, s.ttft_ms)
        elif need.sort == "throughput":
            measure = (s.tokens_per_s == 0, -s.tokens_per_s)
        return (named, s.backoff_until_ms > now_ms, a.slots_free == 0, *measure, *order(v))

    return sorted(eligible, key=preferred if (need.sort or need.order) else order)


def after_success(standing: Standing, ttft_ms: int, now_ms: int, tokens_per_s: int = 0) -> Standing:
    rate = standing.tokens_per_s
    if tokens_per_s:
        rate = tokens_per_s if rate == 0 else _ewma(rate, tokens_per_s)
    return replace(standing, success_ppm=_ewma(standing.success_now_ppm(now_ms), 1_000_000), observed_ms=now_ms,
                   ttft_ms=ttft_ms if standing.ttft_ms == 0 else _ewma(standing.ttft_ms, ttft_ms),
                   tokens_per_s=rate, failures_in_a_row=0, backoff_until_ms=0)


def after_failure(standing: Standing, now_ms: int) -> Standing:
    failures = standing.failures_in_a_row + 1
    backoff = min(BACKOFF_MS_INITIAL << (failures - 1), BACKOFF_MS_MAX)
    return replace(standing, success_ppm=_ewma(standing.success_now_ppm(now_ms), 0), failures_in_a_row=failures,
                   backoff_until_ms=now_ms + backoff, observed_ms=now_ms)


def _ewma(average: int, observation: int) -> int:
    return (average * (1_000_000 - EWMA_WEIGHT_PPM) + observation * EWMA_WEIGHT_PPM) // 1_000_000
