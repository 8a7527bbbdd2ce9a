"""The HTTP surface: ``POST /v1/token``, health endpoints, the metrics app, and the composition root.

``create_app(settings)`` builds every long-lived client in the app's ``cleanup_ctx`` (nothing at import
time) and one middleware renders every ``BrokerError`` as the contract's JSON body. Anything else is a
generic 500 whose body carries only the request id; the traceback goes to the log.
"""

from __future__ import annotations

import asyncio
import importlib.resources
import json
import logging
import re
import secrets
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from redis.asyncio import Redis
from redis.exceptions import RedisError

from broker.cache import PURGE_CHANNEL, TokenCache
from broker.callers import Caller, CallerRegistry
from broker.config import Settings, is_tenant, normalise_resource
from broker.crypto import Sealer, parse_key
from broker.entra import EntraClient
from broker.errors import (
    BrokerError,
    InvalidRequestError,
    PayloadTooLargeError,
    UnsupportedMediaTypeError,
    UpstreamError,
)
from broker.logs import AuditLog, request_id_var
from broker.metrics import Metrics
from broker.oidc import JwksFetcher
from broker.service import Issued, TokenBroker
from broker.tls import ReloadingServerContext, build_ca_bundle
from broker.tokens import DEFAULT_MIN_TTL_SECONDS, MAX_MIN_TTL_SECONDS, TokenRequest
from broker.vault import CredentialStore

log = logging.getLogger(__name__)

SETTINGS = web.AppKey("settings", Settings)
METRICS = web.AppKey("metrics", Metrics)
BROKER = web.AppKey("broker", TokenBroker)
CALLERS = web.AppKey("callers", CallerRegistry)
CACHE = web.AppKey("cache", TokenCache)
CREDENTIALS = web.AppKey("credentials", CredentialStore)
AUDIT = web.AppKey("audit", AuditLog)

_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_FIELDS = frozenset({"tenant", "resource", "scope", "app", "roles", "min_ttl"})
_MAX_ROLES = 64
_MAX_ROLE_LENGTH = 256
_NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}
_RESOURCE_RE = re.compile(r"^https://[A-Za-z0-9.-]+(:\d+)?(/[A-Za-z0-9._~%/-]*)?$")


def _json_response(
    body: dict[str, Any], *, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        body=orjson.dumps(body),
        status=status,
        content_type="application/json",
        headers={**_NO_STORE, **(headers or {})},
    )


def error_response(exc: BrokerError, request_id: str) -> web.Response:
    return _json_response(
        {**exc.to_body(), "request_id": request_id}, status=exc.status, headers=exc.headers()
    )


# --- request parsing ----------------------------------------------------------------------------


def parse_token_request(body: Any) -> TokenRequest:
    """Validate the JSON body strictly: unknown fields, wrong types and bad formats are 400s."""
    if not isinstance(body, dict):
        raise InvalidRequestError("the body must be a JSON object")
    if not _FIELDS.issuperset(body) and (unknown := sorted(set(body) - _FIELDS)):
        raise InvalidRequestError(f"unknown field(s): {', '.join(unknown)}")
    tenant = body.get("tenant")
    if not isinstance(tenant, str) or not tenant:
        raise InvalidRequestError("'tenant' is required: a tenant GUID or verified domain")
    if not is_tenant(tenant):
        raise InvalidRequestError("'tenant' must be a GUID or a domain such as contoso.onmicrosoft.com")
    resource = _parse_resource(body.get("resource"), body.get("scope"))
    app = body.get("app")
    if app is not None and (not isinstance(app, str) or not app or len(app) > 64):
        raise InvalidRequestError("'app' must be the name of a configured app")
    roles = body.get("roles", [])
    if (
        not isinstance(roles, list)
        or len(roles) > _MAX_ROLES
        or not all(isinstance(r, str) and 0 < len(r) <= _MAX_ROLE_LENGTH for r in roles)
    ):
        raise InvalidRequestError(f"'roles' must be a list of at most {_MAX_ROLES} role names")
    min_ttl = body.get("min_ttl", DEFAULT_MIN_TTL_SECONDS)
    if isinstance(min_ttl, bool) or not isinstance(min_ttl, int) or not (0 <= min_ttl <= MAX_MIN_TTL_SECONDS):
        raise InvalidRequestError(f"'min_ttl' must be an integer from 0 to {MAX_MIN_TTL_SECONDS}")
    return TokenRequest(
        tenant=tenant, resource=resource, app=app, roles=tuple(roles), min_ttl_seconds=min_ttl
    )


