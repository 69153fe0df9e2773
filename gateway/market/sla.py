"""A provider's SLA from the gateway's own evidence, per calendar month (UTC), against the SLA it registered
(docs/verification.md §7). Nothing a provider says about itself counts: every figure is the gateway's clock.

  uptime_ppm        the share of the month's 5-minute buckets (from the first one the gateway saw it in, until now
                    or the month's end) in which an attestation of the provider reached the gateway, times the share
                    of the month's probes to it that it answered (1 when none was sent);
  ttft_ms_p50/p95   first tokens frame − accepted frame, over its finished tickets of the month (customers', re-runs'
                    and probes' alike);
  tokens_per_s_p50  tokens after the first per second from the first to the end, over those tickets;
  met               True / False against the registration's ``sla`` (uptime_ppm, and ttft_ms against the p95), None
                    while there are too few observations to say (SLA_BUCKETS_MIN buckets, SLA_REQUESTS_MIN tickets).

``figures`` is the pure core; ``sla_report`` reads the books; ``AttestationClock`` records the buckets.
"""

from __future__ import annotations

import calendar
import re
from dataclasses import dataclass

from llorch.gateway.books.postings import period_of
from llorch.gateway.market.providers import ProviderError
from llorch.ledger.signing import public_key_of_peer_id
from llorch.node.wire.registration import Registration

SLA_BUCKET_MS = 300_000              # uptime is counted in buckets of this length
SLA_BUCKETS_MIN = 12                 # an hour of buckets before uptime is judged
SLA_REQUESTS_MIN = 20                # finished tickets before TTFT is judged
SLA_TICKETS_READ_MAX = 100_000       # finished tickets read per provider and month (the latest)

SCHEMA = """
CREATE TABLE IF NOT EXISTS attested_buckets (
    provider_key  BLOB NOT NULL,
    bucket        INTEGER NOT NULL,       -- the gateway's clock // SLA_BUCKET_MS when an attestation arrived
    PRIMARY KEY (provider_key, bucket)
) WITHOUT ROWID;
"""
MONTH = re.compile(r"^(\d{4})-(0[1-9]|1[0-2])$")


