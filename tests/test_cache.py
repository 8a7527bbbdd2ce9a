"""The real ``TokenCache`` on the test run's redis-server: the lease and its outcomes, what Redis
holds (sealed, bound to its key name), and that nothing read back from Redis is trusted blindly."""

from __future__ import annotations

import json
import time

import pytest
from redis.asyncio import Redis

from broker import cache as cache_module
from broker.cache import (
    MAX_THROTTLE_SECONDS,
    MAX_VALUE_BYTES,
    Lease,
    Lookup,
    TokenCache,
    _Names,
    purge_tenant,
)
from broker.config import RedisOptions
from broker.crypto import Sealer
from broker.errors import ConsentRequiredError, UnknownTenantError
from broker.metrics import Metrics
from broker.tokens import AccessToken, TokenKey, fingerprint
from tests.conftest import MakeCache, metric_value
from tests.support import free_port

RESOURCE = "https://api.security.microsoft.com"
MDE = "https://api.securitycenter.microsoft.com"
TENANT = "aaaaaaaa-1111-4111-8111-aaaaaaaaaaaa"
OTHER_TENANT = "bbbbbbbb-2222-4222-8222-bbbbbbbbbbbb"
KEY = TokenKey("defender", TENANT, RESOURCE)
CONSENT_DESCRIPTION = f"the app is not consented in tenant {TENANT}: an administrator must grant consent"


def token_for(key: TokenKey, lifetime_seconds: float = 3600, value: str = "token-value") -> AccessToken:
    raw = f"{value}-{key.tenant}-{key.resource}"
    return AccessToken(
        token=raw,
        expires_on=time.time() + lifetime_seconds,
        tenant_id=key.tenant,
        resource=key.resource,
        roles=("Incident.Read.All",),
        fingerprint=fingerprint(raw),
    )


def consent_error() -> ConsentRequiredError:
    return ConsentRequiredError(
        CONSENT_DESCRIPTION, aadsts="AADSTS65001", consent_url="https://login.example/adminconsent"
    )


def redis_errors(metrics: Metrics) -> float:
    return metric_value(metrics, "broker_redis_errors_total")


def closed_port() -> RedisOptions:
    return RedisOptions(url=f"redis://127.0.0.1:{free_port()}/0", timeout_seconds=0.5)


# --- the lease ---------------------------------------------------------------------------------


async def test_lease_acquired_is_held_for_the_block_and_released(
    make_cache: MakeCache, raw_redis: Redis
) -> None:
    """ACQUIRED: the lease key exists with a TTL of the lease while the block runs, gone after."""
    cache = make_cache()
    async with cache.lease(KEY, 5, TokenCache.new_holder()) as lease:
        assert Lease.ACQUIRED == lease
        assert 0 < await raw_redis.pttl(_Names.lease(KEY)) <= 5000
    assert 0 == await raw_redis.exists(_Names.lease(KEY))


async def test_lease_is_held_while_another_replica_has_it(make_cache: MakeCache, raw_redis: Redis) -> None:
    """HELD for a second replica while the first holds the key; the second's exit releases nothing."""
    first, second = make_cache(), make_cache()
    async with first.lease(KEY, 5, TokenCache.new_holder()) as held:
        assert Lease.ACQUIRED == held
        async with second.lease(KEY, 5, TokenCache.new_holder()) as other:
            assert Lease.HELD == other
        assert 1 == await raw_redis.exists(_Names.lease(KEY))
    async with second.lease(KEY, 5, TokenCache.new_holder()) as later:
        assert Lease.ACQUIRED == later


async def test_lease_is_unavailable_without_redis(make_cache: MakeCache) -> None:
    """UNAVAILABLE when Redis does not answer (a closed port) or is not configured: the caller
    acquires directly (fail open); the error is counted and Redis is skipped for the back-off."""
    metrics = Metrics()
    unreachable = make_cache(options=closed_port(), metrics=metrics)
    async with unreachable.lease(KEY, 5, TokenCache.new_holder()) as lease:
        assert Lease.UNAVAILABLE == lease
    assert redis_errors(metrics) >= 1
    # One failed call concerns that call; Redis counts as down (and is skipped) once calls in a row fail.
    for _ in range(cache_module.REDIS_DOWN_AFTER_FAILURES):
        await unreachable.lookup(KEY)
    assert not unreachable.shared_available
    assert unreachable.redis_last_error is not None
    async with make_cache(shared=False).lease(KEY, 5, TokenCache.new_holder()) as local:
        assert Lease.UNAVAILABLE == local


