"""Spot-checks: catching a provider that signs the pinned model's hash but serves something else (docs/verification.md).

Within a determinism class identical inputs give byte-identical output, so the gateway re-runs a sample of finished
requests on another provider of the same class and compares. The flow of one check:

  (a) ``finished`` (called by the request flow after settlement, so the sample is drawn after the provider served
      it and it could not tell at serving time): the tenant allows re-runs, a draw under ``rate_ppm``, room in the
      bounded queue; never waits, never fails the customer's request;
  (b) ``run`` (a supervised background loop) takes one sampled request at a time: the original ticket and receipt
      from the books, then a re-run on a different approved provider of the receipt's engine build (EU-only tenants:
      certified EU providers only), with the same model, sampling (seed included), prompt and salt, on a new ticket
      the platform pays for (leg "spot_check");
  (c) the results (output hash, token counts, finish reason) agree: a clean check for both providers; they differ: a
      third provider of the class decides, and the one whose result differs from the two others' is the suspect;
  (d) the evidence (the signed tickets and receipts of every run, the prompt, salt and outputs:
      ledger/evidence.py) is stored; a suspect is suspended from placement at once and the customers it served
      since its last clean check are credited (payout and fee reversed). Without a majority (no third provider, or
      three results) the evidence is stored undecided and nobody is suspended: the operator reviews it.
"""

from __future__ import annotations

import json
import logging
import random
import secrets
from dataclasses import dataclass, field

import trio

from llorch.gateway import limits
from llorch.gateway.books.postings import Books
from llorch.gateway.books.pricing import ticket_price
from llorch.gateway.books.receipts import check_receipt
from llorch.gateway.books.settlement import ENDED, Meter, Metered, Terms, settle
from llorch.gateway.books.tickets import TicketBook
from llorch.gateway.errors import ReceiptRejected
from llorch.gateway.market.node_client import AttemptFailed, request_inference
from llorch.gateway.market.placement import Requirements, rank_providers
from llorch.gateway.market.quota import prompt_tokens_upper_bound
from llorch.gateway.market.tenants import Tenant
from llorch.ledger.errors import LedgerError
from llorch.ledger.evidence import Run, evidence_document, odd_one_out, result_of
from llorch.ledger.objects import VERSION, Receipt, Ticket
from llorch.ledger.signing import peer_id_of, sha256
from llorch.node.errors import ProtocolError
from llorch.node.stream_io import now_ms
from llorch.node.wire.attestation import Attestation
from llorch.node.wire.frames import Final, Request, prompt_parts

log = logging.getLogger("llorch.gateway")

PLATFORM_LEG = "spot_check"

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


@dataclass(frozen=True)
class Finished:
    """A customer request the gateway finished and settled with a receipt: what a re-run needs besides the books."""

    request_id: str
    tenant: Tenant
    prompt: dict
    salt: bytes
    output: str                      # the text the customer got


@dataclass
class Statistics:
    sampled: int = 0
    dropped: int = 0                 # sampled, but the queue was full
    clean: int = 0
    mismatched: int = 0
    suspects: int = 0
    undecided: int = 0
    no_checker: int = 0              # no other provider of the class could re-run it
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

    @property
    def agree(self) -> bool:
        return len({result_of(r) for r in self.receipts}) == 1


