"""Fair shares of the shared app's Entra budget: per-caller acquisition budgets and fair scheduling.

The threat: every caller acquires through one multi-tenant app, so one runaway or compromised caller
(a loop over random tenant GUIDs, say) could spend the app's Entra budget and fill the MSAL workers,
and everyone else's cold acquisitions would queue behind it. Two bounds stop that:

* ``AcquisitionBudget``: a token bucket per caller of upstream acquisitions per minute. Only real
  Entra requests are charged; cache hits (L1 or Redis) never are.
* ``FairScheduler``: at most N acquisitions run at once (N = the MSAL workers); when more wait, the
  free slot goes round-robin to the next *party* (caller, or the background refresh) with work
  queued, so a party with a thousand queued acquisitions delays another party's by at most one turn.

Both are keyed by configured names only (bounded). No I/O here.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable


class AcquisitionBudget:
    """A token bucket per caller: ``per_minute`` acquisitions, refilled continuously, burst of one
    minute's worth."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # caller -> (tokens left, at)

    def take(self, caller: str, per_minute: int) -> float:
        """Spend one acquisition: 0 when allowed, else the seconds until one is available again."""
        now = self._clock()
        rate = per_minute / 60.0
        tokens, at = self._buckets.get(caller, (float(per_minute), now))
        tokens = min(float(per_minute), tokens + (now - at) * rate)
        if tokens >= 1:
            self._buckets[caller] = (tokens - 1, now)
            return 0.0
        self._buckets[caller] = (tokens, now)
        return (1 - tokens) / rate if rate > 0 else 60.0


class FairScheduler:
    """At most ``slots`` holders at once; waiters are served round-robin across parties."""

    def __init__(self, slots: int) -> None:
        self._free = slots
        self._waiting: OrderedDict[str, deque[asyncio.Future[None]]] = OrderedDict()

    @property
    def queued(self) -> int:
        return sum(len(queue) for queue in self._waiting.values())

    @property
    def idle(self) -> bool:
        """A slot is free and nobody waits: background work may take it without delaying anyone."""
        return self._free > 0 and not self._waiting

    @contextlib.asynccontextmanager
    async def slot(self, party: str) -> AsyncIterator[None]:
        """Hold one slot for the block, waiting for this party's turn if all are taken."""
        if self._free > 0 and not self._waiting:
            self._free -= 1
        else:
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiting.setdefault(party, deque()).append(waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    self._release()  # the slot was handed to us as we were cancelled: pass it on
                else:
                    self._forget(party, waiter)
                raise
        try:
            yield
        finally:
            self._release()

    def _release(self) -> None:
        while self._waiting:
            party, queue = next(iter(self._waiting.items()))
            waiter = queue.popleft()
            # Round-robin: this party goes to the back of the line (or leaves it when it is empty).
            del self._waiting[party]
            if queue:
                self._waiting[party] = queue
            if not waiter.done():
                waiter.set_result(None)  # the slot passes straight to the waiter
                return
        self._free += 1

    def _forget(self, party: str, waiter: asyncio.Future[None]) -> None:
        queue = self._waiting.get(party)
        if queue is None:
            return
        with contextlib.suppress(ValueError):
            queue.remove(waiter)
        if not queue:
            del self._waiting[party]