def _parse_resource(resource: Any, scope: Any) -> str:
    given = [v for v in (resource, scope) if v is not None]
    if not given:
        raise InvalidRequestError("one of 'resource' or 'scope' is required")
    if not all(isinstance(v, str) and 0 < len(v) <= 512 for v in given):
        raise InvalidRequestError("'resource' and 'scope' must be strings")
    if isinstance(scope, str) and not scope.endswith("/.default"):
        raise InvalidRequestError("'scope' must be '{resource}/.default' (app tokens only)")
    normalised = {normalise_resource(v) for v in given}
    if len(normalised) != 1:
        raise InvalidRequestError("'resource' and 'scope' name different resources")
    value = normalised.pop()
    if not _RESOURCE_RE.match(value):
        raise InvalidRequestError("'resource' must be an https:// resource URI")
    return value


# --- middleware and handlers --------------------------------------------------------------------

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Request ids, and one rendering of every error as the contract's JSON body."""
    incoming = request.headers.get("X-Request-ID", "")
    request_id = incoming if _REQUEST_ID_RE.match(incoming) else secrets.token_hex(8)
    request_id_var.set(request_id)
    try:
        response = await handler(request)
    except BrokerError as exc:
        response = error_response(exc, request_id)
    except web.HTTPException as exc:
        if exc.status == 413:
            response = error_response(PayloadTooLargeError("request body too large"), request_id)
        else:
            response = _json_response(
                {
                    "error": "invalid_request" if exc.status < 500 else "server_error",
                    "error_description": exc.reason,
                    "request_id": request_id,
                },
                status=exc.status,
                headers={"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None,
            )
    except Exception:
        log.exception("unhandled error")
        response = _json_response(
            {"error": "server_error", "error_description": "internal error", "request_id": request_id},
            status=500,
        )
    response.headers["X-Request-ID"] = request_id
    return response


async def token_handler(request: web.Request) -> web.Response:
    app = request.app
    issued = await issue_token(
        app,
        "v1",
        lambda: app[CALLERS].authenticate(request.headers.get("Authorization")),
        lambda: _read_token_request(request, app[SETTINGS].max_body_bytes),
    )
    token = issued.token
    return _json_response(
        {
            "access_token": token.token,
            "token_type": "Bearer",
            "expires_in": int(token.remaining_seconds()),
            "expires_on": int(token.expires_on),
            "tenant_id": token.tenant_id,
            "resource": token.resource,
            "roles": list(token.roles),
        }
    )


async def issue_token(
    app: web.Application,
    surface: str,
    authenticate: Callable[[], Awaitable[Caller]],
    parse: Callable[[], Awaitable[TokenRequest]],
) -> Issued:
    """The one path of every token surface (``/v1/token``, the Entra-compatible endpoints, the
    managed-identity endpoint): authenticate the caller, parse its request, ``TokenBroker.get_token``;
    then, whatever happened, the same metrics and one audit line naming the surface. Errors propagate
    for the surface to render in its own protocol's shape."""
    started = time.perf_counter()
    metrics = app[METRICS]
    caller_name = "-"
    token_request: TokenRequest | None = None
    issued: Issued | None = None
    outcome = "ok"
    try:
        caller = await authenticate()
        caller_name = caller.name
        token_request = await parse()
        issued = await app[BROKER].get_token(caller, token_request)
    except BrokerError as exc:
        outcome = exc.error
        raise
    except Exception:
        outcome = "server_error"  # never counted or audited as "ok"
        raise
    finally:
        elapsed = time.perf_counter() - started
        metrics.child(metrics.token_requests, caller_name, outcome).inc()
        metrics.child(metrics.token_request_seconds, outcome).observe(elapsed)
        _audit(app[AUDIT], surface, caller_name, token_request, issued, outcome, elapsed)
    metrics.served_token_remaining_seconds.observe(int(issued.token.remaining_seconds()))
    return issued


def _audit(
    audit: AuditLog,
    surface: str,
    caller: str,
    request: TokenRequest | None,
    issued: Issued | None,
    outcome: str,
    elapsed: float,
) -> None:
    """One line per token request: who asked for what, through which surface, and what happened
    (never the token)."""
    audit.write(
        {
            "caller": caller,
            "surface": surface,
            "tenant": request.tenant if request else None,
            "app": issued.app if issued else (request.app if request else None),
            "resource": request.resource if request else None,
            "outcome": outcome,
            "cache_layer": issued.layer if issued else None,
            "latency_ms": round(elapsed * 1000, 3),
            "token_fingerprint": issued.token.fingerprint if issued else None,
            "uti": issued.token.uti if issued else None,
        }
    )


async def _read_token_request(request: web.Request, limit: int) -> TokenRequest:
    return parse_token_request(await _read_json(request, limit))


async def read_body(request: web.Request, limit: int, media_type: str) -> bytes:
    """The whole body, however many pieces it arrives in; 415 for another media type, 413 past ``limit``."""
    content_type = request.headers.get("Content-Type", "")
    if content_type.split(";", 1)[0].strip().lower() != media_type:
        raise UnsupportedMediaTypeError(f"Content-Type must be {media_type}")
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLargeError(f"request body larger than {limit} bytes")
    raw = b""
    while chunk := await request.content.read(limit + 1 - len(raw)):
        raw += chunk
        if len(raw) > limit:
            raise PayloadTooLargeError(f"request body larger than {limit} bytes")
    return raw


async def _read_json(request: web.Request, limit: int) -> Any:
    raw = await read_body(request, limit, "application/json")
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):
        raise InvalidRequestError("the body is not valid JSON") from None


