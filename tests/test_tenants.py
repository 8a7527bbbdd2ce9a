"""The tenants module in process: what an outcome means for a tenant, how entries merge, replicas
writing one entry at once (real redis-server), single-flight domain resolution, policies naming a
tenant by any spelling, and the discovery adapter against the emulator."""

from __future__ import annotations

import asyncio
import base64
import itertools
import os
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from redis.asyncio import Redis

from broker.cache import TokenCache
from broker.config import Settings, parse_settings
from broker.crypto import Sealer, parse_key
from broker.discovery import TenantDiscovery
from broker.errors import (
    BrokerError,
    ConfigError,
    ConsentRequiredError,
    CredentialRejectedError,
    RateLimitedError,
    TemporarilyUnavailableError,
    TenantRefusedError,
    ThrottledError,
    UnknownTenantError,
)
from broker.metrics import Metrics
from broker.service import TokenBroker
from broker.tenants import Observation, TenantRegistry, TenantResolver, TenantSweep, merge_entry, observe
from broker.tokens import AccessToken, TokenKey, TokenRequest, fingerprint
from emulator import Emulator

XDR = "https://api.security.microsoft.com"
MDE = "https://api.securitycenter.microsoft.com"
ROLES = ("Incident.Read.All", "AdvancedHunting.Read.All")
TENANT = "c0c0c0c0-0000-4000-8000-000000000001"
OTHER = "fa0fa0fa-0000-4000-8000-000000000002"


def _settings(top: dict[str, Any] | None = None, **app: Any) -> Settings:
    return parse_settings(
        {
            **(top or {}),
            "apps": {
                "defender": {
                    "client_id": "11111111-2222-3333-4444-555555555555",
                    "credential": {"env": "UNSET"},
                    "resources": [XDR, MDE],
                    **app,
                }
            },
            "callers": {"soar": {"api_key_sha256": "a" * 64, "tenants": ["*"], "apps": ["defender"]}},
        },
        environ={},
    )


def _token(roles: tuple[str, ...] = ROLES) -> AccessToken:
    return AccessToken("t", time.time() + 3600, TENANT, XDR, roles)


# --- configuration -------------------------------------------------------------------------------


def test_required_roles_may_name_only_the_apps_resources() -> None:
    """required_roles per resource of the app; a resource the app does not have is named in the error;
    the tenant settings have their documented defaults."""
    settings = _settings(required_roles={XDR + "/": list(ROLES)})
    assert {"defender": {XDR: ROLES}} == settings.tenant_options().required_roles
    assert (21600.0, 1.0, 86400.0) == (
        settings.tenant_check_interval_seconds,
        settings.tenant_check_rate,
        settings.tenant_domain_ttl_seconds,
    )
    assert settings.callers["soar"].admin is False
    with pytest.raises(
        ConfigError, match=r"apps\.defender\.required_roles: .* is not one of the app's resources"
    ):
        _settings(required_roles={"https://graph.microsoft.com": ["X"]})


# --- what an outcome says ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("outcome", "state"),
    [
        (_token(), "ready"),
        (_token(("Incident.Read.All",)), "missing_roles"),
        (ConsentRequiredError("no", aadsts="AADSTS700016"), "consent_required"),
        (UnknownTenantError("gone", aadsts="AADSTS90002"), "unknown"),
        (TenantRefusedError("disabled", aadsts="AADSTS7000112"), "disabled"),
        (TenantRefusedError("not provisioned", aadsts="AADSTS500011"), "error"),
        (CredentialRejectedError("app secret", aadsts="AADSTS7000215"), None),
        (TemporarilyUnavailableError("later", retry_after=1), None),
        (RateLimitedError("budget", retry_after=1), None),
    ],
    ids=lambda value: type(value).__name__ if not isinstance(value, str | None) else str(value),
)
def test_what_an_outcome_says_about_the_tenant(outcome: AccessToken | BrokerError, state: str | None) -> None:
    """Tokens are ready or missing_roles against the required roles; per-tenant refusals have their
    state (7000112 is disabled); the app's credential, transient failures and spent budgets say
    nothing about the tenant."""
    seen = observe(outcome, ROLES, 1000.0)
    assert state == (seen.state if seen is not None else None)
    if state == "missing_roles":
        assert seen is not None
        assert ("AdvancedHunting.Read.All",) == seen.missing_roles


