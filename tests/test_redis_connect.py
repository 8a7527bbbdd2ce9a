"""The Redis client factory and the cache against real servers on loopback: TLS with a private CA and
mTLS (one server, and a Cluster speaking TLS on every node and its bus), an ACL user holding exactly
the README's rules (on Redis and on Valkey, standalone and Cluster), and Entra ID authentication whose
tokens expire while connections live (one server, and a Cluster with a gate in front of every node).

In process (no broker subprocess): each test drives ``TokenCache`` and ``purge_tenant`` themselves
through the one factory, ``connect_redis``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from azure.identity.aio import ClientSecretCredential

from broker.cache import PURGE_CHANNEL, EntraRedisCredentials, Lease, TokenCache, connect_redis, purge_tenant
from broker.config import CacheOptions, RedisOptions
from broker.crypto import Sealer, new_key, parse_key
from broker.metrics import Metrics
from broker.tokens import AccessToken, TokenKey
from emulator import Emulator
from emulator.stack import RedisServer
from tests.redis_topologies import (
    Cluster,
    EntraGate,
    GatedCluster,
    TlsFiles,
    admin,
    client_ports,
    started,
    tls_cluster,
    tls_files,
    tls_server,
    valkey_binary,
    wait_until,
)

README = Path(__file__).resolve().parent.parent / "README.md"
KEY = TokenKey("defender", "11111111-2222-3333-4444-555555555555", "https://api.security.microsoft.com")


def _cluster_keys(batch: int, size: int = 8) -> list[TokenKey]:
    """``size`` keys of distinct tenants, new for each ``batch``: spread over a cluster's nodes (the
    cluster tests check that every node got some)."""
    return [KEY._replace(tenant=f"{n:08x}-{batch:04x}-3333-4444-555555555555") for n in range(1, size + 1)]


# Calls in flight bounded by the connections per node, as config.py derives them from one setting (a
# cluster node's pool refuses a connection beyond its size, and redis-py then refreshes the topology).
CACHE_OPTIONS = CacheOptions(l1_max_tokens=100, local_max_entries=100, redis_max_concurrent_calls=8)


def _options(url: str, **changes: Any) -> RedisOptions:
    options = RedisOptions(url=url, timeout_seconds=2.0, max_connections=8, pool_timeout_seconds=2.0)
    return replace(options, **changes)


def _token(seconds: float = 600, key: TokenKey = KEY) -> AccessToken:
    return AccessToken("a.b.c", time.time() + seconds, key.tenant, key.resource)


@contextlib.asynccontextmanager
async def _cache(
    options: RedisOptions, credentials: EntraRedisCredentials | None = None
) -> AsyncIterator[tuple[TokenCache, Metrics]]:
    metrics = Metrics()
    redis = connect_redis(options, credentials=credentials)
    cache = TokenCache(
        metrics, CACHE_OPTIONS, redis=redis, sealer=Sealer(parse_key(new_key())), credentials=credentials
    )
    try:
        yield cache, metrics
    finally:
        await cache.close()


@contextlib.asynccontextmanager
async def _listening(cache: TokenCache, *, renewing: bool = False) -> AsyncIterator[None]:
    """The cache's purge listener (and, ``renewing``, its Entra token renewal) running for the block."""
    tasks = [asyncio.create_task(cache.listen_for_purges())]
    if renewing:
        tasks.append(asyncio.create_task(cache.keep_credentials_renewed()))
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def _purge_broadcast_arrives(
    cache: TokenCache, options: RedisOptions, credentials: EntraRedisCredentials | None = None
) -> None:
    """A token in this replica's L1 is gone soon after ``purge_tenant`` broadcasts its tenant."""
    await cache.store(KEY, _token())
    assert cache.get_local(KEY) is not None
    await purge_tenant(options, KEY.tenant, credentials=credentials)
    await _wait(lambda: cache.get_local(KEY) is None, "purge broadcast", 5)


async def _round_trip(cache: TokenCache, key: TokenKey = KEY) -> None:
    """What one acquisition does with Redis: lookup, lease, lookup, store, release; then a hit."""
    assert (await cache.lookup(key)).token is None
    async with cache.lease(key, 5, cache.new_holder()) as lease:
        assert Lease.ACQUIRED == lease, cache.redis_last_error
        await cache.lookup(key)
        await cache.store(key, _token(key=key))
    assert (await cache.lookup(key)).token is not None
    assert await cache.ping()


