"""The admission queue: a request that finds every eligible provider busy waits here for a slot instead of failing.

``FairQueue`` is the pure data structure: FIFO within a tenant, round robin across tenants (one tenant's burst
cannot starve another: each tenant with someone waiting gets the next slot in turn), bounded in size. A waiter woken
for a slot that another request took first goes back to the front of its tenant's line (``push_front``): it keeps
its place.

``WaitingRoom`` puts it to work in trio: ``wait`` parks a request until ``wake`` hands it a turn (called when a
request finishes, or an attestation shows free slots: no polling) or its deadline passes; a request cancelled while
waiting (the customer hung up) leaves the queue at once.
"""

from __future__ import annotations

from collections import deque
from typing import Generic, TypeVar

import trio

T = TypeVar("T")


class QueueFull(Exception):
    """The queue holds its maximum of waiting requests."""


class FairQueue(Generic[T]):
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._lines: dict[str, deque[T]] = {}
        self._rotation: deque[str] = deque()        # tenants with someone waiting, in the order they are served
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def waiting(self, tenant: str) -> int:
        return len(self._lines.get(tenant, ()))

    def push(self, tenant: str, item: T) -> None:
        """Queue ``item`` last in ``tenant``'s line; QueueFull if the queue is full."""
        if self._size >= self.capacity:
            raise QueueFull(f"{self._size} requests are already waiting for a slot")
        line = self._lines.get(tenant)
        if line is None:
            line = self._lines[tenant] = deque()
            self._rotation.append(tenant)
        line.append(item)
        self._size += 1

    def push_front(self, tenant: str, item: T) -> None:
        """Put back a waiter that was given a turn and lost the slot: first in its line, its tenant served next.
        Never refused (it held a place a moment ago)."""
        line = self._lines.get(tenant)
        if line is None:
            line = self._lines[tenant] = deque()
        else:
            self._rotation.remove(tenant)
        self._rotation.appendleft(tenant)          # it was this tenant's turn: it still is
        line.appendleft(item)
        self._size += 1

    def pop(self) -> T | None:
        """The next waiter: the oldest of the tenant whose turn it is; None if nobody waits."""
        if not self._rotation:
            return None
        tenant = self._rotation.popleft()
        line = self._lines[tenant]
        item = line.popleft()
        self._size -= 1
        if line:
            self._rotation.append(tenant)
        else:
            del self._lines[tenant]
        return item

    def remove(self, tenant: str, item: T) -> bool:
        """Take ``item`` out wherever it is (its deadline passed, or its customer left)."""
        line = self._lines.get(tenant)
        if line is None or item not in line:
            return False
        line.remove(item)
        self._size -= 1
        if not line:
            del self._lines[tenant]
            self._rotation.remove(tenant)
        return True


class QueueTimeout(Exception):
    """No slot was handed to the request before its deadline."""


class WaitingRoom:
    def __init__(self, capacity: int) -> None:
        self.queue: FairQueue[trio.Event] = FairQueue(capacity)

    async def wait(self, tenant: str, timeout_s: float, again: bool = False) -> None:
        """Wait for a turn (``wake``). ``again``: this request was woken before and lost the slot, so it goes back to
        the front of its line. Raises QueueFull at once, or QueueTimeout after ``timeout_s``."""
        turn = trio.Event()
        (self.queue.push_front if again else self.queue.push)(tenant, turn)
        try:
            with trio.fail_after(max(timeout_s, 0)):
                await turn.wait()
        except trio.TooSlowError:
            raise QueueTimeout(f"no slot freed within {timeout_s:.0f} s") from None
        finally:
            if not turn.is_set():
                self.queue.remove(tenant, turn)

    def wake(self, count: int = 1) -> None:
        """Give the next ``count`` waiters (in fair order) a turn: slots were freed."""
        for _ in range(count):
            turn = self.queue.pop()
            if turn is None:
                return
            turn.set()
