"""The aiohttp application of the emulator: routes, request log and fault injection.

One server, one port, four faces: Entra ID (``entra``; its admin-consent page in ``consent``), Key
Vault (``vault``, the vault URL is the server's base URL), the managed-identity endpoint
(``identity``) and the test control API under ``/_emulator/`` (``control``). Route names
carry the endpoint class (``"token:v2"`` → ``token``), which a middleware uses to log every
emulated-service request and to fire injected faults before the real handler runs.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from aiohttp import web

from . import consent, control, entra, identity, vault
from .context import REQUEST_INFO, STATE, RequestInfo
from .entra import client_credentials, requested_resource
from .state import ENDPOINTS, EmulatorState, Fault, RequestRecord
from .world import VAULT_TENANT_ID

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


async def _describe(request: web.Request, state: EmulatorState) -> RequestInfo | None:
    """Classify a request by its route name; None for control-API and unmatched requests."""
    name = request.match_info.route.name or ""
    endpoint, _, variant = name.partition(":")
    if endpoint not in ENDPOINTS:
        return None
    raw_tenant = request.match_info.get("tenant")
    tenant_id: str | None
    if endpoint in ("vault", "sign", "identity"):
        raw_tenant, tenant_id = None, VAULT_TENANT_ID
    elif raw_tenant is None:
        tenant_id = None
    else:
        tenant = state.resolve_tenant(raw_tenant)
        tenant_id = tenant.tenant_id if tenant else raw_tenant
    info = RequestInfo(endpoint, raw_tenant, tenant_id)
    if endpoint == "token":
        # Parsed here (aiohttp caches the form) so even a faulted request is logged with its
        # client and resource, which is what upstream-efficiency assertions count.
        form = {k: v for k, v in (await request.post()).items() if isinstance(v, str)}
        client_id, _ = client_credentials(form, request.headers.get("Authorization"))
        info.client_id = client_id.strip().lower() or None
        info.resource = requested_resource(form, variant)
    return info


@web.middleware
async def emulated_service_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Log every Entra/Key Vault request and apply the first matching injected fault."""
    state = request.app[STATE]
    info = await _describe(request, state)
    if info is None:
        return await handler(request)
    request[REQUEST_INFO] = info
    status = 500
    try:
        fault = state.take_fault(info.endpoint, info.tenant_id, info.raw_tenant)
        if fault is not None and fault.kind == "drop":
            status = 0
            _drop_connection(request)
            # Nothing can be sent on an aborted transport; aiohttp discards this response.
            return web.Response(status=500)
        if fault is not None and fault.kind == "latency":
            await asyncio.sleep(fault.latency_seconds or 0)
        elif fault is not None:
            injected = _fault_response(request, info, fault)
            status = injected.status
            return injected
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            status = exc.status
            raise
        status = response.status
        return response
    finally:
        state.record(
            RequestRecord(
                info.endpoint,
                info.tenant_id,
                info.client_id,
                info.resource,
                status,
                time.time(),
                info.credential if 200 <= status < 300 else None,
            )
        )


def _drop_connection(request: web.Request) -> None:
    transport = request.transport
    if transport is not None:
        # abort(), not close(): no TLS close_notify and no pending data flushed, so the client
        # sees the connection die mid-request, like a load balancer reset.
        transport.abort()


def _fault_response(request: web.Request, info: RequestInfo, fault: Fault) -> web.Response:
    headers: dict[str, str] = {}
    retry_after = fault.retry_after
    if retry_after is None and fault.kind in ("429", "429_text"):
        retry_after = 1  # a 429 without Retry-After is not what Entra or Key Vault send
    if retry_after is not None:
        headers["Retry-After"] = str(retry_after)
    if fault.kind == "429_text":
        return web.Response(status=429, text="Too Many Requests", headers=headers)
    status = int(fault.kind)
    if info.endpoint in ("vault", "sign"):
        return vault.fault_response(status, headers)
    if info.endpoint == "identity":
        return identity.fault_response(status, headers)
    return entra.fault_response(request, status, headers)


def build_app(state: EmulatorState | None = None) -> web.Application:
    """Create the emulator's aiohttp application (a fresh state is created when omitted)."""
    app = web.Application(middlewares=[control.loopback_only_middleware, emulated_service_middleware])
    app[STATE] = state or EmulatorState()
    entra.add_routes(app.router)
    consent.add_routes(app.router)
    vault.add_routes(app.router)
    identity.add_routes(app.router)
    control.add_routes(app.router)
    return app
