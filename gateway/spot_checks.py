"""Spot-checks: catching a provider that signs the pinned model's hash but serves something else (docs/verification.md).

Within a determinism class identical inputs give byte-identical output, so the gateway re-runs a sample of finished
requests on another provider of the same class and compares. The flow of one check:

  (a) ``finished`` (called by the request flow after settlement, so the sample is drawn after the provider served
      it and it could not tell at serving time): the tenant allows re-runs, a draw under ``rate_ppm``, room in the
      bounded queue; never waits, never fails the customer's request (a full queue drops the draw: counted);
  (b) ``run`` (a supervised background loop) takes one drawn request at a time: the original ticket and receipt
      from the books, then a re-run through the ticket runner (gateway/ticket_runner.py, payer ``spot_check``) on
      a different approved provider of the receipt's engine build (EU-only tenants: certified EU providers only),
      with the same model, sampling (seed included), prompt and salt. When every such provider is busy the check
      waits for a slot in the admission queue (a turn like a tenant's), up to ``CHECK_DEADLINE_S``: a provider
      cannot cheat exactly when its class is saturated;
  (c) the results (output hash, token counts, finish reason) agree: a clean check for both providers; they differ: a
      third provider of the class decides (waited for the same way), and the one whose result differs from the two
      others' is the suspect;
  (d) the evidence (the signed tickets and receipts of every run, the prompt, salt and outputs:
      ledger/evidence.py) is stored; a suspect is suspended from placement at once and the customers it served
      since its last clean check are credited (gateway/books/settlement.py ``credit``), those whose tickets were
      still in flight when it settles them. Without a majority (no third provider in time, or three results) the
      evidence is stored undecided and nobody is suspended: the operator reviews it.

Every draw ends in one ``CheckOutcome`` (drawn → clean | caught | undecided | dropped | expired), counted in
``llorch_spot_checks_total{outcome}`` and stored in ``spot_check_draws`` (`llorch gateway providers checks`).
"""

from __future__ import annotations

from llorch.node.models import Catalog

import enum
import json
import logging
import random
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Callable, Protocol

import trio

from llorch.gateway import limits
from llorch.gateway.books.postings import Books
from llorch.gateway.books.settlement import Payer
from llorch.gateway.errors import ReceiptRejected
from llorch.gateway.market.admission import QueueFull, QueueTimeout, WaitingRoom
from llorch.gateway.market.node_client import AttemptFailed
from llorch.gateway.market.index import Ranking
from llorch.gateway.market.placement import ProviderView, Requirements
from llorch.gateway.market.providers import ProviderBook
from llorch.gateway.market.quota import prompt_tokens_upper_bound
from llorch.gateway.market.tenants import Tenant
from llorch.gateway.storage import log_fault
from llorch.gateway.ticket_runner import Keep, Order, StreamBroke, TicketRunner, new_request_id
from llorch.ledger.evidence import Run, evidence_document, odd_one_out, result_of
from llorch.ledger.objects import Receipt, Ticket
from llorch.ledger.signing import peer_id_of, sha256
from llorch.ledger.sqlite import Database
from llorch.node.errors import ProtocolError
from llorch.node.stream_io import now_ms
from llorch.node.wire.attestation import Attestation
from llorch.node.wire.frames import prompt_parts

log = logging.getLogger("llorch.gateway")

PLATFORM_LEG = Payer.SPOT_CHECK.value
CHECKS_QUEUE_NAME = "platform:spot-checks"   # the checks' line in the admission queue (one turn like a tenant's)

