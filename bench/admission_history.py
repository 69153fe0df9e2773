"""Authentication + admission latency against a long billing history: a gateway database holding N postings
(default 1,000,000, half of them the measured tenant's), against the same steps on an empty database, in the same
run. Admission reads the tenant's spend from the books, so without the running balance its cost grows with history.

    .venv/bin/python bench/admission_history.py [--postings 1000000] [--rounds 2000]

One process, one core (trio + the SQLite thread); nothing else runs beside it.
"""

from __future__ import annotations

import argparse
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path

import trio

from llorch.gateway.books.postings import Books
from llorch.gateway.books.receipts import ReceiptBook
from llorch.gateway.config import GatewayConfig
from llorch.gateway.db import open_gateway_db
from llorch.gateway.market.directory import ProviderDirectory
from llorch.gateway.market.providers import ProviderBook
from llorch.gateway.market.tenants import TenantBook
from llorch.gateway.service import Gateway
from llorch.gateway.witness.witness import WitnessBook
from llorch.ledger.signing import SigningKey


def fill(path: Path, postings: int) -> None:
    """N legs (payout and fee pairs), half debiting the measured tenant, through the real schema and triggers."""
    with sqlite3.connect(path) as db:
        rows = ((f"request-{n // 2:09d}", "payout" if n % 2 == 0 else "fee",
                 "tenant:measured" if n % 4 < 2 else "tenant:other",
                 "provider:bench" if n % 2 == 0 else "platform:fees", 3, "EUR", "2026-11",
                 "measured" if n % 4 < 2 else "other", "bench", "m", 10, 10, 4000, n)
                for n in range(postings))
        db.executemany("INSERT INTO postings (request_id, leg, debit, credit, amount, currency, period, tenant, "
                       "provider_id, model_id, tokens_in, tokens_out, margin_bp, posted_ms) "
                       "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)


async def measure(path: Path, postings: int, rounds: int) -> list[float]:
    async with open_gateway_db(path) as database:
        tenants = TenantBook(database)
        if await tenants.get("measured") is None:
            key = await tenants.add("measured", "hobby", 10**15, False, False, None, None, None, 0)
            Path(str(path) + ".key").write_text(key)
        if postings:
            await trio.to_thread.run_sync(fill, path, postings)
        api_key = Path(str(path) + ".key").read_text()
        config = GatewayConfig(key_file=path.parent / "unused", db_path=path)
        gateway = Gateway(config, SigningKey.generate(), None, ProviderDirectory(), ReceiptBook(database), tenants,
                          ProviderBook(database), Books(database), WitnessBook(database))
        header = f"Bearer {api_key}"
        samples = []
        for n in range(rounds):
            started = time.perf_counter()
            tenant = await gateway.authenticate(header)
            quota = await gateway.admit(tenant, f"r{n}", 1_000)
            samples.append((time.perf_counter() - started) * 1000)
            quota.settle(f"r{n}", 0)
        return samples


def summary(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    return statistics.median(ordered), ordered[int(len(ordered) * 0.99) - 1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--postings", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=2_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        empty, full = Path(workdir) / "empty.sqlite", Path(workdir) / "full.sqlite"
        base = trio.run(measure, empty, 0, args.rounds)
        started = time.perf_counter()
        history = trio.run(measure, full, args.postings, args.rounds)
        print(f"filled {args.postings:,} postings in {time.perf_counter() - started:.1f} s")
    (base_p50, base_p99), (p50, p99) = summary(base), summary(history)
    print(f"authenticate + admit, empty books:        p50 {base_p50:.3f} ms  p99 {base_p99:.3f} ms")
    print(f"authenticate + admit, {args.postings:,} postings: p50 {p50:.3f} ms  p99 {p99:.3f} ms  "
          f"(ratio p50 {p50 / base_p50:.2f})")


if __name__ == "__main__":
    main()