def month_bounds_ms(month: str) -> tuple[int, int]:
    """[start, end) of a "YYYY-MM" month in ms (UTC); ProviderError for anything else."""
    found = MONTH.match(month)
    if found is None or int(found[1]) < 1970:
        raise ProviderError(f"--month must be YYYY-MM (1970 or later), e.g. 2026-11; got {month[:40]!r}")
    year, number = int(found[1]), int(found[2])
    start = calendar.timegm((year, number, 1, 0, 0, 0)) * 1000
    end = calendar.timegm((year + number // 12, number % 12 + 1, 1, 0, 0, 0)) * 1000
    return start, end


def percentile(values: list[int], ppm: int) -> int | None:
    """The nearest-rank percentile (ppm of 10^6) of integers; None for none."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * ppm // 1_000_000))
    return ordered[rank - 1]


@dataclass(frozen=True)
class Timing:
    """One finished ticket as the gateway's clock saw it."""

    accepted_ms: int
    first_token_ms: int
    ended_ms: int
    frames: int


@dataclass(frozen=True)
class SlaFigures:
    provider_id: str
    month: str
    buckets_attested: int
    buckets_total: int
    probes_sent: int
    probes_answered: int
    requests: int
    uptime_ppm: int | None
    ttft_ms_p50: int | None
    ttft_ms_p95: int | None
    tokens_per_s_p50: int | None
    registered_uptime_ppm: int
    registered_ttft_ms: int
    met: bool | None

    def to_json(self) -> dict:
        return dict(self.__dict__)


def figures(provider_id: str, month: str, registered: dict, buckets_attested: int, buckets_total: int,
            probes_sent: int, probes_answered: int, timings: list[Timing]) -> SlaFigures:
    """The month's figures of one provider from the gateway's observations (pure)."""
    assert 0 <= buckets_attested <= buckets_total and 0 <= probes_answered <= probes_sent
    uptime_ppm = None
    if buckets_total:
        uptime_ppm = buckets_attested * 1_000_000 // buckets_total
        if probes_sent:
            uptime_ppm = uptime_ppm * probes_answered // probes_sent
    ttfts = [t.first_token_ms - t.accepted_ms for t in timings]
    rates = [(t.frames - 1) * 1000 // (t.ended_ms - t.first_token_ms) for t in timings
             if t.frames >= 2 and t.ended_ms > t.first_token_ms]
    ttft_p95 = percentile(ttfts, 950_000)
    verdicts = []
    if buckets_total >= SLA_BUCKETS_MIN:
        verdicts.append(uptime_ppm >= registered["uptime_ppm"])
    if len(timings) >= SLA_REQUESTS_MIN:
        verdicts.append(ttft_p95 <= registered["ttft_ms"])
    return SlaFigures(provider_id, month, buckets_attested, buckets_total, probes_sent, probes_answered,
                      len(timings), uptime_ppm, percentile(ttfts, 500_000), ttft_p95, percentile(rates, 500_000),
                      registered["uptime_ppm"], registered["ttft_ms"], all(verdicts) if verdicts else None)


async def sla_report(database, month: str, now_ms: int, probe_tenant: str) -> list[SlaFigures]:
    """Every registered provider's figures for ``month`` ("YYYY-MM"), by peer id."""
    start, end = month_bounds_ms(month)
    report = []
    for provider_id, key, envelope in await database.fetchall(
            "SELECT provider_id, provider_key, registration FROM providers ORDER BY provider_id"):
        first = (await database.fetchone("SELECT MIN(bucket) FROM attested_buckets WHERE provider_key = ?",
                                         (key,)))[0]
        total = 0
        if first is not None:
            since, until = max(start // SLA_BUCKET_MS, first), (min(end, now_ms + 1) - 1) // SLA_BUCKET_MS
            total = max(0, until - since + 1)
        attested = (await database.fetchone(
            "SELECT COUNT(*) FROM attested_buckets WHERE provider_key = ? AND bucket >= ? AND bucket < ?",
            (key, start // SLA_BUCKET_MS, -(-end // SLA_BUCKET_MS))))[0]
        sent, answered = await database.fetchone(
            "SELECT COUNT(*), COALESCE(SUM(CASE WHEN outcome = 'finished' THEN 1 ELSE 0 END), 0) FROM tickets WHERE provider_key = ? "
            "AND tenant = ? AND issued_ms >= ? AND issued_ms < ? AND state = 'settled'",
            (key, probe_tenant, start, end))
        rows = await database.fetchall(
            "SELECT accepted_ms, first_token_ms, ended_ms, frames FROM tickets WHERE provider_key = ? "
            "AND issued_ms >= ? AND issued_ms < ? AND outcome = 'finished' AND first_token_ms IS NOT NULL "
            "AND accepted_ms IS NOT NULL ORDER BY issued_ms DESC LIMIT ?", (key, start, end, SLA_TICKETS_READ_MAX))
        registered = Registration.from_envelope(envelope).sla
        report.append(figures(provider_id, month, registered, min(attested, total), total, sent, answered,
                              [Timing(*row) for row in rows]))
    return report


class AttestationClock:
    """Records, per provider, the buckets in which one of its attestations reached the gateway: at most one write
    per provider and bucket (the last bucket written is remembered)."""

    def __init__(self, database) -> None:
        self._database = database
        self._last: dict[bytes, int] = {}

    async def observe(self, provider_key: bytes, now_ms: int) -> None:
        bucket = now_ms // SLA_BUCKET_MS
        if self._last.get(provider_key) == bucket:
            return
        await self._database.transaction([(
            "INSERT INTO attested_buckets (provider_key, bucket) VALUES (?, ?) ON CONFLICT DO NOTHING", [(provider_key, bucket)])])
        self._last[provider_key] = bucket


async def missed_sla(database, now_ms: int, probe_tenant: str) -> frozenset[bytes]:
    """The providers whose figures of the current month miss their registered SLA (placement ranks them last)."""
    report = await sla_report(database, period_of(now_ms), now_ms, probe_tenant)
    return frozenset(public_key_of_peer_id(f.provider_id) for f in report if f.met is False)