SCHEMA = """
CREATE TABLE IF NOT EXISTS spot_checks (
    id            INTEGER PRIMARY KEY,
    provider_key  BLOB NOT NULL,
    request_id    TEXT NOT NULL,          -- the run this row judges (a customer request or a re-run)
    served_ms     INTEGER NOT NULL,       -- when the gateway settled that run (its own clock)
    verdict       TEXT NOT NULL,          -- clean | suspect | undecided
    checked_ms    INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS spot_checks_provider ON spot_checks (provider_key, verdict, served_ms);
CREATE TABLE IF NOT EXISTS evidence (
    id            INTEGER PRIMARY KEY,
    request_id    TEXT NOT NULL,          -- the customer request whose runs disagree
    suspect_key   BLOB,                   -- the odd one out; NULL: undecided
    providers     TEXT NOT NULL,          -- peer ids of every run, in the document's order
    found_ms      INTEGER NOT NULL,
    credited      INTEGER NOT NULL,       -- customer requests credited because of it
    document      TEXT NOT NULL           -- the evidence file (docs/verification.md §5)
);
"""
DRAWS_SCHEMA = """
CREATE TABLE IF NOT EXISTS spot_check_draws (
    id            INTEGER PRIMARY KEY,
    request_id    TEXT NOT NULL,          -- the customer request drawn
    provider_key  BLOB,                   -- the provider that served it (NULL: a draw dropped before it was read)
    outcome       TEXT NOT NULL,          -- clean | caught | undecided | dropped | expired
    reason        TEXT NOT NULL,          -- why, in words (for dropped and expired: what was missing)
    decided_ms    INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS spot_check_draws_decided ON spot_check_draws (decided_ms);
"""


class CheckOutcome(enum.Enum):
    """What became of a draw. ``DRAWN`` counts every draw; each then ends in exactly one of the others."""

    DRAWN = "drawn"
    CLEAN = "clean"              # the re-run agreed
    CAUGHT = "caught"            # a majority of the class contradicts one provider: suspended, evidence stored
    UNDECIDED = "undecided"      # a disagreement without a majority: evidence stored for the operator
    DROPPED = "dropped"          # the queue was full, or no other provider of the class exists to re-run it
    EXPIRED = "expired"          # providers of the class exist, but none took the re-run before the deadline


@dataclass(frozen=True)
class Finished:
    """A customer request the gateway finished and settled with a receipt: what a re-run needs besides the books."""

    request_id: str
    tenant: Tenant
    prompt: dict
    salt: bytes
    output: str                      # the text the customer got
    finish_reason: str = "stop"


@dataclass
class Statistics:
    sampled: int = 0
    dropped: int = 0                 # sampled, but the queue was full or no other provider of the class exists
    clean: int = 0
    mismatched: int = 0
    suspects: int = 0
    undecided: int = 0
    expired: int = 0                 # no provider of the class took a run before the deadline
    failed: int = 0                  # a check that raised (logged; the loop goes on)


@dataclass(frozen=True)
class Verdict:
    """What one check found: the runs in order (the original first), and the odd one out, if any."""

    request_id: str
    runs: tuple[Run, ...]
    receipts: tuple[Receipt, ...]
    suspect: bytes | None = None
    evidence_id: int | None = None
    credited: int = 0
    outcome: CheckOutcome = CheckOutcome.CLEAN

    @property
    def agree(self) -> bool:
        return len({result_of(r) for r in self.receipts}) == 1


class Market(Protocol):
    """What checks need of the market view (gateway/market/view.py)."""

    waiting: WaitingRoom

    @property
    def catalog(self) -> Catalog: ...

    async def provider_views(self) -> list[ProviderView]: ...
    async def rank(self, need: Requirements, count: int) -> Ranking: ...
    def full_with_ours(self, provider: Attestation) -> bool: ...
    async def demand_multiplier(self, model_id: str, pin: bytes) -> int: ...
    def suspend(self, provider_key: bytes, at_ms: int) -> None: ...
    def lift(self, provider_key: bytes) -> None: ...


class NoRun(Exception):
    """No provider ran the request: ``outcome`` is DROPPED (none exists) or EXPIRED (none took it in time)."""

    def __init__(self, outcome: CheckOutcome, reason: str) -> None:
        super().__init__(reason)
        self.outcome = outcome


