"""`llorch ledger replay`: re-run a receipt's request on the local engine and check the receipt's commitments.

Given a receipt (from a ledger or bundle, signature-checked), the customer's original request body and the prompt
salt the gateway returned, replay reports, in order:

  1. whether the request and salt give the receipt's prompt commitment (the receipt is for this prompt);
  2. whether the request's sampling parameters (with the seed used) give the receipt's sampling hash;
  3. whether the local engine is in the receipt's determinism class (model sha256 + engine build); if not, the
     output cannot be compared and replay says so instead of reporting a false mismatch;
  4. whether re-generating gives the receipt's output hash.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import trio

from llorch.inference import catalog, sources
from llorch.inference.engine import Engine, Sampling, determinism_class, parse_fingerprint
from llorch.inference.errors import InferenceError
from llorch.ledger import canonical
from llorch.ledger.errors import BundleError, EncodingError, LedgerError
from llorch.ledger.objects import Receipt, logprobs_sha256, prompt_commitment, sampling_sha256
from llorch.ledger.signing import sha256
from llorch.ledger.material import load_material
from llorch.node.errors import ProtocolError
from llorch.node.wire.frames import check_prompt
from llorch.node.wire.sampling import chat_request_prompt, chat_request_sampling

MATCH, MISMATCH, UNUSABLE, INCONCLUSIVE = 0, 1, 2, 3


class ReplayInputError(Exception):
    """The receipt, request or salt given to replay cannot be used; the message says which and why."""


@dataclass(frozen=True)
class ReplayReport:
    verdict: int                   # MATCH, MISMATCH or INCONCLUSIVE
    prompt_matches: bool
    sampling_matches: bool
    receipt_class: str
    local_class: str | None
    output_matches: bool | None    # None when not compared
    message: str


def find_receipt(ledger_path: Path, request_id: str) -> Receipt:
    """The receipt for ``request_id`` in a ledger file or bundle, with its signature verified."""
    needle = request_id.encode()
    try:
        for entry in load_material(ledger_path).entries:
            if needle not in entry:     # the receipt's payload holds its request_id's bytes verbatim: not this one
                continue
            try:
                receipt = Receipt.from_envelope(entry)
            except LedgerError as exc:
                raise ReplayInputError(f"the receipt for {request_id} is not genuine: {exc}") from None
            if receipt.request_id == request_id:
                return receipt
    except BundleError as exc:
        raise ReplayInputError(str(exc)) from None
    except LedgerError as exc:
        raise ReplayInputError(f"cannot read {ledger_path}: {exc}") from None
    raise ReplayInputError(f"no receipt for {request_id} in {ledger_path}")


def load_request(path: Path) -> dict:
    """The customer's request body (as sent to the gateway): a JSON object with "messages" (chat) or "prompt"
    (completion), and sampling fields of the types replay hashes: temperature and top_p numbers, max_tokens and
    max_completion_tokens integers, stop a str or a list of str (each may be absent or null)."""
    try:
        body = json.loads(Path(path).read_text(encoding="utf-8"))
    except RecursionError:
        raise ReplayInputError(f"{path} is not an OpenAI chat request body: JSON nested too deeply") from None
    except (OSError, ValueError) as exc:      # ValueError: not UTF-8, not JSON, a number Python will not convert
        raise ReplayInputError(f"{path} is not an OpenAI chat request body: {exc}") from None
    try:
        _check_request_body(body)
    except (KeyError, TypeError, ProtocolError, EncodingError) as exc:
        raise ReplayInputError(f"{path} is not an OpenAI chat request body: {exc}") from None
    return body


def _check_request_body(body: object) -> None:
    if not isinstance(body, dict):
        raise TypeError("it is not a JSON object")
    try:                                                  # messages, tools, response_format as the gateway reads them
        prompt = chat_request_prompt(body)
    except (AttributeError, ValueError, RecursionError) as exc:
        raise TypeError(f"its messages or tools cannot be read: {exc}") from None
    check_prompt(prompt)
    canonical.encode(prompt)                              # the prompt commitment hashes it (EncodingError if not)
    for name in ("temperature", "top_p", "frequency_penalty", "presence_penalty", "repetition_penalty"):
        value = body.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or isinstance(value, float) and not math.isfinite(value)):
            raise TypeError(f"{name} must be a number")
    for name in ("max_tokens", "max_completion_tokens"):
        value = body.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise TypeError(f"{name} must be an integer")
    stop = body.get("stop")
    if stop is not None and not isinstance(stop, str) and not (
            isinstance(stop, list) and all(isinstance(item, str) for item in stop)):
        raise TypeError("stop must be a string or a list of strings")
    try:
        sampling = chat_request_sampling(body, 0)
    except (AttributeError, ValueError, OverflowError, RecursionError) as exc:
        raise TypeError(f"its sampling fields cannot be read: {exc}") from None
    canonical.encode(sampling)                            # every value fits the sampling map (EncodingError if not)


def read_catalog_file(path: Path) -> tuple[catalog.Catalog, str]:
    """A signed catalog from a file: the envelope bytes a node keeps (node.catalog_file), or the JSON of a
    gateway's GET /v1/catalog; its signature is checked, and the signer's peer id returned with it (a receipt's
    model is checked against the file's sha256 whoever signed the catalog). ReplayInputError if it is neither."""
    import base64

    from llorch.ledger.errors import SignatureError
    from llorch.ledger.signing import peer_id_of
    from llorch.node.wire.catalog import SignedCatalog

    try:
        data = path.read_bytes()
        if data[:1] == b"{":
            data = base64.b64decode(json.loads(data)["document"])
        signed = SignedCatalog.from_envelope(data)
    except (OSError, ValueError, KeyError, TypeError, EncodingError, SignatureError) as exc:
        raise ReplayInputError(f"{path} is not a signed catalog (a node's catalog file or GET /v1/catalog): "
                               f"{exc}") from None
    return signed.catalog(), peer_id_of(signed.gateway_key)


def replay(receipt: Receipt, body: dict, salt: bytes, seed: int | None = None,
           cache_dir: Path | None = None, models: catalog.Catalog = catalog.BUILTIN, log=print) -> ReplayReport:
    """Re-run the receipt's request. ``models``: where to find the receipt's model (a retired entry still counts:
    its pin is what the receipt cites); a model not in the cache is fetched from the entry's sources first."""
    prompt = chat_request_prompt(body)
    prompt_matches = prompt_commitment(salt, prompt) == receipt.prompt_commitment
    sampling = chat_request_sampling(body, receipt.seed if seed is None else seed)
    sampling_matches = sampling_sha256(sampling) == receipt.sampling_sha256
    receipt_class = determinism_class(receipt.model_sha256.hex(), receipt.engine_build)

    def report(verdict: int, message: str, local_class: str | None = None, output: bool | None = None):
        return ReplayReport(verdict, prompt_matches, sampling_matches, receipt_class, local_class, output, message)

    if not prompt_matches:
        return report(MISMATCH, "the request and salt do not give the receipt's prompt commitment: this receipt is "
                                "not for this prompt (or the salt is wrong)")
    if not sampling_matches:
        return report(MISMATCH, "the request's sampling parameters and seed do not give the receipt's sampling hash")
    if receipt.finish_reason == "cancelled":
        return report(INCONCLUSIVE, "the request was cancelled mid-stream: its output cannot be regenerated exactly")
    entry = models.entries.get(receipt.model_id)
    if entry is None or bytes.fromhex(entry.sha256) != receipt.model_sha256:
        return report(INCONCLUSIVE, f"this catalog (version {models.version}) does not pin {receipt.model_id} with "
                                    f"the receipt's sha256: pass the gateway's catalog with --catalog")
    settings = parse_fingerprint(receipt.engine_build)
    try:
        path = sources.fetch_any(entry, cache_dir, log=log)
        engine = Engine(entry, path, 2, int(settings.get("ctx", 0)), int(settings.get("batch", 0)))
    except (ValueError, InferenceError) as exc:
        return report(INCONCLUSIVE, f"cannot build an engine like the receipt's ({exc})")
    if engine.fingerprint != receipt.engine_build:
        return report(INCONCLUSIVE, f"the local engine is in another determinism class ({engine.determinism_class}: "
                                    f"{engine.fingerprint}) than the receipt ({receipt_class}: "
                                    f"{receipt.engine_build}); outputs are not comparable here",
                      engine.determinism_class)
    prepared = engine.prepare(prompt, Sampling.of(sampling))

    async def ignore(text: str, logprobs: dict | None = None) -> None:
        return None

    generation = trio.run(engine.generate, prepared, ignore)
    output_matches = sha256(generation.text.encode("utf-8")) == receipt.output_sha256
    if output_matches and receipt.logprobs_sha256 is not None \
            and logprobs_sha256(list(generation.logprobs)) != receipt.logprobs_sha256:
        return report(MISMATCH, "same determinism class and the same output, but the regenerated logprobs differ "
                                "from the receipt's logprobs hash: the provider did not return the model's "
                                "log-probabilities", engine.determinism_class, False)
    if output_matches:
        return report(MATCH, f"prompt, sampling and output all match ({generation.tokens_out} tokens regenerated)",
                      engine.determinism_class, True)
    return report(MISMATCH, "same determinism class, but the regenerated output differs from the receipt's output "
                            "hash: the provider did not return what this model produces", engine.determinism_class,
                  False)
