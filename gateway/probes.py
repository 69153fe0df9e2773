"""Unmarked probes: known-answer requests the gateway sends that look exactly like customer traffic
(docs/verification.md §6).

A spot-check re-runs real requests, so it needs a consenting tenant's traffic; a probe needs none. The flow of one:

  (a) a provider is drawn at random among the fresh approved ones, at random intervals (exponential, mean
      ``gateway.probe_interval_ms``), by one supervised loop;
  (b) the probe's input: one of the class's probe inputs that this provider has never run and that no dispute
      retired (a run found suspect or undecided: its runs are evidence already), the one with the most runs first
      (so answers get established); if none, a new one: a prompt from a realistic pool, the usual
      sampling and sizes, a fresh seed and salt, parsed by the same code as a customer's request (the API's parser,
      handed in by the wiring as ``parse``) so it is as any customer's;
  (c) the provider runs it through the ticket runner (gateway/ticket_runner.py) on a ticket like a customer's (a
      fresh request id, the pseudonym of the platform's probe tenant at that provider, its price under the current
      demand multiplier), paid by the platform (payer and leg "probe"); the second and third runs wait for a slot of
      the class like a spot-check's re-run;
  (d) the answer is known when two providers of the class agree on it (the first run of a new input is followed by
      a run on a second provider; a disagreement by a third); the run that differs from the others' agreed answer
      is the suspect, with the same evidence, suspension and credits as a spot-check's (gateway/spot_checks.py).

Each input goes to a provider at most once, so no provider sees an input repeated; the cost is one run per probe
once answers are established (two for a new input).
"""

from __future__ import annotations

import json
import logging
import random
import secrets
from dataclasses import dataclass, field
from typing import Callable, Protocol

import trio

from llorch.gateway import limits
from llorch.gateway.books.settlement import Payer
from llorch.gateway.errors import ReceiptRejected
from llorch.gateway.market.node_client import AttemptFailed
from llorch.gateway.market.placement import Requirements
from llorch.gateway.market.quota import prompt_tokens_upper_bound
from llorch.gateway.request import InferenceRequest
from llorch.gateway.storage import log_fault
from llorch.gateway.spot_checks import Market, NoRun, run_on_another
from llorch.gateway.ticket_runner import Keep, Order, StreamBroke, TicketRunner, new_request_id
from llorch.ledger.evidence import Run, odd_one_out, result_of
from llorch.ledger.objects import Receipt, Ticket
from llorch.ledger.signing import peer_id_of
from llorch.ledger.sqlite import Database
from llorch.node.errors import ProtocolError
from llorch.node.limits import SALT_BYTES
from llorch.node.stream_io import now_ms
from llorch.node.wire.attestation import Attestation
from llorch.node.wire.frames import prompt_parts

log = logging.getLogger("llorch.gateway")

PLATFORM_LEG = Payer.PROBE.value

SCHEMA = """
CREATE TABLE IF NOT EXISTS probe_inputs (
    id            INTEGER PRIMARY KEY,
    engine_build  TEXT NOT NULL,          -- the determinism class whose providers run it
    model_id      TEXT NOT NULL,
    model_sha256  BLOB NOT NULL,
    body          TEXT NOT NULL,          -- the chat request body (JSON), as a customer would send it
    salt          BLOB NOT NULL,          -- one salt for every run, so the receipts commit to one prompt
    seed          INTEGER NOT NULL,
    created_ms    INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS probe_inputs_class ON probe_inputs (engine_build, model_sha256);
CREATE TABLE IF NOT EXISTS probe_runs (
    input_id      INTEGER NOT NULL,
    provider_key  BLOB NOT NULL,
    request_id    TEXT NOT NULL,
    ticket        BLOB NOT NULL,
    receipt       BLOB NOT NULL,
    output        TEXT NOT NULL,
    verdict       TEXT NOT NULL,          -- pending (no second run yet) | clean | suspect | undecided
    run_ms        INTEGER NOT NULL,       -- the gateway's clock when the run ended
    PRIMARY KEY (input_id, provider_key)
);
"""

