"""Time and peak RSS of a payout run over 1,000 providers and 10,000,000 receipts' worth of postings, and of
`llorch ledger check-payout` on a 100,000-entry ledger, each against a baseline measured in the same run.

Payout run: a gateway database (SQLite, every migration applied) is filled directly, as the gateway would have
written it over a month: 1,000 providers registered with a payout account, and for each receipt its two legs
(payout and fee) in `postings` and its witnessed ledger entry in `provider_entries`. Then `llorch billing payouts run
--month 2026-11 --min 1.00 --out DIR` runs as a subprocess (one process, its peak RSS from wait4). Baselines: one
read of every posting (`SELECT credit, SUM(amount) FROM postings GROUP BY credit`), the least any payout run reads,
and the same command's start-up (`payouts list`: imports, the database opened).

check-payout: a provider's ledger of 100,000 real signed receipts (LedgerStore), the statement a run would send
for all of them (signed by a gateway key), `llorch ledger check-payout STATEMENT --ledger LEDGER`. Baseline: `llorch
ledger verify LEDGER` on the same ledger (which also checks every receipt's signature).

    .venv/bin/python bench/payouts.py [--providers 1000] [--receipts 10000000] [--ledger-entries 100000]
    .venv/bin/python bench/payouts.py --short          # 100 providers, 200,000 receipts, a 20,000-entry ledger

Both subprocesses use one core; nothing else runs beside them on the 2 cores.
"""

from __future__ import annotations

import argparse
import calendar
import multiprocessing
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).parent))

from ledger_append import fields  # noqa: E402

from llorch.gateway.books import postings  # noqa: E402
from llorch.gateway.db import open_gateway_db  # noqa: E402
from llorch.ledger import merkle  # noqa: E402
from llorch.ledger.objects import VERSION, Receipt  # noqa: E402
from llorch.ledger.payout import PayoutStatement  # noqa: E402
from llorch.ledger.signing import SigningKey, open_envelope, write_key_file  # noqa: E402
from llorch.ledger.store import LedgerStore  # noqa: E402
from llorch.node.wire.registration import Registration  # noqa: E402

MONTH = "2026-11"
MONTH_START_MS = calendar.timegm((2026, 11, 1, 0, 0, 0)) * 1000
PAYOUT_MINOR, FEE_MINOR = 9_100, 6_067                  # one receipt's legs: 17 + 38 tokens at 0.10 / 0.20 EUR per 1M
RUN_RATIO_MAX = 10.0           # a run may read the postings a few times over (per provider, joined to the ledger)
RSS_MAX_MIB = 1024
CHECK_RATIO_MAX = 1.0          # check-payout reads the ledger once and checks no receipt signature: under verify
LLORCH = [sys.executable, "-m", "llorch.gateway"]


