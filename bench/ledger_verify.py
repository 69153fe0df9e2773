"""Speed of `llorch ledger verify` on a 100,000-receipt ledger, as a fraction of this machine's raw Ed25519
verification rate measured in the same run (one signature check per receipt is the floor any verifier pays).

    .venv/bin/python bench/ledger_verify.py [--receipts 100000]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

sys.path.insert(0, str(Path(__file__).parent))
from ledger_append import fields  # noqa: E402

from llorch.ledger.signing import SigningKey  # noqa: E402
from llorch.ledger.store import LedgerStore  # noqa: E402


async def build(path: Path, receipts: int) -> None:
    key = SigningKey.generate()
    async with LedgerStore.open(path, key) as ledger:
        async def appender(worker: int) -> None:
            for n in range(worker, receipts, 64):
                await ledger.append(fields(key, f"req-{n:010d}"))

        async with trio.open_nursery() as nursery:
            for worker in range(64):
                nursery.start_soon(appender, worker)
        await ledger.sign_checkpoint()


def raw_ed25519_rate(count: int) -> float:
    private = Ed25519PrivateKey.generate()
    public = private.public_key()
    messages = [b"llorch/receipt/v1\x00" + n.to_bytes(8, "big") * 90 for n in range(count)]   # receipt-sized
    signatures = [private.sign(m) for m in messages]
    start = time.perf_counter()
    for message, signature in zip(messages, signatures):
        public.verify(signature, message)
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--receipts", type=int, default=100_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="llorch-bench-") as scratch:
        path = Path(scratch) / "ledger.sqlite"
        trio.run(build, path, args.receipts)
        raw_before = raw_ed25519_rate(20_000)
        start = time.perf_counter()
        result = subprocess.run([sys.executable, "-m", "llorch.gateway", "ledger", "verify", str(path)],
                                capture_output=True, text=True)
        elapsed = time.perf_counter() - start
        raw_after = raw_ed25519_rate(20_000)
    assert result.returncode == 0, result.stderr
    raw = (raw_before + raw_after) / 2
    rate = args.receipts / elapsed
    print(f"raw Ed25519 verify (this machine, one core): {raw:8.0f} signatures/s")
    print(f"llorch ledger verify, {args.receipts} receipts     : {rate:8.0f} receipts/s ({elapsed:.2f} s, whole command)")
    print(f"ratio: {rate / raw:.2f}   (target >= 0.8)")


if __name__ == "__main__":
    main()