def test_entries_merge_by_time_and_keep_what_errors_do_not_say() -> None:
    """An error keeps the last token's roles and first_seen; changed_at moves only when the state
    does; an outcome older than the stored one is dropped; `unknown` never creates an entry."""
    ready = merge_entry(None, Observation("ready", 10.0, ROLES, ()))
    assert ready is not None
    again = merge_entry(ready, Observation("ready", 20.0, ROLES, ()))
    refused = merge_entry(again, Observation("consent_required", 30.0, error="consent_required", aadsts="A1"))
    assert again is not None
    assert refused is not None
    assert (10.0, 10.0, 20.0) == (again["first_seen"], again["changed_at"], again["last_checked_at"])
    assert ("consent_required", 30.0, list(ROLES), 20.0) == (
        refused["state"],
        refused["changed_at"],
        refused["roles"],
        refused["last_token_at"],
    )
    assert {"error": "consent_required", "aadsts": "A1", "at": 30.0} == refused["last_error"]
    assert merge_entry(refused, Observation("ready", 25.0, ROLES, ())) is None
    assert merge_entry(None, Observation("unknown", 1.0, error="unknown_tenant")) is None
    assert "unknown" == (merge_entry(refused, Observation("unknown", 40.0)) or {})["state"]


# --- replicas writing one entry ------------------------------------------------------------------


@pytest.fixture
async def replicas(redis_url: str) -> AsyncIterator[list[tuple[TenantRegistry, Metrics]]]:
    """Two registries, each with its own Redis client and metrics (two replicas), one cache key."""
    key = base64.b64encode(os.urandom(32)).decode()
    settings = _settings(required_roles={XDR: list(ROLES)})
    made = []
    caches = []
    for _ in range(2):
        metrics = Metrics()
        cache = TokenCache(
            metrics, settings.cache_options(), redis=Redis.from_url(redis_url), sealer=Sealer(parse_key(key))
        )
        caches.append(cache)
        made.append((TenantRegistry(cache, metrics, settings.tenant_options(), clock=lambda: 100.0), metrics))
    yield made
    for cache in caches:
        await cache.close()


def _transitions(metrics: Metrics, to: str, was: str = "ready") -> float:
    value = metrics.registry.get_sample_value(
        "broker_tenant_transitions_total", {"app": "defender", "from": was, "to": to}
    )
    return value or 0.0


async def test_replicas_writing_one_entry_at_once_lose_nothing_and_count_a_change_once(
    replicas: list[tuple[TenantRegistry, Metrics]],
) -> None:
    """Outcomes for two resources and two domains, written at once by two replicas, all land in the
    entry (no replica overwrites the other's field); the same change recorded by both at once is
    counted by exactly one of them."""
    (one, one_metrics), (two, two_metrics) = replicas
    await asyncio.gather(
        *(
            registry.record(TokenKey("defender", TENANT, resource), _token(), [domain])
            for registry, domain in ((one, "contoso.com"), (two, "contoso.onmicrosoft.com"))
            for resource in (XDR, MDE)
        )
    )
    entry = await one.entry(TENANT)
    assert entry is not None
    assert {"k:defender|" + XDR, "k:defender|" + MDE, "tenant"} == set(entry)
    assert ["contoso.com", "contoso.onmicrosoft.com"] == sorted(entry["tenant"]["domains"])
    news = sum(_transitions(m, "ready", "new") for m in (one_metrics, two_metrics))
    assert 2.0 == news  # one first record per (tenant, resource), whoever wrote it

    refusal = ConsentRequiredError("no consent", aadsts="AADSTS700016")
    await asyncio.gather(*(r.record(TokenKey("defender", TENANT, XDR), refusal) for r in (one, two) * 5))
    assert 1.0 == sum(_transitions(m, "consent_required") for m in (one_metrics, two_metrics))
    stored = await two.entry(TENANT)
    assert stored is not None
    assert "consent_required" == stored["k:defender|" + XDR]["state"]
    assert "ready" == stored["k:defender|" + MDE]["state"]
    assert [TENANT] == await one.tenants_after("", 10)


