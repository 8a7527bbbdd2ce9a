"""broker.limits: the per-caller acquisition budget and the fair scheduler of upstream slots."""

from __future__ import annotations

import asyncio

import pytest

from broker.limits import AcquisitionBudget, FairScheduler


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_budget_allows_a_minutes_worth_then_says_how_long_to_wait() -> None:
    """Three acquisitions per minute: three pass, the fourth waits 20 s, and after 20 s one more
    passes; callers have separate buckets."""
    clock = FakeClock()
    budget = AcquisitionBudget(clock)
    assert [0.0, 0.0, 0.0] == [budget.take("soar", 3) for _ in range(3)]
    assert 20.0 == pytest.approx(budget.take("soar", 3))
    assert 0.0 == budget.take("hunter", 3)
    clock.now += 20
    assert 0.0 == budget.take("soar", 3)
    assert budget.take("soar", 3) > 0


async def test_scheduler_serves_parties_round_robin() -> None:
    """With one slot, a party that queued five acquisitions delays another party's one by a single
    turn, not by all five (a FIFO would run it last)."""
    scheduler = FairScheduler(1)
    order: list[str] = []
    release = asyncio.Event()

    async def job(party: str, name: str) -> None:
        async with scheduler.slot(party):
            order.append(name)
            await release.wait()

    tasks = [asyncio.create_task(job("flood", f"flood{i}")) for i in range(5)]
    await asyncio.sleep(0)  # flood0 holds the slot, flood1..4 queue
    tasks.append(asyncio.create_task(job("quiet", "quiet0")))
    await asyncio.sleep(0)
    assert 5 == scheduler.queued
    release.set()
    await asyncio.wait_for(asyncio.gather(*tasks), 5)
    assert ["flood0", "flood1", "quiet0", "flood2", "flood3", "flood4"] == order


async def test_scheduler_bounds_concurrency_and_survives_cancelled_waiters() -> None:
    """At most N holders at once; a waiter cancelled while queued (a caller gone) neither holds nor
    leaks a slot."""
    scheduler = FairScheduler(2)
    running = 0
    peak = 0
    gate = asyncio.Event()

    async def job() -> None:
        nonlocal running, peak
        async with scheduler.slot("p"):
            running += 1
            peak = max(peak, running)
            await gate.wait()
            running -= 1

    tasks = [asyncio.create_task(job()) for _ in range(6)]
    await asyncio.sleep(0)
    tasks[4].cancel()
    await asyncio.sleep(0)
    gate.set()
    results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 5)
    assert 2 == peak
    assert 1 == sum(isinstance(result, asyncio.CancelledError) for result in results)
    async with asyncio.timeout(1), scheduler.slot("p"), scheduler.slot("q"):
        pass  # both slots are free again
