"""The composition root: builds every component once, supervises background tasks, serves.

``create_app(settings)`` wires the HTTP surface (``http.py``) to the service and its adapters in the
application's ``cleanup_ctx`` (nothing at import time); each component gets the small option object
``config.py`` derives for it, never the whole ``Settings``. Background work (credential rotation, the
purge and offboarding listeners, attaching Redis once the cache key loads, the tenant re-validation
sweep) runs under one ``Supervisor``: a task that dies is logged, counted
(``broker_background_task_failures_total``) and restarted with backoff.
"""

from __future__ import annotations

import asyncio
import gc
import importlib.resources
import logging
import random
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import cast

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from broker import admin, http, pages
from broker.cache import EntraRedisCredentials, TokenCache, connect_redis
from broker.callers import CallerRegistry
from broker.config import Settings
from broker.crypto import Sealer, parse_key
from broker.discovery import TenantDiscovery
from broker.entra import EntraClient
from broker.errors import UpstreamError
from broker.logs import AuditLog
from broker.metrics import Metrics
from broker.oauth_compat import add_compat_routes
from broker.oidc import JwksFetcher
from broker.onboarding import ConsentRecorder, MemoryConsentRecorder, Onboarding
from broker.service import TokenBroker
from broker.tenants import TenantRegistry, TenantResolver, Tenants, TenantSweep
from broker.tls import ReloadingServerContext, build_ca_bundle
from broker.vault import CredentialStore, _build_azure_credential

log = logging.getLogger(__name__)

RESTART_FIRST_SECONDS = 0.5
RESTART_MAX_SECONDS = 30.0
# A task that ran this long before it ended is considered healthy again: its backoff starts over.
HEALTHY_RUN_SECONDS = 60.0