# --- TLS ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return tls_files(tmp_path_factory.mktemp("tls"))


async def test_tls_with_a_private_ca(tls: TlsFiles, tmp_path: Path) -> None:
    """rediss:// with redis_ca_file: the cache works over TLS; a CA that did not sign the server's
    certificate is a failed connection (the probe says so), never a plain-text fallback."""
    server, port = tls_server(tmp_path, tls, client_certificates=False)
    try:
        async with _cache(_options(f"rediss://127.0.0.1:{port}/0", ca_file=tls.ca)) as (cache, _):
            await _round_trip(cache)
        assert 1 == len(list(admin(server.port).scan_iter(match="tb:v1:tok:*")))
        async with _cache(_options(f"rediss://127.0.0.1:{port}/0", ca_file=tls.other_ca)) as (cache, _):
            assert not await cache.ping()
            assert cache.redis_last_error is not None
            assert cache.redis_last_error.startswith("probe: connection")
    finally:
        server.stop()


async def test_mutual_tls(tls: TlsFiles, tmp_path: Path) -> None:
    """A server that requires client certificates accepts the broker's (redis_client_cert_file and
    redis_client_key_file) and refuses a client without one."""
    server, port = tls_server(tmp_path, tls, client_certificates=True)
    url = f"rediss://127.0.0.1:{port}/0"
    try:
        with_cert = _options(
            url, ca_file=tls.ca, client_cert_file=tls.client_cert, client_key_file=tls.client_key
        )
        async with _cache(with_cert) as (cache, _):
            await _round_trip(cache)
        async with _cache(_options(url, ca_file=tls.ca)) as (cache, _):
            assert not await cache.ping()
    finally:
        server.stop()


async def test_tls_on_every_node_of_a_cluster(tls: TlsFiles, tmp_path: Path) -> None:
    """rediss:// on a Cluster whose nodes speak TLS to clients and on their bus: the cluster client
    reaches every node on its TLS port (the nodes name those to a TLS client), and a purge broadcast
    arrives; a CA that did not sign the nodes' certificates is a failed connection."""
    cluster, tls_ports = tls_cluster(tmp_path, tls)
    with started(cluster):
        options = _options(f"rediss://127.0.0.1:{tls_ports[0]}/0", mode="cluster", ca_file=tls.ca)
        async with _cache(options) as (cache, metrics), _listening(cache):
            await asyncio.gather(*(_round_trip(cache, key) for key in _cluster_keys(0, 16)))
            assert all(cluster.keys("*")), "the keys live on every node"
            for node, tls_port in zip(cluster.nodes, tls_ports, strict=True):
                assert tls_port in client_ports(node.port)
            await _wait(lambda: _subscribed(cluster) >= 1, "the purge listener subscribed", 10)
            await _purge_broadcast_arrives(cache, options)
            assert 0 == sum(_samples(metrics, "broker_redis_failures_total").values())
        async with _cache(replace(options, ca_file=tls.other_ca)) as (cache, _):
            assert not await cache.ping()
            assert cache.redis_last_error is not None
            assert cache.redis_last_error.startswith("probe: connection")
            assert (await cache.lookup(KEY)).token is None  # fail open: the cluster client's own error


def _subscribed(cluster: Cluster) -> int:
    """Subscribers of the purge channel on any node of ``cluster``."""
    return sum(
        int(count) for node in cluster.nodes for _, count in admin(node.port).pubsub_numsub(PURGE_CHANNEL)
    )


# --- ACL ---------------------------------------------------------------------------------------------


def documented_acl(mode: str, *, newer_server: bool) -> list[str]:
    """The rules README gives for ``mode`` (between its ``acl-<mode>`` markers): the first line's,
    plus the second's for Redis >= 7.2 and Valkey."""
    text = README.read_text(encoding="utf-8")
    start = text.index(f"<!-- acl-{mode} -->")
    block = text[start : text.index("<!-- /acl -->", start)]
    lines = block.split("```")[1].strip().splitlines()
    rules = []
    for line in lines[: 2 if newer_server else 1]:
        words = line.split("#")[0].split()
        assert ["ACL", "SETUSER", "broker"] == words[:3]
        rules += [word for word in words[3:] if word not in ("on", ">PASSWORD")]
    return rules