def measured(command: list[str], cwd: Path) -> tuple[float, int, subprocess.CompletedProcess]:
    """Wall seconds and peak RSS (KiB) of one subprocess (from wait4: its own, not its siblings')."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        started = time.perf_counter()
        process = subprocess.Popen(command, cwd=cwd, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - started
        process.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return seconds, usage.ru_maxrss, subprocess.CompletedProcess(command, process.returncode, out.read(),
                                                                      err.read())


def fill_books(workdir: Path, providers: int, receipts: int) -> None:
    gateway = SigningKey(bytes(range(32, 64)))
    write_key_file(workdir / "gateway.key", gateway)
    (workdir / "gateway.toml").write_text(
        '[gateway]\nkey_file = "gateway.key"\ndb_path = "gateway.sqlite"\n'
        'payout_debtor_name = "llorch bench platform"\npayout_debtor_iban = "DE89370400440532013000"\n'
        'payout_debtor_bic = "COBADEFFXXX"\n')

    async def migrate() -> None:
        async with open_gateway_db(workdir / "gateway.sqlite"):
            pass
    trio.run(migrate)
    keys = [SigningKey(n.to_bytes(4, "big") * 8) for n in range(1, providers + 1)]
    database = sqlite3.connect(workdir / "gateway.sqlite", isolation_level=None)
    database.execute("PRAGMA journal_mode = OFF")                      # a bulk load: nothing to roll back
    database.execute("PRAGMA synchronous = OFF")
    database.execute("PRAGMA cache_size = -2000000")
    database.execute("DROP TRIGGER postings_balance")                 # balances are rebuilt once, below
    database.execute("DROP INDEX postings_posted")                    # built once, below (inserted out of order)
    database.execute("BEGIN")
    for number, key in enumerate(keys):
        registration = Registration(
            v=VERSION, provider_key=key.public_key, provider_id=key.peer_id, endpoint=f"/p2p/{key.peer_id}",
            pricing={"currency": "EUR", "input_per_1m": 100_000, "output_per_1m": 200_000},
            capacity={"slots": 1, "gpus": 0, "vram_gb": 0}, sla={"uptime_ppm": 950_000, "ttft_ms": 2_000},
            geo={"country": "DE", "region": "eu-central"}, issued_ms=MONTH_START_MS,
            payout={"holder": f"Lab {number}", "iban": "DE12500105170648489890", "bic": None, "currency": "EUR"})
        database.execute("INSERT INTO providers (provider_id, provider_key, registration, status, geo_certified, "
                         "registered_ms, issued_ms) VALUES (?, ?, ?, 'approved', 1, ?, ?)",
                         (key.peer_id, key.public_key, registration.seal(key), MONTH_START_MS, MONTH_START_MS))
    per_provider = receipts // providers
    step_ms = (28 * 86_400_000) // max(1, receipts)
    for number, key in enumerate(keys):
        account = f"provider:{key.peer_id}"
        rows, entries = [], []
        for index in range(per_provider):
            request_id = f"chatcmpl-{number:06d}{index:018d}"
            posted = MONTH_START_MS + (index * providers + number) * step_ms
            rows.append((request_id, "payout", "tenant:acme", account, PAYOUT_MINOR, "EUR", MONTH, "acme",
                         key.peer_id, "m", 17, 38, 4000, posted))
            rows.append((request_id, "fee", "tenant:acme", "platform:fees", FEE_MINOR, "EUR", MONTH, "acme",
                         key.peer_id, "m", 17, 38, 4000, posted))
            entries.append((key.public_key, index, request_id, b""))
        database.executemany("INSERT INTO postings (request_id, leg, debit, credit, amount, currency, period, tenant, "
                             "provider_id, model_id, tokens_in, tokens_out, margin_bp, posted_ms) VALUES "
                             "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
        database.executemany("INSERT INTO provider_entries (provider_key, idx, request_id, entry) VALUES "
                             "(?, ?, ?, ?)", entries)
        database.execute("INSERT INTO witnessed (provider_key, size, root, head_hash, compact, note) VALUES "
                         "(?, ?, ?, ?, ?, ?)", (key.public_key, per_provider, bytes(32), bytes(32), b"", b""))
    database.execute("DELETE FROM account_balances")
    database.execute("INSERT INTO account_balances (account, debits, credits) SELECT account, SUM(d), SUM(c) FROM "
                     "(SELECT debit AS account, amount AS d, 0 AS c FROM postings UNION ALL "
                     "SELECT credit, 0, amount FROM postings) GROUP BY account")
    database.execute("COMMIT")
    database.executescript(postings.SCHEMA)                            # the trigger and index, as the gateway has them
    database.execute("PRAGMA journal_mode = WAL")
    database.close()


def baseline_scan(workdir: Path) -> float:
    database = sqlite3.connect(workdir / "gateway.sqlite")
    started = time.perf_counter()
    database.execute("SELECT credit, SUM(amount) FROM postings GROUP BY credit").fetchall()
    seconds = time.perf_counter() - started
    database.close()
    return seconds


async def build_ledger(path: Path, count: int) -> SigningKey:
    key = SigningKey.generate()
    async with LedgerStore.open(path, key) as ledger:
        async def appender(worker: int) -> None:
            for n in range(worker, count, 64):
                await ledger.append({**fields(key, f"req-{n:010d}"), "finished_ms": MONTH_START_MS + 86_400_000})

        async with trio.open_nursery() as nursery:
            for worker in range(64):
                nursery.start_soon(appender, worker)
    return key


def in_fresh_process(function, *args) -> None:
    """Run ``function`` in a new interpreter: the memory it takes is not inherited by the measured subprocesses
    (a forked child's peak RSS counts its parent's pages until it execs)."""
    child = multiprocessing.get_context("spawn").Process(target=function, args=args)
    child.start()
    child.join()
    if child.exitcode != 0:
        raise SystemExit(f"{function.__name__} failed ({child.exitcode})")


def ledger_and_statement(ledger: Path, entries: int, out: Path) -> None:
    provider = trio.run(build_ledger, ledger, entries)
    out.write_bytes(statement_for(ledger, provider))


def statement_for(ledger: Path, provider: SigningKey) -> bytes:
    gateway = SigningKey(bytes(range(32, 64)))
    database = sqlite3.connect(f"file:{ledger}?mode=ro", uri=True)
    tree = merkle.CompactRange()
    lines = []
    for (entry,) in database.execute("SELECT entry FROM entries ORDER BY idx"):
        tree.append(merkle.leaf_hash(entry))
        receipt = Receipt.from_payload(open_envelope(entry)[0])
        lines.append([receipt.index, receipt.request_id, receipt.amount])
    database.close()
    earned = sum(line[2] for line in lines)
    paid = earned // 10_000 * 10_000
    return PayoutStatement(
        v=VERSION, gateway_key=gateway.public_key, provider_key=provider.public_key, run_id=f"{MONTH}-1", month=MONTH,
        currency="EUR", issued_ms=MONTH_START_MS + 31 * 86_400_000, ticket_keys=[bytes(32)],
        checkpoint_size=tree.size, checkpoint_root=tree.root(), lines=lines, corrections=[],
        totals={"brought_forward": 0, "earned": earned, "corrected": 0, "paid": paid,
                "carried_forward": earned - paid}, account="DE12 •••• 9890").seal(gateway)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--providers", type=int, default=1_000)
    parser.add_argument("--receipts", type=int, default=10_000_000)
    parser.add_argument("--ledger-entries", type=int, default=100_000)
    parser.add_argument("--short", action="store_true")
    args = parser.parse_args()
    if args.short:
        args.providers, args.receipts, args.ledger_entries = 100, 200_000, 20_000
    verdicts = []
    with tempfile.TemporaryDirectory(prefix="llorch-bench-payouts-") as scratch:
        workdir = Path(scratch)
        started = time.perf_counter()
        in_fresh_process(fill_books, workdir, args.providers, args.receipts)
        print(f"books: {args.providers} providers, {args.receipts} receipts ({2 * args.receipts} legs) written in "
              f"{time.perf_counter() - started:.0f} s; database {os.path.getsize(workdir / 'gateway.sqlite') >> 20} "
              f"MiB", flush=True)
        scan = baseline_scan(workdir)
        startup, _, listed = measured(LLORCH + ["billing", "payouts", "list", "--config", "gateway.toml"], workdir)
        seconds, rss, done = measured(LLORCH + ["billing", "payouts", "run", "--config", "gateway.toml", "--month",
                                                MONTH, "--min", "1.00", "--out", str(workdir / "out")], workdir)
        if done.returncode != 0:
            print(done.stderr[-3000:])
            return 1
        print(f"payout run: {seconds:.1f} s, peak RSS {rss >> 10} MiB ({done.stderr.strip().splitlines()[-1]}); "
              f"baselines: one read of every posting {scan:.1f} s, the command's start-up (payouts list) "
              f"{startup:.1f} s")
        verdicts.append((seconds <= startup + RUN_RATIO_MAX * scan,
                         f"run {seconds:.1f} s <= start-up {startup:.1f} s + {RUN_RATIO_MAX:g} x one read of every "
                         f"posting {scan:.1f} s"))
        verdicts.append((rss >> 10 <= RSS_MAX_MIB, f"run peak RSS {rss >> 10} MiB <= {RSS_MAX_MIB} MiB"))

        ledger = workdir / "ledger.sqlite"
        in_fresh_process(ledger_and_statement, ledger, args.ledger_entries, workdir / "provider.statement")
        verify_s, _, verified = measured(LLORCH + ["ledger", "verify", str(ledger)], workdir)
        check_s, check_rss, checked = measured(LLORCH + ["ledger", "check-payout", "provider.statement", "--ledger",
                                                         str(ledger)], workdir)
        if checked.returncode != 0 or verified.returncode != 0:
            print(checked.stdout[-2000:], checked.stderr[-2000:], verified.stderr[-2000:])
            return 1
        print(f"check-payout on a {args.ledger_entries}-entry ledger: {check_s:.1f} s, peak RSS {check_rss >> 10} MiB; "
              f"baseline `ledger verify` {verify_s:.1f} s")
        verdicts.append((check_s <= CHECK_RATIO_MAX * verify_s, f"check-payout {check_s:.1f} s <= "
                                                                f"{CHECK_RATIO_MAX:g} x verify {verify_s:.1f} s"))
    for ok, text in verdicts:
        print(("PASS " if ok else "FAIL ") + text)
    return 0 if all(ok for ok, _ in verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())