class Supervisor:
    """Runs named background tasks for the app's lifetime; restarts any that ends or dies."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        self._tasks: list[asyncio.Task[None]] = []

    def start(self, name: str, work: Callable[[], Awaitable[None]], *, until_done: bool = False) -> None:
        """Run ``work`` for the app's lifetime (restarted whenever it ends), or ``until_done``: until
        it returns normally (restarted only when it fails)."""
        self._tasks.append(asyncio.create_task(self._run(name, work, until_done), name=f"broker:{name}"))

    async def _run(self, name: str, work: Callable[[], Awaitable[None]], until_done: bool) -> None:
        delay = RESTART_FIRST_SECONDS
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            try:
                await work()
            except asyncio.CancelledError:
                raise
            except Exception:  # the supervisor's job: log, count, restart
                self._metrics.background_task_failures.labels(task=name).inc()
                log.exception("background task failed; restarting", extra={"task": name})
            else:
                if until_done:
                    return
                log.info("background task ended; restarting", extra={"task": name})
            if loop.time() - started >= HEALTHY_RUN_SECONDS:
                delay = RESTART_FIRST_SECONDS
            await asyncio.sleep(delay * (0.5 + random.random() / 2))  # noqa: S311 - jitter
            delay = min(delay * 2, RESTART_MAX_SECONDS)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


class _CanonicalTenants:
    """Onboarding's tenant resolver over the registry's: an invite may name a verified domain."""

    def __init__(self, resolver: TenantResolver) -> None:
        self._resolver = resolver

    async def resolve(self, tenant: str) -> str:
        return await self._resolver.canonical(tenant)


def create_app(
    settings: Settings, metrics: Metrics | None = None, *, consent_recorder: ConsentRecorder | None = None
) -> web.Application:
    """The API application; every client it needs is built in its cleanup context. Onboarding's
    proofs go to ``consent_recorder`` (the tenant registry; by default kept in memory and logged)."""
    app = http.create_api(settings.max_body_bytes)
    add_compat_routes(app)
    if settings.public_base_url is not None:
        pages.add_onboarding_routes(app, consent_recorder or MemoryConsentRecorder())
    app[http.SETTINGS] = settings
    app[http.METRICS] = metrics or Metrics()
    app[http.AUDIT] = AuditLog()
    app[http.DRAINING] = asyncio.Event()
    app[http.OPENAPI] = importlib.resources.files("broker").joinpath("openapi.json").read_bytes()
    app.cleanup_ctx.append(_components)
    return app


async def _components(app: web.Application) -> AsyncIterator[None]:
    settings = app[http.SETTINGS]
    metrics = app[http.METRICS]
    ca_bundle = build_ca_bundle(settings.outbound_ca_file)
    jwks = JwksFetcher(settings.service_account_auth, ca_bundle) if settings.service_account_auth else None
    app[http.CALLERS] = CallerRegistry(settings, jwks)
    supervisor = Supervisor(metrics)
    async with CredentialStore(settings, metrics, ca_bundle) as credentials:
        app[http.CREDENTIALS] = credentials
        try:
            await credentials.load_all()
        except UpstreamError as exc:
            # Start anyway: /readyz reports it and requests answer 502 until a reload succeeds.
            log.error("credentials not loaded at start", extra={"reason": exc.description})  # noqa: TRY400 - no traceback: it could quote a secret source
        redis_options = settings.redis_options()
        redis_credentials = entra_redis_credentials(settings, ca_bundle) if redis_options else None
        redis = connect_redis(redis_options, credentials=redis_credentials) if redis_options else None
        sealer = await _load_sealer(credentials) if redis is not None else None
        if redis_options is None:
            log.warning("no redis_url: tokens are cached in this process only (not shared by replicas)")
        cache = TokenCache(
            metrics, settings.cache_options(), redis=redis, sealer=sealer, credentials=redis_credentials
        )
        if redis is not None and sealer is None:
            # Start degraded rather than crash: L1 only until the key loads (/readyz says so).
            supervisor.start("cache_key", lambda: _attach_sealer(credentials, cache), until_done=True)
        app[http.CACHE] = cache
        entra = EntraClient(settings.entra_options(), metrics, credentials, ca_bundle)
        tenant_options = settings.tenant_options()
        discovery = TenantDiscovery(settings.authority_host, ca_bundle, settings.upstream_timeout_seconds)
        resolver = TenantResolver(discovery, cache, metrics, tenant_options)
        registry = TenantRegistry(cache, metrics, tenant_options)
        broker = TokenBroker(
            dict(settings.apps), settings.flight_options(), metrics, cache, entra, resolver, registry
        )
        app[http.BROKER] = broker
        if (onboarding := settings.onboarding_options()) is not None:
            app[pages.ONBOARDING] = Onboarding(
                onboarding,
                credentials,
                cache,
                broker,
                app[pages.CONSENT_RECORDER],
                _CanonicalTenants(resolver),
                app[http.AUDIT],
                lambda outcome: metrics.child(metrics.consent_callbacks, outcome).inc(),
            )
        tenants = Tenants(resolver, registry, cache, broker, metrics, tenant_options)
        app[admin.ADMIN] = admin.TenantAdmin(
            app[http.CALLERS],
            frozenset(name for name, caller in settings.callers.items() if caller.admin),
            frozenset(settings.apps),
            tenants,
            app[http.AUDIT],
        )
        sweep = TenantSweep(registry, cache, broker.check, metrics, tenant_options)
        supervisor.start("credential_refresh", lambda: _refresh_credentials(credentials, settings))
        supervisor.start("tenant_sweep", sweep.run)
        if redis is not None:
            supervisor.start("purge_listener", cache.listen_for_purges)
            supervisor.start("offboard_listener", lambda: cache.listen_for_offboarding(tenants.forget))
        if redis_credentials is not None:
            supervisor.start("redis_credentials", cache.keep_credentials_renewed)
        try:
            yield
        finally:
            await supervisor.close()
            if jwks is not None:
                await jwks.close()
            await discovery.close()
            await broker.close()
            entra.close()
            await cache.close()


def entra_redis_credentials(settings: Settings, ca_bundle: str | None) -> EntraRedisCredentials | None:
    """With ``redis_auth: entra``, Redis AUTH tokens from the broker's own Azure identity (the same
    ``azure_credential`` choice and CA bundle as for Key Vault); the caller closes it."""
    if settings.redis_auth != "entra":
        return None
    transport: dict[str, str] = {"connection_verify": ca_bundle} if ca_bundle else {}
    return EntraRedisCredentials(
        _build_azure_credential(settings.azure_credential, transport), settings.redis_username
    )


async def _load_sealer(credentials: CredentialStore) -> Sealer | None:
    """The cache key's sealer, or ``None`` (logged without a traceback) when it cannot be loaded."""
    try:
        key_text = await credentials.cache_key_text()
        return Sealer(parse_key(key_text)) if key_text is not None else None
    except UpstreamError as exc:
        log.error("cache key not loaded: in-process cache only", extra={"reason": exc.description})  # noqa: TRY400 - no traceback: it could quote a secret source
        return None


async def _attach_sealer(credentials: CredentialStore, cache: TokenCache) -> None:
    """Keep trying to load the cache key; once it loads, the cache starts using Redis."""
    delay = RESTART_FIRST_SECONDS
    while (sealer := await _load_sealer(credentials)) is None:
        await asyncio.sleep(delay)
        delay = min(delay * 2, RESTART_MAX_SECONDS)
    cache.attach_sealer(sealer)
    log.info("cache key loaded: using the shared cache")


async def _refresh_credentials(credentials: CredentialStore, settings: Settings) -> None:
    """Re-read every credential periodically, so a rotation is picked up without a restart."""
    while True:
        await asyncio.sleep(settings.credential_refresh_seconds)
        try:
            await credentials.load_all(force=True)
        except UpstreamError as exc:
            log.warning("periodic credential reload failed", extra={"reason": exc.description})