def _create_user(port: int, rules: list[str]) -> None:
    admin(port).execute_command("ACL", "SETUSER", "broker", "reset", "on", ">broker-password", *rules)


async def _everything_the_broker_does(options: RedisOptions, servers: list[int]) -> None:
    """Cache round trip, the purge listener, the CLI's purge, the probe; then no ACL denials."""
    for port in servers:
        admin(port).execute_command("ACL", "LOG", "RESET")
    async with _cache(options) as (cache, metrics):
        await _round_trip(cache)
        await cache.throttle(KEY, 5)
        listener = asyncio.create_task(cache.listen_for_purges())
        try:
            for _ in range(100):
                removed, notified = await purge_tenant(options, KEY.tenant)
                if notified:
                    break
                await asyncio.sleep(0.05)
            assert 1 == notified
            assert 2 == removed  # the token and the throttle
            deadline = time.monotonic() + 5
            while cache.get_local(KEY) is not None:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
        finally:
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listener
        assert 0 == sum(v for k, v in _samples(metrics, "broker_redis_failures_total").items())
    denials = [entry for port in servers for entry in admin(port).execute_command("ACL", "LOG")]
    assert [] == denials


def _samples(metrics: Metrics, name: str) -> dict[str, float]:
    return {
        str(sample.labels): sample.value
        for family in metrics.registry.collect()
        for sample in family.samples
        if sample.name == name
    }


@pytest.mark.parametrize("server", ["redis-server", "valkey-server"])
async def test_the_documented_acl_is_enough(server: str, tmp_path: Path) -> None:
    """An ACL user with exactly README's rules for a single server (Redis 7 and Valkey 9) does every
    operation of the broker with no denial in ACL LOG."""
    binary = "redis-server" if server == "redis-server" else valkey_binary()
    with started(RedisServer(tmp_path, binary=binary)) as redis_server:
        _create_user(redis_server.port, documented_acl("standalone", newer_server=server != "redis-server"))
        url = f"redis://broker:broker-password@127.0.0.1:{redis_server.port}/0"
        await _everything_the_broker_does(_options(url), [redis_server.port])


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with started(Cluster(tmp_path_factory.mktemp("cluster"))) as running:
        yield running


async def test_the_documented_cluster_acl_is_enough(cluster: Cluster) -> None:
    """The same on a 3-master Redis Cluster with README's cluster rules, the user on every node."""
    cluster.flush()
    for node in cluster.nodes:
        _create_user(node.port, documented_acl("cluster", newer_server=False))
    url = f"redis://broker:broker-password@127.0.0.1:{cluster.nodes[0].port}/0"
    await _everything_the_broker_does(_options(url, mode="cluster"), [n.port for n in cluster.nodes])


async def test_a_cluster_read_as_one_server_is_revealed_by_the_probe(cluster: Cluster) -> None:
    """redis_mode left at standalone on a Cluster: the write probe fails with MOVED on the slots the
    node does not own (reported, counted by reason), and the cluster client passes it."""
    async with _cache(_options(cluster.url)) as (cache, metrics):
        assert not await cache.ping()
        assert cache.redis_last_error is not None
        assert cache.redis_last_error.startswith("probe: moved")
        assert _samples(metrics, "broker_redis_failures_total")["{'reason': 'moved'}"] >= 1
        assert 0 == _samples(metrics, "broker_redis_probe_ok")["{}"]
    async with _cache(_options(cluster.url, mode="cluster")) as (cache, metrics):
        await _round_trip(cache)
        assert 1 == _samples(metrics, "broker_redis_probe_ok")["{}"]


# --- Entra ID ----------------------------------------------------------------------------------------


def _object_id(emulator: Emulator) -> str:
    import uuid

    identity = emulator.broker_identity
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"sp:{identity.tenant_id}:{identity.client_id}"))


