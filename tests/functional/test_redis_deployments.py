"""The broker on the Redis deployments users run, with real processes: two `token-broker serve`
replicas over a 3-master Redis Cluster and over a Sentinel-managed master with one replica, and every
Redis connection killed while a lease holder acquires. One Entra request per key throughout."""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import requests
import yaml

from emulator.stack import RedisServer
from tests.functional.conftest import APP_ID, DEFENDER, World, ask
from tests.functional.test_cluster import _add_tenants, _post
from tests.redis_topologies import Cluster, EntraGate, SentinelSet, admin, started
from tests.support import BrokerProcess, run_cli

StartBroker = Callable[..., BrokerProcess]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with started(Cluster(tmp_path_factory.mktemp("cluster"))) as running:
        yield running


@pytest.fixture
def sentinel(tmp_path: Path) -> Iterator[SentinelSet]:
    with started(SentinelSet(tmp_path)) as running:
        yield running


async def _herd(
    brokers: list[BrokerProcess], key: str, tenants: list[str], requests_count: int
) -> list[tuple[int, dict[str, Any], float]]:
    """``requests_count`` concurrent requests, every tenant first, spread over ``brokers``."""
    jobs = [(brokers[i % len(brokers)], tenants[i % len(tenants)]) for i in range(requests_count)]
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as session:
        return await asyncio.gather(
            *(
                _post(session, broker, key, {"tenant": tenant, "resource": DEFENDER, "min_ttl": 60})
                for broker, tenant in jobs
            )
        )


def _requests_per_tenant(world: World) -> Counter[str]:
    return Counter(entry["tenant_id"] for entry in world.emulator.requests("token", client_id=APP_ID))


def _kill_every_connection(port: int) -> int:
    """``CLIENT KILL`` of every client connection but the one asking (normal and pub/sub)."""
    killed = 0
    for kind in ("normal", "pubsub"):
        killed += int(admin(port).execute_command("CLIENT", "KILL", "TYPE", kind, "SKIPME", "yes"))
    return killed


def test_cluster_herd_over_two_replicas_with_a_node_dropping_its_connections(
    world: World, start_broker: StartBroker, cluster: Cluster, tmp_path: Path
) -> None:
    """A cold herd over two replicas on a 3-master Cluster costs exactly one Entra request per key,
    even when one node drops every connection mid-herd; the tokens are spread over every node; the
    purge CLI removes a tenant's entry wherever it lives, and counts the listeners on every node."""
    cluster.flush()
    tenants = _add_tenants(world, 60)
    config = world.broker_config(cluster.url, redis_mode="cluster")
    brokers = [start_broker(config, world.env, name=f"replica{i}") for i in range(2)]
    world.emulator.reset_counters()
    world.emulator.add_fault("token", "latency", latency_seconds=0.5, count=-1)

    async def kill_mid_herd() -> int:
        await asyncio.sleep(0.7)
        return await asyncio.to_thread(_kill_every_connection, cluster.nodes[1].port)

    async def herd() -> tuple[list[tuple[int, dict[str, Any], float]], int]:
        results, killed = await asyncio.gather(_herd(brokers, world.soar_key, tenants, 600), kill_mid_herd())
        return results, killed

    results, killed = asyncio.run(herd())
    assert killed > 0
    assert {200: 600} == dict(Counter(status for status, _, _ in results)), _unhandled(brokers)
    assert dict.fromkeys(tenants, 1) == dict(_requests_per_tenant(world))
    per_node = cluster.keys("tb:v1:tok:*")
    assert 60 == sum(len(keys) for keys in per_node)
    assert all(per_node), "every node holds some of the tokens"

    path = tmp_path / "purge.yaml"
    path.write_text(yaml.safe_dump(config))
    deadline = time.monotonic() + 10
    while True:  # the listeners of the node that dropped them come back under their supervisor
        result = run_cli("cache", "purge", "--config", str(path), "--tenant", tenants[0])
        assert 0 == result.returncode, result.stderr
        if "2 replica(s)" in result.stdout or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert "2 replica(s)" in result.stdout
    assert 59 == sum(len(keys) for keys in cluster.keys("tb:v1:tok:*"))
    for broker in brokers:
        deadline = time.monotonic() + 5
        while "purge broadcast received" not in broker.log_text():
            assert time.monotonic() < deadline
            time.sleep(0.05)
    assert all("ready" == requests.get(f"{b.url}/readyz", timeout=5).json()["status"] for b in brokers)


