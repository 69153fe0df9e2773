"""The offline check of spot-check evidence (ledger/evidence.py, `llorch ledger check-evidence`, docs/verification.md
§5): genuine evidence holds, and each way of forging or spoiling it fails at its numbered check with exit 1; a file
that is not evidence at all is refused with exit 2."""

from __future__ import annotations

import base64
import copy
import json

import pytest

from llorch.gateway.cli import main
from llorch.ledger.errors import EvidenceError, EvidenceFormatError
from llorch.ledger.evidence import Run, evidence_document, load_evidence, odd_one_out, verify_evidence
from llorch.ledger.objects import VERSION, Receipt, amount_minor, ledger_origin, prompt_commitment, sampling_sha256
from llorch.ledger.signing import SigningKey, sha256
from tests.helpers import make_ticket, receipt_fields

PROMPT = {"messages": [{"role": "user", "content": "what is two plus two?"}]}
SALT = bytes(range(16))
GATEWAY = SigningKey.generate()
HONEST_A, HONEST_B, CHEAT = SigningKey.generate(), SigningKey.generate(), SigningKey.generate()
NOW_MS = 1_700_000_000_000


def run_of(provider: SigningKey, output: str, tokens_out: int = 4, finish_reason: str = "length",
           engine_build: str = "echo/1", prompt: dict = PROMPT, **ticket_overrides) -> Run:
    ticket, ticket_bytes = make_ticket(GATEWAY, provider.public_key, NOW_MS, **ticket_overrides)
    fields = receipt_fields(provider, ticket.request_id, tokens_in=5, tokens_out=tokens_out)
    fields.update(v=VERSION, origin=ledger_origin(provider.public_key), index=0, prev_hash=bytes(32),
                  ticket_sha256=sha256(ticket_bytes), gateway_key=GATEWAY.public_key, tenant=ticket.tenant,
                  seed=ticket.sampling["seed"], sampling_sha256=sampling_sha256(ticket.sampling),
                  engine_build=engine_build, prompt_commitment=prompt_commitment(SALT, prompt),
                  output_sha256=sha256(output.encode()), finish_reason=finish_reason,
                  amount=amount_minor(5, tokens_out, ticket.price_in, ticket.price_out))
    return Run(ticket_bytes, Receipt(**fields).seal(provider), output)


def honest(provider: SigningKey) -> Run:
    return run_of(provider, "four four four four ")


def document(runs: list[Run], suspect: SigningKey | None) -> dict:
    return json.loads(json.dumps(evidence_document(PROMPT, SALT, runs, suspect.public_key if suspect else None,
                                                   NOW_MS)))


def genuine() -> dict:
    return document([run_of(CHEAT, "five "), honest(HONEST_A), honest(HONEST_B)], CHEAT)


def check_cli(tmp_path, doc) -> int:
    path = tmp_path / "evidence.json"
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return main(["ledger", "check-evidence", str(path)])


def test_genuine_evidence_names_the_odd_one_out_and_the_cli_says_ok(tmp_path, capsys):
    checked = verify_evidence(genuine())
    assert checked.suspect == CHEAT.public_key and checked.engine_build == "echo/1"
    assert check_cli(tmp_path, genuine()) == 0
    assert "the odd one out is " + CHEAT.peer_id in capsys.readouterr().out


def test_two_runs_without_a_suspect_still_prove_one_is_false(tmp_path):
    doc = document([run_of(CHEAT, "five "), honest(HONEST_A)], None)
    assert verify_evidence(doc).suspect is None
    assert check_cli(tmp_path, doc) == 0


def test_a_truncated_answer_is_a_disagreement_even_with_a_prefix_of_the_text():
    truncated = run_of(CHEAT, "four four ", tokens_out=2, finish_reason="stop")
    assert verify_evidence(document([truncated, honest(HONEST_A), honest(HONEST_B)], CHEAT)).suspect == \
        CHEAT.public_key


def tampered(mutate) -> dict:
    doc = genuine()
    mutate(doc)
    return doc


def flip_receipt_byte(doc):
    data = bytearray(base64.b64decode(doc["runs"][0]["receipt"]))
    data[-1] ^= 1
    doc["runs"][0]["receipt"] = base64.b64encode(bytes(data)).decode()


