"""Builders shared by tests: valid tickets and receipt fields with sensible defaults."""

from __future__ import annotations

import secrets

from llorch.ledger.objects import VERSION, Ticket, amount_minor, sampling_sha256
from llorch.ledger.signing import SigningKey, sha256

MODEL_ID = "smollm2-135m-instruct-q4_1"
MODEL_SHA256 = bytes.fromhex("b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53")
SAMPLING = {"seed": 42, "temperature_ppm": 800_000, "top_p_ppm": 950_000, "max_tokens": 32, "stop": []}


def make_ticket(gateway: SigningKey, provider_key: bytes, now_ms: int, request_id: str | None = None,
                **overrides) -> tuple[Ticket, bytes]:
    fields = dict(v=VERSION, request_id=request_id or "req-" + secrets.token_hex(8), gateway_key=gateway.public_key,
                  provider_key=provider_key, tenant="t_test", model_id=MODEL_ID, model_sha256=MODEL_SHA256,
                  sampling=dict(SAMPLING), price_in=100_000, price_out=200_000, currency="EUR",
                  issued_ms=now_ms, expires_ms=now_ms + 60_000)
    fields.update(overrides)
    ticket = Ticket(**fields)
    return ticket, ticket.seal(gateway)


def receipt_fields(provider: SigningKey, request_id: str, tokens_in: int = 17, tokens_out: int = 38,
                   **overrides) -> dict:
    fields = dict(request_id=request_id, ticket_sha256=sha256(request_id.encode()), gateway_key=bytes(32),
                  tenant="t_test", provider_key=provider.public_key, model_id=MODEL_ID, model_sha256=MODEL_SHA256,
                  engine_build="test-build", seed=42, sampling_sha256=sampling_sha256(SAMPLING),
                  tokens_in=tokens_in, tokens_out=tokens_out, accepted_ms=1_000, first_token_ms=1_010,
                  finished_ms=1_200, price_in=100_000, price_out=200_000, currency="EUR",
                  amount=amount_minor(tokens_in, tokens_out, 100_000, 200_000), prompt_commitment=bytes(32),
                  output_sha256=sha256(b"output"), finish_reason="stop")
    fields.update(overrides)
    return fields


def write_ledger_file(path, key: SigningKey, entries: int, checkpoint_every: int = 64, tree: bool = False) -> list[str]:
    """A valid ledger SQLite file of ``entries`` signed receipts with a signed checkpoint every ``checkpoint_every``
    entries, written directly (one transaction, no node): fast enough for 100,000 entries. The derived ``tree``
    table is left empty (the auditor and export never read it) unless ``tree`` (a node opening the file needs it).
    Returns the request ids in ledger order."""
    import sqlite3

    from llorch.ledger import merkle
    from llorch.ledger.note import Checkpoint, sign_checkpoint
    from llorch.ledger.objects import Receipt, ledger_origin, with_chain
    from llorch.ledger.store import SCHEMA, TRIGGERS

    origin = ledger_origin(key.public_key)
    compact, previous, request_ids = merkle.CompactRange(), bytes(32), []
    connection = sqlite3.connect(path)
    try:
        connection.execute("PRAGMA journal_mode=WAL")
        connection.executescript(SCHEMA + TRIGGERS)
        with connection:
            for index in range(entries):
                request_id = f"req-{index:010d}"
                fields = with_chain({**receipt_fields(key, request_id), "v": VERSION, "origin": origin},
                                    index, previous)
                entry = Receipt(**fields).seal(key)
                previous = sha256(entry)
                compact.append(merkle.leaf_hash(entry), None if not tree else lambda level, at, hash_:
                               connection.execute("INSERT INTO tree VALUES (?, ?, ?)", (level, at, hash_)))
                connection.execute("INSERT INTO entries VALUES (?, ?, ?, ?)", (index, request_id, entry, previous))
                request_ids.append(request_id)
                if compact.size % checkpoint_every == 0 or index == entries - 1:
                    note = sign_checkpoint(Checkpoint(origin, compact.size, compact.root()), key)
                    connection.execute("INSERT INTO checkpoints VALUES (?, ?)", (compact.size, note))
    finally:
        connection.close()
    return request_ids


def peak_rss_kib(command: list[str], **run_options):
    """Run ``command`` in a child of a fresh interpreter and return (its CompletedProcess, the peak resident set
    size in KiB of the command and every process it waited for, e.g. a worker pool), read from getrusage."""
    import json
    import subprocess
    import sys

    wrapper = ("import json, resource, subprocess, sys\n"
               "done = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
               "print(json.dumps([done.returncode, done.stdout, done.stderr,\n"
               "                  resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss]))\n")
    outer = subprocess.run([sys.executable, "-c", wrapper, *map(str, command)], capture_output=True, text=True,
                           check=True, **run_options)
    returncode, stdout, stderr, peak_kib = json.loads(outer.stdout)
    return subprocess.CompletedProcess(command, returncode, stdout, stderr), peak_kib