def create_metrics_app(metrics: Metrics) -> web.Application:
    async def metrics_handler(_request: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    app = web.Application()
    app.router.add_get("/metrics", metrics_handler)
    return app


async def serve(settings: Settings, *, ready: Callable[[], None] | None = None) -> None:
    """Run the API and metrics listeners until SIGTERM/SIGINT, then drain in-flight requests."""
    metrics = Metrics()
    application = create_app(settings, metrics)
    api = web.AppRunner(
        application,
        shutdown_timeout=settings.drain_seconds,
        access_log=None,
        handle_signals=False,
        keepalive_timeout=settings.keepalive_seconds,
    )
    side = web.AppRunner(create_metrics_app(metrics), access_log=None, handle_signals=False)
    await api.setup()
    dispatch_token_requests_first(api, application)
    # Everything built so far (modules, SDK clients, configuration) lives as long as the process:
    # out of the collector's sight, a full collection no longer walks it (a pause of tens of
    # milliseconds, and a few microseconds a request when amortised, in a serving process).
    gc.freeze()
    await side.setup()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    listener: asyncio.Server | None = None
    try:
        listener = await _listen(api, settings, metrics)
        await web.TCPSite(side, settings.metrics.host, settings.metrics.port).start()
        log.info(
            "token-broker listening",
            extra={
                "host": settings.listen.host,
                "port": settings.listen.port,
                "metrics_port": settings.metrics.port,
                "tls": settings.listen.tls is not None,
            },
        )
        if ready is not None:
            ready()
        await stop.wait()
        application[http.DRAINING].set()
        log.info(
            "shutting down: draining in-flight requests", extra={"drain_seconds": settings.drain_seconds}
        )
    finally:
        if listener is not None:
            listener.close()  # stop accepting; the runner's cleanup then drains what is in flight
        await api.cleanup()
        await side.cleanup()


def dispatch_token_requests_first(runner: web.AppRunner, app: web.Application) -> None:
    """Hand ``POST /v1/token`` (nearly all of the traffic) to its endpoint before aiohttp's router
    and middleware chain, which cost a cache hit about a tenth of its time; every other request
    goes through them as before. The endpoint renders its errors as the middleware does.

    The one use of aiohttp beyond its documented API: ``web.Server.request_handler``, the function
    each new connection's ``RequestHandler`` calls for every request (set to ``Application._handle``
    by ``AppRunner.setup``). pyproject.toml pins the aiohttp range it was checked with, and
    ``tests/test_flat_path.py`` fails loudly if an upgrade moves it.
    """
    server = runner.server
    if server is None or not callable(getattr(server, "request_handler", None)):
        raise RuntimeError("aiohttp's Server.request_handler is gone: see dispatch_token_requests_first")
    routed = server.request_handler
    parts = http.token_parts(app)  # the components, built at startup (runner.setup ran it)

    def dispatch(request: web.BaseRequest) -> Awaitable[web.StreamResponse]:
        # Returns the handler's coroutine for aiohttp to await (no coroutine of its own).
        if request.method == "POST" and request.raw_path == "/v1/token":
            # AppRunner's request factory makes web.Request objects (without a route: none was looked up).
            return http.token_endpoint(app, parts, cast("web.Request", request))
        return routed(request)

    server.request_handler = dispatch


class _Refusal(asyncio.Protocol):
    """Answers a connection over ``max_connections`` with a 503 and closes it."""

    _ANSWER = (
        b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
        b"Connection: close\r\nContent-Length: 80\r\n\r\n"
        b'{"error":"temporarily_unavailable","error_description":"too many connections"}\r\n'
    )

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A TCP listener's transport (uvloop's is not an asyncio.Transport subclass, hence the cast).
        writer = cast("asyncio.WriteTransport", transport)
        writer.write(self._ANSWER)
        writer.close()


async def _listen(runner: web.AppRunner, settings: Settings, metrics: Metrics) -> asyncio.Server:
    """The API listener, with the connection cap that aiohttp's own sites do not have."""
    server = runner.server
    assert server is not None  # noqa: S101 - set up by runner.setup()
    cap = settings.max_connections

    def connection() -> asyncio.Protocol:
        if len(server.connections) >= cap:
            metrics.refused_connections.inc()
            return _Refusal()
        return server()

    tls = settings.listen.tls
    # HTTPS on the API port only (MSAL and azure-identity insist on https authorities); the
    # certificate follows its files, so a renewal needs no restart.
    ssl_context = ReloadingServerContext(tls.cert_file, tls.key_file) if tls else None
    return await asyncio.get_running_loop().create_server(
        connection,
        settings.listen.host,
        settings.listen.port,
        backlog=1024,
        reuse_address=True,
        ssl=ssl_context,
    )