@dataclass
class SpotChecker:
    """Samples finished requests and re-runs them in the background. ``gateway`` is the request flow's Gateway
    (its host, key, books, provider views and pseudonyms); ``rng`` draws the sample (a seeded one in tests)."""

    gateway: object
    rate_ppm: int
    rng: random.Random = field(default_factory=random.SystemRandom)
    statistics: Statistics = field(default_factory=Statistics)

    def __post_init__(self) -> None:
        self._send, self._receive = trio.open_memory_channel[Finished](limits.SPOT_CHECK_QUEUE_MAX)
        self._pending = 0
        self._idle = trio.Event()
        self._idle.set()
        self.verdicts: list[Verdict] = []           # the latest checks (bounded), for the operator and tests

    # (a) ----------------------------------------------------------------------------------------------------------
    def finished(self, request: Finished) -> bool:
        """Draw whether ``request`` is re-run; queue it if so. Never blocks: a full queue drops it (counted)."""
        if not request.tenant.spot_checks or self.rng.randrange(1_000_000) >= self.rate_ppm:
            return False
        self.statistics.sampled += 1
        try:
            self._send.send_nowait(request)
        except trio.WouldBlock:
            self.statistics.dropped += 1
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
                with trio.move_on_after(3 * limits.SPOT_CHECK_TIMEOUT_S):
                    verdict = await self.check(request)
                    if verdict is not None:
                        self.verdicts = (self.verdicts + [verdict])[-limits.SPOT_CHECK_QUEUE_MAX:]
            except Exception as exc:     # a bug or a database fault in one check: the next one still runs
                self.statistics.failed += 1
                log.exception("spot-check of %s failed: %s", request.request_id, exc)
            finally:
                self._pending -= 1
                if self._pending == 0:
                    self._idle.set()

    async def check(self, request: Finished) -> Verdict | None:
        row = await self.gateway.database.fetchone("SELECT ticket, receipt FROM receipts WHERE request_id = ?",
                                                   (request.request_id,))
        if row is None:                      # settled without a receipt (nothing billed): nothing to check
            return None
        ticket, receipt = Ticket.from_envelope(row[0]), Receipt.from_envelope(row[1])
        if receipt.finish_reason == "cancelled":
            return None
        runs, receipts = [Run(row[0], row[1], request.output)], [receipt]
        served_ms = await self._settled_ms(row[0])
        for _ in range(2):                   # (c) a second run; on a mismatch, a third decides
            rerun = await self._rerun(request, ticket, receipt.engine_build, {r.provider_key for r in receipts})
            if rerun is None:
                break
            runs.append(rerun[0])
            receipts.append(rerun[1])
            if len(receipts) == 2 and result_of(receipts[0]) == result_of(receipts[1]):
                break
        verdict = Verdict(request.request_id, tuple(runs), tuple(receipts))
        if len(receipts) == 1:
            self.statistics.no_checker += 1
            log.info("spot-check of %s: no other provider of %s could re-run it", request.request_id,
                     receipt.engine_build)
            return verdict
        return await self._judge(request, verdict, served_ms)

    async def _rerun(self, request: Finished, original: Ticket, engine_build: str,
                     exclude: set[bytes]) -> tuple[Run, Receipt] | None:
        """The request on a new ticket to the best other provider of the class that takes it, or None."""
        need = Requirements(original.model_id, original.model_sha256, original.currency,
                            prompt_tokens_estimate=1, max_tokens=original.sampling["max_tokens"],
                            eu_only=request.tenant.eu_only, engine_build=engine_build, exclude=frozenset(exclude))
        candidates = rank_providers(await self.gateway.provider_views(), need, now_ms())
        for view in candidates[:limits.SPOT_CHECK_CANDIDATES_MAX]:
            try:
                with trio.fail_after(limits.SPOT_CHECK_TIMEOUT_S):
                    return await self._run_on(request, original, view.attestation)
            except (AttemptFailed, ProtocolError, ReceiptRejected, trio.TooSlowError) as exc:
                log.info("spot-check re-run of %s on %s failed: %s", request.request_id,
                         peer_id_of(view.key), exc)
        return None

    async def _run_on(self, request: Finished, original: Ticket, provider: Attestation) -> tuple[Run, Receipt]:
        """One re-run of the customer's request on ``provider``, as a platform cost."""
        run, receipt, _ = await run_for_platform(self.gateway, request.tenant.name, original.model_id,
                                                 original.model_sha256, original.sampling, request.prompt,
                                                 request.salt, provider, PLATFORM_LEG)
        return run, receipt

    # (c)-(d) ------------------------------------------------------------------------------------------------------
    async def _judge(self, request: Finished, verdict: Verdict, served_ms: int) -> Verdict:
        now = now_ms()
        keys = [r.provider_key for r in verdict.receipts]
        served = [served_ms] + [now] * (len(keys) - 1)
        if verdict.agree:
            self.statistics.clean += 1
            await self._record([(key, r.request_id, at, "clean", now)
                                for key, r, at in zip(keys, verdict.receipts, served)])
            return verdict
        self.statistics.mismatched += 1
        odd = odd_one_out([result_of(r) for r in verdict.receipts])
        suspect = keys[odd] if odd is not None else None
        rows = [(key, r.request_id, at, "suspect" if key == suspect else "clean" if suspect else "undecided", now)
                for key, r, at in zip(keys, verdict.receipts, served)]
        statements = [("INSERT INTO spot_checks (provider_key, request_id, served_ms, verdict, checked_ms) "
                       "VALUES (?, ?, ?, ?, ?)", rows)]
        evidence_id, credited = await self.store_evidence(request.request_id, request.prompt, request.salt,
                                                          list(verdict.runs), keys, suspect, now, statements)
        if suspect is None:
            self.statistics.undecided += 1
        else:
            self.statistics.suspects += 1
        return Verdict(verdict.request_id, verdict.runs, verdict.receipts, suspect, evidence_id, credited)

    async def store_evidence(self, request_id: str, prompt: dict, salt: bytes, runs: list[Run], keys: list[bytes],
                             suspect: bytes | None, now: int, statements: list) -> tuple[int, int]:
        """(d) for a spot-check or a probe (gateway/market/probes.py): in one transaction with ``statements``, the
        evidence document and, with a suspect, the credits to the customers it served since its last clean
        spot-check; then the suspension. Returns (evidence id, customer requests credited)."""
        document = evidence_document(prompt, salt, runs, suspect, now)
        statements = list(statements)
        credited = 0
        if suspect is not None:
            since = await self.last_clean_ms(suspect)
            credited = await self._count_credits(peer_id_of(suspect), since)
            statements += Books.credit_statements(peer_id_of(suspect), since, now)
        statements.append((
            "INSERT INTO evidence (request_id, suspect_key, providers, found_ms, credited, document) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            [(request_id, suspect, ",".join(peer_id_of(k) for k in keys), now, credited, json.dumps(document))]))
        await self.gateway.database.transaction(statements)
        evidence_id = (await self.gateway.database.fetchone("SELECT MAX(id) FROM evidence"))[0]
        if suspect is None:
            log.warning("check of %s: the runs of %s disagree with no majority; evidence %d is undecided",
                        request_id, ", ".join(peer_id_of(k) for k in keys), evidence_id)
        else:
            await self.gateway.providers.set_status(peer_id_of(suspect), "suspended")
            log.warning("check of %s: provider %s signed a result the other %d providers of its class "
                        "contradict; suspended, %d customer requests credited (evidence %d)", request_id,
                        peer_id_of(suspect), len(keys) - 1, credited, evidence_id)
        return evidence_id, credited

    async def last_clean_ms(self, provider_key: bytes) -> int:
        """When (the gateway's clock) the latest run of ``provider_key`` that a check found clean was served; 0 if
        none: the customers it served after that are the ones credited when it is caught."""
        row = await self.gateway.database.fetchone(
            "SELECT MAX(served_ms) FROM spot_checks WHERE provider_key = ? AND verdict = 'clean'", (provider_key,))
        return row[0] or 0

    async def _count_credits(self, provider_id: str, since_ms: int) -> int:
        row = await self.gateway.database.fetchone(
            "SELECT COUNT(DISTINCT request_id) FROM postings WHERE provider_id = ? AND posted_ms > ? "
            "AND leg = 'payout' AND debit LIKE 'tenant:%' AND amount > 0 AND request_id NOT IN (SELECT request_id "
            "FROM postings WHERE leg = 'correction:spot-check-payout')", (provider_id, since_ms))
        return row[0]

    async def _record(self, rows: list[tuple]) -> None:
        await self.gateway.database.transaction([(
            "INSERT INTO spot_checks (provider_key, request_id, served_ms, verdict, checked_ms) "
            "VALUES (?, ?, ?, ?, ?)", rows)])

    async def _settled_ms(self, ticket_bytes: bytes) -> int:
        row = await self.gateway.database.fetchone("SELECT settled_ms FROM tickets WHERE ticket_sha256 = ?",
                                                   (sha256(ticket_bytes),))
        return row[0] if row and row[0] is not None else now_ms()


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


async def run_for_platform(gateway, tenant_name: str, model_id: str, model_sha256: bytes, sampling: dict,
                           prompt: dict, salt: bytes, provider: Attestation, leg: str) -> tuple[Run, Receipt, Metered]:
    """One request the platform pays for (a spot-check re-run, a probe): a ticket like any customer's (new request
    id, ``tenant_name``'s pseudonym at this provider, the given model and sampling, this provider's price under the
    current demand multiplier), written before it is sent and settled once with the platform's leg ``leg``.
    Returns the run, the checked receipt and what the gateway's clock measured. Raises AttemptFailed, ProtocolError,
    ReceiptRejected like a customer's attempt."""
    multiplier_bp = gateway.demand_multiplier(model_id, model_sha256)      # as a customer's
    issued = now_ms()
    ticket = Ticket(v=VERSION, request_id="chatcmpl-" + secrets.token_hex(12), gateway_key=gateway.key.public_key,
                    provider_key=provider.provider_key,
                    tenant=gateway.tenant_pseudonym(tenant_name, provider.provider_key),
                    model_id=model_id, model_sha256=model_sha256, sampling=sampling,
                    price_in=ticket_price(provider.price_in, multiplier_bp),
                    price_out=ticket_price(provider.price_out, multiplier_bp),
                    currency=provider.currency, issued_ms=issued, expires_ms=issued + limits.TICKET_LIFETIME_MS)
    ticket_bytes = ticket.seal(gateway.key)
    prompt_bound = prompt_tokens_upper_bound(len(str(prompt).encode()), prompt_parts(prompt))
    terms = Terms(tenant_name, 0, 0, 0, 0, prompt_bound)          # no tenant pays for it
    tickets = TicketBook(gateway.database)
    await tickets.issue(ticket, ticket_bytes, terms)
    meter, pieces, receipt, receipt_bytes = Meter(issued), [], None, None
    try:
        async with request_inference(gateway.p2p, provider, Request(ticket_bytes, salt, prompt),
                                     gateway.streams) as call:
            meter.handle("accepted", now_ms())
            while True:
                frame = await call.next_frame()
                if isinstance(frame, Final):
                    receipt = check_receipt(frame.receipt, ticket, ticket_bytes, salt, prompt, "".join(pieces))
                    receipt_bytes = frame.receipt
                    meter.handle("final", now_ms())
                    break
                if meter.frames >= min(limits.RELAY_FRAMES_MAX, ticket.sampling["max_tokens"]):
                    raise ProtocolError(f"the provider sent more than {meter.frames} token frames")
                meter.handle("token", now_ms(), frame.text)
                pieces.append(frame.text)
    except AttemptFailed:
        meter.handle("refused", now_ms())
        raise
    except (ProtocolError, ReceiptRejected):
        meter.handle("provider_failed", now_ms())
        raise
    finally:
        with trio.CancelScope(shield=True):
            if meter.state not in ENDED:
                meter.handle("customer_gone", now_ms())
            settlement = settle(ticket, terms, receipt, meter.metered())
            try:
                await tickets.settle(ticket, ticket_bytes, meter.metered(), settlement, receipt, receipt_bytes,
                                     tenant_name, now_ms(), leg)
            except LedgerError as exc:   # stays open: `llorch billing reconcile --post` settles it
                log.error("could not settle the platform's ticket %s: %s", ticket.request_id, exc)
    return Run(ticket_bytes, receipt_bytes, "".join(pieces)), receipt, meter.metered()