async def test_an_entry_that_does_not_open_is_not_trusted(
    replicas: list[tuple[TenantRegistry, Metrics]], redis_url: str
) -> None:
    """A registry field written by someone without the cache key is ignored (and replaced by the next
    outcome), never shown."""
    (registry, _), _ = replicas
    redis = Redis.from_url(redis_url)
    await redis.hset(f"tb:v1:reg:{{{TENANT}}}", "k:defender|" + XDR, b'{"state": "ready"}')
    await redis.zadd("tb:v1:reg-index", {TENANT: 0})
    await redis.aclose()
    assert await registry.entry(TENANT) is None
    await registry.record(TokenKey("defender", TENANT, XDR), ConsentRequiredError("no"))
    entry = await registry.entry(TENANT)
    assert entry is not None
    assert "consent_required" == entry["k:defender|" + XDR]["state"]


# --- resolving domains ---------------------------------------------------------------------------


class CountingDiscovery:
    """A ``DomainDiscovery`` of our own: a fixed directory, a delay, and a count of questions."""

    def __init__(self, directory: dict[str, str], fail: BrokerError | None = None) -> None:
        self.directory = directory
        self.fail = fail
        self.asked: list[str] = []

    async def tenant_id(self, domain: str) -> str:
        self.asked.append(domain)
        await asyncio.sleep(0.05)
        if self.fail is not None:
            raise self.fail
        if domain not in self.directory:
            raise UnknownTenantError(f"Entra ID does not know tenant {domain}", aadsts="AADSTS90002")
        return self.directory[domain]


def _resolver(discovery: CountingDiscovery, cache: TokenCache | None = None) -> TenantResolver:
    settings = _settings()
    metrics = Metrics()
    cache = cache or TokenCache(metrics, settings.cache_options(), redis=None, sealer=None)
    return TenantResolver(discovery, cache, metrics, settings.tenant_options())


async def test_a_domain_is_resolved_once_however_many_ask() -> None:
    """Twenty concurrent requests for one domain (any case): one discovery request, one charge to the
    caller that started it; later ones answer from memory; a GUID is itself and costs nothing."""
    discovery = CountingDiscovery({"contoso.com": TENANT})
    resolver = _resolver(discovery)
    charges: list[int] = []
    found = await asyncio.gather(
        *(
            resolver.canonical(("CONTOSO.com" if n % 2 else "contoso.com"), lambda: charges.append(1))
            for n in range(20)
        )
    )
    assert {TENANT} == set(found)
    assert (["contoso.com"], [1]) == (discovery.asked, charges)
    assert TENANT == await resolver.canonical("contoso.com", lambda: charges.append(1))
    assert OTHER == await resolver.canonical(OTHER.upper())
    assert (1, TENANT, ("contoso.com",)) == (
        len(charges),
        resolver.known("Contoso.com"),
        resolver.domains_of(TENANT),
    )
    resolver.forget(TENANT)
    assert resolver.known("contoso.com") is None


async def test_unknown_domains_are_remembered_and_transient_failures_are_not() -> None:
    """A domain Entra does not know is asked about once within negative_cache_seconds; a failure to
    reach Entra is the caller's 503 and is asked again next time."""
    discovery = CountingDiscovery({})
    resolver = _resolver(discovery)
    for _ in range(3):
        with pytest.raises(UnknownTenantError):
            await resolver.canonical("nowhere.example.com")
    assert ["nowhere.example.com"] == discovery.asked
    discovery.fail = ThrottledError("slow down", retry_after=3)
    for _ in range(2):
        with pytest.raises(ThrottledError):
            await resolver.canonical("contoso.com")
    assert ["nowhere.example.com", "contoso.com", "contoso.com"] == discovery.asked


