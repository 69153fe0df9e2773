"""The gateway's live view of the providers it places on: their attestations (the directory), the operator's
decisions (approved, certified geo), and what this gateway observed of them (standing, its own tickets in flight,
SLA misses, suspensions since the last read of the books). Placement (gateway/market/placement.py) ranks the
``ProviderView``s built here; the ticket runner (gateway/ticket_runner.py) tells it what each ticket showed.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Protocol

from llorch.gateway.books.pricing import demand_multiplier_bp, utilisation_ppm
from llorch.gateway.market.admission import WaitingRoom
from llorch.gateway.market.directory import ProviderDirectory
from llorch.gateway.market.placement import ProviderView, Standing, after_failure, after_success
from llorch.gateway.market.providers import ProviderBook
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

    # what placement reads --------------------------------------------------------------------------------------
    async def provider_views(self) -> list[ProviderView]:
        records = {record.provider_key: record for record in await self.providers.all()}
        for key in list(self._suspended_ms):
            record = records.get(key)
            if record is not None and not record.approved:
                self._suspension_written.add(key)
            elif record is not None and key in self._suspension_written:      # the operator readmitted it
                self.lift(key)
        views = []
        for attestation in self.directory.fresh(now_ms()):
            record = records.get(attestation.provider_key)
            certified = record.registration.geo["country"] if record and record.geo_certified else None
            approved = bool(record and record.approved) and attestation.provider_key not in self._suspended_ms
            views.append(ProviderView(attestation, approved, certified,
                                      self.standings.get(attestation.provider_key, Standing()),
                                      attestation.provider_key not in self.sla_missed))
        return views

    @property
    def catalog(self) -> Catalog:
        """The newest catalog version (live entries are placed on; retired ones only verify old receipts)."""
        return self.models.catalog

    def offered_models(self) -> list[str]:
        fresh = self.directory.fresh(now_ms())
        catalog = self.catalog
        pins = {m: catalog.pin(m) for m in catalog.live_ids()}
        return [m for m, pin in pins.items() if pin is not None and any(a.offers(m, pin) for a in fresh)]

    def demand_multiplier(self, model_id: str, pin: bytes) -> int:
        """The demand multiplier from the utilisation of every fresh provider offering the model."""
        offering = [a for a in self.directory.fresh(now_ms()) if a.offers(model_id, pin)]
        return demand_multiplier_bp(utilisation_ppm(sum(a.slots_total for a in offering),
                                                    sum(a.slots_free for a in offering)))

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
        self.sla_missed = provider_keys

    # what the ticket runner tells it ----------------------------------------------------------------------------
    def ticket_started(self, provider_key: bytes) -> None:
        self._in_flight[provider_key] = self._in_flight.get(provider_key, 0) + 1
        standing = self.standings.get(provider_key, Standing())
        self.standings[provider_key] = replace(standing, last_placed_ms=now_ms())

    def ticket_ended(self, provider_key: bytes, held_slot: bool) -> None:
        """A ticket settled; if the provider had admitted it (``held_slot``), a slot is free: the next waiter in
        the admission queue tries again. A refused ticket frees nothing and wakes nobody."""
        self._in_flight[provider_key] -= 1
        if held_slot:
            self.waiting.wake()

    def failed(self, provider_key: bytes) -> None:
        self.standings[provider_key] = after_failure(self.standings.get(provider_key, Standing()), now_ms())

    def succeeded(self, provider_key: bytes, ttft_ms: int, tokens_per_s: int = 0) -> None:
        self.standings[provider_key] = after_success(self.standings.get(provider_key, Standing()), ttft_ms,
                                                     now_ms(), tokens_per_s)

    def suspend(self, provider_key: bytes, at_ms: int) -> None:
        """A check caught ``provider_key`` at ``at_ms``: from now on this gateway issues it no ticket
        (``suspended``), and its tickets still in flight are credited when they settle (``credit_due``). Once the
        database has said "suspended", its saying "approved" again means the operator readmitted it."""
        self._suspended_ms[provider_key] = max(at_ms, self._suspended_ms.get(provider_key, 0))

    def lift(self, provider_key: bytes) -> None:
        """Forget a suspension: the operator readmitted the provider, or writing the suspension failed."""
        self._suspended_ms.pop(provider_key, None)
        self._suspension_written.discard(provider_key)

    def suspended(self, provider_key: bytes) -> bool:
        return provider_key in self._suspended_ms

    def credit_due(self, provider_key: bytes, issued_ms: int) -> bool:
        """Whether a ticket of ``provider_key`` issued at ``issued_ms`` is owed to its customer: it was issued
        before the provider was caught (a readmitted provider's later tickets are not)."""
        suspended_ms = self._suspended_ms.get(provider_key)
        return suspended_ms is not None and issued_ms <= suspended_ms
