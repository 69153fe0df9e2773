"""A payout run over a real market (real llama.cpp, real libp2p, the gateway's SQLite books), as an operator and a
provider run it from the CLI: `llorch billing payouts run` on this month, its SEPA file validated against the official
XSD by the test itself, the provider's statement checked against its own ledger with `llorch ledger check-payout`
(and failing when one line is changed or a receipt is left out, re-signed with the gateway's own key), a second run
paying nothing, mark-paid and mark-failed; and a run SIGKILLed at any moment happened whole or not at all."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import time
import urllib.request
from decimal import Decimal
from pathlib import Path
from xml.etree import ElementTree

import pytest
import sepaxml
import xmlschema

from llorch.gateway.localnet import LocalNetwork, llorch_command
from llorch.ledger.payout import PayoutStatement
from llorch.ledger.signing import load_key_file
from tests.helpers import MODEL_ID

pytestmark = pytest.mark.e2e
XSD = Path(sepaxml.__file__).parent / "schemas" / "pain.001.001.09.xsd"
NS = {"p": "urn:iso:std:iso:20022:tech:xsd:pain.001.001.09"}


@pytest.fixture(scope="module")
def market(tmp_path_factory, model_path):
    net = LocalNetwork(tmp_path_factory.mktemp("payouts"))
    net.start_gateway()
    state = net.start_node("lab", threads=2, price_in=1_000_000_000, price_out=1_000_000_000)   # 1,000 EUR per 1M
    net.wait_for_providers(1)
    for seed in range(3):
        request = urllib.request.Request(
            net.http_url + "/v1/chat/completions",
            json.dumps({"model": MODEL_ID, "seed": seed, "max_tokens": 6,
                        "messages": [{"role": "user", "content": "Say hello."}]}).encode(),
            {"Content-Type": "application/json", "Authorization": f"Bearer {net.api_key}"})
        with urllib.request.urlopen(request, timeout=120) as response:
            assert response.status == 200
    deadline = time.monotonic() + 60                  # the witness has every receipt under a cosigned checkpoint
    while witnessed(net, state["peer_id"]) < 3:
        assert time.monotonic() < deadline, "the witness did not catch up"
        time.sleep(0.3)
    with sqlite3.connect(net.workdir / "gateway.sqlite") as books, \
            sqlite3.connect(net.workdir / "before-payouts.sqlite") as copy:
        books.backup(copy)                            # the books before any run, for the kill test
    try:
        yield net, state["peer_id"]                   # no more requests: nothing moves under the runs
    finally:
        net.stop()


def status_admin_url(net: LocalNetwork) -> str:
    return (net.workdir / "lab.ledger.sqlite.admin-url").read_text().strip()


def witnessed(net: LocalNetwork, peer: str) -> int:
    from llorch.ledger.signing import public_key_of_peer_id
    with sqlite3.connect(net.workdir / "gateway.sqlite") as database:
        row = database.execute("SELECT size FROM witnessed WHERE provider_key = ?",
                               (public_key_of_peer_id(peer),)).fetchone()
    return row[0] if row else 0


def llorch(net: LocalNetwork, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(llorch_command() + list(args), cwd=net.workdir, capture_output=True, text=True, timeout=120)


def this_month() -> str:
    return time.strftime("%Y-%m", time.gmtime())


def test_a_run_pays_from_the_books_and_the_provider_checks_its_statement_against_its_ledger(market):
    net, peer = market
    out = net.workdir / "payouts"
    dry = llorch(net, "billing", "payouts", "run", "--config", "gateway.toml", "--month", this_month(), "--min", "0",
                 "--out", str(out), "--dry-run")
    assert dry.returncode == 0 and json.loads(dry.stdout)["dry_run"] is True, dry.stderr
    assert not out.exists() or not any(out.iterdir())                   # a dry run writes nothing
    done = llorch(net, "billing", "payouts", "run", "--config", "gateway.toml", "--month", this_month(), "--min",
                  "0", "--out", str(out))
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    run_id = report["run_id"]
    (item,) = report["items"]
    assert item["provider_id"] == peer and item["receipts"] == 3 and item["account"].startswith("DE12 ••••")

    # The SEPA file: valid against the official XSD (loaded here, independently of the rail), its total the postings'.
    (xml_file,) = (out / run_id).glob("*.pain.001.001.09.xml")
    xmlschema.XMLSchema(str(XSD)).validate(str(xml_file))
    tree = ElementTree.parse(xml_file)
    control = Decimal(tree.find("p:CstmrCdtTrfInitn/p:GrpHdr/p:CtrlSum", NS).text)
    with sqlite3.connect(net.workdir / "gateway.sqlite") as database:
        (posted,) = database.execute("SELECT SUM(amount) FROM postings WHERE leg = 'payout-run' AND request_id LIKE ?",
                                     (f"payout:{run_id}:%",)).fetchone()
        (earned,) = database.execute("SELECT SUM(amount) FROM postings WHERE credit = ? AND leg <> "
                                     "'payout-returned'", (f"provider:{peer}",)).fetchone()
    assert control == Decimal(posted).scaleb(-6) == Decimal(item["paid_minor"]).scaleb(-6)
    assert item["paid_minor"] + item["carried_minor"] == earned and item["carried_minor"] < 10_000   # whole cents
    assert "DE12500105170648489890" in xml_file.read_text()              # the full IBAN only in the run's file
    listed = llorch(net, "billing", "payouts", "show", run_id, "--config", "gateway.toml")
    assert "DE12500105170648489890" not in listed.stdout and "•••• 9890" in listed.stdout

    # The provider's check, offline, against its own ledger.
    statement_file = out / run_id / "statements" / f"{peer}.statement"
    ledger = net.workdir / "lab.ledger.sqlite"
    checked = llorch(net, "ledger", "check-payout", str(statement_file), "--ledger", str(ledger))
    assert checked.returncode == 0 and checked.stdout.startswith("OK: "), checked.stdout + checked.stderr

    key = load_key_file(net.workdir / "gateway.key")
    statement = PayoutStatement.from_envelope(statement_file.read_bytes())
    changed = [[index, request_id, amount + 1 if n == 1 else amount]
               for n, (index, request_id, amount) in enumerate(statement.lines)]
    forged = _resigned(statement, key, changed, net.workdir / "changed.statement")
    refused = llorch(net, "ledger", "check-payout", str(forged), "--ledger", str(ledger))
    assert refused.returncode == 1 and "more than the receipt's" in refused.stderr, refused.stderr
    left_out = _resigned(statement, key, statement.lines[:-1], net.workdir / "left_out.statement")
    refused = llorch(net, "ledger", "check-payout", str(left_out), "--ledger", str(ledger), "--month-edge-minutes",
                     "0")
    assert refused.returncode == 1 and "no line pays it" in refused.stderr, refused.stderr
    unreadable = llorch(net, "ledger", "check-payout", str(xml_file), "--ledger", str(ledger))
    assert unreadable.returncode == 2 and "Traceback" not in unreadable.stderr

    # The provider sees it: its node asks the gateway at start (and every minute), `node status` and its dashboard
    # show the unpaid balance, the minimum, the next run and the statement.
    net.restart_node("lab")
    deadline = time.monotonic() + 60
    while True:
        status = json.loads(llorch(net, "node", "status", "--config", "lab.toml", "--json").stdout or "{}")
        listing = (status.get("gateways") or [{}])[0].get("listing") or {}
        if (listing.get("payouts") or {}).get("statements") or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    payouts = listing["payouts"]
    assert payouts["statements"] == [{"run_id": run_id, "month": this_month(), "paid": item["paid_minor"],
                                      "carried": item["carried_minor"], "state": "sent"}]
    assert (payouts["balance"], payouts["minimum"]) == (item["carried_minor"], 10_000_000)
    assert time.gmtime(payouts["next_run_ms"] // 1000).tm_mday == 5 and payouts["account"].endswith("9890")
    text = llorch(net, "node", "status", "--config", "lab.toml").stdout
    assert f"payouts: {item['carried']} unpaid" in text and "at least 10.00 EUR" in text and run_id in text, text
    with urllib.request.urlopen(status_admin_url(net) + "/", timeout=10) as page:
        html = page.read().decode()
    assert f'<th class="mono">{run_id}</th>' in html and 'id="unpaid"' in html

    # The same month again pays nothing; the bank's answers.
    again = llorch(net, "billing", "payouts", "run", "--config", "gateway.toml", "--month", this_month(), "--min",
                   "0", "--out", str(out))
    assert again.returncode == 0 and "nothing new to state or pay" in again.stderr, again.stderr
    failed = llorch(net, "billing", "payouts", "mark-failed", run_id, peer, "--config", "gateway.toml")
    assert failed.returncode == 0 and json.loads(failed.stdout)["returned_minor"] == item["paid_minor"]
    repaid = llorch(net, "billing", "payouts", "run", "--config", "gateway.toml", "--month", this_month(), "--min",
                    "0", "--out", str(out))
    (item2,) = json.loads(repaid.stdout)["items"]
    assert item2["paid_minor"] == item["paid_minor"]                     # the returned amount is paid again
    statement2 = PayoutStatement.from_envelope(
        (out / json.loads(repaid.stdout)["run_id"] / "statements" / f"{peer}.statement").read_bytes())
    assert statement2.lines == [] and statement2.totals["brought_forward"] == earned
    paid = llorch(net, "billing", "payouts", "mark-paid", json.loads(repaid.stdout)["run_id"], "--config",
                  "gateway.toml")
    assert paid.returncode == 0 and json.loads(paid.stdout)["state"] == "paid"
    runs = json.loads(llorch(net, "billing", "payouts", "list", "--config", "gateway.toml").stdout)
    assert [(r["state"], r["failed_minor"]) for r in runs] == [("sent", item["paid_minor"]), ("paid", 0)]
    console = operator_console(net)                                   # the operator console shows the runs
    for run in runs:
        assert f'data-run="{run["run_id"]}" data-total="{run["total_minor"]}"' in console


def operator_console(net: LocalNetwork) -> str:
    import http.client
    import urllib.parse
    token = llorch(net, "gateway", "operator-token", "--config", "gateway.toml").stdout.strip()
    port = int(net.http_url.rsplit(":", 1)[1])
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    connection.request("POST", "/operator/sign-in", urllib.parse.urlencode({"token": token}),
                       {"Content-Type": "application/x-www-form-urlencoded", "Origin": net.http_url})
    signed_in = connection.getresponse()
    signed_in.read()
    cookie = (signed_in.getheader("Set-Cookie") or "").split(";")[0]
    connection.request("GET", "/operator", headers={"Cookie": cookie})
    page = connection.getresponse()
    assert page.status == 200, page.status
    return page.read().decode()


def _resigned(statement: PayoutStatement, key, lines: list, path: Path) -> Path:
    """The statement with other lines, its sums made to hold again and signed with the gateway's key: what a
    gateway that lies (not a forger) would send."""
    import dataclasses
    earned = sum(line[2] for line in lines)
    totals = {**statement.totals, "earned": earned}
    totals["carried_forward"] = totals["brought_forward"] + earned - totals["corrected"] - totals["paid"]
    path.write_bytes(dataclasses.replace(statement, lines=lines, totals=totals).seal(key))
    return path


def test_a_run_killed_at_any_moment_happened_whole_or_not_at_all(market, tmp_path):
    net, peer = market
    workdir = tmp_path / "copy"
    workdir.mkdir()
    for name in ("gateway.toml", "gateway.key"):                         # a copy: the first test's runs stay apart
        (workdir / name).write_bytes((net.workdir / name).read_bytes())
    with sqlite3.connect(net.workdir / "before-payouts.sqlite") as source, \
            sqlite3.connect(workdir / "gateway.sqlite") as copy:
        source.backup(copy)
    os.chmod(workdir / "gateway.key", 0o600)
    out = workdir / "out"
    for delay in (0.3, 0.9, 1.6, 2.4):                               # before, during and after the commit
        run = subprocess.Popen(llorch_command() + ["billing", "payouts", "run", "--config", "gateway.toml", "--month",
                                                   this_month(), "--min", "0", "--out", str(out)],
                               cwd=workdir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        run.send_signal(signal.SIGKILL)
        run.wait()
        _whole_or_nothing(workdir)
    finished = subprocess.run(llorch_command() + ["billing", "payouts", "run", "--config", "gateway.toml", "--month",
                                                  this_month(), "--min", "0", "--out", str(out)],
                              cwd=workdir, capture_output=True, text=True, timeout=120)
    assert finished.returncode == 0, finished.stderr
    runs = _whole_or_nothing(workdir)
    assert len(runs) == 1                                               # paid once, whatever the kills did
    (run_id,) = runs
    assert (out / run_id / "statements" / f"{peer}.statement").is_file()   # every file of the run is in place
    assert list((out / run_id).glob("*.pain.001.001.09.xml")) and not list(out.glob(".*.partial"))


def _whole_or_nothing(workdir: Path) -> list[str]:
    """Every recorded run has its items, files and payout legs; nothing of an unrecorded one is in the books."""
    with sqlite3.connect(workdir / "gateway.sqlite") as database:
        runs = [row[0] for row in database.execute("SELECT run_id FROM payout_runs")]
        for run_id in runs:
            (total,) = database.execute("SELECT total_minor FROM payout_runs WHERE run_id = ?", (run_id,)).fetchone()
            (legs,) = database.execute("SELECT COALESCE(SUM(amount), 0) FROM postings WHERE request_id LIKE ? AND "
                                       "leg = 'payout-run'", (f"payout:{run_id}:%",)).fetchone()
            (items,) = database.execute("SELECT COUNT(*) FROM payout_items WHERE run_id = ?", (run_id,)).fetchone()
            (files,) = database.execute("SELECT COUNT(*) FROM payout_files WHERE run_id = ?", (run_id,)).fetchone()
            assert total == legs > 0 and items == 1 and files == 1, run_id
        (stray,) = database.execute("SELECT COUNT(*) FROM postings WHERE leg = 'payout-run' AND request_id NOT IN "
                                    "(SELECT 'payout:' || i.run_id || ':' || i.provider_id FROM payout_items i)"
                                    ).fetchone()
        assert stray == 0
    return runs