def _credential(emulator: Emulator) -> ClientSecretCredential:
    identity = emulator.broker_identity
    return ClientSecretCredential(
        identity.tenant_id,
        identity.client_id,
        identity.client_secret,
        authority=emulator.base_url,
        connection_verify=emulator.ca_path,
    )


async def _wait(predicate: Any, what: str, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.05)


async def test_entra_tokens_are_renewed_on_live_connections(emulator: Emulator, tmp_path: Path) -> None:
    """Against a Redis that, as Azure does, takes Entra tokens as passwords and closes a connection
    whose token expires: the broker authenticates as its object id, renews the token ahead of expiry
    and re-authenticates its live connections, pub/sub included, so past the first token's expiry no
    connection is cut, no AUTH is refused, and a purge broadcast still arrives.

    Tokens live 45 s here: azure-identity asks Entra again at most every 30 s, so a renewal needs a
    token lifetime beyond that (real ones live 60-90 minutes)."""
    emulator.set_token_lifetime(45)  # renewed 15 s before expiry
    backend = RedisServer(tmp_path)
    with started(backend), started(EntraGate(backend, emulator.public_key_pem, _object_id(emulator))) as gate:
        options = _options(f"redis://127.0.0.1:{gate.port}/0", entra=True)
        credentials = EntraRedisCredentials(_credential(emulator))
        async with _cache(options, credentials) as (cache, _), _listening(cache, renewing=True):
            started_at = time.monotonic()
            while time.monotonic() - started_at < 48:  # past the first token's expiry
                await _round_trip(cache)
                await purge_tenant(options, KEY.tenant, credentials=credentials)
                await asyncio.sleep(0.5)
            assert credentials.generation >= 2
            assert (0, 0) == (gate.stats.expired_cuts, gate.stats.rejected)
            await _purge_broadcast_arrives(cache, options, credentials)


async def test_entra_tokens_are_renewed_on_every_cluster_node(emulator: Emulator, tmp_path: Path) -> None:
    """The same on a 3-master Cluster with a gate in front of every node (Azure's clustered caches):
    the renewed token reaches every node's connections, the idle ones re-authenticated and the busy
    ones reconnected when their command is done, so no node cuts a connection at expiry."""
    emulator.set_token_lifetime(45)  # renewed 15 s before expiry
    with started(GatedCluster(tmp_path, emulator.public_key_pem, _object_id(emulator))) as cluster:
        options = _options(cluster.url, mode="cluster", entra=True)
        credentials = EntraRedisCredentials(_credential(emulator))
        async with _cache(options, credentials) as (cache, metrics), _listening(cache, renewing=True):
            started_at = time.monotonic()
            for rounds in itertools.count():
                if time.monotonic() - started_at > 48:  # past the first token's expiry
                    break
                # Several new keys at once, so connections to the nodes are busy when renewal comes.
                await asyncio.gather(*(_round_trip(cache, key) for key in _cluster_keys(rounds)))
                await purge_tenant(options, KEY.tenant, credentials=credentials)
                await asyncio.sleep(0.2)
            assert credentials.generation >= 2
            assert all(gate.stats.auths >= 2 for gate in cluster.gates)  # every node saw a renewal
            assert (0, 0) == (cluster.expired_cuts, cluster.rejected)
            assert 0 == sum(_samples(metrics, "broker_redis_failures_total").values())
            assert all(cluster.cluster.keys("*")), "the keys live on every node"
            await _purge_broadcast_arrives(cache, options, credentials)


async def test_the_gate_cuts_connections_whose_token_expired(emulator: Emulator, tmp_path: Path) -> None:
    """The control for the test above: without renewal, the gate closes the connections at expiry
    (and the next command reconnects with a fresh token, so the cache carries on)."""
    emulator.set_token_lifetime(3)
    backend = RedisServer(tmp_path)
    with started(backend), started(EntraGate(backend, emulator.public_key_pem, _object_id(emulator))) as gate:
        options = _options(f"redis://127.0.0.1:{gate.port}/0", entra=True)
        async with _cache(options, EntraRedisCredentials(_credential(emulator))) as (cache, _):
            await _round_trip(cache)
            await _wait(lambda: gate.stats.expired_cuts >= 1, "a cut at expiry", 10)
            assert await cache.ping()


