"""Helper process for the crash test: append receipts from 8 concurrent tasks forever, printing each request_id as
soon as its append is acknowledged (durable). Usage: python tests/crash_writer.py LEDGER SEED_HEX RUN"""

import sys

import trio

from llorch.ledger.signing import SigningKey
from llorch.ledger.store import LedgerStore
from tests.helpers import receipt_fields


async def main(path: str, seed_hex: str, run: int) -> None:
    key = SigningKey(bytes.fromhex(seed_hex))
    async with LedgerStore.open(path, key) as ledger:
        async def appender(worker: int) -> None:
            for n in range(10**9):
                request_id = f"req-{run:02d}-{worker}-{n:07d}"
                await ledger.append(receipt_fields(key, request_id))
                sys.stdout.write(request_id + "\n")
                sys.stdout.flush()

        async with trio.open_nursery() as nursery:
            for worker in range(8):
                nursery.start_soon(appender, worker)


if __name__ == "__main__":
    trio.run(main, sys.argv[1], sys.argv[2], int(sys.argv[3]))
