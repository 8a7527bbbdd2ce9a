"""Shared fixtures: the Entra ID + Key Vault emulator, a real redis-server, broker processes, and
the real ``TokenCache`` on that redis-server for the in-process tests of the core."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from broker.cache import TokenCache, connect_redis
from broker.config import CacheOptions, RedisOptions
from broker.crypto import Sealer, new_key, parse_key
from broker.metrics import Metrics
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
        config: dict[str, Any],
        env: dict[str, str] | None = None,
        name: str | None = None,
        *,
        wait: bool = True,
    ) -> BrokerProcess:
        broker = BrokerProcess(tmp_path, config, env, name or f"broker{len(started)}")
        started.append(broker)
        broker.start(wait=wait)
        return broker

    yield start
    for broker in started:
        broker.stop()


# The in-process tests use their own database: the process-level tests FLUSHALL and use db 0.
CORE_DB = 9
# Generous: a CPU-starved test run must not turn a Redis test into a fail-open one.
CORE_REDIS_TIMEOUT_SECONDS = 5.0


@pytest.fixture
async def core_redis(redis_server: RedisServer) -> RedisOptions:
    """``RedisOptions`` for an empty database of the session's redis-server."""
    if not redis_server.ping():
        redis_server.start()
    options = RedisOptions(
        url=f"redis://127.0.0.1:{redis_server.port}/{CORE_DB}", timeout_seconds=CORE_REDIS_TIMEOUT_SECONDS
    )
    client = connect_redis(options)
    try:
        await client.flushdb()
    finally:
        await client.aclose()
    return options


@pytest.fixture
async def raw_redis(core_redis: RedisOptions) -> AsyncIterator[Redis]:
    """A plain client on the same database, to look at (or forge) what the cache wrote."""
    client = Redis.from_url(core_redis.url)
    yield client
    await client.aclose()


@pytest.fixture
def sealer() -> Sealer:
    """One cache key shared by every replica of a test (as the cluster shares one)."""
    return Sealer(parse_key(new_key()))


MakeCache = Callable[..., TokenCache]


def metric_value(metrics: Metrics, name: str, **labels: str) -> float:
    """One sample of an in-process ``Metrics`` (0 when it was never touched)."""
    return metrics.registry.get_sample_value(name, labels) or 0.0


@pytest.fixture
async def make_cache(core_redis: RedisOptions, sealer: Sealer) -> AsyncIterator[MakeCache]:
    """Build real ``TokenCache``s (one per simulated replica), closed when the test ends.

    ``make_cache()`` shares the test's Redis database; ``make_cache(shared=False)`` is an in-process
    cache; ``make_cache(options=RedisOptions(...))`` points at another Redis (a closed port, say).
    """
    caches: list[TokenCache] = []

    def make(
        *,
        shared: bool = True,
        options: RedisOptions | None = None,
        local_max_entries: int = 1000,
        metrics: Metrics | None = None,
    ) -> TokenCache:
        client = connect_redis(options or core_redis) if shared else None
        cache = TokenCache(
            metrics or Metrics(),
            CacheOptions(l1_max_tokens=1000, local_max_entries=local_max_entries),
            redis=client,
            sealer=sealer if client is not None else None,
        )
        caches.append(cache)
        return cache

    yield make
    for cache in caches:
        await cache.close()