async def test_release_is_fenced_to_its_holder(make_cache: MakeCache, raw_redis: Redis) -> None:
    """A holder whose lease expired and was taken by another replica does not release the new
    holder's lease on exit."""
    cache = make_cache()
    async with cache.lease(KEY, 5, TokenCache.new_holder()) as lease:
        assert Lease.ACQUIRED == lease
        await raw_redis.set(_Names.lease(KEY), b"another-holder", px=5000)
    assert b"another-holder" == await raw_redis.get(_Names.lease(KEY))


async def test_lease_without_ttl_does_not_block_acquisition(make_cache: MakeCache, raw_redis: Redis) -> None:
    """Hardening: a lease key some bug or intruder left without a TTL is replaced (and gets one),
    instead of blocking its key forever."""
    await raw_redis.set(_Names.lease(KEY), b"stuck")
    cache = make_cache()
    async with cache.lease(KEY, 5, TokenCache.new_holder()) as lease:
        assert Lease.ACQUIRED == lease
        assert 0 < await raw_redis.pttl(_Names.lease(KEY)) <= 5000
    assert 0 == await raw_redis.exists(_Names.lease(KEY))


# --- tokens ------------------------------------------------------------------------------------


async def test_stored_token_is_sealed_and_shared_with_its_real_lifetime(
    make_cache: MakeCache, raw_redis: Redis
) -> None:
    """A stored token reaches another replica through Redis, which holds only ciphertext with a TTL
    equal to the token's remaining lifetime."""
    token = token_for(KEY, lifetime_seconds=600)
    await make_cache().store(KEY, token)
    raw = await raw_redis.get(_Names.token(KEY))
    assert raw is not None
    assert token.token.encode() not in raw
    assert 590_000 < await raw_redis.pttl(_Names.token(KEY)) <= 600_000
    found = await make_cache().lookup(KEY)
    assert found.token is not None
    assert (token.token, token.expires_on) == (found.token.token, found.token.expires_on)


async def test_token_copied_to_another_tenants_key_is_not_served(
    make_cache: MakeCache, raw_redis: Redis
) -> None:
    """A sealed token copied under another tenant's key name does not open there (associated data):
    that key is a miss, never the first tenant's token."""
    other = TokenKey(KEY.app, OTHER_TENANT, RESOURCE)
    await make_cache().store(KEY, token_for(KEY))
    await raw_redis.set(_Names.token(other), await raw_redis.get(_Names.token(KEY)) or b"")
    assert (await make_cache().lookup(other)).token is None


@pytest.mark.parametrize(
    "forged",
    [
        json.dumps({"access_token": "forged", "expires_on": 9e9, "tenant_id": TENANT, "resource": RESOURCE}),
        b"\x01" + b"\x00" * 40,
        b"x" * (MAX_VALUE_BYTES + 1),
    ],
    ids=["plaintext-json", "bad-ciphertext", "oversized"],
)
async def test_values_not_sealed_by_us_are_misses(
    make_cache: MakeCache, raw_redis: Redis, forged: str | bytes
) -> None:
    """A value under a token name that is not our ciphertext for that name (plain JSON, garbage,
    anything over MAX_VALUE_BYTES) is a miss, and Redis stays in use."""
    await raw_redis.set(_Names.token(KEY), forged)
    cache = make_cache()
    assert (await cache.lookup(KEY)).token is None
    assert cache.shared_available


async def test_wrong_type_key_is_that_keys_miss_not_an_outage(
    make_cache: MakeCache, raw_redis: Redis
) -> None:
    """Hardening: a LIST under one key's token name makes that key a miss (counted) while other
    keys keep using Redis: no back-off, ``shared_available`` stays True."""
    other = TokenKey(KEY.app, OTHER_TENANT, RESOURCE)
    await make_cache().store(other, token_for(other))
    await raw_redis.rpush(_Names.token(KEY), b"not-a-token")
    metrics = Metrics()
    cache = make_cache(metrics=metrics)
    broken = await cache.lookup(KEY)
    assert broken.token is None
    assert redis_errors(metrics) >= 1
    assert cache.shared_available
    found = await cache.lookup(other)
    assert found.token is not None
    assert token_for(other).token == found.token.token
    await cache.store(KEY, token_for(KEY))  # the next acquisition overwrites the bad value
    assert (await make_cache().lookup(KEY)).token is not None


