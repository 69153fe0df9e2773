"""The gateway's live view of the providers it places on: their attestations (the directory), the operator's
decisions (approved, certified geo), and what this gateway observed of them (standing, its own tickets in flight,
SLA misses, suspensions since the last read of the books). Placement (gateway/market/placement.py) ranks the
``ProviderView``s built here; the ticket runner (gateway/ticket_runner.py) tells it what each ticket showed.

Every change to a provider's view files it again in the placement index (gateway/market/index.py), so ``rank``
reads a few entries however many providers there are: the directory tells of attestations and exclusions, the
ticket runner of placements and outcomes, the SLA loop of misses, and each ``rank`` compares the operator's
decisions (the provider book, re-read only when the database changed) with what the index was told last.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Protocol

from llorch.gateway.books.pricing import demand_multiplier_bp, utilisation_ppm
from llorch.gateway.market.admission import WaitingRoom
from llorch.gateway.market.directory import ProviderDirectory
from llorch.gateway.market.index import PlacementIndex, Ranking
from llorch.gateway.market.placement import ProviderView, Requirements, Standing, after_failure, after_success
from llorch.gateway.market.providers import ProviderBook, ProviderRecord
from llorch.node.models import Catalog
from llorch.node.stream_io import now_ms
from llorch.node.wire.attestation import Attestation


class Models(Protocol):
    """Where the market reads the newest catalog (gateway/catalog.py ``GatewayCatalog``)."""

    @property
    def catalog(self) -> Catalog: ...


class MarketView:
    def __init__(self, directory: ProviderDirectory, providers: ProviderBook, waiting: WaitingRoom,
                 catalog: Models) -> None:
        self.directory = directory
        self.models = catalog                        # the operator's catalog: which models exist, and their pins
        self.waiting = waiting
        self.providers = providers
        self.standings: dict[bytes, Standing] = {}
        self.sla_missed: frozenset[bytes] = frozenset()   # ranked last: kept by run.py's "sla" loop (market/sla.py)
        self._suspended_ms: dict[bytes, int] = {}   # provider → when this gateway suspended it (its clock)
        self._suspension_written: set[bytes] = set()  # ...and the database has said so since
        self._in_flight: dict[bytes, int] = {}    # this gateway's tickets per provider, from issue to settlement
        self._others: dict[bytes, int] = {}       # other replicas' open tickets per provider (``others_now``)
        self.index = PlacementIndex()
        self._records: dict[bytes, ProviderRecord] = {}   # the provider book as the index was last told it
        self._records_seen: object = None
        directory.changed = self._refile

    # what placement reads --------------------------------------------------------------------------------------
    async def rank(self, need: Requirements, count: int) -> Ranking:
        """The first ``count`` providers placement would try for ``need`` (gateway/market/index.py)."""
        await self._sync_records()
        return self.index.rank(need, now_ms(), count)

    async def ready_providers(self) -> int:
        """How many approved providers have a fresh attestation here (for /healthz)."""
        await self._sync_records()
        return len(self.directory.fresh(now_ms()))

    async def provider_views(self) -> list[ProviderView]:
        """Every fresh provider's view (for pages, probes and the reasons nobody is eligible: it reads them all)."""
        await self._sync_records()
        return [view for a in self.directory.fresh(now_ms()) if (view := self._view(a.provider_key)) is not None]

    async def _sync_records(self) -> None:
        """Tell the index what changed in the operator's decisions since it was last told (approvals, suspensions,
        certifications: one comparison per provider, only when the provider book was read again)."""
        book = await self.providers.all()
        if book is not self._records_seen:
            records = {record.provider_key: record for record in book}
            changed = {key for key in records.keys() | self._records.keys()
                       if records.get(key) != self._records.get(key)}
            self._records, self._records_seen = records, book
            for key in changed:
                record = records.get(key)
                if record is not None and record.approved:
                    self.directory.approved(key)          # its pending attestation counts now (refiled if so)
                self._refile(key)
        for key in list(self._suspended_ms):
            record = self._records.get(key)
            if record is not None and not record.approved:
                self._suspension_written.add(key)
            elif record is not None and key in self._suspension_written:      # the operator readmitted it
                self.lift(key)

    def _view(self, provider_key: bytes) -> ProviderView | None:
        attestation = self.directory.placeable(provider_key)
        if attestation is None:
            return None
        record = self._records.get(provider_key)
        certified = record.registration.geo["country"] if record and record.geo_certified else None
        approved = bool(record and record.approved) and provider_key not in self._suspended_ms
        return ProviderView(attestation, approved, certified, self.standings.get(provider_key, Standing()),
                            provider_key not in self.sla_missed)

    def _refile(self, provider_key: bytes) -> None:
        view = self._view(provider_key)
        if view is None:
            self.index.drop(provider_key)
        else:
            self.index.put(view, now_ms())

    @property
    def catalog(self) -> Catalog:
        """The newest catalog version (live entries are placed on; retired ones only verify old receipts)."""
        return self.models.catalog

    async def offered_models(self) -> list[str]:
        """The live catalog's models some placeable provider offers."""
        await self._sync_records()
        catalog = self.catalog
        pins = {m: catalog.pin(m) for m in catalog.live_ids()}
        return [m for m, pin in pins.items() if pin is not None and self.index.slots(m, pin, now_ms())[0] > 0]

    async def demand_multiplier(self, model_id: str, pin: bytes) -> int:
        """The demand multiplier from the utilisation of every placeable provider offering the model."""
        await self._sync_records()
        return demand_multiplier_bp(utilisation_ppm(*self.index.slots(model_id, pin, now_ms())))

    def full_with_ours(self, provider: Attestation) -> bool:
        """Every slot of ``provider`` serves one of this gateway's tickets, or of the other replicas' (as last
        counted): busy without asking, so no ticket is written and no round trip spent on a certain refusal."""
        key = provider.provider_key
        return self._in_flight.get(key, 0) + self._others.get(key, 0) >= provider.slots_total

    def in_flight(self) -> dict[bytes, int]:
        """This gateway's tickets in flight per provider (a copy)."""
        return dict(self._in_flight)

    def others_now(self, others: dict[bytes, int]) -> None:
        """The other replicas' open tickets per provider, counted in the shared books (gateway/run.py's "placement"
        loop). A count that went down may have freed a slot a waiting request can take: the queue is woken."""
        freed = any(others.get(key, 0) < count for key, count in self._others.items())
        self._others = others
        if freed:
            self.waiting.wake()

    def sla_missed_now(self, provider_keys: frozenset[bytes]) -> None:
        """The providers whose figures this month miss their registered SLA (run.py's "sla" loop)."""
        changed, self.sla_missed = self.sla_missed ^ provider_keys, provider_keys
        for key in changed:
            self._refile(key)

    # what the ticket runner tells it ----------------------------------------------------------------------------
    def ticket_started(self, provider_key: bytes) -> None:
        self._in_flight[provider_key] = self._in_flight.get(provider_key, 0) + 1
        standing = self.standings.get(provider_key, Standing())
        self.standings[provider_key] = replace(standing, last_placed_ms=now_ms())
        self._refile(provider_key)

    def ticket_ended(self, provider_key: bytes, held_slot: bool) -> None:
        """A ticket settled; if the provider had admitted it (``held_slot``), a slot is free: the next waiter in
        the admission queue tries again. A refused ticket frees nothing and wakes nobody."""
        self._in_flight[provider_key] -= 1
        if held_slot:
            self.waiting.wake()

    def failed(self, provider_key: bytes) -> None:
        self.standings[provider_key] = after_failure(self.standings.get(provider_key, Standing()), now_ms())
        self._refile(provider_key)

    def succeeded(self, provider_key: bytes, ttft_ms: int, tokens_per_s: int = 0) -> None:
        self.standings[provider_key] = after_success(self.standings.get(provider_key, Standing()), ttft_ms,
                                                     now_ms(), tokens_per_s)
        self._refile(provider_key)

    def suspend(self, provider_key: bytes, at_ms: int) -> None:
        """A check caught ``provider_key`` at ``at_ms``: from now on this gateway issues it no ticket
        (``suspended``), and its tickets still in flight are credited when they settle (``credit_due``). Once the
        database has said "suspended", its saying "approved" again means the operator readmitted it."""
        self._suspended_ms[provider_key] = max(at_ms, self._suspended_ms.get(provider_key, 0))
        self._refile(provider_key)

    def lift(self, provider_key: bytes) -> None:
        """Forget a suspension: the operator readmitted the provider, or writing the suspension failed."""
        self._suspended_ms.pop(provider_key, None)
        self._suspension_written.discard(provider_key)
        self._refile(provider_key)

    def suspended(self, provider_key: bytes) -> bool:
        return provider_key in self._suspended_ms

    def credit_due(self, provider_key: bytes, issued_ms: int) -> bool:
        """Whether a ticket of ``provider_key`` issued at ``issued_ms`` is owed to its customer: it was issued
        before the provider was caught (a readmitted provider's later tickets are not)."""
        suspended_ms = self._suspended_ms.get(provider_key)
        return suspended_ms is not None and issued_ms <= suspended_ms