# A realistic pool: short everyday questions and tasks, as customers of a small chat model send them.
PROMPTS = (
    "What is the capital of Spain?", "Write a short poem about the moon.", "Give me a synonym for happy.",
    "Explain photosynthesis in one sentence.", "Suggest a name for a small bakery.", "What is 7 times 8?",
    "Translate 'good morning' into French.", "List three fruits that are red.", "How do I boil an egg?",
    "Write a two-line joke about computers.", "What does HTTP stand for?", "Summarize the plot of Cinderella.",
    "Give me a tip for sleeping better.", "What is the largest planet in our solar system?",
    "Describe the colour blue to someone.", "Write a friendly reminder to drink water.",
    "Name an animal that lives in the ocean.", "What year did the first person walk on the moon?",
    "Write a one-sentence product description for a mug.", "How many days are in a leap year?",
)
SYSTEM_PROMPTS = (None, None, "You are a helpful assistant.", "Answer briefly.")
TEMPERATURES = (None, 0.0, 0.7, 0.8, 1.0)
TOP_PS = (None, None, 0.9, 0.95)
MAX_TOKENS = (16, 32, 64, 128)


def probe_body(model_id: str, rng: random.Random) -> dict:
    """A chat request body as a customer's client sends it: a prompt from the pool, the usual sampling and sizes,
    a seed (customers who want reproducible answers send one; the gateway draws one for those who do not)."""
    messages = [{"role": "user", "content": rng.choice(PROMPTS)}]
    system = rng.choice(SYSTEM_PROMPTS)
    if system is not None:
        messages.insert(0, {"role": "system", "content": system})
    body = {"model": model_id, "messages": messages, "max_tokens": rng.choice(MAX_TOKENS)}
    for name, value in (("temperature", rng.choice(TEMPERATURES)), ("top_p", rng.choice(TOP_PS))):
        if value is not None:
            body[name] = value
    return body


@dataclass(frozen=True)
class ProbeInput:
    id: int
    engine_build: str
    model_id: str
    model_sha256: bytes
    request: InferenceRequest
    salt: bytes
    seed: int

    @property
    def sampling(self) -> dict:
        return self.request.sampling(self.seed)

    @property
    def prompt(self) -> dict:
        return self.request.prompt


class EvidenceStore(Protocol):
    """The spot-checker's (d): evidence, credits and the suspension, in one transaction with ``statements``."""

    async def store_evidence(self, request_id: str, prompt: dict, salt: bytes, runs: list[Run], keys: list[bytes],
                             suspect: bytes | None, now: int, statements: list) -> tuple[int, int]: ...


@dataclass
class ProbeStatistics:
    sent: int = 0
    clean: int = 0                   # the run agreed with an answer two or more providers gave
    pending: int = 0                 # no second provider of the class yet: the answer is not known
    suspects: int = 0
    undecided: int = 0
    failed: int = 0                  # the provider did not answer (busy, failed): counted, not evidence


@dataclass(frozen=True)
class ProbeVerdict:
    input_id: int
    provider_key: bytes
    verdict: str                     # clean | pending | suspect | undecided
    suspect: bytes | None = None
    evidence_id: int | None = None


