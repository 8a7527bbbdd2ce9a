"""The processes a local stack runs besides the emulator: a throwaway redis-server and token-broker.

Nothing here is a fake: :class:`RedisServer` runs the system's ``redis-server`` (Debian's, put there
by ``make install``) on a free loopback port, persisting nothing; :class:`BrokerProcess` runs
``token-broker serve`` exactly as an operator would, configured by a YAML file written from a dict
(for instance ``world.broker_config()``), and reads back its JSON log, audit lines and metrics. The
tests, the benchmarks and ``make demo`` start their stacks with these.

Every process started here is the caller's to stop (``stop()``); nothing is left behind but files in
the work directory the caller chose.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final

import requests
import yaml

STARTUP_TIMEOUT_SECONDS: Final = 20.0
PORT_RETRIES: Final = 2  # BrokerProcess: starts again on other ports when the one it picked was taken


def free_port() -> int:
    """A loopback TCP port free right now (the caller binds it soon after)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


POLL_INTERVAL_SECONDS = 0.05


def wait_until(predicate: Callable[[], object], timeout: float, what: str) -> None:
    """Poll ``predicate`` until it is true; ``TimeoutError`` naming ``what`` after ``timeout`` s.

    The one way a test (or the demo) waits for something another process, thread or task does:
    never a bare sleep (too short under load, too long otherwise). From a coroutine, run it in a
    worker thread so the event loop keeps going: ``await asyncio.to_thread(wait_until, ...)``.
    """
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{what} not ready after {timeout} s")
        time.sleep(POLL_INTERVAL_SECONDS)


class RedisServer:
    """A throwaway redis-server bound to 127.0.0.1 on a free port, persisting nothing.

    ``args`` are added to its command line (cluster, replication, TLS, ACL settings); ``binary`` may
    name another Redis-compatible server (valkey-server). The plain port always answers, so
    ``command`` can administer a server whose clients use TLS or ACL users.
    """

    def __init__(self, workdir: Path, args: Sequence[str] = (), binary: str = "redis-server") -> None:
        self.workdir = workdir
        self.port = free_port()
        self.args = list(args)
        self.binary = binary
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which(self.binary)
        if binary is None:
            raise RuntimeError(f"{self.binary} is not installed (make install puts it there)")
        self.process = subprocess.Popen(  # noqa: S603 - redis-server from PATH, arguments built here
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
                *self.args,
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
        self,
        workdir: Path,
        config: dict[str, Any],
        env: dict[str, str] | None = None,
        name: str = "broker",
        port: int | None = None,
    ) -> None:
        self.workdir = workdir
        self.config_path = workdir / f"{name}.yaml"
        self.config_path.write_text(yaml.safe_dump(config), encoding="utf-8")
        self.log_path = workdir / f"{name}.log"
        # Chosen by the caller when the configuration must name it (public_base_url).
        self.port = port or free_port()
        self._own_port = port is None
        self.metrics_port = free_port()
        self.env = {**os.environ, **(env or {})}
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, *, wait: bool = True) -> None:
        """Start the process; unless ``wait`` is False, return once /healthz answers (see
        ``wait_ready``: several replicas start faster side by side than one after another)."""
        self._spawn("ab")
        if wait:
            self.wait_ready()

    def _spawn(self, log_mode: str) -> None:
        self._log = self.log_path.open(log_mode)
        self.process = subprocess.Popen(  # noqa: S603 - our own interpreter running our own CLI
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

    def wait_ready(self) -> None:
        """Wait for /healthz. A port picked by ``free_port`` can be taken by another socket (any
        outgoing connection's ephemeral port) before the broker binds it: then the broker is started
        again on other ports, with a fresh log (at most ``PORT_RETRIES`` times)."""
        for attempt in range(PORT_RETRIES + 1):
            try:
                wait_until(self._healthy, STARTUP_TIMEOUT_SECONDS, f"broker (log: {self.log_path})")
            except RuntimeError:
                taken = "address already in use" in self.log_text()
                if not (taken and attempt < PORT_RETRIES):
                    raise
                self._log.close()
                self.port = free_port() if self._own_port else self.port
                self.metrics_port = free_port()
                self._spawn("wb")
            else:
                return

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
