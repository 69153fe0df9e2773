"""Spot-check evidence: signed tickets and receipts of one request run by several providers of one determinism class
that disagree about its output. Anyone can check it offline (`llorch ledger check-evidence FILE`); the steps are
numbered as in docs/verification.md §5:

  (1) EV01 genuine        every ticket and receipt is a well-typed object validly signed by the key it names;
  (2) EV02 answers        each receipt answers its own ticket (ticket hash, request, gateway, provider, tenant, model,
                          seed, sampling hash, prices), its amount is tokens × prices, and it was not cancelled;
  (3) EV03 same_inputs    the runs had identical inputs: one model sha256, one sampling map (seed included), one
                          engine build (one determinism class), and every prompt commitment opens to the document's
                          prompt and salt;
  (4) EV04 providers      every run is by a different provider;
  (5) EV05 outputs        every output text given hashes to its receipt's ``output_sha256``;
  (6) EV06 disagreement   the results (output hash, input and output token counts, finish reason, and the logprobs
                          hash when the request asked for logprobs) are not all equal:
                          within a determinism class identical inputs give identical results, so at least one of
                          these signed receipts is false;
  (7) EV07 suspect        the named suspect (if any) is the odd one out: its result differs from every other run's,
                          and the others, at least two, agree with each other.

Without a suspect (null) the document still proves (6): one of its providers signed a false result, not which one.
The output texts let anyone with the model and a node of the class replay the request (`llorch ledger replay`) and
see for themselves which result is the true one.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass

from llorch.ledger import canonical, limits
from llorch.ledger.errors import EncodingError, EvidenceError, EvidenceFormatError, LedgerError
from llorch.ledger.objects import Receipt, Ticket, prompt_commitment, sampling_sha256
from llorch.ledger.signing import peer_id_of, public_key_of_peer_id, sha256

FORMAT = "llorch-evidence/1"
SALT_BYTES = 16

CHECKS = {1: ("EV01", "genuine"), 2: ("EV02", "answers"), 3: ("EV03", "same_inputs"), 4: ("EV04", "providers"),
          5: ("EV05", "outputs"), 6: ("EV06", "disagreement"), 7: ("EV07", "suspect")}


@dataclass(frozen=True)
class Run:
    """One provider's run of the request: the ticket it was sent, the receipt it signed, the text it streamed."""

    ticket: bytes
    receipt: bytes
    output: str | None = None


@dataclass(frozen=True)
class CheckedEvidence:
    receipts: tuple[Receipt, ...]
    suspect: bytes | None                 # the odd one out's public key, or None (undecided)
    engine_build: str


def result_of(receipt: Receipt) -> tuple:
    """What must be identical between two honest runs of identical inputs in one determinism class."""
    return receipt.output_sha256, receipt.tokens_in, receipt.tokens_out, receipt.finish_reason, receipt.logprobs_sha256


def odd_one_out(results: list[tuple]) -> int | None:
    """The index of the only result that differs from all others, when the others (at least two) agree; else None.
    Pure: the gateway decides its suspect with it, and the verifier checks the suspect with it."""
    for index, result in enumerate(results):
        others = results[:index] + results[index + 1:]
        if len(others) >= 2 and all(other == others[0] for other in others) and result != others[0]:
            return index
    return None


def evidence_document(prompt: dict, salt: bytes, runs: list[Run], suspect: bytes | None, detected_ms: int) -> dict:
    """The evidence file's JSON object (docs/verification.md §5)."""
    return {"format": FORMAT, "prompt": prompt, "salt": base64.b64encode(salt).decode(),
            "runs": [{"ticket": base64.b64encode(run.ticket).decode(),
                      "receipt": base64.b64encode(run.receipt).decode(), "output": run.output} for run in runs],
            "suspect": peer_id_of(suspect) if suspect is not None else None, "detected_ms": detected_ms}


