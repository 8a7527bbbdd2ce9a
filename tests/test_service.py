"""``TokenBroker.get_token()`` in process: a scripted ``TokenSource`` (our own protocol, as httpx's
``MockTransport`` is its own transport) behind the real ``TokenCache`` on a real redis-server.

Two brokers on one Redis database are two replicas; ``FakeTokenSource.calls`` is what Entra saw.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable

import pytest
from redis import Redis as SyncRedis
from redis.asyncio import Redis

from broker.cache import MAX_THROTTLE_SECONDS, PURGE_CHANNEL, TokenCache, _Names, purge_tenant
from broker.callers import Caller
from broker.config import AppSettings, CredentialSource, FlightOptions, RedisOptions
from broker.crypto import Sealer
from broker.errors import (
    BrokerError,
    ConsentRequiredError,
    CredentialRejectedError,
    InsufficientConsentError,
    TemporarilyUnavailableError,
    TenantRefusedError,
    ThrottledError,
    UnknownTenantError,
    UpstreamError,
)
from broker.metrics import Metrics
from broker.service import TokenBroker
from broker.tokens import AccessToken, TokenKey, TokenRequest, fingerprint
from tests.conftest import MakeCache, metric_value
from tests.support import free_port, wait_until

APP = "defender"
CLIENT_ID = "0f0e0d0c-0b0a-4999-8888-777766665555"
RESOURCE = "https://api.security.microsoft.com"
MDE = "https://api.securitycenter.microsoft.com"
TENANT = "aaaaaaaa-1111-4111-8111-aaaaaaaaaaaa"
KEY = TokenKey(APP, TENANT, RESOURCE)
ROLES = ("Incident.Read.All", "AdvancedHunting.Read.All")
CALLER = Caller("soar", frozenset({"*"}), frozenset({APP}))
APPS = {
    APP: AppSettings(
        client_id=CLIENT_ID, credential=CredentialSource(env="UNUSED_SECRET"), resources=[RESOURCE, MDE]
    )
}
FLIGHT = FlightOptions(
    lease_seconds=10, upstream_retry_seconds=2, upstream_timeout_seconds=5, negative_cache_seconds=30
)
WAIT_SECONDS = 10.0


class FakeTokenSource:
    """Entra as the broker sees it, scripted: counts calls, holds each acquisition while ``gate``
    is clear, raises the queued ``errors`` first (oldest first), then issues tokens that live
    ``lifetime_seconds``."""

    def __init__(self, *, lifetime_seconds: float = 3600, gated: bool = False) -> None:
        self.lifetime_seconds = lifetime_seconds
        self.calls: list[TokenKey] = []
        self.errors: list[BrokerError] = []
        self.issued: list[AccessToken] = []
        self.entered = asyncio.Event()  # set by the first call
        self.gate = asyncio.Event()
        if not gated:
            self.gate.set()

    async def acquire(self, key: TokenKey) -> AccessToken:
        self.calls.append(key)
        self.entered.set()
        await self.gate.wait()
        if self.errors:
            raise self.errors.pop(0)
        raw = f"fake-token-{len(self.calls)}-{secrets.token_hex(8)}"
        token = AccessToken(
            token=raw,
            expires_on=time.time() + self.lifetime_seconds,
            tenant_id=key.tenant,
            resource=key.resource,
            roles=ROLES,
            uti=f"uti-{len(self.calls)}",
            fingerprint=fingerprint(raw),
        )
        self.issued.append(token)
        return token

    def consent_url(self, key: TokenKey) -> str:
        return f"https://login.example/{key.tenant}/v2.0/adminconsent?client_id={CLIENT_ID}"

    def forget_tenant(self, tenant: str) -> None:
        pass  # nothing kept per tenant


def request(
    tenant: str = TENANT, resource: str = RESOURCE, *, roles: tuple[str, ...] = (), min_ttl: int = 300
) -> TokenRequest:
    return TokenRequest(tenant=tenant, resource=resource, roles=roles, min_ttl_seconds=min_ttl)


def consent_error() -> ConsentRequiredError:
    return ConsentRequiredError(
        f"the app is not consented in tenant {TENANT}: an administrator must grant consent",
        aadsts="AADSTS65001",
        consent_url="https://login.example/consent-as-acquired",
    )


class Replicas:
    """Brokers built on real caches; every one is closed when the test ends."""

    def __init__(self, make_cache: MakeCache) -> None:
        self._make_cache = make_cache
        self.brokers: list[TokenBroker] = []

    def start(
        self,
        source: FakeTokenSource,
        *,
        options: FlightOptions = FLIGHT,
        metrics: Metrics | None = None,
        cache: TokenCache | None = None,
    ) -> TokenBroker:
        metrics = metrics or Metrics()
        cache = cache or self._make_cache(metrics=metrics)
        broker = TokenBroker(dict(APPS), options, metrics, cache, source)
        self.brokers.append(broker)
        return broker


@pytest.fixture
async def replicas(make_cache: MakeCache) -> AsyncIterator[Replicas]:
    """Start brokers ("replicas") with ``replicas.start(source)``."""
    started = Replicas(make_cache)
    yield started
    for broker in started.brokers:
        await broker.close()


async def wait_for(predicate: Callable[[], object], what: str) -> None:
    """``wait_until`` from a coroutine: polled in a thread while this loop keeps running."""
    await asyncio.to_thread(wait_until, predicate, WAIT_SECONDS, what)


# --- single flight and the lease ------------------------------------------------------------------


async def test_concurrent_requests_for_one_key_cost_one_acquisition(replicas: Replicas) -> None:
    """100 concurrent cold requests for one key in one process: one acquisition, which the other
    99 join; everybody gets that token."""
    source, metrics = FakeTokenSource(gated=True), Metrics()
    broker = replicas.start(source, metrics=metrics)
    tasks = [asyncio.create_task(broker.get_token(CALLER, request())) for _ in range(100)]
    await wait_for(lambda: 99 == metric_value(metrics, "broker_singleflight_coalesced_total"), "99 joined")
    source.gate.set()
    issued = await asyncio.gather(*tasks)
    assert [KEY] == source.calls
    assert {source.issued[0].token} == {result.token.token for result in issued}
    assert {"entra": 1, "singleflight": 99} == Counter(result.layer for result in issued)


async def test_two_replicas_sharing_redis_acquire_once(replicas: Replicas, raw_redis: Redis) -> None:
    """Two brokers on one Redis: while the first holds the key's lease and waits on Entra, the
    second's requests find the lease held and poll Redis; they are served the first's token, and
    Entra sees one request."""
    source = FakeTokenSource(gated=True)
    second_metrics = Metrics()
    first, second = replicas.start(source), replicas.start(source, metrics=second_metrics)
    leader = asyncio.create_task(first.get_token(CALLER, request()))
    await asyncio.wait_for(source.entered.wait(), WAIT_SECONDS)
    assert 1 == await raw_redis.exists(_Names.lease(KEY))
    followers = [asyncio.create_task(broker.get_token(CALLER, request())) for broker in [first, second] * 50]

    def second_is_polling() -> bool:
        return metric_value(second_metrics, "broker_cache_lookups_total", layer="redis", result="miss") >= 2

    await wait_for(second_is_polling, "the second replica polling Redis behind the lease")
    source.gate.set()
    issued = [await leader, *await asyncio.gather(*followers)]
    assert [KEY] == source.calls
    assert {source.issued[0].token} == {result.token.token for result in issued}
    second_layers = Counter(result.layer for result in issued[2::2])
    assert {"redis": 1, "singleflight": 49} == second_layers
    assert 0 == await raw_redis.exists(_Names.lease(KEY))


async def test_unreachable_redis_fails_open(replicas: Replicas, make_cache: MakeCache) -> None:
    """Redis on a closed port: the broker acquires directly (lease UNAVAILABLE), serves the token,
    counts the error, and serves the next request from its own memory."""
    metrics = Metrics()
    unreachable = RedisOptions(url=f"redis://127.0.0.1:{free_port()}/0", timeout_seconds=0.5)
    source = FakeTokenSource()
    broker = replicas.start(source, metrics=metrics, cache=make_cache(options=unreachable, metrics=metrics))
    first = await broker.get_token(CALLER, request())
    again = await broker.get_token(CALLER, request())
    assert ("entra", "l1") == (first.layer, again.layer)
    assert first.token.token == again.token.token
    assert [KEY] == source.calls
    assert metric_value(metrics, "broker_redis_errors_total") >= 1


# --- refresh ahead --------------------------------------------------------------------------------


async def seed_due_token(cache: TokenCache) -> AccessToken:
    """A valid token whose refresh time has passed, as if acquired 40 minutes ago."""
    now = time.time()
    due = AccessToken(
        token="old-token",
        expires_on=now + 1200,
        tenant_id=TENANT,
        resource=RESOURCE,
        roles=ROLES,
        fingerprint=fingerprint("old-token"),
        refresh_on=now - 1,
    )
    await cache.store(KEY, due)
    return due


async def test_due_token_is_refreshed_in_background_and_adopted_by_the_other_replica(
    replicas: Replicas, make_cache: MakeCache
) -> None:
    """A token due for refresh is still served at once while one replica refreshes it in the
    background (nobody waits on Entra); the other replica then adopts the new token from Redis
    instead of asking Entra again."""
    source = FakeTokenSource(gated=True)
    first_metrics, second_metrics = Metrics(), Metrics()
    first_cache = make_cache(metrics=first_metrics)
    old = await seed_due_token(first_cache)
    first = replicas.start(source, metrics=first_metrics, cache=first_cache)
    second = replicas.start(source, metrics=second_metrics)
    seen_by_second = await second.get_token(CALLER, request())
    assert ("redis", old.token) == (seen_by_second.layer, seen_by_second.token.token)

    served = await first.get_token(CALLER, request())  # Entra is held: this must not wait on it
    assert ("l1", old.token) == (served.layer, served.token.token)
    source.gate.set()
    await wait_for(lambda: 1 == metric_value(first_metrics, "broker_refresh_total", outcome="ok"), "refresh")
    fresh = source.issued[0]
    assert fresh.token == (await first.get_token(CALLER, request())).token.token

    still_old = await second.get_token(CALLER, request())  # due in its L1: served, then refreshed
    assert old.token == still_old.token.token
    await wait_for(
        lambda: 1 == metric_value(second_metrics, "broker_refresh_total", outcome="adopted"), "adopt"
    )
    adopted = await second.get_token(CALLER, request())
    assert ("l1", fresh.token) == (adopted.layer, adopted.token.token)
    assert [KEY] == source.calls


async def test_refresh_stands_down_while_another_replica_refreshes(
    replicas: Replicas, make_cache: MakeCache
) -> None:
    """Two replicas with the same due token: while the first refreshes, the second's background
    refresh finds the lease held and stands down; Entra sees one request."""
    source = FakeTokenSource(gated=True)
    first_metrics, second_metrics = Metrics(), Metrics()
    first_cache, second_cache = make_cache(metrics=first_metrics), make_cache(metrics=second_metrics)
    old = await seed_due_token(first_cache)
    second_cache.put_local(KEY, old)
    first = replicas.start(source, metrics=first_metrics, cache=first_cache)
    second = replicas.start(source, metrics=second_metrics, cache=second_cache)
    await first.get_token(CALLER, request())
    await asyncio.wait_for(source.entered.wait(), WAIT_SECONDS)
    served = await second.get_token(CALLER, request())
    assert old.token == served.token.token
    await wait_for(
        lambda: 1 == metric_value(second_metrics, "broker_refresh_total", outcome="other_replica"),
        "stand-down",
    )
    source.gate.set()
    await wait_for(lambda: 1 == metric_value(first_metrics, "broker_refresh_total", outcome="ok"), "refresh")
    assert [KEY] == source.calls


# --- throttles ------------------------------------------------------------------------------------


async def test_throttle_is_shared_and_answered_503_with_retry_after(replicas: Replicas) -> None:
    """Entra throttles the first replica for 30 s: its caller gets 503 + Retry-After, and the
    second replica answers another resource of that tenant the same way without asking Entra."""
    source = FakeTokenSource()
    source.errors.append(ThrottledError("throttled", retry_after=30, hinted=True))
    first, second = replicas.start(source), replicas.start(source)
    with pytest.raises(ThrottledError) as throttled:
        await first.get_token(CALLER, request())
    assert (503, {"Retry-After": "30"}) == (throttled.value.status, throttled.value.headers())
    with pytest.raises(TemporarilyUnavailableError) as held_off:
        await second.get_token(CALLER, request(resource=MDE))
    assert 503 == held_off.value.status
    assert 25 <= held_off.value.retry_after <= 30
    assert str(held_off.value.retry_after) == held_off.value.headers()["Retry-After"]
    assert [KEY] == source.calls


async def test_shared_throttle_is_waited_out_within_the_retry_budget(replicas: Replicas) -> None:
    """A 1-s throttle recorded by one replica (which gave up: no retry budget) is waited out by
    another replica whose budget allows it, which then asks Entra once."""
    source = FakeTokenSource()
    source.errors.append(ThrottledError("throttled", retry_after=1, hinted=True))
    impatient = replicas.start(
        source,
        options=FlightOptions(
            lease_seconds=10, upstream_retry_seconds=0, upstream_timeout_seconds=5, negative_cache_seconds=30
        ),
    )
    patient = replicas.start(source)
    with pytest.raises(ThrottledError):
        await impatient.get_token(CALLER, request())
    started = time.monotonic()
    issued = await patient.get_token(CALLER, request(resource=MDE))
    assert time.monotonic() - started >= 0.5  # the throttle's remaining TTL, at least
    assert "entra" == issued.layer
    assert [KEY, TokenKey(APP, TENANT, MDE)] == source.calls


async def test_throttle_from_redis_is_honoured_for_at_most_the_maximum(
    replicas: Replicas, raw_redis: Redis
) -> None:
    """Hardening: a throttle key with a 10-year TTL (an intruder's or a bug's) holds the key off
    for at most MAX_THROTTLE_SECONDS: the caller is told to retry then, not in 10 years."""
    await raw_redis.set(_Names.throttle(KEY), b"1", ex=10 * 365 * 24 * 3600)
    source = FakeTokenSource()
    with pytest.raises(TemporarilyUnavailableError) as held_off:
        await replicas.start(source).get_token(CALLER, request())
    assert MAX_THROTTLE_SECONDS == held_off.value.retry_after
    assert [] == source.calls


async def test_transient_failure_is_retried_within_the_budget(replicas: Replicas) -> None:
    """A 503 from Entra without Retry-After is retried after a short jittered backoff: the caller
    sees only the success."""
    source = FakeTokenSource()
    source.errors.append(TemporarilyUnavailableError("Entra ID answered 503", retry_after=5))
    issued = await replicas.start(source).get_token(CALLER, request())
    assert "entra" == issued.layer
    assert [KEY, KEY] == source.calls


# --- remembered failures --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "refusal",
    [
        consent_error(),
        UnknownTenantError(f"Entra ID does not know tenant {TENANT}", aadsts="AADSTS90002"),
        TenantRefusedError(f"Entra ID refused tokens in tenant {TENANT}", aadsts="AADSTS500011"),
    ],
    ids=lambda refusal: type(refusal).__name__,
)
async def test_permanent_failure_is_remembered_across_replicas(
    replicas: Replicas, raw_redis: Redis, refusal: BrokerError
) -> None:
    """A permanent refusal is asked of Entra once for 10 requests on two replicas; it is remembered
    for negative_cache_seconds (the Redis TTL) and replayed with its code and description."""
    source = FakeTokenSource()
    source.errors.append(refusal)
    first_metrics = Metrics()
    first, second = replicas.start(source, metrics=first_metrics), replicas.start(source)
    for broker in [first, second] * 5:
        with pytest.raises(type(refusal)) as failed:
            await broker.get_token(CALLER, request())
        assert (refusal.description, refusal.aadsts) == (failed.value.description, failed.value.aadsts)
    assert [KEY] == source.calls
    assert 4 == metric_value(first_metrics, "broker_negative_cache_hits_total")
    ttl_ms = await raw_redis.pttl(_Names.failure(KEY))
    assert FLIGHT.negative_cache_seconds * 1000 - 5000 < ttl_ms <= FLIGHT.negative_cache_seconds * 1000


async def test_failures_that_are_not_the_tenants_are_not_remembered(replicas: Replicas) -> None:
    """A rejected app credential is the operator's problem, not the tenant's: the next request asks
    Entra again."""
    source = FakeTokenSource()
    source.errors.append(CredentialRejectedError("rejected", aadsts="AADSTS7000215"))
    broker = replicas.start(source)
    with pytest.raises(CredentialRejectedError):
        await broker.get_token(CALLER, request())
    assert "entra" == (await broker.get_token(CALLER, request())).layer
    assert [KEY, KEY] == source.calls


async def test_remembered_consent_url_is_rebuilt_from_the_source(
    replicas: Replicas, raw_redis: Redis, sealer: Sealer
) -> None:
    """Hardening: a remembered ConsentRequiredError's consent_url comes from the configuration, never
    from storage: a link planted in a (even validly sealed) Redis entry never reaches the caller."""
    name = _Names.failure(KEY)
    planted = {
        "error": "consent_required",
        "error_description": "consent needed",
        "aadsts": "AADSTS65001",
        "consent_url": "https://evil.example/phish",
    }
    await raw_redis.set(name, sealer.seal(json.dumps(planted).encode(), name.encode()), px=30_000)
    source = FakeTokenSource()
    with pytest.raises(ConsentRequiredError) as failed:
        await replicas.start(source).get_token(CALLER, request())
    assert source.consent_url(KEY) == failed.value.consent_url
    assert "evil.example" not in json.dumps(failed.value.to_body())
    assert [] == source.calls


async def test_consent_url_of_a_fresh_refusal_is_rebuilt_too(replicas: Replicas) -> None:
    """The first replica's refusal and the second's remembered one carry the same, configured link."""
    source = FakeTokenSource()
    source.errors.append(consent_error())
    first, second = replicas.start(source), replicas.start(source)
    with pytest.raises(ConsentRequiredError):
        await first.get_token(CALLER, request())
    with pytest.raises(ConsentRequiredError) as remembered:
        await second.get_token(CALLER, request())
    assert source.consent_url(KEY) == remembered.value.consent_url


async def test_forged_failure_in_redis_is_ignored(replicas: Replicas, raw_redis: Redis) -> None:
    """Hardening: an unsealed failure body written by hand under the failure key is not replayed:
    the request goes to Entra and succeeds."""
    forged = {"error": "consent_required", "error_description": "forged", "consent_url": "https://evil"}
    await raw_redis.set(_Names.failure(KEY), json.dumps(forged))
    source = FakeTokenSource()
    issued = await replicas.start(source).get_token(CALLER, request())
    assert "entra" == issued.layer
    assert [KEY] == source.calls


async def test_purge_tenant_forgets_a_remembered_failure_everywhere(
    replicas: Replicas, core_redis: RedisOptions
) -> None:
    """After consent is granted, ``purge_tenant`` makes the next request on either replica ask Entra
    again instead of replaying the remembered refusal."""
    source = FakeTokenSource()
    source.errors.append(consent_error())
    first, second = replicas.start(source), replicas.start(source)
    for broker in (first, second):
        with pytest.raises(ConsentRequiredError):
            await broker.get_token(CALLER, request())
    removed, _ = await purge_tenant(core_redis, TENANT)
    assert 1 == removed
    assert "entra" == (await second.get_token(CALLER, request())).layer
    assert "redis" == (await first.get_token(CALLER, request())).layer
    assert [KEY, KEY] == source.calls


async def test_purge_local_forgets_a_remembered_failure_without_redis(
    replicas: Replicas, make_cache: MakeCache
) -> None:
    """Without Redis the refusal is remembered in process (one Entra request for 5 asks) until
    ``purge_local`` forgets it."""
    source = FakeTokenSource()
    source.errors.append(consent_error())
    cache = make_cache(shared=False)
    broker = replicas.start(source, cache=cache)
    for _ in range(5):
        with pytest.raises(ConsentRequiredError) as failed:
            await broker.get_token(CALLER, request())
    assert source.consent_url(KEY) == failed.value.consent_url
    assert [KEY] == source.calls
    cache.purge_local(TENANT)
    assert "entra" == (await broker.get_token(CALLER, request())).layer
    assert [KEY, KEY] == source.calls


async def test_purge_broadcast_drops_tokens_on_a_listening_replica(
    replicas: Replicas, make_cache: MakeCache, core_redis: RedisOptions
) -> None:
    """A replica running ``listen_for_purges`` drops its in-process token for a purged tenant, so
    its next request asks Entra again instead of serving the old token."""
    metrics = Metrics()
    cache = make_cache(metrics=metrics)
    source = FakeTokenSource()
    broker = replicas.start(source, metrics=metrics, cache=cache)
    old = await broker.get_token(CALLER, request())
    listener = asyncio.create_task(cache.listen_for_purges())
    try:

        def subscribed() -> bool:
            with SyncRedis.from_url(core_redis.url) as client:
                return bool(client.pubsub_numsub(PURGE_CHANNEL)[0][1])

        await wait_for(subscribed, "the purge listener")
        _, notified = await purge_tenant(core_redis, TENANT)
        assert 1 == notified
        await wait_for(lambda: 0 == metric_value(metrics, "broker_cached_tokens"), "the broadcast applied")
    finally:
        listener.cancel()
        await asyncio.gather(listener, return_exceptions=True)
    new = await broker.get_token(CALLER, request())
    assert "entra" == new.layer
    assert old.token.token != new.token.token
    assert [KEY, KEY] == source.calls


# --- what the caller asked for --------------------------------------------------------------------


async def test_missing_roles_are_403_with_the_consent_link(replicas: Replicas) -> None:
    """A token lacking a requested role is refused with the missing roles and the consent link."""
    source = FakeTokenSource()
    with pytest.raises(InsufficientConsentError) as failed:
        await replicas.start(source).get_token(
            CALLER, request(roles=("Incident.Read.All", "Machine.Isolate"))
        )
    assert (["Machine.Isolate"], source.consent_url(KEY)) == (
        failed.value.missing_roles,
        failed.value.consent_url,
    )


async def test_unsatisfiable_min_ttl_costs_one_upstream_request(replicas: Replicas) -> None:
    """A min_ttl that Entra's tokens cannot satisfy is a 502 that costs one upstream request, not a
    loop (PRODUCT: "Every caller is bounded")."""
    source = FakeTokenSource(lifetime_seconds=120)
    with pytest.raises(UpstreamError, match="min_ttl"):
        await replicas.start(source).get_token(CALLER, request(min_ttl=600))
    assert [KEY] == source.calls
