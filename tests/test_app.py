"""The composition root's ``Supervisor``: background work that dies or ends is logged, counted and
restarted (with backoff), until the app closes it."""

from __future__ import annotations

import asyncio
import logging

import pytest

from broker.app import Supervisor
from broker.metrics import Metrics
from tests.conftest import metric_value
from tests.support import wait_until

WAIT_SECONDS = 10.0


async def test_task_that_raises_is_counted_logged_and_restarted(caplog: pytest.LogCaptureFixture) -> None:
    """A task that raises is restarted after a backoff; each failure is counted under its name and
    logged with its traceback; other tasks' counters stay at zero."""
    metrics = Metrics()
    supervisor = Supervisor(metrics)
    runs: list[int] = []

    async def broken() -> None:
        runs.append(len(runs))
        raise RuntimeError("purge listener exploded")

    supervisor.start("purge_listener", broken)
    try:
        await asyncio.to_thread(
            wait_until,
            lambda: (
                metric_value(metrics, "broker_background_task_failures_total", task="purge_listener") >= 2
            ),
            WAIT_SECONDS,
            "two failures",
        )
    finally:
        await supervisor.close()
    assert len(runs) >= 2
    assert len(runs) == metric_value(metrics, "broker_background_task_failures_total", task="purge_listener")
    assert 0 == metric_value(metrics, "broker_background_task_failures_total", task="credential_refresh")
    failures = [r for r in caplog.records if r.getMessage() == "background task failed; restarting"]
    assert len(failures) >= 2
    assert "purge_listener" == failures[0].__dict__["task"]
    assert failures[0].exc_info is not None


async def test_task_that_returns_is_restarted_without_counting_a_failure(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A task that simply ends (a listener that lost Redis, say) is restarted, logged, not counted."""
    caplog.set_level(logging.INFO, logger="broker.app")
    metrics = Metrics()
    supervisor = Supervisor(metrics)
    runs: list[int] = []

    async def ends() -> None:
        runs.append(len(runs))

    supervisor.start("credential_refresh", ends)
    try:
        await asyncio.to_thread(wait_until, lambda: len(runs) >= 2, WAIT_SECONDS, "a restart")
    finally:
        await supervisor.close()
    assert 0 == metric_value(metrics, "broker_background_task_failures_total", task="credential_refresh")
    assert any(r.getMessage() == "background task ended; restarting" for r in caplog.records)


async def test_close_cancels_running_work() -> None:
    """``close`` cancels work still running and returns once it has stopped."""
    supervisor = Supervisor(Metrics())
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def forever() -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        finally:
            cancelled.set()

    supervisor.start("listener", forever)
    await asyncio.wait_for(started.wait(), WAIT_SECONDS)
    await asyncio.wait_for(supervisor.close(), WAIT_SECONDS)
    assert cancelled.is_set()
