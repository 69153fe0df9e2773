"""Admission (step 2: ``Admission``, a tenant's quota and reservation) and the admission queue: a request that finds every eligible provider busy waits here for a slot instead of failing.

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

from llorch.gateway.books.postings import Books
from llorch.gateway.errors import PaymentRequired, RateLimited
from llorch.gateway.market.quota import QuotaExceeded, TenantQuota, TokenBucket
from llorch.gateway.market.shared import SharedReservations
from llorch.gateway.market.tenants import Tenant
from llorch.node.stream_io import now_ms

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


class Admission:
    """Step (2): a tenant's rate token, concurrency slot and budget reservation, all or nothing, against the spend
    in the books (gateway/market/quota.py); with replicas on one PostgreSQL database, the slot and the reservation
    also in the database, where they hold over every replica (gateway/market/shared.py). ``tenant_lock``: admission
    reads a tenant's spend and reserves under it, and a settlement posts under it, so no admission sees a charge
    both spent and still reserved, or neither."""

    def __init__(self, books: Books, shared: SharedReservations | None) -> None:
        self._books = books
        self.shared = shared
        self._quotas: dict[str, TenantQuota] = {}
        self._locks: dict[str, trio.Lock] = {}

    def tenant_lock(self, name: str) -> trio.Lock:
        return self._locks.setdefault(name, trio.Lock())

    async def admit(self, tenant: Tenant, request_id: str, reserved_minor: int) -> None:
        """Take a rate token, a concurrency slot and the reservation, or raise PaymentRequired / RateLimited and
        take nothing. The caller gives them back with ``release``."""
        quota = self._quota(tenant)
        async with self.tenant_lock(tenant.name):
            quota.spent_minor = await self._books.tenant_spent(tenant.name)      # the books, not a counter
            try:
                quota.admit(request_id, reserved_minor, now_ms())
                if self.shared is not None and tenant.limited:
                    try:
                        await self.shared.admit(tenant.name, tenant.max_concurrent, tenant.budget_minor, request_id,
                                                reserved_minor, now_ms())
                    except BaseException:
                        quota.settle(request_id, None)
                        raise
            except QuotaExceeded as exc:
                raise (PaymentRequired(str(exc)) if exc.kind == "budget" else
                       RateLimited(str(exc), "rate_limit_exceeded" if exc.kind == "rate" else "too_many_concurrent",
                                   max(1, -(-(exc.retry_after_ms or 1000) // 1000)))) from None

    async def release(self, tenant: Tenant, request_id: str, charged_minor: int) -> None:
        """Give back what ``admit`` took, once the request's tickets are settled (``charged_minor``: their charge)."""
        self._quota(tenant).settle(request_id, charged_minor)
        if self.shared is not None and tenant.limited:
            with trio.CancelScope(shield=True):     # after the settlement: its charge is in the books
                await self.shared.release(request_id)

    def _quota(self, tenant: Tenant) -> TenantQuota:
        quota = self._quotas.get(tenant.name)
        if quota is None:
            quota = self._quotas[tenant.name] = TenantQuota(tenant.max_concurrent, tenant.budget_minor,
                                                            tenant.spent_minor)
        quota.max_concurrent, quota.budget_minor = tenant.max_concurrent, tenant.budget_minor   # may be updated
        quota.spent_minor = max(quota.spent_minor, tenant.spent_minor)
        if tenant.rps is None:
            quota.bucket = None
        elif quota.bucket is None or quota.bucket.rate_per_s != tenant.rps:
            quota.bucket = TokenBucket(tenant.rps, tenant.rps)
        return quota
