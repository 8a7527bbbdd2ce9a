"""The HTTP surface: ``POST /v1/token``, health endpoints and the OpenAPI document (the tenant admin
API, ``/v1/tenants``, lives in ``admin.py`` and is registered by ``create_api``).

Handlers parse and validate, call the service, and render. They find their components under typed
``web.AppKey``s that the composition root (``app.py``) fills. One middleware renders every
``BrokerError`` as the contract's JSON body; anything else is a generic 500 whose body carries only
the request id, with the traceback in the log.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

from broker import admin
from broker.cache import TokenCache
from broker.callers import Caller, CallerRegistry
from broker.config import Settings, is_tenant, normalise_resource
from broker.errors import (
    BrokerError,
    InvalidRequestError,
    PayloadTooLargeError,
    RequestTimeoutError,
    UnsupportedMediaTypeError,
)
from broker.logs import AuditLog, request_id_var
from broker.metrics import Metrics
from broker.service import Issued, TokenBroker
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
OPENAPI = web.AppKey("openapi", bytes)
DRAINING = web.AppKey("draining", asyncio.Event)  # set on SIGTERM: /readyz answers 503

_REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_FIELDS = frozenset({"tenant", "resource", "scope", "app", "roles", "min_ttl"})
_MAX_ROLES = 64
_MAX_ROLE_LENGTH = 256
_NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}
_RESOURCE_RE = re.compile(r"https://[A-Za-z0-9.-]+(:\d+)?(/[A-Za-z0-9._~%/-]*)?")


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
    if not _RESOURCE_RE.fullmatch(value):
        raise InvalidRequestError("'resource' must be an https:// resource URI")
    return value


# --- middleware and handlers --------------------------------------------------------------------

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Request ids, and one rendering of every error as the contract's JSON body."""
    incoming = request.headers.get("X-Request-ID", "")
    request_id = incoming if _REQUEST_ID_RE.fullmatch(incoming) else secrets.token_hex(8)
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
    settings = app[SETTINGS]
    issued = await issue_token(
        app,
        "v1",
        lambda: app[CALLERS].authenticate(request.headers.get("Authorization")),
        lambda: _read_token_request(request, settings.max_body_bytes, settings.body_timeout_seconds),
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
    outcome = "server_error"  # until proven otherwise: an unexpected failure is never "ok"
    try:
        caller = await authenticate()
        caller_name = caller.name
        token_request = await parse()
        issued = await app[BROKER].get_token(caller, token_request)
        outcome = "ok"
    except BrokerError as exc:
        outcome = exc.error
        raise
    finally:
        elapsed = time.perf_counter() - started
        metrics.child(metrics.token_requests, caller_name, outcome).inc()
        metrics.child(metrics.token_request_seconds, outcome).observe(elapsed)
        app_name = (
            issued.app if issued else app[BROKER].app_name(token_request.app) if token_request else None
        )
        tenant = app[BROKER].canonical_tenant(token_request.tenant) if token_request else None
        _audit(app[AUDIT], surface, caller_name, token_request, tenant, app_name, issued, outcome, elapsed)
    metrics.served_token_remaining_seconds.observe(int(issued.token.remaining_seconds()))
    return issued


def _audit(
    audit: AuditLog,
    surface: str,
    caller: str,
    request: TokenRequest | None,
    tenant: str | None,
    app: str | None,
    issued: Issued | None,
    outcome: str,
    elapsed: float,
) -> None:
    """One line per token request: who asked for what, through which surface, and what happened
    (never the token). ``tenant`` is the tenant's GUID (when known), ``tenant_requested`` the
    spelling the caller sent."""
    audit.write(
        {
            "caller": caller,
            "surface": surface,
            "tenant": tenant,
            "tenant_requested": request.tenant if request else None,
            "app": app,
            "resource": request.resource if request else None,
            "outcome": outcome,
            "cache_layer": issued.layer if issued else None,
            "latency_ms": round(elapsed * 1000, 3),
            "token_fingerprint": issued.token.fingerprint if issued else None,
            "uti": issued.token.uti if issued else None,
        }
    )


async def _read_token_request(request: web.Request, limit: int, body_timeout_seconds: float) -> TokenRequest:
    raw = await read_body(request, limit, "application/json", body_timeout_seconds)
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):
        raise InvalidRequestError("the body is not valid JSON") from None
    return parse_token_request(body)


async def read_body(request: web.Request, limit: int, media_type: str, timeout_seconds: float) -> bytes:
    """The whole body, however many segments or chunks it arrives in: 415 for another media type,
    413 past ``limit``, 408 when it trickles in for longer than ``timeout_seconds``."""
    content_type = request.headers.get("Content-Type", "")
    if content_type.split(";", 1)[0].strip().lower() != media_type:
        raise UnsupportedMediaTypeError(f"Content-Type must be {media_type}")
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLargeError(f"request body larger than {limit} bytes")
    raw = b""
    try:
        async with asyncio.timeout(timeout_seconds):
            while chunk := await request.content.read(limit + 1 - len(raw)):
                raw += chunk
                if len(raw) > limit:
                    raise PayloadTooLargeError(f"request body larger than {limit} bytes")
    except TimeoutError:
        raise RequestTimeoutError("the request body did not arrive in time") from None
    return raw


async def healthz(_request: web.Request) -> web.Response:
    return _json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Whether this replica can issue tokens: 503 only while it cannot at all (draining, or no app
    credential ever loaded).

    Shared dependencies (Redis, Key Vault, a credential Entra rejects) are reported in the body but do
    not make the replica unready: every replica shares them, and taking all of them out of service
    would turn a degradation into an outage (cached tokens would stop being served). The body names
    no secret source; the reason is in the logs.
    """
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
        elif not cache.key_loaded:
            checks["redis"] = {"status": "degraded", "reason": "cache key not loaded: in-process cache only"}
    else:
        checks["redis"] = {"status": "disabled"}
    loaded = [name for name in settings.apps if credentials.is_loaded(name)]
    missing = [name for name in settings.apps if name not in loaded]
    rejected = dict(credentials.rejected)
    checks["credentials"] = {"status": "ok" if not (missing or rejected) else "degraded"}
    if missing:
        checks["credentials"]["not_loaded"] = missing
    if rejected:
        checks["credentials"]["rejected_by_entra"] = rejected
    draining = app[DRAINING].is_set()
    ready = bool(loaded) and not draining
    if draining:
        status = "draining"
    elif not ready:
        status = "not_ready"
    else:
        status = "ready" if all(c["status"] in ("ok", "disabled") for c in checks.values()) else "degraded"
    return _json_response({"status": status, "checks": checks}, status=200 if ready else 503)


async def openapi_document(request: web.Request) -> web.Response:
    return web.Response(body=request.app[OPENAPI], content_type="application/json")


def create_api(max_body_bytes: int) -> web.Application:
    """The API application with its routes; ``app.create_app`` fills its components."""
    app = web.Application(middlewares=[error_middleware], client_max_size=max_body_bytes)
    app.router.add_post("/v1/token", token_handler)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/openapi.json", openapi_document)
    admin.add_routes(app)
    return app