def load_evidence(text: str) -> dict:
    """Parse an evidence file; EvidenceFormatError if it is not one (checked with ``parse_evidence``)."""
    if len(text.encode("utf-8", "surrogatepass")) > limits.EVIDENCE_FILE_BYTES_MAX:
        raise EvidenceFormatError(f"larger than {limits.EVIDENCE_FILE_BYTES_MAX} bytes")
    try:
        document = json.loads(text, parse_constant=_no_constants)
    except RecursionError:
        raise EvidenceFormatError("not JSON: nested too deeply") from None
    except ValueError as exc:
        raise EvidenceFormatError(f"not JSON: {exc}") from None
    parse_evidence(document)
    return document


def parse_evidence(document) -> tuple[dict, bytes, list[Run], bytes | None]:
    """(prompt, salt, runs, suspect key) of a document of the right shape; EvidenceFormatError naming the field."""
    if not isinstance(document, dict):
        raise EvidenceFormatError("not an evidence document: it is not a JSON object")
    missing = sorted({"format", "prompt", "salt", "runs", "suspect", "detected_ms"} - set(document))
    if missing:
        raise EvidenceFormatError(f"not an evidence document: missing {', '.join(missing)}")
    if document["format"] != FORMAT:
        raise EvidenceFormatError(f"format is {str(document['format'])[:40]!r}, this build reads {FORMAT!r}")
    prompt = document["prompt"]
    if not isinstance(prompt, dict):
        raise EvidenceFormatError("prompt must be a JSON object (the prompt map the receipts commit to)")
    try:
        canonical.encode(prompt)
    except (EncodingError, TypeError, ValueError, OverflowError) as exc:
        raise EvidenceFormatError(f"prompt cannot be encoded canonically: {exc}") from None
    salt = _base64("salt", document["salt"])
    if len(salt) != SALT_BYTES:
        raise EvidenceFormatError(f"salt must be {SALT_BYTES} bytes, got {len(salt)}")
    texts = document["runs"]
    if not isinstance(texts, list) or not limits.EVIDENCE_RUNS_MIN <= len(texts) <= limits.EVIDENCE_RUNS_MAX:
        raise EvidenceFormatError(f"runs must be a list of {limits.EVIDENCE_RUNS_MIN}..{limits.EVIDENCE_RUNS_MAX} "
                                  f"objects")
    runs = []
    for number, item in enumerate(texts):
        if not isinstance(item, dict) or not {"ticket", "receipt", "output"} <= set(item):
            raise EvidenceFormatError(f"runs[{number}] must be an object with ticket, receipt and output")
        if item["output"] is not None and not isinstance(item["output"], str):
            raise EvidenceFormatError(f"runs[{number}].output must be a string or null")
        runs.append(Run(_base64(f"runs[{number}].ticket", item["ticket"]),
                        _base64(f"runs[{number}].receipt", item["receipt"]), item["output"]))
    suspect = document["suspect"]
    if suspect is not None:
        if not isinstance(suspect, str):
            raise EvidenceFormatError("suspect must be a peer id (string) or null")
        try:
            suspect = public_key_of_peer_id(suspect)
        except LedgerError as exc:
            raise EvidenceFormatError(f"suspect is not a peer id: {exc}") from None
    detected = document["detected_ms"]
    if isinstance(detected, bool) or not isinstance(detected, int) or not 0 <= detected < 2**63:
        raise EvidenceFormatError("detected_ms must be an integer in 0..2^63-1")
    return prompt, salt, runs, suspect