async def test_dropped_connection_is_retried_not_an_outage(make_cache: MakeCache, raw_redis: Redis) -> None:
    """A connection the server dropped (idle timeout, failover) costs nothing: the next call
    reconnects, no error is counted and Redis is not skipped."""
    metrics = Metrics()
    cache = make_cache(metrics=metrics)
    await cache.store(KEY, token_for(KEY))
    killed = await raw_redis.client_kill_filter(_type="normal", skipme=True)
    assert killed >= 1
    found = await cache.lookup(KEY)
    assert found.token is not None
    assert 0 == redis_errors(metrics)
    assert cache.shared_available


async def test_store_and_release_are_attempted_while_backing_off(
    make_cache: MakeCache, raw_redis: Redis, core_redis: RedisOptions, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Hardening: a replica that saw Redis time out mid-acquisition (and now skips it for reads)
    still stores the token it got and releases its lease, so other replicas' callers find the
    token instead of waiting out the lease."""
    monkeypatch.setattr(cache_module, "REDIS_BACKOFF_SECONDS", 60.0)  # the back-off outlasts the test
    cache = make_cache(options=RedisOptions(url=core_redis.url, timeout_seconds=0.2))
    async with cache.lease(KEY, 30, TokenCache.new_holder()) as lease:
        assert Lease.ACQUIRED == lease
        await raw_redis.client_pause(1000)  # Redis holds every client's commands for 1 s
        # Redis has been timing out for a while (a lone timeout only concerns its own call):
        cache._failing_since = time.monotonic() - 2 * cache_module.REDIS_BACKOFF_SECONDS
        assert (await cache.lookup(KEY)).token is None  # times out: fail open, back off
        assert not cache.shared_available
        await raw_redis.ping()  # answered once the pause is over
        await cache.store(KEY, token_for(KEY))
    assert not cache.shared_available
    assert 0 == await raw_redis.exists(_Names.lease(KEY))
    found = await make_cache().lookup(KEY)
    assert found.token is not None
    assert token_for(KEY).token == found.token.token


# --- remembered failures -------------------------------------------------------------------------


async def test_remembered_failure_is_sealed_in_redis(
    make_cache: MakeCache, raw_redis: Redis, sealer: Sealer
) -> None:
    """Hardening: a remembered failure is ciphertext in Redis (neither its description nor the word
    "consent" readable; under the key only error, description and AADSTS code, never the consent
    link), with the remembering TTL, and another replica reads it back."""
    await make_cache().remember(KEY, consent_error(), 30)
    raw = await raw_redis.get(_Names.failure(KEY))
    assert raw is not None
    assert CONSENT_DESCRIPTION.encode() not in raw
    assert b"consent" not in raw.lower()
    assert isinstance(raw, bytes)
    stored = json.loads(sealer.open(raw, _Names.failure(KEY).encode()))
    assert {"error", "error_description", "aadsts"} == set(stored)
    assert 29_000 < await raw_redis.pttl(_Names.failure(KEY)) <= 30_000
    failure = (await make_cache().lookup(KEY)).failure
    assert isinstance(failure, ConsentRequiredError)
    assert (CONSENT_DESCRIPTION, "AADSTS65001") == (failure.description, failure.aadsts)


async def test_forged_failure_is_ignored(make_cache: MakeCache, raw_redis: Redis) -> None:
    """Hardening: an unsealed failure body written by hand under the failure key is not replayed."""
    forged = {"error": "consent_required", "error_description": "forged", "consent_url": "https://evil"}
    await raw_redis.set(_Names.failure(KEY), json.dumps(forged))
    cache = make_cache()
    assert (await cache.lookup(KEY)).failure is None
    assert cache.shared_available


async def test_sealed_failure_replays_only_its_documented_fields(
    make_cache: MakeCache, raw_redis: Redis, sealer: Sealer
) -> None:
    """Even a sealed failure body replays only error, description and aadsts: a consent_url (or any
    other field) in it never comes back."""
    name = _Names.failure(KEY)
    body = {
        "error": "consent_required",
        "error_description": "stored",
        "aadsts": "AADSTS65001",
        "consent_url": "https://evil.example/phish",
        "missing_roles": ["x"],
    }
    await raw_redis.set(name, sealer.seal(json.dumps(body).encode(), name.encode()), px=30_000)
    failure = (await make_cache().lookup(KEY)).failure
    assert isinstance(failure, ConsentRequiredError)
    assert {"error": "consent_required", "error_description": "stored", "aadsts": "AADSTS65001"} == (
        failure.to_body()
    )


async def test_in_process_failures_and_throttles_stay_bounded(make_cache: MakeCache) -> None:
    """Hardening: after 500 distinct failing (and throttled) tenants, an in-process cache remembers
    only the newest ``local_max_entries`` of each, so one caller's random tenants cannot grow a
    replica's memory."""
    bound = 8
    cache = make_cache(shared=False, local_max_entries=bound)
    keys = [TokenKey("defender", f"{i:08x}-0000-4000-8000-{i:012x}", RESOURCE) for i in range(500)]
    for key in keys:
        await cache.remember(key, UnknownTenantError("unknown", aadsts="AADSTS90002"), 60)
        await cache.throttle(key, 60)
    lookups = [await cache.lookup(key) for key in keys]
    remembered = [i for i, found in enumerate(lookups) if found.failure is not None]
    throttled = [i for i, found in enumerate(lookups) if found.throttled_seconds > 0]
    assert list(range(500 - bound, 500)) == remembered
    assert list(range(500 - bound, 500)) == throttled


async def test_purge_local_forgets_a_tenant_in_process(make_cache: MakeCache) -> None:
    """``purge_local`` drops the tenant's tokens, remembered failures and throttles from this
    process, and nothing of another tenant."""
    cache = make_cache(shared=False)
    other = TokenKey(KEY.app, OTHER_TENANT, RESOURCE)
    for key in (KEY, other):
        await cache.store(key, token_for(key))
        await cache.remember(TokenKey(key.app, key.tenant, MDE), consent_error(), 60)
        await cache.throttle(key, 60)
    assert 1 == cache.purge_local(TENANT.upper())
    assert cache.get_local(KEY) is None
    assert Lookup() == await cache.lookup(TokenKey(KEY.app, TENANT, MDE))
    assert cache.get_local(other) is not None
    kept = await cache.lookup(TokenKey(other.app, OTHER_TENANT, MDE))
    assert kept.failure is not None
    assert kept.throttled_seconds > 0


# --- throttles ---------------------------------------------------------------------------------


async def test_throttle_is_shared_through_redis(make_cache: MakeCache) -> None:
    """A throttle set by one replica holds every resource of that (app, tenant) on another."""
    await make_cache().throttle(KEY, 30)
    found = await make_cache().lookup(TokenKey(KEY.app, TENANT, MDE))
    assert 25 < found.throttled_seconds <= 30
    assert 0 == (await make_cache().lookup(TokenKey(KEY.app, OTHER_TENANT, RESOURCE))).throttled_seconds


async def test_throttle_ttl_from_redis_is_clamped(make_cache: MakeCache, raw_redis: Redis) -> None:
    """Hardening: a throttle key with a 10-year TTL is honoured for at most MAX_THROTTLE_SECONDS."""
    await raw_redis.set(_Names.throttle(KEY), b"1", ex=10 * 365 * 24 * 3600)
    assert MAX_THROTTLE_SECONDS == (await make_cache().lookup(KEY)).throttled_seconds


# --- purge ---------------------------------------------------------------------------------------


async def test_purge_tenant_removes_every_entry_of_that_tenant_only(
    make_cache: MakeCache, raw_redis: Redis, core_redis: RedisOptions
) -> None:
    """Hardening: ``purge_tenant`` deletes the tenant's tok, lock, neg and throttle keys (every app
    and resource, whatever case the tenant is given in) and leaves other tenants' keys alone."""
    cache = make_cache()
    for tenant in (TENANT, OTHER_TENANT):
        for app in ("defender", "other-app"):
            key = TokenKey(app, tenant, RESOURCE)
            await cache.store(key, token_for(key))
            await cache.remember(TokenKey(app, tenant, MDE), consent_error(), 60)
            await cache.throttle(key, 60)
            await raw_redis.set(_Names.lease(key), b"holder", px=60_000)
    before = sorted(await raw_redis.keys("tb:v1:*"))
    assert 16 == len(before)
    removed, notified = await purge_tenant(core_redis, TENANT.upper())
    assert (8, 0) == (removed, notified)
    left = sorted(await raw_redis.keys("tb:v1:*"))
    assert [name for name in before if OTHER_TENANT.encode() in name] == left
