"""Durable append rate of the ledger (synchronous=FULL, group commit) with 32 concurrent appenders, against one
appender at a time (no batching possible), measured in the same run.

    .venv/bin/python bench/ledger_append.py [--receipts 20000] [--appenders 32]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import trio

from llorch.ledger.objects import amount_minor
from llorch.ledger.signing import SigningKey, sha256
from llorch.ledger.store import LedgerStore
from llorch.ledger.verify import load_material, verify

MODEL_SHA256 = bytes.fromhex("b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53")


def fields(key: SigningKey, request_id: str) -> dict:
    return dict(request_id=request_id, ticket_sha256=sha256(request_id.encode()), gateway_key=bytes(32),
                tenant="t_bench", provider_key=key.public_key, model_id="smollm2-135m-instruct-q4_1",
                model_sha256=MODEL_SHA256, engine_build="bench", seed=1, sampling_sha256=bytes(32), tokens_in=17,
                tokens_out=38, accepted_ms=1, first_token_ms=2, finished_ms=3, price_in=100_000, price_out=200_000,
                currency="EUR", amount=amount_minor(17, 38, 100_000, 200_000), prompt_commitment=bytes(32),
                output_sha256=bytes(32), finish_reason="stop")


async def run(path: Path, receipts: int, appenders: int) -> tuple[float, int]:
    key = SigningKey.generate()
    async with LedgerStore.open(path, key) as ledger:
        start = time.perf_counter()

        async def appender(worker: int) -> None:
            for n in range(worker, receipts, appenders):
                await ledger.append(fields(key, f"req-{n:010d}"))

        async with trio.open_nursery() as nursery:
            for worker in range(appenders):
                nursery.start_soon(appender, worker)
        elapsed = time.perf_counter() - start
        return receipts / elapsed, ledger.batches_committed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--receipts", type=int, default=20_000)
    parser.add_argument("--appenders", type=int, default=32)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="llorch-bench-") as scratch:
        single_n = max(200, args.receipts // 20)
        single, _ = trio.run(run, Path(scratch) / "single.sqlite", single_n, 1)
        rate, batches = trio.run(run, Path(scratch) / "group.sqlite", args.receipts, args.appenders)
        assert verify(load_material(Path(scratch) / "group.sqlite")).entries == args.receipts
    print(f"one appender at a time : {single:8.0f} durable signed receipts/s ({single_n} receipts)")
    print(f"{args.appenders} concurrent appenders : {rate:8.0f} durable signed receipts/s ({args.receipts} receipts, "
          f"{batches} transactions, {args.receipts / batches:.1f} receipts per fsync)")
    print(f"group commit speed-up : {rate / single:.1f}x   (target: >= 5000 receipts/s with 32 appenders)")


if __name__ == "__main__":
    main()
