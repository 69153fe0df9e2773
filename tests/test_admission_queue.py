"""The admission queue as a pure data structure (no I/O), and its trio waiting room."""

from __future__ import annotations

import pytest
import trio
from hypothesis import given, strategies as st

from llorch.gateway.market.admission import FairQueue, QueueFull, QueueTimeout, WaitingRoom


def test_fifo_within_a_tenant_and_round_robin_across_tenants():
    queue = FairQueue(100)
    for n in range(50):
        queue.push("a", f"a{n}")
    for n in range(5):
        queue.push("b", f"b{n}")
    served = [queue.pop() for _ in range(55)]
    assert served[:10] == ["a0", "b0", "a1", "b1", "a2", "b2", "a3", "b3", "a4", "b4"]   # B is not served after A
    assert served[10:] == [f"a{n}" for n in range(5, 50)]
    assert queue.pop() is None and len(queue) == 0


def test_a_full_queue_refuses_and_a_woken_waiter_that_lost_the_slot_keeps_its_place():
    queue = FairQueue(3)
    for item in ("a0", "a1", "b0"):
        queue.push(item[0], item)
    with pytest.raises(QueueFull):
        queue.push("c", "c0")
    first = queue.pop()
    assert first == "a0"
    queue.push_front("a", first)                   # it lost the race for the slot: back first in line, A next
    assert [queue.pop() for _ in range(3)] == ["a0", "b0", "a1"]


def test_remove_takes_a_waiter_out_wherever_it_is():
    queue = FairQueue(10)
    for item in ("a0", "b0", "a1"):
        queue.push(item[0], item)
    assert queue.remove("b", "b0") and not queue.remove("b", "b0")
    assert [queue.pop() for _ in range(2)] == ["a0", "a1"] and len(queue) == 0


@given(st.lists(st.tuples(st.sampled_from("abc"), st.booleans()), max_size=60))
def test_every_waiter_is_served_once_and_no_tenant_waits_more_than_its_share(operations):
    """Whatever arrives, each tenant's items leave in arrival order, and while tenants wait, no tenant is served
    twice before every other waiting tenant is served once."""
    queue, arrived, served, count = FairQueue(1_000), [], [], 0
    for tenant, pop in operations:
        if pop:
            item = queue.pop()
            if item is not None:
                served.append(item)
        else:
            queue.push(tenant, (tenant, count))
            arrived.append((tenant, count))
            count += 1
    while (item := queue.pop()) is not None:
        served.append(item)
    assert sorted(served) == sorted(arrived)
    for tenant in "abc":
        assert [i for i in served if i[0] == tenant] == [i for i in arrived if i[0] == tenant]


async def test_the_waiting_room_hands_turns_in_fair_order_and_forgets_who_left(autojump_clock):
    room = WaitingRoom(10)
    order = []

    async def customer(tenant: str, name: str, timeout_s: float = 60) -> None:
        try:
            await room.wait(tenant, timeout_s)
            order.append(name)
        except QueueTimeout:
            order.append(f"{name} timed out")

    async with trio.open_nursery() as nursery:
        for name in ("a1", "a2", "a3"):
            nursery.start_soon(customer, "a", name)
            await trio.sleep(0.01)
        nursery.start_soon(customer, "b", "b1")
        await trio.sleep(0.01)
        with trio.CancelScope() as hung_up:           # a customer who disconnects while queued
            hung_up.cancel()
            await room.wait("c", 60)
        assert len(room.queue) == 4
        nursery.start_soon(customer, "d", "d1", 5)
        await trio.sleep(6)                          # d1's deadline passes
        assert len(room.queue) == 4
        for _ in range(4):
            room.wake()
            await trio.sleep(0.01)
    assert order == ["d1 timed out", "a1", "b1", "a2", "a3"]