def other_ticket(doc):
    doc["runs"][0]["ticket"] = doc["runs"][1]["ticket"]


def other_prompt(doc):
    doc["prompt"] = {"messages": [{"role": "user", "content": "what is two plus three?"}]}


def blame_an_honest_provider(doc):
    doc["suspect"] = HONEST_A.peer_id


def blame_a_stranger(doc):
    doc["suspect"] = SigningKey.generate().peer_id


def forge_an_output(doc):
    doc["runs"][1]["output"] = "five "


@pytest.mark.parametrize("mutate, check", [
    (flip_receipt_byte, 1), (other_ticket, 2), (other_prompt, 3), (forge_an_output, 5),
    (blame_an_honest_provider, 7), (blame_a_stranger, 7)])
def test_spoiled_evidence_fails_at_its_numbered_check_with_exit_1(tmp_path, mutate, check):
    doc = tampered(mutate)
    with pytest.raises(EvidenceError) as caught:
        verify_evidence(doc)
    assert caught.value.check == check and caught.value.code == f"EV0{check}"
    assert check_cli(tmp_path, doc) == 1


def test_runs_of_other_inputs_are_no_evidence():
    other_seed = run_of(CHEAT, "five ", sampling={"seed": 7, "temperature_ppm": 800_000, "top_p_ppm": 950_000,
                                                  "max_tokens": 32, "stop": []})
    with pytest.raises(EvidenceError, match="EV03"):
        verify_evidence(document([other_seed, honest(HONEST_A), honest(HONEST_B)], CHEAT))
    other_class = run_of(CHEAT, "five ", engine_build="llama-cpp-python/0.3.36;ggml-cpu/x;ctx/2048;batch/512")
    with pytest.raises(EvidenceError, match="another engine build"):
        verify_evidence(document([other_class, honest(HONEST_A), honest(HONEST_B)], CHEAT))


def test_agreeing_runs_are_no_evidence_and_one_provider_cannot_outvote_itself():
    with pytest.raises(EvidenceError, match="EV06"):
        verify_evidence(document([honest(HONEST_A), honest(HONEST_B)], None))
    with pytest.raises(EvidenceError, match="EV04"):
        verify_evidence(document([run_of(CHEAT, "five "), honest(HONEST_A), honest(HONEST_A)], CHEAT))


def test_a_cancelled_run_is_no_evidence():
    cancelled = run_of(CHEAT, "four ", tokens_out=1, finish_reason="cancelled")
    with pytest.raises(EvidenceError, match="EV02"):
        verify_evidence(document([cancelled, honest(HONEST_A), honest(HONEST_B)], CHEAT))


@pytest.mark.parametrize("text, reason", [
    ("not json", "not JSON"), ("[]", "not a JSON object"), ('{"format": "llorch-evidence/1"}', "missing"),
    (json.dumps({**genuine(), "salt": "AAAA"}), "salt must be 16 bytes"),
    (json.dumps({**genuine(), "runs": genuine()["runs"][:1]}), "runs must be a list"),
    (json.dumps({**genuine(), "detected_ms": 1.5}), "detected_ms"),
    (json.dumps({**genuine(), "suspect": "12D3KooWnot"}), "suspect is not a peer id"),
    (json.dumps({**genuine(), "format": "llorch-evidence/9"}), "this build reads")])
def test_a_file_that_is_not_evidence_is_refused_with_exit_2(tmp_path, capsys, text, reason):
    with pytest.raises(EvidenceFormatError, match=reason):
        load_evidence(text)
    capsys.readouterr()
    assert check_cli(tmp_path, text) == 2
    assert reason in capsys.readouterr().err


def test_odd_one_out_needs_a_majority_of_at_least_two():
    assert odd_one_out(["b", "a", "a"]) == 0 and odd_one_out(["a", "a", "b"]) == 2
    assert odd_one_out(["a", "b"]) is None and odd_one_out(["a", "b", "c"]) is None
    assert odd_one_out(["a", "a", "a"]) is None


def test_the_document_is_independent_of_its_json_spelling():
    doc = genuine()
    respelled = json.loads(json.dumps(copy.deepcopy(doc), indent=4, sort_keys=True))
    assert verify_evidence(respelled).suspect == CHEAT.public_key