async def run_on_another(runner: TicketRunner, market: Market, order_of: Callable[[Attestation], Order],
                         need: Requirements, deadline: float) -> tuple[Run, Receipt]:
    """The run, through the ticket runner, on the best provider meeting ``need`` that takes it, waiting for a slot
    (a turn in the admission queue) while every one is busy, until ``deadline`` (trio's clock), which bounds each
    run too. A provider that fails is not tried again. Raises NoRun."""
    failed: set[bytes] = set()
    again = False                  # woken for a slot before: back to the front of the checks' line
    while True:
        candidates = (await market.rank(replace(need, exclude=need.exclude | failed),
                                        limits.SPOT_CHECK_CANDIDATES_MAX)).candidates
        if not candidates:
            raise NoRun(CheckOutcome.DROPPED, f"no other approved provider of {need.engine_build} offers "
                                              f"{need.model_id}" + (f" ({len(failed)} failed)" if failed else ""))
        attempted = False
        for view in candidates:
            left_s = deadline - trio.current_time()
            if left_s <= 0:
                break
            if market.full_with_ours(view.attestation):
                continue
            attempted = True
            try:
                with trio.fail_after(min(left_s, limits.SPOT_CHECK_TIMEOUT_S)):
                    run = await runner.run(order_of(view.attestation), view.attestation, Keep())
                assert run.receipt is not None and run.receipt_bytes is not None
                return Run(run.ticket_bytes, run.receipt_bytes, run.text()), run.receipt
            except AttemptFailed as exc:
                if not exc.busy:
                    failed.add(view.key)
                log.info("platform run on %s: %s", peer_id_of(view.key), exc)
            except (StreamBroke, ProtocolError, ReceiptRejected, trio.TooSlowError) as exc:
                failed.add(view.key)
                log.info("platform run on %s failed: %s", peer_id_of(view.key), exc)
        left_s = deadline - trio.current_time()
        if left_s <= 0:
            raise NoRun(CheckOutcome.EXPIRED, f"every provider of {need.engine_build} was busy until the deadline")
        if again and not attempted:
            market.waiting.wake()    # woken, but every slot is ours again already: the turn goes to the next waiter
        try:
            await market.waiting.wait(CHECKS_QUEUE_NAME, min(left_s, limits.CHECK_RETRY_S_MAX), again)
            again = True
        except QueueTimeout:         # no wake within a retry period: look again (an attestation may show a slot)
            again = False
        except QueueFull:
            await trio.sleep(min(left_s, limits.CHECK_RETRY_S_MAX))
            again = False


