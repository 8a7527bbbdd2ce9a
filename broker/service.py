"""``TokenBroker.get_token()``: policy, then cache, then one acquisition per key cluster-wide.

No aiohttp and no SDKs here: Entra is reached through the ``TokenSource`` protocol. The flow for a
request is

    policy check ──▶ L1 hit? ──▶ return (and start a background refresh if the token is due)
                       │ miss
                       ▼
    per-process single-flight ──▶ remembered failure? ──▶ Redis hit? ──▶ lease ──▶ Entra
                                                                         │ held by another replica
                                                                         └──▶ poll Redis until the
                                                                              holder's token lands

so N callers on M replicas cost Entra one request per (app, tenant, resource) per token lifetime.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from broker.errors import (
    PERMANENT_TENANT_ERRORS,
    AccessDeniedError,
    BrokerError,
    InsufficientConsentError,
    InvalidRequestError,
    TemporarilyUnavailableError,
    ThrottledError,
    UpstreamError,
    error_from_body,
)
from broker.tokens import AccessToken, TokenKey, TokenRequest, schedule_refresh

if TYPE_CHECKING:
    from broker.cache import TokenCache
    from broker.callers import Caller
    from broker.config import Settings
    from broker.metrics import Metrics

log = logging.getLogger(__name__)

MAX_FLIGHT_ROUNDS = 3
POLL_FIRST_SECONDS = 0.02
POLL_MAX_SECONDS = 0.2
REFRESH_RETRY_SECONDS = 2.0
MAX_UPSTREAM_ATTEMPTS = 6
BACKOFF_BASE_SECONDS = 0.25
BACKOFF_CAP_SECONDS = 4.0


class TokenSource(Protocol):
    """Where fresh tokens come from (``entra.EntraClient`` in production)."""

    async def acquire(self, app: str, tenant: str, resource: str) -> AccessToken: ...

    def consent_url(self, app: str, tenant: str, resource: str) -> str: ...


@dataclass(frozen=True, slots=True)
class Issued:
    """A token handed to a caller, with where it came from (for the audit line)."""

    token: AccessToken
    app: str
    layer: str  # l1 | redis | entra


class TokenBroker:
    """Serves tokens from cache, acquiring each key once per lifetime across all replicas."""

    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        cache: TokenCache,
        source: TokenSource,
    ) -> None:
        self._settings = settings
        self._metrics = metrics
        self._cache = cache
        self._source = source
        # The lease must outlive the holder's whole acquisition, retries included.
        self._lease_seconds = settings.lease_seconds or (
            settings.upstream_retry_seconds + settings.upstream_timeout_seconds * 2 + 5
        )
        self._inflight: dict[TokenKey, asyncio.Task[tuple[AccessToken, str]]] = {}
        self._negative: dict[TokenKey, tuple[float, BrokerError]] = {}
        self._refreshing: dict[TokenKey, float] = {}  # key -> monotonic time of the last attempt
        self._throttles: dict[tuple[str, str], float] = {}  # (app, tenant) -> monotonic end
        self._background: set[asyncio.Task[None]] = set()

    async def close(self) -> None:
        tasks = list(self._background) + list(self._inflight.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # --- the request path -------------------------------------------------------------------------

    def resolve(self, caller: Caller, request: TokenRequest) -> TokenKey:
        """Apply policy and return the cache key; raises 400/403 errors."""
        found = self._settings.app_for(request.app)
        if found is None:
            if request.app is None:
                raise InvalidRequestError(
                    "several apps are configured: name one in 'app'", apps=sorted(self._settings.apps)
                )
            raise InvalidRequestError(f"unknown app {request.app!r}")
        app_name, app = found
        caller.check(tenant=request.tenant, app=app_name)
        if request.resource not in app.resources:
            raise AccessDeniedError(
                f"resource {request.resource} is not allowed for app {app_name!r}",
                allowed_resources=list(app.resources),
            )
        return TokenKey(app_name, request.tenant.lower(), request.resource)

    async def get_token(self, caller: Caller, request: TokenRequest) -> Issued:
        key = self.resolve(caller, request)
        min_ttl = request.min_ttl_seconds
        token = self._cache.get_local(key)
        if token is not None and token.valid_for(min_ttl):
            self._metrics.child(self._metrics.cache_lookups, "l1", "hit").inc()
            self._maybe_refresh(key, token)
            layer = "l1"
        else:
            self._metrics.child(self._metrics.cache_lookups, "l1", "miss").inc()
            token, layer = await self._fetch(key, min_ttl)
        missing = token.missing_roles(request.roles)
        if missing:
            raise InsufficientConsentError(
                f"the token for tenant {request.tenant} lacks roles {', '.join(missing)}",
                missing_roles=missing,
                consent_url=self._source.consent_url(key.app, request.tenant, key.resource),
            )
        return Issued(token, key.app, layer)

    async def _fetch(self, key: TokenKey, min_ttl: float) -> tuple[AccessToken, str]:
        """Join or start this key's flight until a token valid for ``min_ttl`` comes back."""
        for _ in range(MAX_FLIGHT_ROUNDS):
            task = self._inflight.get(key)
            joined = task is not None and not task.done()
            if task is None or not joined:
                task = self._start_flight(key, min_ttl)
            else:
                self._metrics.singleflight_coalesced.inc()
            try:
                # shield: a caller that disconnects must not cancel the acquisition others wait on.
                token, layer = await asyncio.shield(task)
            except _LeaseHeldError:
                continue  # we joined a background refresh that stood down; start our own flight
            if token.valid_for(min_ttl):
                return token, "singleflight" if joined else layer
        raise UpstreamError(
            f"Entra ID issued a token that lives less than the requested min_ttl ({int(min_ttl)} s)"
        )

    def _start_flight(
        self, key: TokenKey, min_ttl: float, *, refresh: bool = False
    ) -> asyncio.Task[tuple[AccessToken, str]]:
        task = asyncio.create_task(self._flight(key, min_ttl, refresh=refresh))
        self._inflight[key] = task

        def done(finished: asyncio.Task[tuple[AccessToken, str]]) -> None:
            if self._inflight.get(key) is finished:
                del self._inflight[key]
            if not finished.cancelled():
                finished.exception()  # retrieved here so an unawaited failure is not logged as lost

        task.add_done_callback(done)
        return task

    async def _flight(
        self, key: TokenKey, min_ttl: float, *, refresh: bool = False
    ) -> tuple[AccessToken, str]:
        """One acquisition for ``key``: remembered failure, Redis, or the lease and Entra."""
        self._raise_if_remembered_locally(key)
        deadline = time.monotonic() + self._lease_seconds + self._settings.upstream_timeout_seconds
        delay = POLL_FIRST_SECONDS

        async def shared_usable() -> AccessToken | None:
            candidate = await self._cache.get_shared(key)
            if candidate is None or not candidate.valid_for(min_ttl):
                return None
            # A refresh wants a token that is not itself due; a miss takes any valid one.
            if refresh and candidate.refresh_on <= time.time():
                return None
            self._cache.put_local(key, candidate)
            return candidate

        while True:
            remembered = await self._cache.get_negative(key)
            if remembered is not None:
                self._metrics.negative_cache_hits.inc()
                raise error_from_body(remembered)
            shared = await shared_usable()
            if shared is not None:
                return shared, "redis"
            fence = await self._cache.try_lease(key, self._lease_seconds)
            if fence is not None:
                try:
                    # The holder before us may have stored its token just as we took the lease.
                    shared = await shared_usable() if fence else None
                    if shared is not None:
                        return shared, "redis"
                    token = await self._acquire(key)
                finally:
                    await self._cache.release_lease(key, fence)
                return token, "entra"
            if refresh or time.monotonic() >= deadline:
                if refresh:
                    raise _LeaseHeldError("another replica holds the refresh lease")
                raise TemporarilyUnavailableError(
                    "another replica is still acquiring this token", retry_after=1
                )
            await asyncio.sleep(delay)
            delay = min(delay * 2, POLL_MAX_SECONDS)

    async def _acquire(self, key: TokenKey) -> AccessToken:
        fresh = await self._acquire_with_retries(key)
        token = schedule_refresh(fresh, now=time.time(), jitter_unit=random.random())  # noqa: S311 - jitter, not security
        self._cache.put_local(key, token)
        await self._cache.put_shared(key, token)
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

    async def _acquire_with_retries(self, key: TokenKey) -> AccessToken:
        """Entra, retried on transient failures with backoff inside ``upstream_retry_seconds``.

        A 429's Retry-After is honoured and shared through Redis, so other replicas hold off this
        (app, tenant) too instead of each being throttled in turn.
        """
        deadline = time.monotonic() + self._settings.upstream_retry_seconds
        for attempt in range(MAX_UPSTREAM_ATTEMPTS):
            throttled = max(
                self._throttled_locally(key), await self._cache.throttled_for(key.app, key.tenant)
            )
            if throttled > 0:
                if time.monotonic() + throttled > deadline:
                    raise TemporarilyUnavailableError(
                        "Entra ID is throttling this tenant; retry later", retry_after=math.ceil(throttled)
                    )
                await asyncio.sleep(throttled)
            try:
                return await self._source.acquire(key.app, key.tenant, key.resource)
            except PERMANENT_TENANT_ERRORS as exc:
                await self._remember(key, exc)
                raise
            except TemporarilyUnavailableError as exc:
                retry_after = float(exc.context["retry_after"])
                if isinstance(exc, ThrottledError):
                    self._throttles[(key.app, key.tenant)] = time.monotonic() + retry_after
                    await self._cache.set_throttle(key.app, key.tenant, retry_after)
                if exc.hinted or isinstance(exc, ThrottledError):
                    wait = retry_after
                else:
                    wait = random.uniform(0, min(BACKOFF_CAP_SECONDS, BACKOFF_BASE_SECONDS * 2**attempt))  # noqa: S311 - jitter
                if time.monotonic() + wait > deadline:
                    raise
                log.info(
                    "entra transient failure, retrying",
                    extra={
                        "app": key.app,
                        "tenant": key.tenant,
                        "attempt": attempt + 1,
                        "wait_seconds": round(wait, 3),
                    },
                )
                await asyncio.sleep(wait)
        raise TemporarilyUnavailableError("Entra ID kept failing; retry later", retry_after=1)

    def _throttled_locally(self, key: TokenKey) -> float:
        until = self._throttles.get((key.app, key.tenant))
        if until is None:
            return 0.0
        remaining = until - time.monotonic()
        if remaining <= 0:
            del self._throttles[(key.app, key.tenant)]
            return 0.0
        return remaining

    # --- remembered permanent failures -------------------------------------------------------------

    async def _remember(self, key: TokenKey, exc: BrokerError) -> None:
        ttl = self._settings.negative_cache_seconds
        if ttl <= 0:
            return
        self._negative[key] = (time.monotonic() + ttl, exc)
        await self._cache.put_negative(key, exc.to_body(), ttl)

    def _raise_if_remembered_locally(self, key: TokenKey) -> None:
        if self._cache.shared_available:
            # Redis is the memory every replica shares (and `cache purge` clears): trust it alone,
            # so a purge after consent is granted takes effect everywhere at once.
            return
        entry = self._negative.get(key)
        if entry is None:
            return
        until, exc = entry
        if time.monotonic() >= until:
            del self._negative[key]
            return
        self._metrics.negative_cache_hits.inc()
        raise error_from_body(exc.to_body())

    def forget(self, tenant: str) -> None:
        """Drop remembered failures and throttles for a tenant (after consent is granted, say)."""
        tenant = tenant.lower()
        for key in [k for k in self._negative if k.tenant == tenant]:
            del self._negative[key]
        for app_tenant in [t for t in self._throttles if t[1] == tenant]:
            del self._throttles[app_tenant]

    # --- refresh ahead ------------------------------------------------------------------------------

    def _maybe_refresh(self, key: TokenKey, token: AccessToken) -> None:
        if token.refresh_on <= 0 or time.time() < token.refresh_on or key in self._inflight:
            return
        last = self._refreshing.get(key)
        now = time.monotonic()
        if last is not None and now - last < REFRESH_RETRY_SECONDS:
            return
        self._refreshing[key] = now
        flight = self._start_flight(key, 0, refresh=True)
        task = asyncio.create_task(self._refresh(key, flight))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _refresh(self, key: TokenKey, flight: asyncio.Task[tuple[AccessToken, str]]) -> None:
        try:
            _, layer = await flight
        except _LeaseHeldError:
            self._metrics.refresh.labels(outcome="other_replica").inc()
            return
        except BrokerError as exc:
            # Keep serving the still-valid token; the next hit after the retry interval tries again.
            self._metrics.refresh.labels(outcome="error").inc()
            log.warning(
                "background refresh failed",
                extra={"app": key.app, "tenant": key.tenant, "resource": key.resource, "error": exc.error},
            )
            return
        self._refreshing.pop(key, None)
        self._metrics.refresh.labels(outcome="ok" if layer == "entra" else "adopted").inc()


class _LeaseHeldError(BrokerError):
    """Internal: a background refresh found another replica refreshing the key."""