async def healthz(_request: web.Request) -> web.Response:
    return _json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Ready when config is loaded, Redis answers (if configured) and every credential is loaded."""
    app = request.app
    settings = app[SETTINGS]
    cache = app[CACHE]
    credentials = app[CREDENTIALS]
    checks: dict[str, dict[str, Any]] = {"config": {"status": "ok"}}
    if cache.shared:
        ok = await cache.ping()
        checks["redis"] = {"status": "ok" if ok else "degraded"}
        if not ok:
            checks["redis"]["reason"] = cache.redis_last_error
    else:
        checks["redis"] = {"status": "disabled"}
    missing = [name for name in settings.apps if not credentials.is_loaded(name)]
    rejected = dict(credentials.rejected)
    checks["credentials"] = {"status": "ok" if not (missing or rejected) else "degraded"}
    if missing:
        checks["credentials"].update(not_loaded=missing, reason=credentials.last_error)
    if rejected:
        checks["credentials"]["rejected_by_entra"] = rejected
    ready = all(check["status"] in ("ok", "disabled") for check in checks.values())
    return _json_response(
        {"status": "ready" if ready else "degraded", "checks": checks}, status=200 if ready else 503
    )


# --- composition root ---------------------------------------------------------------------------


def create_app(settings: Settings, metrics: Metrics | None = None) -> web.Application:
    """The API application; every client it needs is built in its cleanup context."""
    app = web.Application(middlewares=[error_middleware], client_max_size=settings.max_body_bytes)
    app[SETTINGS] = settings
    app[METRICS] = metrics or Metrics()
    app[AUDIT] = AuditLog()
    app.cleanup_ctx.append(_components)
    app.router.add_post("/v1/token", token_handler)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    openapi = importlib.resources.files("broker").joinpath("openapi.json").read_bytes()

    async def openapi_handler(_request: web.Request) -> web.Response:
        return web.Response(body=openapi, content_type="application/json")

    app.router.add_get("/openapi.json", openapi_handler)
    # Imported here: the compatible surfaces import this module (the composition root will own both).
    from broker.oauth_compat import add_compat_routes

    add_compat_routes(app)
    return app


async def _components(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    metrics = app[METRICS]
    ca_bundle = build_ca_bundle(settings.outbound_ca_file)
    jwks = JwksFetcher(settings.service_account_auth, ca_bundle) if settings.service_account_auth else None
    app[CALLERS] = CallerRegistry(settings, jwks)
    async with CredentialStore(settings, metrics, ca_bundle) as credentials:
        app[CREDENTIALS] = credentials
        try:
            await credentials.load_all()
        except UpstreamError as exc:
            # Start anyway: /readyz reports it and requests answer 502 until a reload succeeds.
            log.error("credentials not loaded at start", extra={"reason": exc.description})  # noqa: TRY400 - no traceback: it could quote a secret source
        redis, sealer = await _shared_cache(settings, credentials)
        cache = TokenCache(metrics, redis=redis, sealer=sealer, l1_max_tokens=settings.l1_max_tokens)
        app[CACHE] = cache
        entra = EntraClient(settings, metrics, credentials, ca_bundle)
        broker = TokenBroker(settings, metrics, cache, entra)
        app[BROKER] = broker
        background = [asyncio.create_task(_refresh_credentials(credentials, settings))]
        if settings.redis_url:
            background.append(asyncio.create_task(_listen_for_purges(settings, cache, broker)))
        try:
            yield
        finally:
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            if jwks is not None:
                await jwks.close()
            await broker.close()
            entra.close()
            if redis is not None:
                await redis.aclose()


async def _shared_cache(
    settings: Settings, credentials: CredentialStore
) -> tuple[Redis | None, Sealer | None]:
    if not settings.redis_url:
        log.warning("no redis_url: tokens are cached in this process only (not shared by replicas)")
        return None, None
    key_text = await credentials.cache_key_text()
    if key_text is None:
        raise UpstreamError("cache_encryption_key is not loaded")
    sealer = Sealer(parse_key(key_text))
    redis = Redis.from_url(
        settings.redis_url,
        socket_timeout=settings.redis_timeout_seconds,
        socket_connect_timeout=settings.redis_timeout_seconds,
        health_check_interval=30,
    )
    return redis, sealer


async def _refresh_credentials(credentials: CredentialStore, settings: Settings) -> None:
    """Re-read every credential periodically, so a rotation is picked up without a restart."""
    while True:
        await asyncio.sleep(settings.credential_refresh_seconds)
        try:
            await credentials.load_all(force=True)
        except UpstreamError as exc:
            log.warning("periodic credential reload failed", extra={"reason": exc.description})
        except Exception:
            log.exception("periodic credential reload crashed")


async def _listen_for_purges(settings: Settings, cache: TokenCache, broker: TokenBroker) -> None:
    """Drop a tenant's L1 tokens when `token-broker cache purge` broadcasts it (any replica)."""
    assert settings.redis_url is not None  # noqa: S101 - only started with Redis configured
    # Its own connection without a read timeout: a subscriber waits for messages by design.
    redis = Redis.from_url(
        settings.redis_url, socket_connect_timeout=settings.redis_timeout_seconds, health_check_interval=30
    )
    try:
        while True:
            try:
                async with redis.pubsub() as pubsub:
                    await pubsub.subscribe(PURGE_CHANNEL)
                    while True:
                        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=5.0)
                        if message is not None and message.get("type") == "message":
                            tenant = message["data"].decode(errors="replace")
                            dropped = cache.purge_local(tenant)
                            broker.forget(tenant)
                            log.info("purge broadcast received", extra={"tenant": tenant, "dropped": dropped})
            except (RedisError, OSError) as exc:
                log.warning("purge listener lost Redis; retrying", extra={"reason": type(exc).__name__})
                await asyncio.sleep(1.0)
    finally:
        await redis.aclose()


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
    api = web.AppRunner(
        create_app(settings, metrics),
        shutdown_timeout=settings.drain_seconds,
        access_log=None,
        handle_signals=False,
    )
    side = web.AppRunner(create_metrics_app(metrics), access_log=None, handle_signals=False)
    await api.setup()
    await side.setup()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        tls = settings.listen.tls
        ssl_context = ReloadingServerContext(tls.cert_file, tls.key_file) if tls else None
        await web.TCPSite(
            api, settings.listen.host, settings.listen.port, backlog=1024, ssl_context=ssl_context
        ).start()
        await web.TCPSite(side, settings.metrics.host, settings.metrics.port).start()
        log.info(
            "token-broker listening",
            extra={
                "host": settings.listen.host,
                "port": settings.listen.port,
                "tls": ssl_context is not None,
                "metrics_port": settings.metrics.port,
            },
        )
        if ready is not None:
            ready()
        await stop.wait()
        log.info(
            "shutting down: draining in-flight requests", extra={"drain_seconds": settings.drain_seconds}
        )
    finally:
        await api.cleanup()
        await side.cleanup()
