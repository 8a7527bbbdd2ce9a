"""The tenant admin API: ``/v1/tenants`` (list, show, check, remove), for callers with ``admin: true``.

Same bearer authentication as ``POST /v1/token``; a caller that is not an admin is refused 403 before
anything else is looked at. Every admin request writes one ``broker.audit`` line (``message``
"tenant admin request": caller, action, tenant as GUID and as asked, outcome, latency). Handlers parse
and render; ``tenants.Tenants`` does the work; errors are ``BrokerError``s, rendered as the contract's
JSON body by ``http.error_middleware``. ``http.create_api`` registers these routes with one call
(``add_routes``); the composition root fills ``ADMIN``.
"""

from __future__ import annotations

import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from broker.callers import Caller, CallerRegistry
from broker.config import is_tenant
from broker.errors import AccessDeniedError, BrokerError, InvalidRequestError
from broker.logs import AuditLog
from broker.tenants import PAGE_MAX, STATES, Tenants

DEFAULT_PAGE = 100
_CURSOR_RE = re.compile(r"[0-9a-f-]{1,64}")
_NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}


@dataclass(frozen=True)
class TenantAdmin:
    """What the admin handlers need: who may use them, and the tenant operations."""

    callers: CallerRegistry
    admins: frozenset[str]  # names of the callers with admin: true
    apps: frozenset[str]
    tenants: Tenants
    audit: AuditLog


ADMIN = web.AppKey("tenant_admin", TenantAdmin)

Work = Callable[[Caller], Awaitable[tuple[dict[str, Any], str | None]]]


async def _serve(request: web.Request, action: str, work: Work) -> web.Response:
    """Authenticate an admin, run ``work`` (its JSON body and the tenant GUID it concerned), audit."""
    admin = request.app[ADMIN]
    started = time.perf_counter()
    asked = request.match_info.get("tenant")
    caller_name, outcome, tenant = "-", "server_error", None
    try:
        caller = await admin.callers.authenticate(request.headers.get("Authorization"))
        caller_name = caller.name
        if caller.name not in admin.admins:
            raise AccessDeniedError(f"caller {caller.name!r} may not use the tenant admin API")
        body, tenant = await work(caller)
        outcome = "ok"
    except BrokerError as exc:
        outcome = exc.error
        raise
    finally:
        if tenant is None and asked is not None and is_tenant(asked):
            tenant = admin.tenants.known(asked)
        admin.audit.write(
            {
                "message": "tenant admin request",
                "caller": caller_name,
                "action": action,
                "tenant": tenant,
                "tenant_requested": asked,
                "outcome": outcome,
                "latency_ms": round((time.perf_counter() - started) * 1000, 3),
            }
        )
    return web.Response(body=orjson.dumps(body), content_type="application/json", headers=_NO_STORE)


def _tenant(request: web.Request) -> str:
    asked = request.match_info["tenant"]
    if not is_tenant(asked):
        raise InvalidRequestError("the tenant must be a GUID or a domain such as contoso.onmicrosoft.com")
    return asked


def _app(request: web.Request) -> str | None:
    app = request.query.get("app")
    if app is not None and app not in request.app[ADMIN].apps:
        raise InvalidRequestError(f"unknown app {app!r}", apps=sorted(request.app[ADMIN].apps))
    return app


async def list_tenants(request: web.Request) -> web.Response:
    """``GET /v1/tenants?state=&app=&limit=&cursor=``: registered tenants in GUID order, a page at a time."""

    async def work(_caller: Caller) -> tuple[dict[str, Any], str | None]:
        unknown = sorted(set(request.query) - {"state", "app", "limit", "cursor"})
        if unknown:
            raise InvalidRequestError(f"unknown query parameter(s): {', '.join(unknown)}")
        state = request.query.get("state")
        if state is not None and state not in STATES:
            raise InvalidRequestError(f"'state' must be one of {', '.join(STATES)}")
        app = _app(request)
        limit = request.query.get("limit", str(DEFAULT_PAGE))
        if not limit.isdigit() or not 1 <= int(limit) <= PAGE_MAX:
            raise InvalidRequestError(f"'limit' must be an integer from 1 to {PAGE_MAX}")
        cursor = request.query.get("cursor", "")
        if cursor and not _CURSOR_RE.fullmatch(cursor):
            raise InvalidRequestError("'cursor' must be the next_cursor of a previous page")
        tenants = request.app[ADMIN].tenants
        found, next_cursor = await tenants.page(cursor=cursor, limit=int(limit), state=state, app=app)
        return {"tenants": found, "next_cursor": next_cursor}, None

    return await _serve(request, "list", work)


async def show_tenant(request: web.Request) -> web.Response:
    """``GET /v1/tenants/{tenant}`` (GUID or domain): the registry entry."""

    async def work(_caller: Caller) -> tuple[dict[str, Any], str | None]:
        entry = await request.app[ADMIN].tenants.show(_tenant(request))
        return entry, entry["tenant"]

    return await _serve(request, "show", work)


async def check_tenant(request: web.Request) -> web.Response:
    """``POST /v1/tenants/{tenant}/check[?app=]``: forget remembered failures and ask Entra now."""

    async def work(caller: Caller) -> tuple[dict[str, Any], str | None]:
        result = await request.app[ADMIN].tenants.check(caller, _tenant(request), _app(request))
        return result, result["tenant"]

    return await _serve(request, "check", work)


async def remove_tenant(request: web.Request) -> web.Response:
    """``DELETE /v1/tenants/{tenant}``: offboard, on every replica; says what was removed."""

    async def work(_caller: Caller) -> tuple[dict[str, Any], str | None]:
        result = await request.app[ADMIN].tenants.remove(_tenant(request))
        return result, result["tenant"]

    return await _serve(request, "remove", work)


def add_routes(app: web.Application) -> None:
    """The admin routes, on the API application."""
    app.router.add_get("/v1/tenants", list_tenants)
    app.router.add_get("/v1/tenants/{tenant}", show_tenant)
    app.router.add_post("/v1/tenants/{tenant}/check", check_tenant)
    app.router.add_delete("/v1/tenants/{tenant}", remove_tenant)
