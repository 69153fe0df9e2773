"""The gateway's view of the market: the latest valid attestation of every provider, fed by gossip.

Attestations arrive on ``llorch/attestations/1``; ``observe`` keeps one per provider and enforces that seq strictly
increases (a replayed or reordered attestation is dropped with a logged reason). ``departed`` takes a provider out
of placement before its attestation expires: the gateway's last libp2p connection to it closed (gateway/run.py
``Departures``); its next attestation brings it back.
"""

from __future__ import annotations

import logging
from typing import Callable

from llorch.node.wire.attestation import Attestation
from llorch.node.errors import AttestationRejected
from llorch.gateway import limits

log = logging.getLogger("llorch.gateway")


class ProviderDirectory:
    """The latest attestation per provider, in two rooms: approved providers (never pushed out by anyone) and a small
    pending pool for every other key (bounded; when full, the oldest pending entry makes room). Only the approved
    room is placed on or witnessed, so a flood of attestations from fresh keys can neither evict an honest provider
    nor make the gateway dial an address it was only told about."""

    def __init__(self) -> None:
        self._latest: dict[bytes, Attestation] = {}
        self._pending: dict[bytes, Attestation] = {}
        self._excluded: set[bytes] = set()       # providers caught forking their ledger: never placed on
        self._departed: set[bytes] = set()       # kept attestations whose provider's connection closed since
        self.changed: Callable[[bytes], None] = lambda provider_key: None   # told each key whose entry changed

    @property
    def excluded(self) -> frozenset[bytes]:
        return frozenset(self._excluded)

    @excluded.setter
    def excluded(self, keys: set[bytes] | frozenset[bytes]) -> None:
        changed = self._excluded ^ set(keys)
        self._excluded = set(keys)
        for key in changed:
            self.changed(key)

    def exclude(self, provider_key: bytes) -> None:
        self.excluded = self._excluded | {provider_key}

    def check_newer(self, attestation: Attestation) -> None:
        """Raise AttestationRejected ("replay") unless ``attestation`` is newer than the one kept for its key."""
        known = self.get(attestation.provider_key)
        if known is not None and attestation.seq <= known.seq:
            raise AttestationRejected(f"seq {attestation.seq} is not above the last seen seq {known.seq} (replay?)",
                                      "replay")

    def observe(self, attestation: Attestation, approved: bool = True) -> None:
        """Keep ``attestation`` if it is newer than what we have; raise AttestationRejected otherwise."""
        self.check_newer(attestation)
        key = attestation.provider_key
        known = self.get(key)
        self._departed.discard(key)
        if approved:
            self._pending.pop(key, None)
            self._keep_approved(attestation, known is None)
            return
        if self._latest.pop(key, None) is not None:   # suspended or never approved: back to the pending pool
            self.changed(key)
        self._pending.pop(key, None)
        if len(self._pending) >= limits.PENDING_ATTESTATIONS_MAX:
            del self._pending[next(iter(self._pending))]          # the oldest pending entry
        self._pending[key] = attestation

    def approved(self, provider_key: bytes) -> None:
        """The operator approved (or readmitted) ``provider_key``: its attestation waiting in the pending pool counts
        from now, without waiting for its next one (a heartbeat may be 30 s away)."""
        attestation = self._pending.pop(provider_key, None)
        if attestation is not None:
            self._keep_approved(attestation, provider_key not in self._latest)

    def _keep_approved(self, attestation: Attestation, new: bool) -> None:
        if new and len(self._latest) >= limits.ATTESTATIONS_KEPT_MAX:
            self._forget_expired_or_oldest()
        self._latest[attestation.provider_key] = attestation
        self.changed(attestation.provider_key)

    def departed(self, provider_key: bytes) -> None:
        """The gateway's last connection to ``provider_key`` closed: its kept attestation no longer counts (the
        provider is not placed on, witnessed or counted ready) until a newer one arrives."""
        if provider_key in self._latest and provider_key not in self._departed:
            self._departed.add(provider_key)
            self.changed(provider_key)

    def fresh(self, now_ms: int) -> list[Attestation]:
        """Unexpired attestations of approved providers that are neither excluded nor departed."""
        return [a for a in self._latest.values() if a.expires_ms > now_ms and a.provider_key not in self._excluded
                and a.provider_key not in self._departed]

    def placeable(self, provider_key: bytes) -> Attestation | None:
        """The kept attestation of an approved provider that is neither excluded nor departed (expired or not)."""
        if provider_key in self._excluded or provider_key in self._departed:
            return None
        return self._latest.get(provider_key)

    def get(self, provider_key: bytes) -> Attestation | None:
        return self._latest.get(provider_key) or self._pending.get(provider_key)

    def pending(self) -> int:
        return len(self._pending)

    def _forget_expired_or_oldest(self) -> None:
        oldest = min(self._latest.values(), key=lambda a: a.expires_ms)
        del self._latest[oldest.provider_key]
        self._departed.discard(oldest.provider_key)
        self.changed(oldest.provider_key)
