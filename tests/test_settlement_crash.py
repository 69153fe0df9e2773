"""SIGKILL the gateway at each step between signing a ticket and settling it (tests/crash_gateway.py runs it as a
real process, with a provider in another process). After the crash, a restarted gateway witnesses the provider and
reconciles: no honest provider is reported for a receipt without a ticket (tickets are durable before they are
sent), ``--post`` settles what was never settled, and nothing is ever billed twice.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio

from llorch.gateway.witness.witness import Witness
from llorch.ledger.errors import StoreError
from llorch.ledger.signing import SigningKey, load_key_file, write_key_file
from llorch.ledger.verify import read_sqlite_entries
from llorch.ledger.objects import Receipt
from llorch.node.wire.attestation import Attestation
from tests.crash_gateway import STEPS
from tests.inprocess import market_gateway

ROOT = Path(__file__).resolve().parent.parent


def spawn(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tests.crash_gateway", *args], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


async def restart_and_reconcile(workdir: Path) -> tuple[dict, dict, list, list]:
    """A new gateway process's view: one witness round of the provider, then reconcile, --post, --post again."""
    key = load_key_file(workdir / "gateway.key")
    attestation = Attestation.from_envelope(bytes.fromhex(json.loads(
        (workdir / "provider.json").read_text())["attestation"]))
    async with market_gateway(workdir, key) as m:
        witness = Witness(m.gateway.p2p, key, m.gateway.witness_book, lambda provider_key: None)
        with trio.fail_after(20):
            while (await witness.witness(attestation.provider_key, list(attestation.addrs))) is None or \
                    (await m.gateway.witness_book.state(attestation.provider_key)).size < \
                    len(list(read_sqlite_entries(workdir / "provider.sqlite"))):
                await trio.sleep(0.2)
        before = (await m.reconcile(grace_ms=0)).as_json()
        posted = (await m.reconcile(post=True, grace_ms=0)).as_json()
        legs = await m.rows("SELECT request_id, leg, debit, credit, amount FROM postings ORDER BY request_id, leg")
        again = (await m.reconcile(post=True, grace_ms=0)).as_json()
        assert again["posted"] == 0
        assert await m.rows("SELECT request_id, leg, debit, credit, amount FROM postings "
                            "ORDER BY request_id, leg") == legs, "a second --post billed again"
        states = await m.rows("SELECT state, outcome FROM tickets")
        return before, posted, legs, states


@pytest.mark.parametrize("step", STEPS)
def test_a_gateway_killed_between_ticket_and_settlement_never_blames_a_provider_or_bills_twice(tmp_path, step):
    write_key_file(tmp_path / "gateway.key", SigningKey.generate())
    write_key_file(tmp_path / "provider.key", SigningKey.generate())
    provider = spawn("provider", str(tmp_path))
    try:
        deadline = time.monotonic() + 30
        while not (tmp_path / "provider.json").exists():
            assert provider.poll() is None and time.monotonic() < deadline, provider.stderr.read()
            time.sleep(0.1)
        gateway = spawn("gateway", str(tmp_path), step)
        _, errors = gateway.communicate(timeout=60)
        assert gateway.returncode == -signal.SIGKILL, errors
        time.sleep(0.5)                      # the provider notices the gateway is gone and records its receipt
        before, posted, legs, states = trio.run(restart_and_reconcile, tmp_path)
    finally:
        provider.kill()
        provider.wait(timeout=10)
    kinds = [f["kind"] for f in before["findings"]]
    assert "receipt_without_ticket" not in kinds, before
    assert all(state == "settled" for state, _ in states), states
    assert posted["ok"], posted
    receipts = [Receipt.from_envelope(e) for e in read_sqlite_entries(tmp_path / "provider.sqlite")]
    if step == "settled":                    # settled live: the customer paid, --post changed nothing
        assert posted["posted"] == 0 and {leg for _, leg, *_ in legs} == {"payout", "fee"}
    elif receipts:                           # the gateway lost it: the platform pays the provider, the customer not
        assert "unbilled" in kinds and posted["posted"] == 1
        assert [(leg, debit) for _, leg, debit, _, _ in legs] == [("payout", "platform:fees")]
    else:                                    # the provider never served: nothing to bill
        assert legs == []
    assert len({request_id for request_id, *_ in legs}) <= 1


async def test_a_failing_disk_during_settlement_and_during_reconcile_post_half_writes_nothing(tmp_path):
    """The gateway database stops taking writes after the ticket is written (PRAGMA query_only: every write fails,
    as on a full or failing disk, where SQLite's own page limit would still let small rows into free space): the
    live settlement fails and leaves the ticket open; `reconcile --post` while writes still fail settles nothing and
    writes nothing; once writes work again it settles the ticket exactly once."""
    from tests.inprocess import market

    async with market(tmp_path, {"a": {}}) as m:
        async def break_the_disk(*_piece) -> None:
            await m.database.execute("PRAGMA query_only = 1")

        await m.complete("acme", {"messages": [{"role": "user", "content": "hello there"}], "max_tokens": 3},
                         on_text=break_the_disk)
        assert await m.rows("SELECT state FROM tickets") == [("issued",)]
        assert await m.rows("SELECT COUNT(*) FROM postings") == [(0,)]
        await m.database.execute("PRAGMA query_only = 0")
        await m.witness_all()
        await break_the_disk()
        with pytest.raises(StoreError, match="readonly"):
            await m.reconcile(post=True, grace_ms=0)
        assert await m.rows("SELECT state FROM tickets") == [("issued",)]
        assert await m.rows("SELECT COUNT(*) FROM postings") == [(0,)]
        await m.database.execute("PRAGMA query_only = 0")
        assert (await m.reconcile(post=True, grace_ms=0)).as_json()["posted"] == 1
        assert (await m.reconcile(post=True, grace_ms=0)).as_json()["posted"] == 0
        assert await m.rows("SELECT state, outcome FROM tickets") == [("settled", "gateway_lost")]
        assert [leg for leg, in await m.rows("SELECT leg FROM postings")] == ["payout"]    # once: the platform pays
