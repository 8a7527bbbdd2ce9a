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
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from broker.cache import Lease
from broker.errors import (
    PERMANENT_TENANT_ERRORS,
    AccessDeniedError,
    BrokerError,
    ConsentRequiredError,
    InsufficientConsentError,
    InvalidRequestError,
    TemporarilyUnavailableError,
    ThrottledError,
    UpstreamError,
)
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


class TokenSource(Protocol):
    """Where fresh tokens come from (``entra.EntraClient`` in production)."""

    async def acquire(self, key: TokenKey) -> AccessToken: ...

    def consent_url(self, key: TokenKey) -> str: ...


@dataclass(frozen=True, slots=True)
class Issued:
    """A token handed to a caller, with where it came from (for the audit line)."""

    token: AccessToken
    app: str
    layer: str  # l1 | redis | entra | singleflight


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
    ) -> None:
        self._apps = apps
        self._options = options
        self._metrics = metrics
        self._cache = cache
        self._source = source
        self._inflight: dict[TokenKey, asyncio.Task[_Flight]] = {}
        self._refreshing: dict[TokenKey, float] = {}  # key -> monotonic time of the last attempt
        self._background: set[asyncio.Task[None]] = set()

    async def close(self) -> None:
        tasks = list(self._background) + list(self._inflight.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # --- the request path -------------------------------------------------------------------------

    def resolve(self, caller: Caller, request: TokenRequest) -> TokenKey:
        """Apply policy and return the cache key; raises 400/403 errors."""
        if request.app is None:
            if len(self._apps) != 1:
                raise InvalidRequestError(
                    "several apps are configured: name one in 'app'", apps=sorted(self._apps)
                )
            app_name = next(iter(self._apps))
        elif request.app in self._apps:
            app_name = request.app
        else:
            raise InvalidRequestError(f"unknown app {request.app!r}")
        app = self._apps[app_name]
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
                consent_url=self._source.consent_url(key),
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
            # shield: a caller that disconnects must not cancel the acquisition others wait on.
            flight = await asyncio.shield(task)
            if flight.token is None:
                continue  # we joined a background refresh that stood down; start our own flight
            if flight.token.valid_for(min_ttl):
                return flight.token, "singleflight" if joined else flight.layer
        raise UpstreamError(
            f"Entra ID issued a token that lives less than the requested min_ttl ({int(min_ttl)} s)"
        )

    def _start_flight(self, key: TokenKey, min_ttl: float, *, refresh: bool = False) -> asyncio.Task[_Flight]:
        task = asyncio.create_task(self._flight(key, min_ttl, refresh=refresh))
        self._inflight[key] = task

        def done(finished: asyncio.Task[_Flight]) -> None:
            if self._inflight.get(key) is finished:
                del self._inflight[key]
            if not finished.cancelled():
                finished.exception()  # retrieved here so an unawaited failure is not logged as lost

        task.add_done_callback(done)
        return task

    async def _flight(self, key: TokenKey, min_ttl: float, *, refresh: bool = False) -> _Flight:
        """One acquisition for ``key``: remembered failure, Redis, or the lease and Entra."""
        deadline = time.monotonic() + self._options.lease_seconds + self._options.upstream_timeout_seconds
        delay = POLL_FIRST_SECONDS
        while True:
            found = await self._cache.lookup(key)
            self._raise_if_failed(key, found.failure)
            if self._usable(key, found.token, min_ttl, refresh=refresh):
                return _Flight(found.token, "redis")
            async with self._cache.lease(key, self._options.lease_seconds) as lease:
                if lease is Lease.ACQUIRED:
                    # The holder before us may have stored its token just as we took the lease.
                    found = await self._cache.lookup(key)
                    self._raise_if_failed(key, found.failure)
                    if self._usable(key, found.token, min_ttl, refresh=refresh):
                        return _Flight(found.token, "redis")
                if lease is not Lease.HELD:
                    return _Flight(await self._acquire(key, found.throttled_seconds), "entra")
            if refresh:
                return _Flight(None, "other_replica")
            if time.monotonic() >= deadline:
                raise TemporarilyUnavailableError(
                    "another replica is still acquiring this token", retry_after=1
                )
            await asyncio.sleep(delay)
            delay = min(delay * 2, POLL_MAX_SECONDS)

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

    async def _acquire(self, key: TokenKey, throttled_seconds: float) -> AccessToken:
        fresh = await self._acquire_with_retries(key, throttled_seconds)
        token = schedule_refresh(fresh, now=time.time(), jitter_unit=random.random())  # noqa: S311 - jitter, not security
        await self._cache.store(key, token)
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

    async def _acquire_with_retries(self, key: TokenKey, throttled_seconds: float) -> AccessToken:
        """Entra, retried on transient failures with backoff inside ``upstream_retry_seconds``.

        A 429's Retry-After is honoured and shared through Redis, so other replicas hold off this
        (app, tenant) too instead of each being throttled in turn.
        """
        deadline = time.monotonic() + self._options.upstream_retry_seconds
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
        raise TemporarilyUnavailableError("Entra ID kept failing; retry later", retry_after=1)

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
