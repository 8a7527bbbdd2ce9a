"""Shared fixtures: the Entra ID + Key Vault emulator, a real redis-server, broker processes."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import BrokerProcess, RedisServer

pytest_plugins = ["emulator.pytest_plugin"]


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """A clean database on the session's redis-server (restarted if a test stopped it)."""
    if not redis_server.ping():
        redis_server.start()
    redis_server.command(b"FLUSHALL")
    return redis_server.url


@pytest.fixture
def start_broker(tmp_path: Path) -> Iterator[Callable[..., BrokerProcess]]:
    """Start ``token-broker serve`` processes; every one is stopped when the test ends."""
    started: list[BrokerProcess] = []

    def start(
        config: dict[str, Any], env: dict[str, str] | None = None, name: str | None = None
    ) -> BrokerProcess:
        broker = BrokerProcess(tmp_path, config, env, name or f"broker{len(started)}")
        started.append(broker)
        broker.start()
        return broker

    yield start
    for broker in started:
        broker.stop()