def test_sentinel_failover_under_load(world: World, start_broker: StartBroker, sentinel: SentinelSet) -> None:
    """Two replicas on a Sentinel-managed master keep answering 200 while `SENTINEL FAILOVER` runs
    under load; afterwards they write to the new master (no READONLY left behind) and a cold herd
    costs exactly one Entra request per key again."""
    tenants = _add_tenants(world, 50)
    warm, cold = tenants[:20], tenants[20:]
    config = world.broker_config(
        "redis://tb/0",
        redis_mode="sentinel",
        redis_sentinels=[f"127.0.0.1:{sentinel.sentinel_port}"],
        redis_sentinel_service=SentinelSet.SERVICE,
    )
    brokers = [start_broker(config, world.env, name=f"replica{i}") for i in range(2)]
    stop = asyncio.Event()
    statuses: Counter[int] = Counter()

    async def load() -> None:
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30)) as s:
            for round_number in range(10_000):  # bounded; ends at `stop`
                if stop.is_set():
                    return
                body = {"tenant": warm[round_number % len(warm)], "resource": DEFENDER}
                status, _, _ = await _post(s, brokers[round_number % 2], world.soar_key, body)
                statuses[status] += 1

    async def failover_under_load() -> tuple[int, int]:
        loaders = [asyncio.create_task(load()) for _ in range(4)]
        await asyncio.sleep(1.0)
        old_port = sentinel.master_port()
        new_port = await asyncio.to_thread(sentinel.failover)
        await asyncio.sleep(2.0)
        stop.set()
        await asyncio.gather(*loaders)
        return old_port, new_port

    old_port, new_port = asyncio.run(failover_under_load())
    assert [200] == list(statuses), statuses
    assert statuses[200] > 20
    for broker in brokers:
        deadline = time.monotonic() + 15
        while requests.get(f"{broker.url}/readyz", timeout=5).json()["checks"]["redis"]["status"] != "ok":
            assert time.monotonic() < deadline, "the replica follows the new master"
            time.sleep(0.2)

    world.emulator.reset_counters()
    world.emulator.add_fault("token", "latency", latency_seconds=0.3, count=-1)
    results = asyncio.run(_herd(brokers, world.soar_key, cold, 300))
    assert {200: 300} == dict(Counter(status for status, _, _ in results))
    assert dict.fromkeys(cold, 1) == dict(_requests_per_tenant(world))
    on_new_master = {key.decode() for key in admin(new_port).scan_iter(match="tb:v1:tok:*", count=1000)}
    assert all(any(tenant in key for key in on_new_master) for tenant in cold)
    assert "slave" == admin(old_port).info("replication")["role"]


def test_every_connection_killed_while_a_holder_acquires(
    world: World, start_broker: StartBroker, redis_url: str
) -> None:
    """`CLIENT KILL` of every Redis connection while one replica holds a key's lease and Entra is
    slow: the holder still stores the token and releases the lease (reconnecting), so the other
    replica's callers get it as soon as it lands, not after the lease (33 s here) expires."""
    config = world.broker_config(redis_url)
    holder, other = (start_broker(config, world.env, name=f"replica{i}") for i in range(2))
    tenant = _add_tenants(world, 1)[0]
    world.emulator.add_fault("token", "latency", latency_seconds=3, count=-1)
    body = {"tenant": tenant, "resource": DEFENDER}
    port = int(redis_url.rsplit(":", 1)[1].split("/", maxsplit=1)[0])

    async def scenario() -> list[tuple[int, float]]:
        loop = asyncio.get_running_loop()
        first = loop.run_in_executor(None, _timed, holder, world.soar_key, body)
        await asyncio.sleep(0.8)  # the holder has the lease and waits for Entra
        waiters = [loop.run_in_executor(None, _timed, other, world.soar_key, body) for _ in range(8)]
        await asyncio.sleep(0.5)
        assert await asyncio.to_thread(_kill_every_connection, port) > 0
        return list(await asyncio.gather(first, *waiters))

    answers = asyncio.run(scenario())
    assert [200] * 9 == [status for status, _ in answers]
    assert max(seconds for _, seconds in answers[1:]) < 8
    assert 1 == world.emulator.token_requests(tenant=tenant, client_id=APP_ID)
    assert 200 == ask(other, world.soar_key, body).status_code


def _unhandled(brokers: list[BrokerProcess]) -> Counter[str]:
    """The last line of each unhandled error's traceback in the brokers' logs (to explain a 500)."""
    return Counter(
        str(line.get("exception", "")).strip().splitlines()[-1][:200]
        for broker in brokers
        for line in broker.log_lines()
        if line.get("message") == "unhandled error"
    )


def _timed(broker: BrokerProcess, key: str, body: dict[str, Any]) -> tuple[int, float]:
    started_at = time.monotonic()
    status = ask(broker, key, body).status_code
    return status, time.monotonic() - started_at


def test_entra_auth_end_to_end_with_the_cli_purge(
    world: World, start_broker: StartBroker, tmp_path: Path
) -> None:
    """`redis_auth: entra` end to end: the broker's own identity (azure_credential: environment, at the
    emulator) authenticates to an Entra-gated Redis; tokens are shared there, /readyz's probe is ok,
    and `cache purge` authenticates the same way and reaches the replica's listener."""
    identity = world.emulator.broker_identity
    object_id = str(uuid.uuid5(uuid.NAMESPACE_URL, f"sp:{identity.tenant_id}:{identity.client_id}"))
    with (
        started(RedisServer(tmp_path)) as backend,
        started(EntraGate(backend, world.emulator.public_key_pem, object_id)) as gate,
    ):
        config = world.broker_config(f"redis://127.0.0.1:{gate.port}/0", redis_auth="entra")
        broker = start_broker(config, world.env)
        tenant = _add_tenants(world, 1)[0]
        assert 200 == ask(broker, world.soar_key, {"tenant": tenant, "resource": DEFENDER}).status_code
        assert 1 == len(list(admin(backend.port).scan_iter(match="tb:v1:tok:*")))
        readiness = requests.get(f"{broker.url}/readyz", timeout=5).json()
        assert "ok" == readiness["checks"]["redis"]["status"], readiness
        path = tmp_path / "purge.yaml"
        path.write_text(yaml.safe_dump(config))
        environment = {**os.environ, **world.env}
        result = run_cli("cache", "purge", "--config", str(path), "--tenant", tenant, env=environment)
        assert 0 == result.returncode, result.stderr
        assert "removed 1 shared cache entry" in result.stdout
        assert "1 replica(s)" in result.stdout
        assert 0 == gate.stats.rejected
