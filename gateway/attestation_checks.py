"""Attestations from gossip parsed and checked off trio's thread, in batches (issue 30).

Checking one attestation (canonical msgpack, every field, the addresses, the Ed25519 signature) is a pure function of
its bytes, the sender's key, the time and the accepted relays, and costs about 0.3 ms of CPU: 2,000 a second (10,000
busy providers whose slots change every few seconds) would take 60% of the event loop's core. ``AttestationChecks`` takes the checks the
GossipSub topic validator asks for (py-libp2p runs up to 10 asynchronous validations at once) and, while they come
in numbers, checks them in batches in a worker process: the event loop pays one thread hop and the pickling of a
batch (about 10 µs an attestation), the other core the checks. A worker *thread* saved the event loop little:
parsing holds the GIL (only the signature check releases it), and the hand-offs nearly doubled the process's CPU
(measured with bench/market_scale.py).

While checks come at fewer than 200 a second (a market of up to about 1,000 providers, the tests, the demo) they are
done inline, as before, and no worker process is started. A worker that dies is replaced; the batch it held is
checked inline.
"""

from __future__ import annotations

import logging
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field

import trio

from llorch.gateway import limits
from llorch.node.errors import AttestationRejected
from llorch.node.wire.attestation import Attestation, parse_attestation

log = logging.getLogger("llorch.gateway")

Outcome = tuple[str, object, str]
"""("ok", the Attestation, "") or ("rejected", the reason, the message): what a worker sends back (an exception with
extra constructor arguments does not survive pickling whole)."""


def check_batch(items: list[tuple[bytes, bytes | None, int]], relays: frozenset[str]) -> list[Outcome]:
    """In the worker process (or inline): each item's verdict, as ``parse_attestation`` gives it."""
    outcomes: list[Outcome] = []
    for data, sender_key, now in items:
        try:
            outcomes.append(("ok", parse_attestation(data, sender_key, now, relays), ""))
        except AttestationRejected as exc:
            outcomes.append(("rejected", exc.reason, str(exc)))
        except Exception as exc:     # a bug: the validator drops the message as malformed and says so
            outcomes.append(("rejected", "malformed", f"{type(exc).__name__}: {exc}"))
    return outcomes


@dataclass
class _Check:
    data: bytes
    sender_key: bytes | None
    now: int
    done: trio.Event = field(default_factory=trio.Event)
    outcome: Outcome | None = None


class AttestationChecks:
    """``check`` waits for one attestation's verdict; ``run`` (a supervised long-lived task) does the checks: inline
    until ATTESTATION_WORKER_RATE_MIN arrive within a second, then in the worker, up to ATTESTATION_BATCH_MAX at a
    time (what arrived while the previous batch was out)."""

    def __init__(self, relays: frozenset[str], rate_min: float = limits.ATTESTATION_WORKER_RATE_MIN,
                 batch_max: int = limits.ATTESTATION_BATCH_MAX) -> None:
        self.relays = relays
        self.rate_min = rate_min
        self.batch_max = batch_max
        self._second = (0.0, 0)          # (when the current second began, checks asked for in it)
        self.batches_in_worker = 0
        self.checked_inline = 0
        self._waiting: list[_Check] = []
        self._arrived = trio.Event()
        self._pool: ProcessPoolExecutor | None = None

    def worker_pids(self) -> list[int]:
        """The worker process's pid, once started (for measuring its CPU)."""
        return list(self._pool._processes or ()) if self._pool is not None else []

    async def check(self, data: bytes, sender_key: bytes | None, now: int) -> Attestation:
        """The attestation of ``data``, or AttestationRejected with the reason, as ``parse_attestation``."""
        check = _Check(data, sender_key, now)
        self._waiting.append(check)
        self._arrived.set()
        await check.done.wait()
        assert check.outcome is not None
        kind, value, message = check.outcome
        if kind != "ok":
            raise AttestationRejected(message, str(value))
        assert isinstance(value, Attestation)
        return value

    async def run(self) -> None:
        try:
            while True:
                await self._arrived.wait()
                if self._pool is not None:           # let the validations arriving with this one join its batch
                    await trio.sleep(limits.ATTESTATION_BATCH_WAIT_S)
                self._arrived = trio.Event()
                while self._waiting:
                    batch, self._waiting = self._waiting[:self.batch_max], self._waiting[self.batch_max:]
                    items = [(check.data, check.sender_key, check.now) for check in batch]
                    # once the worker runs, every batch goes there: checks arriving meanwhile make the next one
                    outcomes = await self._in_worker(items) if self._busy(len(batch)) else None
                    if outcomes is None:
                        outcomes = check_batch(items, self.relays)
                        self.checked_inline += len(items)
                    for check, outcome in zip(batch, outcomes):
                        check.outcome = outcome
                        check.done.set()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=False, cancel_futures=True)
                self._pool = None

    def _busy(self, arrived: int) -> bool:
        """Whether checks go to the worker: it runs, or this second's checks reached ``rate_min``."""
        began, count = self._second
        now = trio.current_time()
        self._second = (began, count + arrived) if now - began < 1.0 else (now, arrived)
        return self._pool is not None or self._second[1] >= self.rate_min

    async def warm(self) -> None:
        """Start the worker process now and wait until it answers (it imports what checking needs: about a second
        of CPU), instead of at the first batch."""
        await self._in_worker([])

    async def _in_worker(self, items: list[tuple[bytes, bytes | None, int]]) -> list[Outcome] | None:
        """The batch's verdicts from the worker process (started on first need), or None if it failed (it is
        replaced at the next batch)."""
        if self._pool is None:
            self._pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
        pool = self._pool
        try:
            future = pool.submit(check_batch, items, self.relays)
            # not abandoned when cancelled: a batch takes milliseconds, and the timeout bounds a stuck worker
            outcomes = await trio.to_thread.run_sync(future.result, limits.ATTESTATION_WORKER_TIMEOUT_S)
        except (BrokenProcessPool, FutureTimeout) as exc:
            log.warning("the attestation checking process failed (%s); replacing it",
                        exc or f"no answer in {limits.ATTESTATION_WORKER_TIMEOUT_S:g} s")
            pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
            return None
        self.batches_in_worker += 1
        return outcomes
