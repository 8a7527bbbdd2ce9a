"""Real processes for the tests: a redis-server on a free port and token-broker itself.

Nothing here is a fake: ``RedisServer`` runs Debian's redis-server, ``BrokerProcess`` runs
``token-broker serve`` exactly as an operator would, configured by a YAML file.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import requests
import yaml
from aiohttp import web

STARTUP_TIMEOUT_SECONDS = 20.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


POLL_INTERVAL_SECONDS = 0.05


def wait_until(predicate: Callable[[], object], timeout: float, what: str) -> None:
    """Poll ``predicate`` until it is true; ``TimeoutError`` naming ``what`` after ``timeout`` s.

    The one way a test waits for something another process, thread or task does: never a bare
    sleep (too short under load, too long otherwise). From a coroutine, run it in a worker thread
    so the event loop keeps going: ``await asyncio.to_thread(wait_until, ...)`` (the predicate then
    runs off the loop: keep it to reads, such as a metric's value).
    """
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{what} not ready after {timeout} s")
        time.sleep(POLL_INTERVAL_SECONDS)


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


class RedisServer:
    """A throwaway redis-server bound to 127.0.0.1 on a free port, persisting nothing."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (make install puts it there)")
        self.process = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.workdir),
                "--loglevel",
                "warning",
                "--enable-debug-command",
                "local",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_until(self.ping, STARTUP_TIMEOUT_SECONDS, "redis-server")

    def ping(self) -> bool:
        try:
            return b"PONG" in self.command(b"PING")
        except OSError:
            return False

    def command(self, *parts: bytes, timeout: float = 2) -> bytes:
        """Send one RESP command and return the raw reply (enough for PING/FLUSHALL in fixtures)."""
        payload = b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)
        with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as sock:
            sock.sendall(payload)
            return sock.recv(65536)

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)
            self.process = None


class BrokerProcess:
    """``token-broker serve --config FILE`` as a child process, with its log captured."""

    def __init__(
        self, workdir: Path, config: dict[str, Any], env: dict[str, str] | None = None, name: str = "broker"
    ) -> None:
        self.workdir = workdir
        self.config_path = workdir / f"{name}.yaml"
        self.config_path.write_text(yaml.safe_dump(config), encoding="utf-8")
        self.log_path = workdir / f"{name}.log"
        self.port = free_port()
        self.metrics_port = free_port()
        self.env = {**os.environ, **(env or {})}
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, *, wait: bool = True) -> None:
        """Start the process; unless ``wait`` is False, return once /healthz answers (see
        ``wait_ready``: several replicas start faster side by side than one after another)."""
        self._log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "broker.cli",
                "serve",
                "--config",
                str(self.config_path),
                "--port",
                str(self.port),
                "--metrics-port",
                str(self.metrics_port),
            ],
            stdout=self._log,
            stderr=self._log,
            env=self.env,
        )
        if wait:
            self.wait_ready()

    def wait_ready(self) -> None:
        wait_until(self._healthy, STARTUP_TIMEOUT_SECONDS, f"broker (log: {self.log_path})")

    def _healthy(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(f"broker exited with {self.process.returncode}: {self.log_text()}")
        try:
            return requests.get(f"{self.url}/healthz", timeout=1).status_code == 200
        except requests.RequestException:
            return False

    def log_text(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def log_lines(self) -> list[dict[str, Any]]:
        """Every log line, parsed: raises if one is not a JSON object."""
        return [json.loads(line) for line in self.log_text().splitlines() if line.strip()]

    def audit_lines(self) -> list[dict[str, Any]]:
        """The ``broker.audit`` lines: one per token request that reached this broker."""
        return [line for line in self.log_lines() if line.get("logger") == "broker.audit"]

    def metrics_text(self) -> str:
        return requests.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).text

    def metric_samples(self) -> dict[str, float]:
        """Every sample of the exposition, keyed by its name and labels as printed."""
        samples = {}
        for line in self.metrics_text().splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                samples[name] = float(value)
        return samples

    def metric(self, name: str) -> float:
        """The sum of every sample of ``name``, over all its label sets."""
        return sum(v for k, v in self.metric_samples().items() if k == name or k.startswith(name + "{"))

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int | None:
        if self.process is None:
            return None
        with contextlib.suppress(ProcessLookupError):
            self.process.send_signal(sig)
        try:
            code = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait(timeout=5)
        self.process = None
        self._log.close()
        return code


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
