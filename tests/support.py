"""Helpers for the tests: the CLI runner and in-thread fake servers; the real processes come from
``emulator.stack`` (a redis-server on a free port and token-broker itself), re-exported here.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import subprocess
import sys
import threading
from collections.abc import Awaitable, Callable, Iterator

from aiohttp import web

from emulator.stack import STARTUP_TIMEOUT_SECONDS, BrokerProcess, RedisServer, free_port, wait_until

__all__ = ["BrokerProcess", "RedisServer", "free_port", "run_cli", "serve_in_thread", "wait_until"]


def run_cli(
    *args: str, env: dict[str, str] | None = None, check: bool = False
) -> subprocess.CompletedProcess[str]:
    """``token-broker ARGS`` as an operator would run it (bounded; output captured as text)."""
    return subprocess.run(
        [sys.executable, "-m", "broker.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=check,
        env=env,
    )


@contextlib.contextmanager
def serve_in_thread(
    app: web.Application,
    port: int,
    *,
    ssl_context: ssl.SSLContext | None = None,
    after_cleanup: Callable[[], Awaitable[None]] | None = None,
) -> Iterator[None]:
    """Serve an aiohttp app on 127.0.0.1:``port`` from its own event loop in a thread (for fake peers
    such as an OIDC issuer or a Defender API, while the test itself talks to real processes)."""
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(app, access_log=None)

    async def start() -> None:
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port, ssl_context=ssl_context).start()

    async def stop() -> None:
        await runner.cleanup()
        if after_cleanup is not None:
            await after_cleanup()

    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        asyncio.run_coroutine_threadsafe(start(), loop).result(STARTUP_TIMEOUT_SECONDS)
        yield
    finally:
        asyncio.run_coroutine_threadsafe(stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
