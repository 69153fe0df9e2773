"""Witnessing 10,000 providers (issue 30): the schedule (gateway/witness/witness.py ``WitnessSchedule``) witnesses
every listed provider within the stated period, several side by side, never one more often than the interval, and
says when it cannot keep up. Pure timing, so trio's MockClock; the witness here is a test-only stand-in whose rounds
take seeded random times (the real round's cost is measured in bench/market_scale.py)."""

import logging
import random

import trio

from llorch.gateway.witness import witness as witness_module
from llorch.gateway.witness.witness import WitnessSchedule, witness_forever

PROVIDERS = 10_000
INTERVAL_S, PERIOD_S = 5.0, 300.0


class TimedWitness:
    """Test-only: a round is a sleep of a seeded random length; it records when each round began."""

    def __init__(self, low_s: float, high_s: float) -> None:
        self.rng = random.Random(30)
        self.low_s, self.high_s = low_s, high_s
        self.began: dict[bytes, list[float]] = {}
        self.running = self.most = 0

    async def witness(self, provider_key, addrs):
        self.began.setdefault(provider_key, []).append(trio.current_time())
        self.running += 1
        self.most = max(self.most, self.running)
        try:
            await trio.sleep(self.rng.uniform(self.low_s, self.high_s))
        finally:
            self.running -= 1


def keys(count: int) -> list[bytes]:
    return [number.to_bytes(32, "big") for number in range(count)]


async def test_ten_thousand_providers_are_each_witnessed_within_the_period_and_never_more_often_than_the_interval(
        autojump_clock):
    witness = TimedWitness(0.05, 0.6)
    listed = [(key, []) for key in keys(PROVIDERS)]
    schedule = WitnessSchedule(INTERVAL_S, PERIOD_S)

    async def providers():
        return listed

    with trio.move_on_after(2 * PERIOD_S):
        await witness_forever(witness, providers, INTERVAL_S, PERIOD_S, schedule)
    end = trio.current_time()
    assert len(witness.began) == PROVIDERS
    for key, began in witness.began.items():
        gaps = [b - a for a, b in zip([0.0, *began], [*began, end])]
        assert max(gaps) <= PERIOD_S, (key, began)
        assert min([b - a for a, b in zip(began, began[1:])], default=INTERVAL_S) >= INTERVAL_S
    assert witness_module.PROVIDERS_AT_ONCE < witness.most <= witness_module.WITNESS_AT_ONCE_MAX
    assert schedule.behind(end) == []
    print(f"\n[witness schedule] {PROVIDERS} providers, rounds 0.05-0.6 s: up to {witness.most} at once, "
          f"{sum(map(len, witness.began.values()))} rounds in {2 * PERIOD_S:.0f} s")


async def test_a_provider_that_joins_is_witnessed_at_once_and_one_that_leaves_is_forgotten(autojump_clock):
    witness = TimedWitness(0.1, 0.1)
    listed = [(key, []) for key in keys(3)]

    async def providers():
        return listed

    async with trio.open_nursery() as nursery:
        nursery.start_soon(witness_forever, witness, providers, INTERVAL_S, PERIOD_S)
        await trio.sleep(12)
        listed.append((b"\xff" * 32, []))
        del listed[0]
        await trio.sleep(12)
        nursery.cancel_scope.cancel()
    assert witness.began[b"\xff" * 32][0] <= 12 + INTERVAL_S + 0.2        # at the next reading of the list
    assert len(witness.began[keys(3)[1]]) == 5                  # a small market: every interval (0, 5, ... 20 s)
    assert max(witness.began[keys(3)[0]]) <= 12 + INTERVAL_S


async def test_a_witness_that_cannot_keep_up_says_so(autojump_clock, caplog):
    witness = TimedWitness(4.0, 4.0)                    # 10,000 × 4 s / 64 at once: 625 s, over the period
    listed = [(key, []) for key in keys(PROVIDERS)]

    async def providers():
        return listed

    with caplog.at_level(logging.WARNING, logger="llorch.witness"):
        with trio.move_on_after(2 * PERIOD_S):
            await witness_forever(witness, providers, INTERVAL_S, PERIOD_S)
    assert witness.most == witness_module.WITNESS_AT_ONCE_MAX
    said = [record.getMessage() for record in caplog.records if "witness behind" in record.getMessage()]
    assert said and "not witnessed within 300 s" in said[0]


async def test_a_round_slower_than_the_interval_is_never_run_twice_at_once(autojump_clock):
    """A provider's round that outlasts the interval while the list is read again: its next round waits for it to
    end. Before: the provider was queued again while its round ran, came due, and borrowing the limiter a second
    time for it raised inside the witness loop (a traceback in a replica's log, tests/test_replicas.py)."""
    witness = TimedWitness(3.5, 3.5)
    ended: dict[bytes, list[float]] = {}
    inner = witness.witness

    async def timed(provider_key, addrs):
        await inner(provider_key, addrs)
        ended.setdefault(provider_key, []).append(trio.current_time())
    witness.witness = timed                                     # type: ignore[method-assign]
    listed = [(key, []) for key in keys(2)]

    async def providers():
        return listed

    with trio.move_on_after(20):
        await witness_forever(witness, providers, 1.0, PERIOD_S)
    for key in keys(2):
        began, done = witness.began[key], ended[key]
        assert len(began) >= 5
        assert all(next_began >= end for next_began, end in zip(began[1:], done))   # one at a time