async def test_another_replica_resolves_from_redis(redis_url: str) -> None:
    """A mapping one replica learnt from Entra is read by another from Redis (sealed), without asking
    Entra; so is a domain Entra does not know."""
    key = Sealer(parse_key(base64.b64encode(os.urandom(32)).decode()))
    settings = _settings()

    def cache() -> TokenCache:
        return TokenCache(Metrics(), settings.cache_options(), redis=Redis.from_url(redis_url), sealer=key)

    first_discovery, second_discovery = CountingDiscovery({"contoso.com": TENANT}), CountingDiscovery({})
    first, second = cache(), cache()
    try:
        assert TENANT == await _resolver(first_discovery, first).canonical("contoso.com")
        with pytest.raises(UnknownTenantError):
            await _resolver(first_discovery, first).canonical("nowhere.example.com")
        resolver = _resolver(second_discovery, second)
        assert TENANT == await resolver.canonical("contoso.com")
        with pytest.raises(UnknownTenantError):
            await resolver.canonical("nowhere.example.com")
        assert [] == second_discovery.asked
    finally:
        await first.close()
        await second.close()


async def test_a_policy_names_a_tenant_by_guid_or_by_any_domain() -> None:
    """A policy entry names the tenant when it is the spelling, the GUID, or a domain resolving to
    it; unknown policy domains name nothing; a policy domain that cannot be resolved now is a 503
    only when nothing else matched."""
    discovery = CountingDiscovery(
        {"contoso.com": TENANT, "contoso.onmicrosoft.com": TENANT, "fabrikam.com": OTHER}
    )
    resolver = _resolver(discovery)
    assert "contoso.com" == await resolver.policy_name(["contoso.com"], "contoso.com", TENANT)
    assert "contoso.com" == await resolver.policy_name(["gone.example.com", "contoso.com"], TENANT, TENANT)
    assert TENANT == await resolver.policy_name([TENANT], "contoso.onmicrosoft.com", TENANT)
    assert await resolver.policy_name(["fabrikam.com", TENANT], "x.com", OTHER) == "fabrikam.com"
    assert await resolver.policy_name(["fabrikam.com"], TENANT, TENANT) is None
    failing = _resolver(CountingDiscovery({}, fail=TemporarilyUnavailableError("down", retry_after=1)))
    with pytest.raises(TemporarilyUnavailableError):
        await failing.policy_name(["contoso.com"], TENANT, TENANT)
    assert TENANT == await failing.policy_name(["contoso.com", TENANT], TENANT, TENANT)


# --- the discovery adapter, against the emulator --------------------------------------------------


async def test_discovery_names_the_tenant_or_says_why_not(emulator: Emulator) -> None:
    """Each of a tenant's domains names its GUID; an unknown domain is 404 unknown_tenant with
    AADSTS90002; a 429 keeps its Retry-After; a 5xx is a 503."""
    emulator.add_tenant(TENANT, ["contoso.onmicrosoft.com", "contoso.com"])
    discovery = TenantDiscovery(emulator.base_url, emulator.ca_path, 5)
    try:
        for domain in ("contoso.com", "contoso.onmicrosoft.com"):
            assert TENANT == await discovery.tenant_id(domain)
        with pytest.raises(UnknownTenantError) as unknown:
            await discovery.tenant_id("nowhere.example.com")
        assert (404, "AADSTS90002") == (unknown.value.status, unknown.value.aadsts)
        emulator.add_fault("discovery", "429", retry_after=7)
        with pytest.raises(ThrottledError) as throttled:
            await discovery.tenant_id("contoso.com")
        assert 7 == throttled.value.retry_after
        emulator.add_fault("discovery", "503")
        with pytest.raises(TemporarilyUnavailableError):
            await discovery.tenant_id("contoso.com")
    finally:
        await discovery.close()


async def test_discovery_of_an_unreachable_entra_is_a_503() -> None:
    """Nothing listening: 503 naming the cause, never the connection's own message."""
    discovery = TenantDiscovery("https://127.0.0.1:9", None, 2)
    try:
        with pytest.raises(TemporarilyUnavailableError, match="cannot reach Entra ID"):
            await discovery.tenant_id("contoso.com")
    finally:
        await discovery.close()


