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
import random
import re
import time
from collections.abc import Awaitable, Callable
from functools import lru_cache, partial
from typing import Any, NamedTuple

import orjson
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

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
from broker.logs import AuditLog, TokenAudit, request_id_var
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
_NO_ROLES: tuple[str, ...] = ()  # "roles" absent (JSON has no tuples, so this is never a body's value)
# Every JSON answer's headers, built once (aiohttp copies them into each response).
_JSON_HEADERS = CIMultiDictProxy(
    CIMultiDict({"Content-Type": "application/json", "Cache-Control": "no-store", "Pragma": "no-cache"})
)
_RECEIVED = web.RequestKey("received_body", bytes)  # the body _received_json took
_RESOURCE_RE = re.compile(r"https://[A-Za-z0-9.-]+(:\d+)?(/[A-Za-z0-9._~%/-]*)?")


def _json_response(
    body: dict[str, Any], *, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        body=orjson.dumps(body),
        status=status,
        headers=_JSON_HEADERS if headers is None else {**_JSON_HEADERS, **headers},
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
    roles = body.get("roles", _NO_ROLES)
    if roles is not _NO_ROLES and (
        not isinstance(roles, list)
        or len(roles) > _MAX_ROLES
        or not all(isinstance(r, str) and 0 < len(r) <= _MAX_ROLE_LENGTH for r in roles)
    ):
        raise InvalidRequestError(f"'roles' must be a list of at most {_MAX_ROLES} role names")
    min_ttl = body.get("min_ttl", DEFAULT_MIN_TTL_SECONDS)
    if type(min_ttl) is not int or not (0 <= min_ttl <= MAX_MIN_TTL_SECONDS):
        raise InvalidRequestError(f"'min_ttl' must be an integer from 0 to {MAX_MIN_TTL_SECONDS}")
    return TokenRequest(tenant, resource, app, tuple(roles), min_ttl)


def _parse_resource(resource: Any, scope: Any) -> str:
    if resource is None and scope is None:
        raise InvalidRequestError("one of 'resource' or 'scope' is required")
    for given in (resource, scope):
        if given is not None and not (isinstance(given, str) and 0 < len(given) <= 512):
            raise InvalidRequestError("'resource' and 'scope' must be strings")
    if scope is not None and not scope.endswith("/.default"):
        raise InvalidRequestError("'scope' must be '{resource}/.default' (app tokens only)")
    value, valid = _resource_value(resource if scope is None else scope)
    if resource is not None and scope is not None and _resource_value(resource)[0] != value:
        raise InvalidRequestError("'resource' and 'scope' name different resources")
    if not valid:
        raise InvalidRequestError("'resource' must be an https:// resource URI")
    return value


@lru_cache(maxsize=256)  # callers name a handful of resources; bounded whatever they send
def _resource_value(spelling: str) -> tuple[str, bool]:
    """The resource ``spelling`` names (``normalise_resource``), and whether that is an https://
    resource URI."""
    value = normalise_resource(spelling)
    return value, _RESOURCE_RE.fullmatch(value) is not None


# --- middleware and handlers --------------------------------------------------------------------

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _request_id(request: web.BaseRequest) -> str:
    """The caller's ``X-Request-ID`` when it is a sane one, else a fresh one; set for the logs."""
    incoming = request.headers.get("X-Request-ID")
    if incoming is not None and _REQUEST_ID_RE.fullmatch(incoming):
        request_id = incoming
    else:  # a correlation id, not a secret: the PRNG is enough and spares a getrandom(2) a request
        request_id = f"{random.getrandbits(64):016x}"
    request_id_var.set(request_id)
    return request_id


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Request ids, and one rendering of every error as the contract's JSON body."""
    return await guarded(request, handler, _request_id(request))


async def guarded(request: web.Request, handler: Handler, request_id: str) -> web.StreamResponse:
    """``handler(request)`` with every error rendered as the contract's JSON body, and the request id
    on the response (``error_middleware``; the token endpoint ahead of the router calls it too)."""
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


class TokenParts(NamedTuple):
    """The components a token request needs, looked up once (``token_parts``) instead of once per
    use in ``app[...]`` (the served app's dispatcher keeps them for its lifetime)."""

    settings: Settings
    callers: CallerRegistry
    broker: TokenBroker
    metrics: Metrics
    audit: AuditLog


def token_parts(app: web.Application) -> TokenParts:
    return TokenParts(app[SETTINGS], app[CALLERS], app[BROKER], app[METRICS], app[AUDIT])


async def token_endpoint(app: web.Application, parts: TokenParts, request: web.Request) -> web.StreamResponse:
    """``POST /v1/token`` as the served app dispatches it, ahead of the router and middleware
    (``app.dispatch_token_requests_first``): from memory when it can, else ``answer_token``."""
    request_id = _request_id(request)
    response = answer_from_memory(parts, request, request_id)
    if response is None:
        return await guarded(request, partial(answer_token, app), request_id)
    response.headers["X-Request-ID"] = request_id
    return response


async def token_handler(request: web.Request) -> web.Response:
    """``POST /v1/token`` reached through the router and ``error_middleware`` (which set the request
    id and put it on the response)."""
    app = request.app
    return answer_from_memory(token_parts(app), request, request_id_var.get() or "-") or await answer_token(
        app, request
    )


async def answer_token(app: web.Application, request: web.BaseRequest) -> web.Response:
    """``POST /v1/token`` through ``issue_token``, the path of every token surface."""
    settings = app[SETTINGS]
    issued = await issue_token(
        app,
        "v1",
        lambda: app[CALLERS].authenticate(request.headers.get("Authorization")),
        lambda: _read_token_request(request, settings.max_body_bytes, settings.body_timeout_seconds),
    )
    return _token_response(issued)


def answer_from_memory(parts: TokenParts, request: web.BaseRequest, request_id: str) -> web.Response | None:
    """The cache hit, flat and synchronous: a body that has all arrived (``_received_json``), a
    caller known by one hash (``CallerRegistry.known_bearer``), a body ``orjson`` parses and
    ``parse_token_request`` accepts, and a token ``TokenBroker.from_memory`` finds in L1. ``None``,
    having recorded nothing, for anything else: ``answer_token`` then handles the request from the
    start (errors included), with the same code for everything that decides the answer (parsing,
    policy, key, L1, the response, metrics and the audit line)."""
    started = time.perf_counter()
    raw = _received_json(request, parts.settings.max_body_bytes)
    if raw is None:
        return None
    caller = parts.callers.known_bearer(request.headers.get("Authorization"))
    issued = None
    if caller is not None:
        try:
            token_request = parse_token_request(orjson.loads(raw))
            issued = parts.broker.from_memory(caller, token_request)
        except (BrokerError, orjson.JSONDecodeError):
            pass  # the general path raises the very same error (or json accepts what orjson did not)
    if caller is None or issued is None:
        request[_RECEIVED] = raw  # for the general path: the body cannot be read twice
        return None
    record_outcome(parts, "v1", caller.name, token_request, issued, "ok", started, request_id)
    return _token_response(issued)


def _token_response(issued: Issued) -> web.Response:
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
    then, whatever happened, ``record_outcome`` (metrics, one audit line naming the surface). Errors
    propagate for the surface to render in its own protocol's shape."""
    started = time.perf_counter()
    parts = token_parts(app)
    caller_name = "-"
    token_request: TokenRequest | None = None
    issued: Issued | None = None
    outcome = "server_error"  # until proven otherwise: an unexpected failure is never "ok"
    try:
        caller = await authenticate()
        caller_name = caller.name
        token_request = await parse()
        issued = await parts.broker.get_token(caller, token_request)
        outcome = "ok"
    except BrokerError as exc:
        outcome = exc.error
        raise
    finally:
        record_outcome(
            parts, surface, caller_name, token_request, issued, outcome, started, request_id_var.get()
        )
    return issued


def record_outcome(
    parts: TokenParts,
    surface: str,
    caller: str,
    request: TokenRequest | None,
    issued: Issued | None,
    outcome: str,
    started: float,
    request_id: str | None,
) -> None:
    """The metrics and the audit line of one token request: who asked for what, through which
    surface, and what happened (never the token). The audit's ``tenant`` is the tenant's GUID (when
    known), ``tenant_requested`` the spelling the caller sent. Written before the answer is sent."""
    elapsed = time.perf_counter() - started
    metrics = parts.metrics
    metrics.token_requests.inc(caller, outcome)
    metrics.token_request_seconds.observe(elapsed, outcome)
    if issued is not None and request is not None:
        token = issued.token
        metrics.served_token_remaining_seconds.observe(int(token.remaining_seconds()))
        said = TokenAudit(
            caller,
            surface,
            issued.tenant,
            request.tenant,
            issued.app,
            request.resource,
            outcome,
            issued.layer,
            token.fingerprint,
            token.uti,
        )
    elif request is not None:
        broker = parts.broker
        said = TokenAudit(
            caller,
            surface,
            broker.canonical_tenant(request.tenant),
            request.tenant,
            broker.app_name(request.app),
            request.resource,
            outcome,
            None,
            None,
            None,
        )
    else:
        said = TokenAudit(caller, surface, None, None, None, None, outcome, None, None, None)
    parts.audit.token_request(said, round(elapsed * 1000, 3), request_id)


async def _read_token_request(
    request: web.BaseRequest, limit: int, body_timeout_seconds: float
) -> TokenRequest:
    """The request's body, validated."""
    raw = request.get(_RECEIVED)
    if raw is None:
        raw = await read_body(request, limit, "application/json", body_timeout_seconds)
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):
        raise InvalidRequestError("the body is not valid JSON") from None
    return parse_token_request(body)


def _is_media_type(request: web.BaseRequest, media_type: str) -> bool:
    return request.headers.get("Content-Type", "").split(";", 1)[0].strip().lower() == media_type


def _received_json(request: web.BaseRequest, limit: int) -> bytes | None:
    """The body when all of it has already arrived, is JSON and within ``limit`` (the usual case: a
    small body comes with its headers), taken without waiting; ``None`` otherwise, for ``read_body``
    to read and judge."""
    length = request.content_length
    if length is None or length > limit or not request.content.is_eof():
        return None
    content_type = request.headers.get("Content-Type")
    if content_type != "application/json" and not _is_media_type(request, "application/json"):
        return None
    return request.content.read_nowait()


async def read_body(request: web.BaseRequest, limit: int, media_type: str, timeout_seconds: float) -> bytes:
    """The whole body, however many segments or chunks it arrives in: 415 for another media type,
    413 past ``limit``, 408 when it trickles in for longer than ``timeout_seconds``."""
    if not _is_media_type(request, media_type):
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