@dataclass
class Prober:
    """The gateway's probes. ``tenant``: the platform tenant whose pseudonym probes carry; ``parse``: a request
    body as the API parses a customer's; ``rng``: a seeded one in tests."""

    runner: TicketRunner
    market: Market
    database: Database
    evidence: EvidenceStore
    parse: Callable[[dict], InferenceRequest]
    interval_ms: int
    tenant: str
    rng: random.Random = field(default_factory=random.SystemRandom)
    statistics: ProbeStatistics = field(default_factory=ProbeStatistics)
    deadline_s: float = limits.CHECK_DEADLINE_S

    # (a) ----------------------------------------------------------------------------------------------------------
    async def run(self) -> None:
        """The background loop: a probe at random intervals (mean ``interval_ms``) to a random provider; a probe
        that fails is logged and counted, never ends it."""
        while True:
            await trio.sleep(self.rng.expovariate(1000 / self.interval_ms))
            views = [v for v in await self.market.provider_views() if v.approved]
            if not views:
                continue
            target = self.rng.choice(views).attestation
            try:
                with trio.move_on_after(self.deadline_s + 2 * limits.SPOT_CHECK_TIMEOUT_S):   # a bound on a bug
                    await self.probe(target)
            except Exception:     # a bug or a database fault in one probe: the next one still runs
                self.statistics.failed += 1
                log_fault(log, "probe of %s failed", peer_id_of(target.provider_key))

    async def probe(self, target: Attestation) -> ProbeVerdict | None:
        """One probe of ``target``; None if it offers no chat model or did not answer. The second and third runs
        wait for a slot of the class until ``deadline_s`` after the probe began."""
        deadline = trio.current_time() + self.deadline_s
        probe_input = await self._input_for(target)
        if probe_input is None:
            return None
        if not await self._run(probe_input, target):
            return None
        runs = await self._runs(probe_input.id)
        while len(runs) < 3 and (len(runs) < 2 or len({result_of(r) for _, _, r in runs}) > 1):
            if not await self._run_elsewhere(probe_input, {key for key, _, _ in runs}, deadline):
                break
            runs = await self._runs(probe_input.id)
        return await self._judge(probe_input, target.provider_key, runs)

    # (b) ----------------------------------------------------------------------------------------------------------
    async def _input_for(self, target: Attestation) -> ProbeInput | None:
        catalog = self.market.catalog
        pins = {m: pin for m in catalog.chat_ids() if (pin := catalog.pin(m)) is not None and target.offers(m, pin)}
        if not pins:
            return None
        model_id = self.rng.choice(sorted(pins))
        pin = pins[model_id]
        row = await self.database.fetchone(
            "SELECT i.id, i.body, i.salt, i.seed, COUNT(r.input_id) AS runs FROM probe_inputs i "
            "LEFT JOIN probe_runs r ON r.input_id = i.id WHERE i.engine_build = ? AND i.model_id = ? "
            "AND i.model_sha256 = ? AND NOT EXISTS (SELECT 1 FROM probe_runs o WHERE o.input_id = i.id "
            "AND o.provider_key = ?) AND NOT EXISTS (SELECT 1 FROM probe_runs d WHERE d.input_id = i.id "
            "AND d.verdict IN ('suspect', 'undecided')) GROUP BY i.id, i.body, i.salt, i.seed "
            "HAVING COUNT(r.input_id) < ? ORDER BY runs DESC, i.id LIMIT 1",
            (target.engine_build, model_id, pin, target.provider_key, limits.PROBE_RUNS_PER_INPUT_MAX))
        if row is not None:
            return ProbeInput(row[0], target.engine_build, model_id, pin, self.parse(json.loads(row[1])), row[2],
                              row[3])
        body = probe_body(model_id, self.rng)
        salt, seed = secrets.token_bytes(SALT_BYTES), secrets.randbelow(2**32)
        await self.database.transaction([(
            "INSERT INTO probe_inputs (engine_build, model_id, model_sha256, body, salt, seed, created_ms) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            [(target.engine_build, model_id, pin, json.dumps(body), salt, seed, now_ms())])])
        row = await self.database.fetchone("SELECT MAX(id) FROM probe_inputs")
        assert row is not None and row[0] is not None          # the row just written
        return ProbeInput(row[0], target.engine_build, model_id, pin, self.parse(body), salt, seed)

    # (c) ----------------------------------------------------------------------------------------------------------
    async def _order(self, probe_input: ProbeInput) -> Callable[[Attestation], Order]:
        prompt = probe_input.prompt
        prompt_bound = prompt_tokens_upper_bound(len(str(prompt).encode()), prompt_parts(prompt))
        multiplier_bp = await self.market.demand_multiplier(probe_input.model_id, probe_input.model_sha256)

        def order_of(provider: Attestation) -> Order:
            return Order(new_request_id(), self.tenant, Payer.PROBE, probe_input.model_id, probe_input.model_sha256,
                         probe_input.sampling, probe_input.salt, prompt, prompt_bound, multiplier_bp)

        return order_of

    async def _run(self, probe_input: ProbeInput, provider: Attestation) -> bool:
        """``provider`` runs the input; its run is stored (pending until judged). False if it did not answer."""
        self.statistics.sent += 1
        try:
            with trio.fail_after(limits.SPOT_CHECK_TIMEOUT_S):
                run = await self.runner.run((await self._order(probe_input))(provider), provider, Keep())
        except (AttemptFailed, StreamBroke, ProtocolError, ReceiptRejected, trio.TooSlowError) as exc:
            self.statistics.failed += 1
            log.info("probe %d on %s was not answered: %s", probe_input.id, peer_id_of(provider.provider_key), exc)
            return False
        assert run.receipt is not None and run.receipt_bytes is not None
        await self._store_run(probe_input, provider.provider_key, Run(run.ticket_bytes, run.receipt_bytes, run.text()),
                              run.receipt)
        return True

    async def _store_run(self, probe_input: ProbeInput, provider_key: bytes, run: Run, receipt: Receipt) -> None:
        await self.database.transaction([(
            "INSERT INTO probe_runs (input_id, provider_key, request_id, ticket, receipt, output, verdict, run_ms) "
            "VALUES (?, ?, ?, ?, ?, ?, 'pending', ?)",
            [(probe_input.id, provider_key, receipt.request_id, run.ticket, run.receipt, run.output, now_ms())])])

    async def _run_elsewhere(self, probe_input: ProbeInput, exclude: set[bytes], deadline: float) -> bool:
        """The input on the best other approved provider of the class that takes it, waiting for a slot while all
        are busy (like a spot-check's re-run); False if none exists or none took it in time."""
        need = Requirements(probe_input.model_id, probe_input.model_sha256, "EUR", prompt_tokens_estimate=1,
                            max_tokens=probe_input.sampling["max_tokens"], engine_build=probe_input.engine_build,
                            exclude=frozenset(exclude))
        self.statistics.sent += 1
        try:
            run, receipt = await run_on_another(self.runner, self.market, await self._order(probe_input), need,
                                                deadline)
        except NoRun as exc:
            self.statistics.failed += 1
            log.info("probe %d: no second run: %s", probe_input.id, exc)
            return False
        await self._store_run(probe_input, receipt.provider_key, run, receipt)
        return True

    async def _runs(self, input_id: int) -> list[tuple[bytes, Run, Receipt]]:
        rows = await self.database.fetchall(
            "SELECT provider_key, ticket, receipt, output FROM probe_runs WHERE input_id = ? ORDER BY run_ms",
            (input_id,))
        return [(key, Run(ticket, receipt, output), Receipt.from_envelope(receipt))
                for key, ticket, receipt, output in rows]

    # (d) ----------------------------------------------------------------------------------------------------------
    async def _judge(self, probe_input: ProbeInput, target: bytes, runs: list) -> ProbeVerdict:
        results = [result_of(receipt) for _, _, receipt in runs]
        keys = [key for key, _, _ in runs]
        now = now_ms()
        if len(runs) < 2:
            self.statistics.pending += 1
            return ProbeVerdict(probe_input.id, target, "pending")
        if len(set(results)) == 1:
            await self._set_verdicts(probe_input.id, {key: "clean" for key in keys})
            self.statistics.clean += 1
            return ProbeVerdict(probe_input.id, target, "clean")
        odd = odd_one_out(results)
        suspect = keys[odd] if odd is not None else None
        verdicts = {key: "suspect" if key == suspect else "clean" if suspect else "undecided" for key in keys}
        statements = [("UPDATE probe_runs SET verdict = ? WHERE input_id = ? AND provider_key = ?",
                       [(verdict, probe_input.id, key) for key, verdict in verdicts.items()])]
        # the target's run first, as the customer's original in a spot-check's evidence; at most 8 runs
        order = sorted(range(len(runs)), key=lambda i: keys[i] != target)[:limits.EVIDENCE_RUNS_MAX]
        request_id = Ticket.from_envelope(runs[order[0]][1].ticket).request_id
        evidence_id, _ = await self.evidence.store_evidence(
            request_id, probe_input.prompt, probe_input.salt, [runs[i][1] for i in order], [keys[i] for i in order],
            suspect, now, statements)
        if suspect is None:
            self.statistics.undecided += 1
        else:
            self.statistics.suspects += 1
        return ProbeVerdict(probe_input.id, target, verdicts[target], suspect, evidence_id)

    async def _set_verdicts(self, input_id: int, verdicts: dict[bytes, str]) -> None:
        await self.database.transaction([(
            "UPDATE probe_runs SET verdict = ? WHERE input_id = ? AND provider_key = ?",
            [(verdict, input_id, key) for key, verdict in verdicts.items()])])