def verify_evidence(document: dict) -> CheckedEvidence:
    """Run checks (1)-(7) on a parsed document; EvidenceError naming the first that fails."""
    prompt, salt, runs, suspect = parse_evidence(document)
    pairs = []
    for number, run in enumerate(runs):                                             # (1)
        try:
            pairs.append((Ticket.from_envelope(run.ticket), Receipt.from_envelope(run.receipt)))
        except LedgerError as exc:
            _fail(1, f"run {number}: the ticket or receipt is not genuine: {exc}")
    for number, (run, (ticket, receipt)) in enumerate(zip(runs, pairs)):            # (2)
        problem = _answers(ticket, run.ticket, receipt)
        if problem:
            _fail(2, f"run {number}: the receipt does not answer its ticket: {problem}")
    first_ticket, first_receipt = pairs[0]
    commitment = prompt_commitment(salt, prompt)
    for number, (ticket, receipt) in enumerate(pairs):                              # (3)
        if ticket.model_sha256 != first_ticket.model_sha256 or ticket.sampling != first_ticket.sampling:
            _fail(3, f"run {number} asked for another model or other sampling parameters than run 0")
        if receipt.engine_build != first_receipt.engine_build:
            _fail(3, f"run {number} is of another engine build ({receipt.engine_build!r}, run 0 "
                     f"{first_receipt.engine_build!r}): no determinism class holds both")
        if receipt.prompt_commitment != commitment:
            _fail(3, f"run {number}'s prompt commitment does not open to the document's prompt and salt")
    keys = [receipt.provider_key for _, receipt in pairs]                           # (4)
    if len(set(keys)) != len(keys):
        _fail(4, "two runs are by the same provider")
    for number, (run, (_, receipt)) in enumerate(zip(runs, pairs)):                 # (5)
        if run.output is not None and sha256(run.output.encode("utf-8")) != receipt.output_sha256:
            _fail(5, f"run {number}'s output text does not hash to its receipt's output_sha256")
    results = [result_of(receipt) for _, receipt in pairs]                          # (6)
    if all(result == results[0] for result in results):
        _fail(6, "every run has the same result: the providers agree, this is no evidence against anyone")
    if suspect is not None:                                                         # (7)
        if suspect not in keys:
            _fail(7, f"the suspect {peer_id_of(suspect)} ran none of the runs")
        odd = odd_one_out(results)
        if odd is None or keys[odd] != suspect:
            _fail(7, f"the suspect {peer_id_of(suspect)} is not the odd one out: its result is not the only one "
                     f"that differs from the others' agreed result")
    return CheckedEvidence(tuple(receipt for _, receipt in pairs), suspect, first_receipt.engine_build)


def _answers(ticket: Ticket, ticket_bytes: bytes, receipt: Receipt) -> str | None:
    expected = {"ticket_sha256": sha256(ticket_bytes), "request_id": ticket.request_id,
                "gateway_key": ticket.gateway_key, "provider_key": ticket.provider_key, "tenant": ticket.tenant,
                "model_id": ticket.model_id, "model_sha256": ticket.model_sha256, "seed": ticket.sampling["seed"],
                "sampling_sha256": sampling_sha256(ticket.sampling), "price_in": ticket.price_in,
                "price_out": ticket.price_out, "currency": ticket.currency}
    for name, value in expected.items():
        if getattr(receipt, name) != value:
            return f"{name} differs"
    if receipt.amount != receipt.expected_amount():
        return f"amount {receipt.amount} is not tokens × prices ({receipt.expected_amount()})"
    if receipt.tokens_out > ticket.sampling["max_tokens"]:
        return f"{receipt.tokens_out} output tokens, the ticket allowed {ticket.sampling['max_tokens']}"
    if receipt.finish_reason == "cancelled":
        return "the run was cancelled: a partial output proves nothing about the whole"
    return None


def _fail(check: int, message: str):
    raise EvidenceError(check, CHECKS[check][0], message)


def _base64(name: str, text) -> bytes:
    if not isinstance(text, str):
        raise EvidenceFormatError(f"{name} must be a base64 string")
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (UnicodeEncodeError, ValueError) as exc:
        raise EvidenceFormatError(f"{name} is not base64: {exc}") from None


def _no_constants(name: str):
    raise ValueError(f"{name} is not JSON")
