"""Entra ID's v2 admin-consent page: ``/{tenant}/v2.0/adminconsent``, with Accept and Cancel.

``GET`` shows what the app requests (the registration's app roles per resource) for the tenant named
in the path, the way Entra's "Permissions requested" page does, as a form with two buttons; ``POST``
is the administrator's choice. Accept creates the service principal with those roles (visible to the
token endpoint only after ``set_consent_delay`` seconds, as propagation takes a while) and redirects
to ``redirect_uri`` with ``admin_consent=True&tenant=<GUID>&scope=…&state=…``; Cancel redirects with
``admin_consent=True&error=access_denied&error_description=AADSTS65004: …&state=…`` (Entra sends
``admin_consent=True`` on failure too). As in Entra, ``redirect_uri`` must be registered on the app
(exactly), else an error page and no redirect; so must the client and the tenant exist. No user
signs in here: whoever opens the page acts as the tenant's Global Administrator.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from typing import Final

from aiohttp import web
from yarl import URL

from .context import STATE
from .state import App, EmulatorState, Tenant

_PAGE_STYLE: Final = """
body { margin: 0; background: #f2f2f2; color: #1b1b1b; font: 15px/1.5 "Segoe UI", "DejaVu Sans", sans-serif; }
main { max-width: 440px; margin: 48px auto; background: #fff; padding: 36px 44px;
       box-shadow: 0 2px 6px #0003; }
.brand { font-weight: 600; color: #5e5e5e; margin-bottom: 20px; }
h1 { font-size: 24px; margin: 0 0 16px; font-weight: 600; }
.app { font-weight: 600; }
ul { padding-left: 20px; }
.fine { font-size: 13px; color: #5e5e5e; }
.buttons { display: flex; justify-content: flex-end; gap: 8px; margin-top: 24px; }
button { min-width: 108px; padding: 7px 12px; font: inherit; border: 1px solid #8a8886; background: #fff; }
button.primary { background: #0067b8; border-color: #0067b8; color: #fff; }
button:focus { outline: 2px solid #1b1b1b; outline-offset: 2px; }
"""
_DECLINED: Final = "AADSTS65004: User declined to consent to access the app."


@dataclass(frozen=True)
class _Request:
    """A consent request that passed Entra's checks (tenant, client, redirect URI, scope)."""

    tenant: Tenant
    app: App
    scope: str
    redirect_uri: str
    state: str | None


def _page(title: str, body: str, status: int = 200) -> web.Response:
    document = (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{html.escape(title)}</title><style>{_PAGE_STYLE}</style></head><body><main>"
        '<div class="brand">Microsoft Entra ID (emulator)</div>'
        f"{body}</main></body></html>"
    )
    return web.Response(text=document, status=status, content_type="text/html", charset="utf-8")


def _error_page(code: int, message: str) -> web.Response:
    heading = "<h1>Sorry, but we're having trouble signing you in.</h1>"
    return _page("Sign in", f"{heading}<p>AADSTS{code}: {html.escape(message)}</p>", status=400)


def _check(state: EmulatorState, raw_tenant: str, params: dict[str, str]) -> _Request | web.Response:
    """The checks Entra makes before it shows the page (or acts on a choice), in its order."""
    tenant = state.resolve_tenant(raw_tenant)
    if tenant is None:
        return _error_page(90002, f"Tenant '{raw_tenant}' not found.")
    client_id = params.get("client_id", "").strip().lower()
    app = state.apps.get(client_id)
    if app is None:
        return _error_page(
            700016, f"Application with identifier '{client_id}' was not found in the directory."
        )
    redirect_uri = params.get("redirect_uri", "")
    if not app.redirect_uris:
        return _error_page(500113, "No reply address is registered for the application.")
    if redirect_uri not in app.redirect_uris:
        return _error_page(
            50011,
            f"The redirect URI '{redirect_uri}' specified in the request does not match the redirect "
            f"URIs configured for the application '{app.client_id}'.",
        )
    scope = params.get("scope", "").strip()
    if not scope.endswith("/.default") or " " in scope:
        return _error_page(70011, f"The provided value for the input parameter 'scope' is not valid: {scope}")
    return _Request(tenant, app, scope, redirect_uri, params.get("state"))


async def consent_page(request: web.Request) -> web.Response:
    """``GET``: the "Permissions requested" page."""
    checked = _check(request.app[STATE], request.match_info["tenant"], dict(request.query))
    if isinstance(checked, web.Response):
        return checked
    permissions = "".join(
        f"<li>{html.escape(role)} <span class='fine'>({html.escape(resource)})</span></li>"
        for resource, roles in checked.app.permissions.items()
        for role in roles
    )
    hidden = "".join(
        f'<input type="hidden" name="{name}" value="{html.escape(value)}">'
        for name, value in (
            ("client_id", checked.app.client_id),
            ("scope", checked.scope),
            ("redirect_uri", checked.redirect_uri),
            ("state", checked.state),
        )
        if value is not None
    )
    body = (
        "<h1>Permissions requested</h1>"
        f'<p><span class="app">App {html.escape(checked.app.client_id)}</span> would like to, for everyone '
        f"in <strong>{html.escape(checked.tenant.display_name)}</strong>:</p>"
        f"<ul>{permissions or '<li>Sign in and read your profile</li>'}</ul>"
        '<p class="fine">Accepting grants these permissions to the app for your whole organization. '
        f"It will be redirected to {html.escape(checked.redirect_uri)}.</p>"
        f'<form method="post">{hidden}<div class="buttons">'
        '<button type="submit" name="action" value="cancel">Cancel</button>'
        '<button type="submit" name="action" value="accept" class="primary">Accept</button>'
        "</div></form>"
    )
    return _page("Permissions requested", body)


async def consent_choice(request: web.Request) -> web.Response:
    """``POST``: Accept grants and redirects with ``tenant``; Cancel redirects with ``error``."""
    state = request.app[STATE]
    form = {k: v for k, v in (await request.post()).items() if isinstance(v, str)}
    checked = _check(state, request.match_info["tenant"], form)
    if isinstance(checked, web.Response):
        return checked
    params: dict[str, str] = {"admin_consent": "True"}
    if form.get("action") == "accept":
        state.admin_consent(checked.tenant.tenant_id, checked.app)
        params.update(tenant=checked.tenant.tenant_id, scope=checked.scope)
    else:
        params.update(error="access_denied", error_description=_DECLINED)
    if checked.state is not None:
        params["state"] = checked.state
    location = URL(checked.redirect_uri).update_query(params)
    raise web.HTTPFound(str(location))


def add_routes(router: web.UrlDispatcher) -> None:
    """Register the admin-consent page (not an endpoint class: never faulted, never counted)."""
    router.add_get("/{tenant}/v2.0/adminconsent", consent_page, name="adminconsent:page")
    router.add_post("/{tenant}/v2.0/adminconsent", consent_choice, name="adminconsent:choice")
