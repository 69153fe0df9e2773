"""Placement without a scan: the providers placement may choose from, kept in order as their attestations,
standings, approvals and SLA judgements change, so one placement decision reads a few entries of sorted structures
instead of ranking every provider (gateway/market/placement.py says the ranking; this module gives the same answer).

Kept per **class**: (model id, model sha256, currency, EU-certified only?, determinism class or any). A provider is
in the classes its fresh attestation and the operator's decisions put it in (approved, not suspended, not excluded,
at least one slot); a request reads only its own class. Within a class, providers are

- **hot**: in back-off, or with a success rate not yet forgiven back to 100%, or a time to first token beyond the
  index's range (``TTFT_SPAN_MS``). These are few (providers that failed in the last minute or so) and are ranked
  one by one with placement's own key. A hot provider turns cold at a known moment (``cold_at_ms``), when the index
  files it again.
- **cold**: everyone else. Their rank key is (full?, SLA missed?, worst-case cost, 0, TTFT step, -free share, last
  placed, key): the success step is 0 (100% is the best there is), the cost depends only on the price pair. So they
  are filed by (full?, SLA missed?) and price pair, and within that in a range-minimum tree over the observed time to
  first token whose leaves hold (-free share, last placed, key) in order. The first TTFT step present gives a range
  of 250 ms; the tree answers its least entry in O(log TTFT_SPAN_MS).

A decision reads: the class's price pairs (to apply ceilings and compare costs; a market has a few), the hot
providers of the class, and per cheapest price pair one sorted-list head and one tree query. Top-k is k such reads
with the taken providers set aside, against the best success and TTFT of the whole eligible set (as placement's
full sort computes them once). Customer routing that reorders (``order``, ``sort``) or narrows to a list (``only``)
ranks the class's members (``only``: just those listed) with placement's full sort.

Expiry and forgiveness are lazy: two heaps of (moment, key, generation) are drained at each read.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from typing import Iterable

from sortedcontainers import SortedList

from llorch.gateway.market.placement import (FORGIVE_HALF_LIFE_MS, SUCCESS_PPM_INITIAL, TTFT_STEP_MS, ProviderView,
                                             Requirements, cost_at, customer_price, rank_key, rank_providers,
                                             why_not)
from llorch.node.wire.attestation import EU_COUNTRIES

TTFT_SPAN_MS = 1 << 20          # cold providers' observed TTFT lies in [0, 17.5 min); slower ones are ranked as hot
CLASS_ANY = None

ClassKey = tuple[str, bytes, str, bool, str | None]       # model, sha256, currency, EU only, determinism class
Rest = tuple[int, int, bytes]                              # -free share (ppm), last placed (ms), provider key


def cold_at_ms(view: ProviderView) -> int:
    """When ``view``'s standing stops being hot: its back-off over and its success rate forgiven to 100%
    (``Standing.success_now_ppm``: the shortfall halves every FORGIVE_HALF_LIFE_MS)."""
    standing = view.standing
    halvings = (SUCCESS_PPM_INITIAL - standing.success_ppm).bit_length()
    return max(standing.backoff_until_ms, standing.observed_ms + halvings * FORGIVE_HALF_LIFE_MS)


def _rest(view: ProviderView) -> Rest:
    a = view.attestation
    return (-(a.slots_free * 1_000_000 // a.slots_total), view.standing.last_placed_ms, view.key)


class RangeMin:
    """Entries (ttft_ms, rest): the least ``rest`` among those with ttft_ms in a range. A sparse segment tree over
    [0, TTFT_SPAN_MS) whose leaves are the sorted entries of one TTFT; ``by_ttft`` orders all entries by TTFT."""

    def __init__(self) -> None:
        self._leaves: dict[int, SortedList] = {}
        self._least: dict[int, Rest] = {}       # node → least rest beneath it (root 1; the leaf of t: SPAN + t)
        self.by_ttft = SortedList()             # (ttft, rest)

    def __len__(self) -> int:
        return len(self.by_ttft)

    def add(self, ttft: int, rest: Rest) -> None:
        self.by_ttft.add((ttft, rest))
        leaf = self._leaves.get(ttft)
        if leaf is None:
            leaf = self._leaves[ttft] = SortedList()
        leaf.add(rest)
        self._climb(TTFT_SPAN_MS + ttft, leaf[0])

    def remove(self, ttft: int, rest: Rest) -> None:
        self.by_ttft.remove((ttft, rest))
        leaf = self._leaves[ttft]
        leaf.remove(rest)
        if not leaf:
            del self._leaves[ttft]
        self._climb(TTFT_SPAN_MS + ttft, leaf[0] if leaf else None)

    def _climb(self, node: int, least: Rest | None) -> None:
        while True:
            if least is None:
                self._least.pop(node, None)
            else:
                self._least[node] = least
            node >>= 1
            if node == 0:
                return
            left, right = self._least.get(2 * node), self._least.get(2 * node + 1)
            least = left if right is None else right if left is None else min(left, right)
            if self._least.get(node) == least:
                return

    def least(self, low: int, high: int) -> Rest | None:
        """The least rest of the entries with low <= ttft < high."""
        found: Rest | None = None
        low, high = TTFT_SPAN_MS + max(0, low), TTFT_SPAN_MS + min(high, TTFT_SPAN_MS)
        while low < high:
            for node in ((low,) if low & 1 else ()) + ((high - 1,) if high & 1 else ()):
                candidate = self._least.get(node)
                if candidate is not None and (found is None or candidate < found):
                    found = candidate
            low, high = (low + 1) >> 1, high >> 1
        return found


TIERS = ((False, False), (False, True), (True, False), (True, True))   # (no free slot, SLA missed), best first


@dataclass
class _Prices:
    """The cold members of one class at one price pair."""

    ttfts: SortedList = field(default_factory=SortedList)            # (ttft, key) of all tiers: the best TTFT
    tiers: dict[tuple[bool, bool], RangeMin] = field(default_factory=dict)


@dataclass(frozen=True)
class _Filed:
    """Where a member is filed: what ``_Class.take_out`` needs to find it again."""

    hot: bool
    prices: tuple[int, int]
    tier: tuple[bool, bool]
    ttft: int
    rest: Rest


@dataclass
class _Class:
    members: dict[bytes, _Filed] = field(default_factory=dict)
    hot: set[bytes] = field(default_factory=set)
    prices: dict[tuple[int, int], _Prices] = field(default_factory=dict)

    def put_in(self, key: bytes, filed: _Filed) -> None:
        self.members[key] = filed
        if filed.hot:
            self.hot.add(key)
            return
        group = self.prices.get(filed.prices)
        if group is None:
            group = self.prices[filed.prices] = _Prices()
        group.ttfts.add((filed.ttft, key))
        tree = group.tiers.get(filed.tier)
        if tree is None:
            tree = group.tiers[filed.tier] = RangeMin()
        tree.add(filed.ttft, filed.rest)

    def take_out(self, key: bytes) -> _Filed:
        filed = self.members.pop(key)
        if filed.hot:
            self.hot.discard(key)
            return filed
        group = self.prices[filed.prices]
        group.ttfts.remove((filed.ttft, key))
        tree = group.tiers[filed.tier]
        tree.remove(filed.ttft, filed.rest)
        if not tree:
            del group.tiers[filed.tier]
        if not group.ttfts:
            del self.prices[filed.prices]
        return filed


@dataclass(frozen=True)
class Ranking:
    """The best ``count`` candidates in placement's order, and the highest customer prices (per 1M input and output
    tokens) among every eligible provider: what a reservation must cover (None: nobody is eligible)."""

    candidates: list[ProviderView]
    price_caps: tuple[int, int] | None


@dataclass
class _Bests:
    success_ppm: int
    ttft_ms: int
    hot: list[ProviderView]
    prices: list[tuple[int, int]]


class PlacementIndex:
    """Every placeable provider, filed by class; ``rank`` answers as ``rank_providers`` would, reading a few
    entries. ``put`` files a provider's current view again (after any change to it), ``drop`` removes it."""

    def __init__(self) -> None:
        self._views: dict[bytes, ProviderView] = {}
        self._generation: dict[bytes, int] = {}
        self._filed: dict[bytes, _Filed] = {}
        self._classes: dict[ClassKey, _Class] = {}
        self._models: dict[tuple[str, bytes], list[int]] = {}    # (model, sha256) → [slots, free slots]
        self._expiring: list[tuple[int, bytes, int]] = []        # (expires_ms, key, generation)
        self._cooling: list[tuple[int, bytes, int]] = []         # (cold_at_ms, key, generation)

    def __len__(self) -> int:
        return len(self._views)

    # keeping it --------------------------------------------------------------------------------------------------
    def put(self, view: ProviderView, now_ms: int) -> None:
        """File ``view`` (replacing what was filed for its provider); an unplaceable one is only removed. A view
        filed exactly where the last one was (a heartbeat attestation: new seq and expiry, nothing else) only
        replaces it."""
        a = view.attestation
        if not view.approved or a.slots_total == 0 or a.expires_ms <= now_ms:
            self.drop(view.key)
            return
        key = view.key
        cold_at = cold_at_ms(view)
        ttft = view.standing.ttft_ms
        filed = _Filed(now_ms < cold_at or ttft >= TTFT_SPAN_MS, (a.price_in, a.price_out),
                       (a.slots_free == 0, not view.sla_met), ttft, _rest(view))
        class_keys = self._class_keys(view)
        old = self._views.get(key)
        if (old is not None and self._filed[key] == filed and self._class_keys(old) == class_keys and
                (old.attestation.slots_total, old.attestation.slots_free) == (a.slots_total, a.slots_free)):
            self._views[key] = view
        else:
            self.drop(key)
            self._views[key] = view
            self._filed[key] = filed
            for class_key in class_keys:
                found = self._classes.get(class_key)
                if found is None:
                    found = self._classes[class_key] = _Class()
                found.put_in(key, filed)
            for model in a.models:
                slots = self._models.setdefault((model["id"], model["sha256"]), [0, 0])
                slots[0] += a.slots_total
                slots[1] += a.slots_free
        generation = self._generation.get(key, 0) + 1
        self._generation[key] = generation
        if now_ms < cold_at:
            heapq.heappush(self._cooling, (cold_at, key, generation))
        heapq.heappush(self._expiring, (a.expires_ms, key, generation))
        if len(self._expiring) > 4 * len(self._views) + 1024:        # stale entries: keep the heaps small
            self._expiring = [(v.attestation.expires_ms, k, self._generation[k]) for k, v in self._views.items()]
            heapq.heapify(self._expiring)
            self._cooling = [entry for entry in self._cooling if self._generation.get(entry[1]) == entry[2]]
            heapq.heapify(self._cooling)

    def drop(self, key: bytes) -> None:
        view = self._views.pop(key, None)
        if view is None:
            return
        del self._filed[key]
        self._generation[key] += 1                # its heap entries are stale now
        for class_key in self._class_keys(view):
            found = self._classes[class_key]
            found.take_out(key)
            if not found.members:
                del self._classes[class_key]
        a = view.attestation
        for model in a.models:
            slots = self._models[(model["id"], model["sha256"])]
            slots[0] -= a.slots_total
            slots[1] -= a.slots_free
            if slots[0] == 0:
                del self._models[(model["id"], model["sha256"])]

    def view(self, key: bytes) -> ProviderView | None:
        return self._views.get(key)

    def views(self) -> Iterable[ProviderView]:
        return self._views.values()

    def slots(self, model_id: str, sha256: bytes, now_ms: int) -> tuple[int, int]:
        """(slots, free slots) of the placeable providers offering the model."""
        self._catch_up(now_ms)
        total, free = self._models.get((model_id, sha256), (0, 0))
        return total, free

    @staticmethod
    def _class_keys(view: ProviderView) -> list[ClassKey]:
        a = view.attestation
        eu = view.certified_country in EU_COUNTRIES and a.geo["country"] == view.certified_country
        keys: list[ClassKey] = []
        for model in a.models:
            for eu_only in (False, True) if eu else (False,):
                for build in (CLASS_ANY, a.engine_build):
                    keys.append((model["id"], model["sha256"], a.currency, eu_only, build))
        return list(dict.fromkeys(keys))         # a model listed twice is filed once

    def _catch_up(self, now_ms: int) -> None:
        """Drop what expired, file again (cold) what was forgiven, up to ``now_ms``."""
        while self._expiring and self._expiring[0][0] <= now_ms:
            _, key, generation = heapq.heappop(self._expiring)
            if self._generation.get(key) == generation:
                self.drop(key)
        while self._cooling and self._cooling[0][0] <= now_ms:
            _, key, generation = heapq.heappop(self._cooling)
            if self._generation.get(key) == generation:
                self.put(self._views[key], now_ms)

    # reading it --------------------------------------------------------------------------------------------------
    def rank(self, need: Requirements, now_ms: int, count: int) -> Ranking:
        """The first ``count`` of ``rank_providers`` over every placeable provider, and the eligible price caps."""
        self._catch_up(now_ms)
        found = self._classes.get((need.model_id, need.model_sha256, need.currency, need.eu_only, need.engine_build))
        if found is None:
            return Ranking([], None)
        if need.only is not None or need.order or need.sort or not need.fallbacks:
            keys = found.members if need.only is None else [k for k in need.only if k in found.members]
            ranked = rank_providers([self._views[k] for k in keys], need, now_ms)
            return Ranking(ranked[:count], _caps(ranked, need))
        aside: dict[bytes, _Filed] = {}
        try:
            for key in need.exclude:
                if key in found.members:
                    aside[key] = found.take_out(key)
            bests = self._bests(found, need, now_ms)
            caps = self._caps_of(bests, need)
            costs = {pair: cost_at(pair, need) for pair in bests.prices}
            hot = sorted((rank_key(v, need, now_ms, bests.success_ppm, bests.ttft_ms,
                                   costs.get((v.attestation.price_in, v.attestation.price_out))), v.key)
                         for v in bests.hot)
            taken: list[ProviderView] = []
            while len(taken) < count:
                cold = self._best_cold(found, bests, costs)
                if hot and (cold is None or hot[0][0] < cold[0]):
                    taken.append(self._views[hot.pop(0)[1]])
                elif cold is not None:
                    taken.append(self._views[cold[1]])
                    aside[cold[1]] = found.take_out(cold[1])
                else:
                    break
            return Ranking(taken, caps)
        finally:
            for key, filed in aside.items():
                found.put_in(key, filed)

    def _bests(self, found: _Class, need: Requirements, now_ms: int) -> _Bests:
        """The best success rate and TTFT of the eligible providers (placement compares with them in steps), the
        eligible hot ones, and the price pairs within the request's ceilings."""
        prices = [pair for pair in found.prices if _within(pair, need)]
        hot = [self._views[k] for k in found.hot if why_not(self._views[k], need, now_ms) is None]
        ttfts = [found.prices[pair].ttfts[0][0] for pair in prices] + [v.standing.ttft_ms for v in hot]
        success = SUCCESS_PPM_INITIAL if prices else max((v.standing.success_now_ppm(now_ms) for v in hot), default=0)
        return _Bests(success, min(ttfts, default=0), hot, prices)

    @staticmethod
    def _caps_of(bests: _Bests, need: Requirements) -> tuple[int, int] | None:
        pairs = bests.prices + [(v.attestation.price_in, v.attestation.price_out) for v in bests.hot]
        if not pairs:
            return None
        return (customer_price(max(p for p, _ in pairs), need.multiplier_bp, need.margin_bp),
                customer_price(max(p for _, p in pairs), need.multiplier_bp, need.margin_bp))

    @staticmethod
    def _best_cold(found: _Class, bests: _Bests, costs: dict[tuple[int, int], int]) -> tuple[tuple, bytes] | None:
        """The best cold provider's rank key and provider key: in the best tier holding any, at the cheapest price
        pair, the least (-free share, last placed, key) within the first TTFT step present."""
        for tier in TIERS:
            pairs = sorted((costs[pair], pair) for pair in bests.prices
                           if pair in found.prices and tier in found.prices[pair].tiers)
            best: tuple | None = None
            for cost, pair in pairs:
                if cost > pairs[0][0]:
                    break
                tree = found.prices[pair].tiers[tier]
                step = (tree.by_ttft[0][0] - bests.ttft_ms) // TTFT_STEP_MS
                low = bests.ttft_ms + step * TTFT_STEP_MS
                rest = tree.least(low, low + TTFT_STEP_MS)
                assert rest is not None                 # the range holds the tree's first entry
                key = (False, tier[0], tier[1], cost, 0, step, *rest)
                if best is None or key < best:
                    best = key
            if best is not None:
                return best, best[-1]
        return None


def _within(pair: tuple[int, int], need: Requirements) -> bool:
    price_in = customer_price(pair[0], need.multiplier_bp, need.margin_bp)
    price_out = customer_price(pair[1], need.multiplier_bp, need.margin_bp)
    return ((need.max_price_in is None or price_in <= need.max_price_in) and
            (need.max_price_out is None or price_out <= need.max_price_out))


def _caps(ranked: list[ProviderView], need: Requirements) -> tuple[int, int] | None:
    if not ranked:
        return None
    return (customer_price(max(v.attestation.price_in for v in ranked), need.multiplier_bp, need.margin_bp),
            customer_price(max(v.attestation.price_out for v in ranked), need.multiplier_bp, need.margin_bp))