@dataclass
class SpotChecker:
    """Samples finished requests and re-runs them in the background. ``rng`` draws the sample (a seeded one in
    tests); ``on_outcome`` counts each draw's outcome (the gateway's metrics)."""

    runner: TicketRunner
    market: Market
    database: Database
    providers: ProviderBook
    books: Books
    rate_ppm: int
    on_outcome: Callable[[CheckOutcome], None] = lambda outcome: None
    rng: random.Random = field(default_factory=random.SystemRandom)
    statistics: Statistics = field(default_factory=Statistics)
    deadline_s: float = limits.CHECK_DEADLINE_S

    def __post_init__(self) -> None:
        self._send, self._receive = trio.open_memory_channel[Finished](limits.SPOT_CHECK_QUEUE_MAX)
        self._pending = 0
        self._idle = trio.Event()
        self._idle.set()
        self._dropped: deque[str] = deque(maxlen=limits.SPOT_CHECK_QUEUE_MAX)   # not yet in spot_check_draws
        self.verdicts: list[Verdict] = []           # the latest checks (bounded), for the operator and tests

    # (a) ----------------------------------------------------------------------------------------------------------
    def finished(self, request: Finished) -> bool:
        """Draw whether ``request`` is re-run; queue it if so. Never blocks: a full queue drops it (counted)."""
        if not request.tenant.spot_checks or request.finish_reason == "cancelled":
            return False
        if self.rng.randrange(1_000_000) >= self.rate_ppm:
            return False
        self.statistics.sampled += 1
        self.on_outcome(CheckOutcome.DRAWN)
        try:
            self._send.send_nowait(request)
        except trio.WouldBlock:
            self.statistics.dropped += 1
            self.on_outcome(CheckOutcome.DROPPED)
            self._dropped.append(request.request_id)
            log.warning("spot-check of %s dropped: %d checks wait already", request.request_id,
                        limits.SPOT_CHECK_QUEUE_MAX)
            return False
        self._pending += 1
        self._idle = trio.Event() if self._idle.is_set() else self._idle
        return True

    async def wait_idle(self) -> None:
        """Until every queued check is done (for tests and orderly shutdown)."""
        await self._idle.wait()

    # (b) ----------------------------------------------------------------------------------------------------------
    async def run(self) -> None:
        """The background loop: one check at a time; a check that fails is logged and counted, never ends it."""
        async for request in self._receive:
            try:
                verdict = None
                with trio.move_on_after(self.deadline_s + limits.SPOT_CHECK_TIMEOUT_S) as bound:   # a bug's bound
                    verdict = await self.check(request)
                if bound.cancelled_caught:
                    self.statistics.expired += 1
                    await self._outcome(request.request_id, None, CheckOutcome.EXPIRED, "the check overran its bound")
                if verdict is not None:
                    self.verdicts = (self.verdicts + [verdict])[-limits.SPOT_CHECK_QUEUE_MAX:]
            except Exception:     # a bug or a database fault in one check: the next one still runs
                self.statistics.failed += 1
                log_fault(log, "spot-check of %s failed", request.request_id)
            finally:
                self._pending -= 1
                if self._pending == 0:
                    self._idle.set()
            await self._record_dropped()

    async def check(self, request: Finished) -> Verdict | None:
        row = await self.database.fetchone("SELECT ticket, receipt FROM receipts WHERE request_id = ?",
                                           (request.request_id,))
        if row is None:                      # settled without a receipt (nothing billed): nothing to check
            await self._outcome(request.request_id, None, CheckOutcome.DROPPED, "no receipt in the books")
            return None
        ticket, receipt = Ticket.from_envelope(row[0]), Receipt.from_envelope(row[1])
        runs, receipts = [Run(row[0], row[1], request.output)], [receipt]
        served_ms = await self._settled_ms(row[0])
        deadline = trio.current_time() + self.deadline_s
        missing: NoRun | None = None
        while len(receipts) < 3:             # (c) a second run; on a mismatch, a third decides
            try:
                run, rerun = await self._rerun(request, ticket, receipt.engine_build,
                                               {r.provider_key for r in receipts}, deadline)
            except NoRun as exc:
                missing = exc
                break
            runs.append(run)
            receipts.append(rerun)
            if len(receipts) == 2 and result_of(receipts[0]) == result_of(receipts[1]):
                break
        verdict = Verdict(request.request_id, tuple(runs), tuple(receipts))
        if len(receipts) == 1:
            assert missing is not None
            if missing.outcome is CheckOutcome.EXPIRED:
                self.statistics.expired += 1
            else:
                self.statistics.dropped += 1
            log.warning("spot-check of %s %s: %s", request.request_id, missing.outcome.value, missing)
            await self._outcome(request.request_id, ticket.provider_key, missing.outcome, str(missing))
            return Verdict(verdict.request_id, verdict.runs, verdict.receipts, outcome=missing.outcome)
        return await self._judge(request, verdict, served_ms, missing)

    async def _rerun(self, request: Finished, original: Ticket, engine_build: str, exclude: set[bytes],
                     deadline: float) -> tuple[Run, Receipt]:
        """The request on a new ticket (the platform pays) to the best other provider of the class that takes it."""
        need = Requirements(original.model_id, original.model_sha256, original.currency,
                            prompt_tokens_estimate=1, max_tokens=original.sampling["max_tokens"],
                            eu_only=request.tenant.eu_only, engine_build=engine_build, exclude=frozenset(exclude))
        prompt_bound = prompt_tokens_upper_bound(len(str(request.prompt).encode()), prompt_parts(request.prompt))
        multiplier_bp = await self.market.demand_multiplier(original.model_id, original.model_sha256)    # as a customer's

        def order_of(provider: Attestation) -> Order:
            return Order(new_request_id(), request.tenant.name, Payer.SPOT_CHECK, original.model_id,
                         original.model_sha256, original.sampling, request.salt, request.prompt, prompt_bound,
                         multiplier_bp)

        return await run_on_another(self.runner, self.market, order_of, need, deadline)

    # (c)-(d) ------------------------------------------------------------------------------------------------------
    async def _judge(self, request: Finished, verdict: Verdict, served_ms: int, missing: NoRun | None) -> Verdict:
        now = now_ms()
        keys = [r.provider_key for r in verdict.receipts]
        served = [served_ms] + [now] * (len(keys) - 1)
        original_key = keys[0]
        if verdict.agree:
            self.statistics.clean += 1
            await self._record([(key, r.request_id, at, "clean", now)
                                for key, r, at in zip(keys, verdict.receipts, served)])
            await self._outcome(request.request_id, original_key, CheckOutcome.CLEAN, "the runs agree")
            return verdict
        self.statistics.mismatched += 1
        odd = odd_one_out([result_of(r) for r in verdict.receipts])
        suspect = keys[odd] if odd is not None else None
        rows = [(key, r.request_id, at, "suspect" if key == suspect else "clean" if suspect else "undecided", now)
                for key, r, at in zip(keys, verdict.receipts, served)]
        statements = [("INSERT INTO spot_checks (provider_key, request_id, served_ms, verdict, checked_ms) "
                       "VALUES (?, ?, ?, ?, ?)", rows)]
        outcome = CheckOutcome.CAUGHT if suspect else CheckOutcome.UNDECIDED
        reason = (f"{peer_id_of(suspect)} contradicted by {len(keys) - 1} providers" if suspect else
                  f"no majority among {len(keys)} runs" + (f" ({missing})" if missing else ""))
        statements += self.outcome_statements(request.request_id, original_key, outcome, reason, now)
        evidence_id, credited = await self.store_evidence(request.request_id, request.prompt, request.salt,
                                                          list(verdict.runs), keys, suspect, now, statements)
        if suspect is None:
            self.statistics.undecided += 1
        else:
            self.statistics.suspects += 1
        self.on_outcome(outcome)
        return Verdict(verdict.request_id, verdict.runs, verdict.receipts, suspect, evidence_id, credited, outcome)

    async def store_evidence(self, request_id: str, prompt: dict, salt: bytes, runs: list[Run], keys: list[bytes],
                             suspect: bytes | None, now: int, statements: list) -> tuple[int, int]:
        """(d) for a spot-check or a probe (gateway/probes.py): in one transaction with ``statements``, the
        evidence document and, with a suspect, the credits to the customers it served since its last clean
        spot-check; then the suspension. Returns (evidence id, customer requests credited)."""
        with trio.CancelScope(shield=True):     # a suspension is written whole (evidence, credits, status) or not
            return await self._store_evidence(request_id, prompt, salt, runs, keys, suspect, now, statements)

    async def _store_evidence(self, request_id: str, prompt: dict, salt: bytes, runs: list[Run], keys: list[bytes],
                              suspect: bytes | None, now: int, statements: list) -> tuple[int, int]:
        document = evidence_document(prompt, salt, runs, suspect, now)
        statements = list(statements)
        credited = 0
        if suspect is not None:
            # This gateway stops issuing it tickets first, so its tickets still in flight are credited as they
            # settle (gateway/ticket_runner.py), and every request it settled before is in the books read below.
            self.market.suspend(suspect, now_ms())
            try:
                owed = await self.books.credits_since(peer_id_of(suspect), await self.last_clean_ms(suspect))
            except BaseException:
                self.market.lift(suspect)
                raise
            credited = len(owed)
            statements += Books.credit_statements(owed, now)
        statements.append((
            "INSERT INTO evidence (request_id, suspect_key, providers, found_ms, credited, document) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            [(request_id, suspect, ",".join(peer_id_of(k) for k in keys), now, credited, json.dumps(document))]))
        if suspect is None:
            await self.database.transaction(statements)
        else:
            try:                   # the evidence, the credits and the suspension in one transaction
                await self.providers.set_status(peer_id_of(suspect), "suspended", statements)
            except BaseException:
                self.market.lift(suspect)
                raise
        row = await self.database.fetchone("SELECT MAX(id) FROM evidence")
        assert row is not None and row[0] is not None          # the row this transaction wrote
        evidence_id: int = row[0]
        if suspect is None:
            log.warning("check of %s: the runs of %s disagree with no majority; evidence %d is undecided",
                        request_id, ", ".join(peer_id_of(k) for k in keys), evidence_id)
        else:
            log.warning("check of %s: provider %s signed a result the other %d providers of its class "
                        "contradict; suspended, %d customer requests credited (evidence %d)", request_id,
                        peer_id_of(suspect), len(keys) - 1, credited, evidence_id)
        return evidence_id, credited

    async def last_clean_ms(self, provider_key: bytes) -> int:
        """When (the gateway's clock) the latest run of ``provider_key`` that a check found clean was served; 0 if
        none: the customers it served after that are the ones credited when it is caught."""
        row = await self.database.fetchone(
            "SELECT MAX(served_ms) FROM spot_checks WHERE provider_key = ? AND verdict = 'clean'", (provider_key,))
        return row[0] or 0 if row is not None else 0

    @staticmethod
    def outcome_statements(request_id: str, provider_key: bytes | None, outcome: CheckOutcome, reason: str,
                           now: int) -> list:
        return [("INSERT INTO spot_check_draws (request_id, provider_key, outcome, reason, decided_ms) "
                 "VALUES (?, ?, ?, ?, ?)", [(request_id, provider_key, outcome.value, reason, now)])]

    async def _outcome(self, request_id: str, provider_key: bytes | None, outcome: CheckOutcome,
                       reason: str) -> None:
        self.on_outcome(outcome)
        await self.database.transaction(self.outcome_statements(request_id, provider_key, outcome, reason, now_ms()))

    async def _record_dropped(self) -> None:
        """Store the draws ``finished`` dropped (a full queue) since the last check."""
        while self._dropped:
            request_id = self._dropped.popleft()
            await self.database.transaction(self.outcome_statements(
                request_id, None, CheckOutcome.DROPPED, f"{limits.SPOT_CHECK_QUEUE_MAX} checks waited already",
                now_ms()))

    async def _record(self, rows: list[tuple]) -> None:
        await self.database.transaction([(
            "INSERT INTO spot_checks (provider_key, request_id, served_ms, verdict, checked_ms) "
            "VALUES (?, ?, ?, ?, ?)", rows)])

    async def _settled_ms(self, ticket_bytes: bytes) -> int:
        row = await self.database.fetchone("SELECT settled_ms FROM tickets WHERE ticket_sha256 = ?",
                                           (sha256(ticket_bytes),))
        return row[0] if row and row[0] is not None else now_ms()


async def check_outcomes(database: Database, since_ms: int = 0) -> dict:
    """What became of the draws decided since ``since_ms`` (`llorch gateway providers checks`): counts by outcome,
    and the latest draws that did not end clean, with their reason."""
    counts = dict(await database.fetchall(
        "SELECT outcome, COUNT(*) FROM spot_check_draws WHERE decided_ms >= ? GROUP BY outcome", (since_ms,)))
    rows = await database.fetchall(
        "SELECT request_id, provider_key, outcome, reason, decided_ms FROM spot_check_draws "
        "WHERE decided_ms >= ? AND outcome != 'clean' ORDER BY id DESC LIMIT 50", (since_ms,))
    return {"outcomes": {o.value: counts.get(o.value, 0) for o in CheckOutcome if o is not CheckOutcome.DRAWN},
            "drawn": sum(counts.values()),
            "not_clean": [{"request_id": r[0], "provider": peer_id_of(r[1]) if r[1] else None, "outcome": r[2],
                           "reason": r[3], "decided_ms": r[4]} for r in rows]}


async def evidence_list(database) -> list[dict]:
    """Every stored evidence, oldest first, for the operator (`llorch gateway providers evidence`)."""
    rows = await database.fetchall("SELECT id, request_id, suspect_key, providers, found_ms, credited FROM evidence "
                                   "ORDER BY id")
    return [{"id": row[0], "request_id": row[1], "suspect": peer_id_of(row[2]) if row[2] else None,
             "verdict": "suspect" if row[2] else "undecided", "providers": row[3].split(","), "found_ms": row[4],
             "credited_requests": row[5]} for row in rows]


async def evidence_document_of(database, evidence_id: int) -> str | None:
    row = await database.fetchone("SELECT document FROM evidence WHERE id = ?", (evidence_id,))
    return None if row is None else row[0]
