"""The test control API under ``/_emulator/``: JSON in, JSON out, loopback callers only.

Every operation of :class:`emulator.client.Emulator` maps to one route here. Bad arguments
(unknown tenant or app, malformed GUID, unknown fault kind) answer 400 ``{"error": "..."}`` so a
test fails at the line that configured the emulator wrongly, not later at an opaque token error.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Awaitable, Callable
from typing import Any, Final

from aiohttp import web

from .context import SIGNING_KEY, STATE
from .state import StateError
from .world import DEMO_WORLD

PREFIX: Final = "/_emulator"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def loopback_only_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Refuse control-API calls from anything but loopback; turn StateError into a 400."""
    if not request.path.startswith(PREFIX + "/"):
        return await handler(request)
    try:
        remote_is_loopback = ipaddress.ip_address(request.remote or "").is_loopback
    except ValueError:
        remote_is_loopback = False
    if not remote_is_loopback:
        return web.json_response({"error": "control API is loopback-only"}, status=403)
    try:
        return await handler(request)
    except StateError as exc:
        return web.json_response({"error": str(exc)}, status=400)


async def _body(request: web.Request) -> dict[str, Any]:
    if not request.can_read_body:
        return {}
    try:
        data = await request.json()
    except json.JSONDecodeError as exc:
        raise StateError(f"body is not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise StateError("body must be a JSON object")
    return data


def _str(data: dict[str, Any], key: str) -> str:
    value = data.get(key)
    if not isinstance(value, str) or not value:
        raise StateError(f"{key!r} must be a non-empty string")
    return value


def _opt_str(data: dict[str, Any], key: str) -> str | None:
    value = data.get(key)
    if value is not None and not isinstance(value, str):
        raise StateError(f"{key!r} must be a string")
    return value


def _str_list(data: dict[str, Any], key: str) -> list[str]:
    value = data.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise StateError(f"{key!r} must be a list of strings")
    return value


_OK: Final = {"ok": True}


async def reset(request: web.Request) -> web.Response:
    """Back to the base state (vault tenant + broker identity), no faults, no log."""
    request.app[STATE].reset()
    return web.json_response(_OK)


async def seed_demo_route(request: web.Request) -> web.Response:
    """Add the demo world (``emulator.world.DEMO_WORLD``)."""
    DEMO_WORLD.seed(request.app[STATE])
    return web.json_response(_OK)


async def add_tenant(request: web.Request) -> web.Response:
    """``{"tenant_id", "domains"?}``."""
    data = await _body(request)
    tenant = request.app[STATE].add_tenant(_str(data, "tenant_id"), _str_list(data, "domains"))
    return web.json_response({"tenant_id": tenant.tenant_id, "domains": tenant.domains})


async def add_app(request: web.Request) -> web.Response:
    """``{"client_id", "home_tenant", "secret"?, "certificate_pem"?}``."""
    data = await _body(request)
    app = request.app[STATE].add_app(
        _str(data, "client_id"),
        home_tenant=_str(data, "home_tenant"),
        secret=_opt_str(data, "secret"),
        certificate_pem=_opt_str(data, "certificate_pem"),
    )
    return web.json_response({"client_id": app.client_id, "home_tenant": app.home_tenant})


async def add_app_secret(request: web.Request) -> web.Response:
    """``{"secret", "expires_in_seconds"?}``; a non-positive lifetime is already expired."""
    data = await _body(request)
    expires = data.get("expires_in_seconds")
    if expires is not None and not isinstance(expires, int | float):
        raise StateError("'expires_in_seconds' must be a number")
    request.app[STATE].add_app_secret(request.match_info["client_id"], _str(data, "secret"), expires)
    return web.json_response(_OK)


async def add_app_certificate(request: web.Request) -> web.Response:
    """``{"certificate_pem"}``."""
    data = await _body(request)
    request.app[STATE].add_app_certificate(request.match_info["client_id"], _str(data, "certificate_pem"))
    return web.json_response(_OK)


async def rotate_app_secret(request: web.Request) -> web.Response:
    """``{"vault_secret"?}`` → ``{"secret"}``: all old secrets of the app stop working."""
    data = await _body(request)
    value = request.app[STATE].rotate_app_secret(
        request.match_info["client_id"], _opt_str(data, "vault_secret")
    )
    return web.json_response({"secret": value})


async def grant(request: web.Request) -> web.Response:
    """``{"tenant", "client_id", "resource", "roles"?}``: consent plus app roles."""
    data = await _body(request)
    request.app[STATE].grant(
        _str(data, "tenant"),
        _str(data, "client_id"),
        _str(data, "resource"),
        _str_list(data, "roles"),
    )
    return web.json_response(_OK)


async def revoke(request: web.Request) -> web.Response:
    """``{"tenant", "client_id"}``: delete the app's service principal in the tenant."""
    data = await _body(request)
    request.app[STATE].revoke(_str(data, "tenant"), _str(data, "client_id"))
    return web.json_response(_OK)


async def set_unprovisioned(request: web.Request) -> web.Response:
    """``{"tenant", "resource"}``: token requests for it answer AADSTS500011."""
    data = await _body(request)
    request.app[STATE].set_unprovisioned(_str(data, "tenant"), _str(data, "resource"))
    return web.json_response(_OK)


async def set_secret(request: web.Request) -> web.Response:
    """``{"value", "content_type"?, "enabled"?, "tags"?}`` → ``{"version"}``."""
    data = await _body(request)
    value = data.get("value")
    if not isinstance(value, str):
        raise StateError("'value' must be a string")
    enabled = data.get("enabled", True)
    if not isinstance(enabled, bool):
        raise StateError("'enabled' must be a boolean")
    tags = data.get("tags")
    if tags is not None and not (isinstance(tags, dict) and all(isinstance(v, str) for v in tags.values())):
        raise StateError("'tags' must map strings to strings")
    version = request.app[STATE].set_secret(
        request.match_info["name"],
        value,
        content_type=_opt_str(data, "content_type"),
        enabled=enabled,
        tags=tags,
    )
    return web.json_response({"version": version})


async def set_secret_enabled(request: web.Request) -> web.Response:
    """``{"enabled"}`` for one version."""
    data = await _body(request)
    enabled = data.get("enabled")
    if not isinstance(enabled, bool):
        raise StateError("'enabled' must be a boolean")
    request.app[STATE].set_secret_enabled(request.match_info["name"], request.match_info["version"], enabled)
    return web.json_response(_OK)


async def set_vault_access(request: web.Request) -> web.Response:
    """``{"client_ids": [...] | null}``: explicit access list, or null for the default rule."""
    data = await _body(request)
    ids = data.get("client_ids")
    request.app[STATE].set_vault_access(None if ids is None else _str_list(data, "client_ids"))
    return web.json_response(_OK)


async def add_fault(request: web.Request) -> web.Response:
    """``{"endpoint", "kind", "tenant"?, "count"?, "retry_after"?, "latency_seconds"?}``."""
    data = await _body(request)
    count, retry_after, latency = data.get("count", 1), data.get("retry_after"), data.get("latency_seconds")
    if not isinstance(count, int) or not (retry_after is None or isinstance(retry_after, int)):
        raise StateError("'count' and 'retry_after' must be integers")
    if latency is not None and not isinstance(latency, int | float):
        raise StateError("'latency_seconds' must be a number")
    fault = request.app[STATE].add_fault(
        _str(data, "endpoint"),
        _str(data, "kind"),
        tenant=_opt_str(data, "tenant"),
        count=count,
        retry_after=retry_after,
        latency_seconds=latency,
    )
    return web.json_response(fault.describe())


async def list_faults(request: web.Request) -> web.Response:
    """The pending faults."""
    return web.json_response([f.describe() for f in request.app[STATE].faults])


async def clear_faults(request: web.Request) -> web.Response:
    """Drop every pending fault."""
    request.app[STATE].clear_faults()
    return web.json_response(_OK)


async def set_token_lifetime(request: web.Request) -> web.Response:
    """``{"seconds", "jitter_seconds"?}``: lifetime of tokens issued from now on."""
    data = await _body(request)
    seconds, jitter = data.get("seconds"), data.get("jitter_seconds", 0)
    if not isinstance(seconds, int) or not isinstance(jitter, int):
        raise StateError("'seconds' and 'jitter_seconds' must be integers")
    request.app[STATE].set_token_lifetime(seconds, jitter)
    return web.json_response(_OK)


async def counters(request: web.Request) -> web.Response:
    """Requests per endpoint class, ``issued_tokens`` and ``faults_fired``."""
    state = request.app[STATE]
    result = {key: 0 for key in ("discovery", "token", "jwks", "vault", "issued_tokens")}
    result["faults_fired"] = 0
    result.update(state.counters)
    return web.json_response(result)


async def reset_counters(request: web.Request) -> web.Response:
    """Forget counters and the request log."""
    request.app[STATE].reset_counters()
    return web.json_response(_OK)


async def requests_log(request: web.Request) -> web.Response:
    """The request log, filtered by ``endpoint``, ``tenant``, ``client_id``, ``resource``."""
    query = request.query
    records = request.app[STATE].query_log(
        endpoint=query.get("endpoint"),
        tenant=query.get("tenant"),
        client_id=query.get("client_id"),
        resource=query.get("resource"),
    )
    return web.json_response([r.as_json() for r in records])


async def signing_key(request: web.Request) -> web.Response:
    """The token-signing key: ``{"kid", "public_key_pem", "jwks"}``."""
    key = request.app[SIGNING_KEY]
    return web.json_response({"kid": key.kid, "public_key_pem": key.public_key_pem, "jwks": key.jwks()})


async def health(request: web.Request) -> web.Response:
    """Liveness probe for the process that started us."""
    return web.json_response(_OK)


def add_routes(router: web.UrlDispatcher) -> None:
    """Register the control API."""
    p = PREFIX
    router.add_get(f"{p}/health", health)
    router.add_post(f"{p}/reset", reset)
    router.add_post(f"{p}/demo", seed_demo_route)
    router.add_post(f"{p}/tenants", add_tenant)
    router.add_post(f"{p}/apps", add_app)
    router.add_post(f"{p}/apps/{{client_id}}/secrets", add_app_secret)
    router.add_post(f"{p}/apps/{{client_id}}/certificates", add_app_certificate)
    router.add_post(f"{p}/apps/{{client_id}}/rotate-secret", rotate_app_secret)
    router.add_post(f"{p}/grants", grant)
    router.add_post(f"{p}/revocations", revoke)
    router.add_post(f"{p}/unprovisioned", set_unprovisioned)
    router.add_put(f"{p}/vault/secrets/{{name}}", set_secret)
    router.add_patch(f"{p}/vault/secrets/{{name}}/{{version}}", set_secret_enabled)
    router.add_put(f"{p}/vault/access", set_vault_access)
    router.add_get(f"{p}/faults", list_faults)
    router.add_post(f"{p}/faults", add_fault)
    router.add_delete(f"{p}/faults", clear_faults)
    router.add_put(f"{p}/token-lifetime", set_token_lifetime)
    router.add_get(f"{p}/counters", counters)
    router.add_delete(f"{p}/counters", reset_counters)
    router.add_get(f"{p}/requests", requests_log)
    router.add_get(f"{p}/signing-key", signing_key)
