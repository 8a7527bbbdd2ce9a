"""``TokenBroker.get_token()``: policy, then cache, then one acquisition per key cluster-wide.

No aiohttp and no SDKs here: Entra is reached through the ``TokenSource`` protocol. The flow for a
request is

    policy check ──▶ L1 hit? ──▶ return (and start a background refresh if the token is due)
                       │ miss
                       ▼
    per-process single-flight ──▶ lookup: remembered failure? Redis hit? ──▶ lease ──▶ Entra
                                  (one Redis round-trip)                     │ held by another replica
                                                                             └──▶ poll the lookup until
                                                                                  the holder's token lands

so N callers on M replicas cost Entra one request per (app, tenant, resource) per token lifetime.

With a ``TenantDirectory`` the tenant in every key is its GUID, whatever the caller spelled (a verified
domain is resolved once), and the caller's policy admits the request when any entry names that GUID;
with a ``TenantLedger`` every Entra outcome is recorded (the tenant registry). ``check`` asks Entra
now for a key, whatever is cached: the registry's re-validation.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple, Protocol

from broker.cache import Lease
from broker.config import GUID_RE
from broker.errors import (
    PERMANENT_TENANT_ERRORS,
    AccessDeniedError,
    BrokerError,
    ConsentRequiredError,
    InsufficientConsentError,
    InvalidRequestError,
    RateLimitedError,
    TemporarilyUnavailableError,
    ThrottledError,
    UnknownTenantError,
    UpstreamError,
)
from broker.limits import AcquisitionBudget, FairScheduler
from broker.tokens import AccessToken, TokenKey, TokenRequest, schedule_refresh

if TYPE_CHECKING:
    from broker.cache import TokenCache
    from broker.callers import Caller
    from broker.config import AppSettings, FlightOptions
    from broker.metrics import Metrics

log = logging.getLogger(__name__)

MAX_FLIGHT_ROUNDS = 3
POLL_FIRST_SECONDS = 0.02
POLL_MAX_SECONDS = 0.2
REFRESH_RETRY_SECONDS = 2.0
MAX_UPSTREAM_ATTEMPTS = 6
BACKOFF_BASE_SECONDS = 0.25
BACKOFF_CAP_SECONDS = 4.0
# Token lifetimes remembered per key, so a min_ttl Entra's tokens cannot satisfy is refused at once.
MAX_REMEMBERED_LIFETIMES = 10_000
REFRESH_PARTY = "(refresh)"  # the background refresh's share of the fair scheduler
SWEEP_PARTY = "(sweep)"  # the tenant registry's re-validation


class TokenSource(Protocol):
    """Where fresh tokens come from (``entra.EntraClient`` in production)."""

    async def acquire(self, key: TokenKey) -> AccessToken: ...

    def consent_url(self, key: TokenKey) -> str: ...

    def forget_tenant(self, tenant: str) -> None:
        """Drop whatever the source keeps per tenant (offboarding)."""


class TenantDirectory(Protocol):
    """Names tenants by their GUID (``tenants.TenantResolver`` in production)."""

    async def canonical(self, spelling: str, charge: Callable[[], None] | None = None) -> str: ...

    def known(self, spelling: str) -> str | None: ...

    def domains_of(self, tenant: str) -> tuple[str, ...]: ...

    async def policy_name(self, policy: Iterable[str], spelling: str, tenant: str) -> str | None: ...


class TenantLedger(Protocol):
    """Records every Entra outcome per tenant (``tenants.TenantRegistry`` in production)."""

    async def record(
        self, key: TokenKey, outcome: AccessToken | BrokerError, domains: Iterable[str] = ()
    ) -> None: ...


class Issued(NamedTuple):
    """A token handed to a caller, with where it came from (for the audit line)."""

    token: AccessToken
    app: str
    tenant: str  # the key's tenant: its GUID (with a tenant directory)
    layer: str  # l1 | redis | entra | singleflight


@dataclass(frozen=True, slots=True)
class _Party:
    """Who a flight acquires for: its budget and its turn in the fair scheduler."""

    name: str
    per_minute: int | None  # None: not budgeted (the background refresh)


@dataclass(frozen=True, slots=True)
class _Flight:
    """What one flight for a key produced: a token and its layer, or nothing when it was a
    background refresh that found another replica refreshing (callers that joined it start their own)."""

    token: AccessToken | None
    layer: str


class TokenBroker:
    """Serves tokens from cache, acquiring each key once per lifetime across all replicas."""

    def __init__(
        self,
        apps: dict[str, AppSettings],
        options: FlightOptions,
        metrics: Metrics,
        cache: TokenCache,
        source: TokenSource,
        tenants: TenantDirectory | None = None,
        ledger: TenantLedger | None = None,
    ) -> None:
        self._apps = apps
        self._options = options
        self._metrics = metrics
        self._cache = cache
        self._source = source
        self._tenants = tenants
        self._ledger = ledger
        self._inflight: dict[TokenKey, tuple[asyncio.Task[_Flight], _Party]] = {}
        # key -> (lifetime of a fresh token that was too short for a min_ttl, monotonic end of the
        # memory): until then a min_ttl longer than that lifetime is refused without asking Entra.
        self._lifetimes: OrderedDict[TokenKey, tuple[float, float]] = OrderedDict()
        self._budget = AcquisitionBudget()
        self._scheduler = FairScheduler(options.max_concurrent_acquisitions)
        self._refreshing: dict[TokenKey, float] = {}  # key -> monotonic time of the last attempt
        self._background: set[asyncio.Task[None]] = set()
        self._only_app = next(iter(apps)) if len(apps) == 1 else ""

    async def close(self) -> None:
        tasks = list(self._background) + [task for task, _ in self._inflight.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # --- the request path -------------------------------------------------------------------------

    def resolve(self, caller: Caller, request: TokenRequest) -> TokenKey:
        """Apply policy and return the cache key (the tenant as spelled); raises 400/403 errors."""
        tenant = request.tenant.lower()
        return TokenKey(self._admit(caller, request, tenant), tenant, request.resource)

    def _admit(self, caller: Caller, request: TokenRequest, named: str) -> str:
        """The app ``request`` is for, once the caller's policy admits it for the tenant its policy
        calls ``named``; raises 400/403 errors."""
        if request.app is None:
            if len(self._apps) != 1:
                raise InvalidRequestError(
                    "several apps are configured: name one in 'app'", apps=sorted(self._apps)
                )
            app_name = self._only_app
        elif request.app in self._apps:
            app_name = request.app
        else:
            raise InvalidRequestError(f"unknown app {request.app!r}")
        caller.check(tenant=named, app=app_name)
        resources = self._apps[app_name].resources
        if request.resource not in resources:
            raise AccessDeniedError(
                f"resource {request.resource} is not allowed for app {app_name!r}",
                allowed_resources=list(resources),
            )
        return app_name

    def known_key(self, caller: Caller, request: TokenRequest) -> TokenKey | None:
        """``canonical_key`` when it needs nothing but this process's memory: the tenant's GUID known
        and the policy decided by an entry naming the spelling or the GUID (or ``*``). ``None`` when
        ``canonical_key`` has more to find out; the policy's refusals are raised as it raises them."""
        spelling = request.tenant.lower()
        if self._tenants is None:
            return TokenKey(self._admit(caller, request, spelling), spelling, request.resource)
        tenant = self._tenants.known(spelling)
        if tenant is None:
            return None
        policy = caller.tenants
        if "*" in policy or spelling in policy:
            named = spelling
        elif tenant in policy:
            named = tenant
        else:
            return None  # a domain in the policy may name this tenant: canonical_key resolves it
        return TokenKey(self._admit(caller, request, named), tenant, request.resource)

    async def canonical_key(self, caller: Caller, request: TokenRequest) -> TokenKey:
        """``resolve`` with the tenant named by its GUID: a domain is resolved (once, shared; paid from
        the caller's budget), and the policy admits the request when any of its entries names that
        GUID, by GUID or by domain. A caller the tenant is not for learns nothing about it (403, never
        whether a domain exists)."""
        key = self.known_key(caller, request)
        if key is not None or self._tenants is None:
            return key if key is not None else self.resolve(caller, request)
        spelling = request.tenant.lower()
        party = _Party(caller.name, caller.max_acquisitions_per_minute)
        wildcard = "*" in caller.tenants
        try:
            tenant = await self._tenants.canonical(spelling, lambda: self._charge(party))
        except UnknownTenantError:
            if not wildcard and spelling not in caller.tenants:
                self.resolve(caller, request)  # raises the refusal the policy makes of the spelling
            raise
        named = spelling if wildcard else await self._tenants.policy_name(caller.tenants, spelling, tenant)
        return TokenKey(
            self._admit(caller, request, spelling if named is None else named), tenant, request.resource
        )

    def canonical_tenant(self, spelling: str) -> str | None:
        """The GUID ``spelling`` names, when this process knows it without asking (audit lines)."""
        return self._tenants.known(spelling) if self._tenants is not None else spelling.lower()

    def from_memory(self, caller: Caller, request: TokenRequest) -> Issued | None:
        """``get_token`` when this process's memory answers it whole: the key known (``known_key``)
        and its token in L1, valid for ``min_ttl`` and holding every role asked for. ``None``, having
        changed nothing, otherwise (``get_token`` then serves it); policy refusals are raised."""
        key = self.known_key(caller, request)
        if key is None:
            return None
        token = self._cache.get_local(key)
        if token is None or not token.valid_for(request.min_ttl_seconds):
            return None
        if request.roles and token.missing_roles(request.roles):
            return None
        return self._l1_hit(key, token, request)

    async def get_token(self, caller: Caller, request: TokenRequest) -> Issued:
        key = await self.canonical_key(caller, request)
        min_ttl = request.min_ttl_seconds
        token = self._cache.get_local(key)
        if token is not None and token.valid_for(min_ttl):
            return self._l1_hit(key, token, request)
        self._metrics.cache_lookups.inc("l1", "miss")
        token, layer = await self._fetch(
            key, min_ttl, _Party(caller.name, caller.max_acquisitions_per_minute)
        )
        return self._issue(key, token, layer, request)

    def _l1_hit(self, key: TokenKey, token: AccessToken, request: TokenRequest) -> Issued:
        self._metrics.cache_lookups.inc("l1", "hit")
        self._maybe_refresh(key, token)
        return self._issue(key, token, "l1", request)

    def _issue(self, key: TokenKey, token: AccessToken, layer: str, request: TokenRequest) -> Issued:
        missing = token.missing_roles(request.roles) if request.roles else None
        if missing:
            raise InsufficientConsentError(
                f"the token for tenant {request.tenant} lacks roles {', '.join(missing)}",
                missing_roles=missing,
                consent_url=self._source.consent_url(key),
            )
        return Issued(token, key.app, key.tenant, layer)

    async def acquire_fresh(self, key: TokenKey, party: str, per_minute: int | None) -> AccessToken:
        """Forget ``key``'s remembered failure (on every replica) and acquire a token from Entra now,
        whatever is cached: the proof that consent was just granted, with the roles granted *now*.

        One Entra request (plus transient retries), charged to ``party``'s budget and taking a fair
        scheduler slot only while it runs; the token is then cached like any other. A permanent
        refusal is remembered again as usual. Policy is the caller's business (``resolve``).
        """
        await self._cache.forget_failure(key)
        acquirer = _Party(party, per_minute)
        self._charge(acquirer)
        found = await self._cache.lookup(key)  # only for a throttle Entra asked every replica to honour
        return await self._acquire(key, acquirer, found.throttled_seconds)

    def app_name(self, requested: str | None) -> str | None:
        """The app a request is for, when that is known (for the audit line of a refused request)."""
        if requested is None:
            return next(iter(self._apps)) if len(self._apps) == 1 else None
        return requested if requested in self._apps else None

    async def _fetch(self, key: TokenKey, min_ttl: float, party: _Party) -> tuple[AccessToken, str]:
        """Join or start this key's flight until a token valid for ``min_ttl`` comes back."""
        known = self._lifetimes.get(key)
        if known is not None and known[0] < min_ttl and time.monotonic() < known[1]:
            raise self._short_lived(min_ttl)
        for _ in range(MAX_FLIGHT_ROUNDS):
            running = self._inflight.get(key)
            joined = running is not None and not running[0].done()
            if running is None or not joined:
                task = self._start_flight(key, min_ttl, party)
                flight_party = party
            else:
                task, flight_party = running
                self._metrics.singleflight_coalesced.inc()
            try:
                # shield: a caller that disconnects must not cancel the acquisition others wait on.
                flight = await asyncio.shield(task)
            except RateLimitedError:
                if flight_party.name != party.name:
                    continue  # another caller's budget ran out, not ours: try with our own
                raise
            if flight.token is None:
                continue  # we joined a background refresh that stood down; start our own flight
            if flight.token.valid_for(min_ttl):
                return flight.token, "singleflight" if joined else flight.layer
            if flight.layer == "entra":
                # A token fresh from Entra lives less than asked: another request would get the
                # same. One upstream call, and the key's lifetime is remembered for the next ones.
                self._remember_lifetime(key, flight.token)
                raise self._short_lived(min_ttl)
        raise self._short_lived(min_ttl)

    def _remember_lifetime(self, key: TokenKey, token: AccessToken) -> None:
        """Remember, like a permanent failure, how long ``key``'s fresh tokens live."""
        until = time.monotonic() + self._options.negative_cache_seconds
        self._lifetimes[key] = (token.remaining_seconds(), until)
        self._lifetimes.move_to_end(key)
        while len(self._lifetimes) > MAX_REMEMBERED_LIFETIMES:
            self._lifetimes.popitem(last=False)

    @staticmethod
    def _short_lived(min_ttl: float) -> UpstreamError:
        return UpstreamError(
            f"Entra ID issued a token that lives less than the requested min_ttl ({int(min_ttl)} s)"
        )

    def _start_flight(
        self, key: TokenKey, min_ttl: float, party: _Party, *, refresh: bool = False
    ) -> asyncio.Task[_Flight]:
        task = asyncio.create_task(self._flight(key, min_ttl, party, refresh=refresh))
        self._inflight[key] = (task, party)

        def done(finished: asyncio.Task[_Flight]) -> None:
            running = self._inflight.get(key)
            if running is not None and running[0] is finished:
                del self._inflight[key]
            if not finished.cancelled():
                finished.exception()  # retrieved here so an unawaited failure is not logged as lost

        task.add_done_callback(done)
        return task

    async def _flight(
        self, key: TokenKey, min_ttl: float, party: _Party, *, refresh: bool = False
    ) -> _Flight:
        """One acquisition for ``key``: remembered failure, Redis, or the lease and Entra."""
        deadline = time.monotonic() + self._options.lease_seconds + self._options.upstream_timeout_seconds
        delay = POLL_FIRST_SECONDS
        holder = self._cache.new_holder()
        while True:
            found = await self._cache.lookup(key)
            self._raise_if_failed(key, found.failure)
            if self._usable(key, found.token, min_ttl, refresh=refresh):
                return _Flight(found.token, "redis")
            async with self._cache.lease(key, self._options.lease_seconds, holder) as lease:
                if lease is Lease.ACQUIRED:
                    # The holder before us may have stored its token just as we took the lease.
                    found = await self._cache.lookup(key)
                    self._raise_if_failed(key, found.failure)
                    if self._usable(key, found.token, min_ttl, refresh=refresh):
                        return _Flight(found.token, "redis")
                if lease is not Lease.HELD:
                    self._charge(party)
                    return _Flight(await self._acquire(key, party, found.throttled_seconds), "entra")
            if refresh:
                return _Flight(None, "other_replica")
            if time.monotonic() >= deadline:
                raise TemporarilyUnavailableError(
                    "another replica is still acquiring this token", retry_after=1
                )
            await asyncio.sleep(delay)
            delay = min(delay * 2, POLL_MAX_SECONDS)

    def _charge(self, party: _Party) -> None:
        """Spend one of the party's upstream acquisitions, or refuse with 429."""
        if party.per_minute is None:
            return
        wait = self._budget.take(party.name, party.per_minute)
        if wait > 0:
            self._metrics.child(self._metrics.rate_limited, party.name).inc()
            raise RateLimitedError(
                f"caller {party.name!r} exceeded its {party.per_minute} Entra acquisitions per minute",
                retry_after=wait,
            )

    def _usable(self, key: TokenKey, token: AccessToken | None, min_ttl: float, *, refresh: bool) -> bool:
        """A shared token serves when it is valid for ``min_ttl`` (it is then kept in L1); a refresh
        wants one that is not itself due."""
        if token is None or not token.valid_for(min_ttl):
            return False
        if refresh and token.refresh_on <= time.time():
            return False
        self._cache.put_local(key, token)
        return True

    def _raise_if_failed(self, key: TokenKey, failure: BrokerError | None) -> None:
        if failure is None:
            return
        self._metrics.negative_cache_hits.inc()
        if isinstance(failure, ConsentRequiredError):
            # Never replayed from storage: the link is rebuilt from the configuration.
            failure.consent_url = self._source.consent_url(key)
        raise failure

    async def _acquire(
        self, key: TokenKey, party: _Party, throttled_seconds: float, retry_seconds: float | None = None
    ) -> AccessToken:
        try:
            fresh = await self._acquire_with_retries(key, party, throttled_seconds, retry_seconds)
            if GUID_RE.fullmatch(key.tenant) and fresh.tenant_id.lower() != key.tenant:
                # A token for another tenant is never served nor cached, whatever Entra answered.
                log.error(
                    "entra issued a token for another tenant; refusing it",
                    extra={"app": key.app, "tenant": key.tenant, "token_tid": fresh.tenant_id},
                )
                raise UpstreamError(f"Entra ID issued a token for another tenant than {key.tenant}")
        except BrokerError as exc:
            await self._record(key, exc)
            raise
        token = schedule_refresh(fresh, now=time.time(), jitter_unit=random.random())  # noqa: S311 - jitter, not security
        await self._cache.store(key, token)
        await self._record(key, token)
        log.info(
            "token acquired",
            extra={
                "app": key.app,
                "tenant": key.tenant,
                "resource": key.resource,
                "token_fingerprint": token.fingerprint,
                "uti": token.uti,
                "expires_in": int(token.remaining_seconds()),
            },
        )
        return token

    async def _acquire_with_retries(
        self, key: TokenKey, party: _Party, throttled_seconds: float, retry_seconds: float | None = None
    ) -> AccessToken:
        """Entra, retried on transient failures with backoff inside ``upstream_retry_seconds`` (or
        ``retry_seconds``: 0 is one attempt, and none at all while Entra asks to hold off).

        A 429's Retry-After is honoured and shared through Redis, so other replicas hold off this
        (app, tenant) too instead of each being throttled in turn.
        """
        retry_budget = self._options.upstream_retry_seconds if retry_seconds is None else retry_seconds
        deadline = time.monotonic() + retry_budget
        wait = throttled_seconds
        last_error: TemporarilyUnavailableError | None = None
        for attempt in range(MAX_UPSTREAM_ATTEMPTS):
            if wait > 0:
                if time.monotonic() + wait > deadline:
                    raise last_error or TemporarilyUnavailableError(
                        "Entra ID is throttling this tenant; retry later", retry_after=math.ceil(wait)
                    )
                if attempt:
                    log.info(
                        "entra transient failure, retrying",
                        extra={
                            "app": key.app,
                            "tenant": key.tenant,
                            "attempt": attempt,
                            "wait_seconds": round(wait, 3),
                        },
                    )
                await asyncio.sleep(wait)
            try:
                # A scheduler slot per Entra call, not per retry loop: a backoff holds no worker.
                async with self._scheduler.slot(party.name):
                    return await self._source.acquire(key)
            except PERMANENT_TENANT_ERRORS as exc:
                await self._cache.remember(key, exc, self._options.negative_cache_seconds)
                raise
            except TemporarilyUnavailableError as exc:
                last_error = exc
                if isinstance(exc, ThrottledError):
                    await self._cache.throttle(key, exc.retry_after)
                if exc.hinted or isinstance(exc, ThrottledError):
                    wait = exc.retry_after
                else:
                    wait = random.uniform(0, min(BACKOFF_CAP_SECONDS, BACKOFF_BASE_SECONDS * 2**attempt))  # noqa: S311 - jitter
        reason = f" ({last_error.description})" if last_error is not None else ""
        raise TemporarilyUnavailableError(f"Entra ID kept failing{reason}; retry later", retry_after=1)

    async def _record(self, key: TokenKey, outcome: AccessToken | BrokerError) -> None:
        if self._ledger is not None:
            domains = self._tenants.domains_of(key.tenant) if self._tenants is not None else ()
            await self._ledger.record(key, outcome, domains)

    # --- re-validation and offboarding (the tenant registry) ----------------------------------------

    async def check(self, key: TokenKey, caller: Caller | None = None) -> AccessToken:
        """Ask Entra now for ``key``, whatever is cached or remembered, and record the outcome.

        For ``caller`` (an admin's check): under its budget and fair share, with the usual retries,
        waiting for a replica that holds the key's lease. Without a caller it is the sweep's: one
        attempt, started only while an MSAL worker is idle and no caller waits, skipped (503) while
        another replica is acquiring the key (that acquisition's outcome is recorded anyway).
        """
        sweep = caller is None
        party = (
            _Party(SWEEP_PARTY, None)
            if caller is None
            else _Party(caller.name, caller.max_acquisitions_per_minute)
        )
        await self._cache.forget_failure(key)
        deadline = time.monotonic() + self._options.lease_seconds + self._options.upstream_timeout_seconds
        delay = POLL_FIRST_SECONDS
        holder = self._cache.new_holder()
        while True:
            # Callers first: the sweep starts only while an MSAL worker is free and nobody waits for one
            # (a caller arriving in the few milliseconds before it takes the slot waits one turn at
            # most). Polled: the scheduler has no event for it, and the sweep's pace is slow anyway.
            while sweep and not self._scheduler.idle:  # noqa: ASYNC110
                await asyncio.sleep(POLL_MAX_SECONDS)
            throttled = await self._cache.throttled_seconds(key)
            async with self._cache.lease(key, self._options.lease_seconds, holder) as lease:
                if lease is not Lease.HELD:
                    self._charge(party)
                    return await self._acquire(key, party, throttled, retry_seconds=0 if sweep else None)
            if sweep or time.monotonic() >= deadline:
                raise TemporarilyUnavailableError("another replica is acquiring this token", retry_after=1)
            await asyncio.sleep(delay)
            delay = min(delay * 2, POLL_MAX_SECONDS)

    def forget_tenant(self, tenant: str) -> None:
        """Forget what this process remembers per key of ``tenant`` (offboarding), and what the
        token source keeps for it."""
        for memory in (self._lifetimes, self._refreshing):
            for key in [k for k in memory if k.tenant == tenant]:
                del memory[key]
        self._source.forget_tenant(tenant)

    # --- refresh ahead ------------------------------------------------------------------------------

    def _maybe_refresh(self, key: TokenKey, token: AccessToken) -> None:
        if token.refresh_on <= 0 or time.time() < token.refresh_on or key in self._inflight:
            return
        last = self._refreshing.get(key)
        now = time.monotonic()
        if last is not None and now - last < REFRESH_RETRY_SECONDS:
            return
        self._refreshing[key] = now
        flight = self._start_flight(key, 0, _Party(REFRESH_PARTY, None), refresh=True)
        task = asyncio.create_task(self._refresh(key, flight))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _refresh(self, key: TokenKey, flight: asyncio.Task[_Flight]) -> None:
        try:
            result = await flight
        except BrokerError as exc:
            # Keep serving the still-valid token; the next hit after the retry interval tries again.
            self._metrics.refresh.labels(outcome="error").inc()
            log.warning(
                "background refresh failed",
                extra={"app": key.app, "tenant": key.tenant, "resource": key.resource, "error": exc.error},
            )
            return
        if result.token is None:
            self._metrics.refresh.labels(outcome="other_replica").inc()
            return
        self._refreshing.pop(key, None)
        self._metrics.refresh.labels(outcome="ok" if result.layer == "entra" else "adopted").inc()