async def test_an_unusable_entra_credential_is_an_auth_failure(emulator: Emulator, tmp_path: Path) -> None:
    """A credential Entra refuses: the cache fails open, and /readyz's probe names an auth failure."""
    backend = RedisServer(tmp_path)
    with started(backend):
        gate = EntraGate(backend, emulator.public_key_pem, _object_id(emulator))
        with started(gate):
            identity = emulator.broker_identity
            wrong = ClientSecretCredential(
                identity.tenant_id,
                identity.client_id,
                "wrong",
                authority=emulator.base_url,
                connection_verify=emulator.ca_path,
            )
            options = _options(f"redis://127.0.0.1:{gate.port}/0", entra=True)
            async with _cache(options, EntraRedisCredentials(wrong)) as (cache, _):
                assert not await cache.ping()
                assert cache.redis_last_error is not None
                assert cache.redis_last_error.startswith("probe: auth (Entra token for Redis")
                assert (await cache.lookup(KEY)).token is None  # fail open


def test_wait_until_is_bounded() -> None:
    """The helpers' waits end (a test of the test tooling: a hang would hold CI for its whole limit)."""
    with pytest.raises(TimeoutError):
        wait_until(lambda: False, "never", timeout=0.2)


async def test_one_keys_failure_does_not_pause_the_others(redis_url: str) -> None:
    """A command that fails for one key (a wrong-type value under its lease name) makes that key
    acquire directly without pausing Redis for unrelated keys: the next key's lease and store still
    use Redis."""
    other = TokenKey(KEY.app, "22222222-3333-4444-5555-666666666666", KEY.resource)
    async with _cache(_options(redis_url)) as (cache, _):
        admin(int(redis_url.rsplit(":", 1)[1].split("/", maxsplit=1)[0])).lpush(
            f"tb:v1:lock:{{{KEY.app}|{KEY.tenant}}}:{KEY.resource}", b"x"
        )
        async with cache.lease(KEY, 5, cache.new_holder()) as lease:
            assert Lease.UNAVAILABLE == lease  # that key only: acquire directly
        assert cache.redis_last_error is not None
        assert cache.redis_last_error.startswith("lease: command")
        assert cache.shared_available
        async with cache.lease(other, 5, cache.new_holder()) as lease:
            assert Lease.ACQUIRED == lease
            await cache.store(other, _token())
        assert (await cache.lookup(other)).token is not None


async def test_a_replica_is_revealed_by_the_probe(tmp_path: Path) -> None:
    """redis_url naming a replica (or a master since demoted): PING answers, the write probe says
    READONLY, and so does the metric."""
    (tmp_path / "master").mkdir()
    (tmp_path / "replica").mkdir()
    with started(RedisServer(tmp_path / "master")) as master:
        replica = RedisServer(tmp_path / "replica", ["--replicaof", "127.0.0.1", str(master.port)])
        with started(replica):
            async with _cache(_options(f"redis://127.0.0.1:{replica.port}/0")) as (cache, metrics):
                assert not await cache.ping()
                assert cache.redis_last_error is not None
                assert cache.redis_last_error.startswith("probe: readonly")
                assert _samples(metrics, "broker_redis_failures_total")["{'reason': 'readonly'}"] >= 1


async def test_a_password_file_is_read_at_every_new_connection(tmp_path: Path) -> None:
    """redis_username + redis_password {file}: after the password is rotated (file and ACL) and the
    connections dropped, the next connection authenticates with the new one, without a restart."""
    password = tmp_path / "password"
    password.write_text("first-password\n", encoding="utf-8")
    with started(RedisServer(tmp_path)) as server:
        admin(server.port).execute_command(
            "ACL", "SETUSER", "broker", "on", ">first-password", "~*", "&*", "+@all"
        )
        options = _options(f"redis://127.0.0.1:{server.port}/0", username="broker", password_file=password)
        async with _cache(options) as (cache, _):
            await _round_trip(cache)
            password.write_text("second-password\n", encoding="utf-8")
            admin(server.port).execute_command("ACL", "SETUSER", "broker", "resetpass", ">second-password")
            admin(server.port).execute_command("CLIENT", "KILL", "USER", "broker")
            assert await cache.ping()
            assert (await cache.lookup(KEY)).token is not None