# --- the sweep -----------------------------------------------------------------------------------


class GatedSource:
    """A ``TokenSource`` of our own: records when each key was asked for; ``gate`` holds callers."""

    def __init__(self) -> None:
        self.asked: list[tuple[float, TokenKey]] = []
        self.gate = asyncio.Event()
        self.gate.set()

    async def acquire(self, key: TokenKey) -> AccessToken:
        self.asked.append((time.monotonic(), key))
        await self.gate.wait()
        token = f"token-{len(self.asked)}"
        return AccessToken(
            token, time.time() + 3600, key.tenant, key.resource, ROLES, fingerprint=fingerprint(token)
        )

    def consent_url(self, key: TokenKey) -> str:
        return f"https://login.example/{key.tenant}/adminconsent"

    def forget_tenant(self, tenant: str) -> None:
        pass  # nothing kept per tenant


def _sweep_stack(**top: Any) -> tuple[TokenBroker, TenantRegistry, TenantSweep, GatedSource]:
    settings = _settings(top)
    metrics = Metrics()
    cache = TokenCache(metrics, settings.cache_options(), redis=None, sealer=None)
    registry = TenantRegistry(cache, metrics, settings.tenant_options())
    source = GatedSource()
    broker = TokenBroker(
        dict(settings.apps), settings.flight_options(), metrics, cache, source, None, registry
    )
    sweep = TenantSweep(registry, cache, broker.check, metrics, settings.tenant_options())
    return broker, registry, sweep, source


async def test_the_sweep_rechecks_stale_entries_no_faster_than_its_rate() -> None:
    """Six registered tenants, a 1-second interval and 4 checks a second: the sweep re-acquires each
    once they are stale, never two checks closer than 1/rate, and publishes the state counts."""
    broker, registry, sweep, source = _sweep_stack(tenant_check_interval_seconds=1, tenant_check_rate=4)
    tenants = [f"{n:08x}-1111-4111-8111-111111111111" for n in range(1, 7)]
    for tenant in tenants:
        await registry.record(TokenKey("defender", tenant, XDR), _token())
    running = asyncio.create_task(sweep.run())
    await asyncio.sleep(3.2)
    running.cancel()
    await asyncio.gather(running, return_exceptions=True)
    await broker.close()
    times = [at for at, _ in source.asked]
    assert set(tenants) == {key.tenant for _, key in source.asked}
    assert min(b - a for a, b in itertools.pairwise(times)) >= 0.25
    assert all(
        entry["k:defender|" + XDR]["last_checked_at"] > 0
        for entry in (await registry.entries(tenants)).values()
    )


async def test_a_sweep_check_never_goes_ahead_of_a_caller() -> None:
    """One MSAL worker, held by a caller's acquisition: a sweep check asked for then waits, and a
    caller arriving after it still reaches Entra first; the check runs once the worker is idle."""
    broker, _, _, source = _sweep_stack(msal_max_workers=1)
    caller = await _caller(broker)
    source.gate.clear()
    first = asyncio.create_task(broker.get_token(caller, TokenRequest(tenant=TENANT, resource=XDR)))
    await asyncio.sleep(0.1)
    sweep_key = TokenKey("defender", "0000000a-1111-4111-8111-111111111111", XDR)
    checking = asyncio.create_task(broker.check(sweep_key))
    await asyncio.sleep(0.3)
    second = asyncio.create_task(broker.get_token(caller, TokenRequest(tenant=OTHER, resource=XDR)))
    await asyncio.sleep(0.3)
    assert [TENANT] == [key.tenant for _, key in source.asked]
    source.gate.set()
    await asyncio.gather(first, second, checking)
    assert [TENANT, OTHER, sweep_key.tenant] == [key.tenant for _, key in source.asked]
    await broker.close()


async def _caller(broker: TokenBroker) -> Any:
    from broker.callers import Caller

    return Caller("soar", frozenset({"*"}), frozenset({"defender"}))
