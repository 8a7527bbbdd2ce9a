"""The onboarding surface: ``POST /v1/tenants/{tenant}/invite`` (JSON, admin callers) and the HTML pages a
customer's administrator sees, ``GET /consent/start`` and ``GET /consent/callback``.

The pages are server-rendered from ``templates/`` (one per outcome, in one layout), need no script and
load nothing: their only style is inline and allowed by its hash in a Content-Security-Policy that
forbids everything else, and they may not be framed (clickjacking a consent flow), cached, or leak
their URL (which carries the invite or the state) through ``Referer``. Every value put into a page
is HTML-escaped; the only values a browser sent that are ever shown are a validated OAuth error code
and an AADSTS number. Pages never show a token, the signing key or a caller key.

The JSON error middleware (``http.py``) must never render these pages' failures: the page handlers
catch everything themselves and answer with an HTML page, whatever happened.
"""

from __future__ import annotations

import base64
import hashlib
import html
import importlib.resources
import json
import logging
import string
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, Final

import orjson
from aiohttp import web

from broker.errors import InvalidRequestError
from broker.http import CALLERS, SETTINGS, read_body
from broker.logs import request_id_var
from broker.onboarding import ConsentRecorder, Onboarding, Outcome, Page

log = logging.getLogger(__name__)


_PAGES: Final = (
    "connected",
    "missing_roles",
    "declined",
    "invalid",
    "expired",
    "used",
    "propagating",
    "failed",
)
_INVITE_FIELDS: Final = frozenset({"app", "resource"})

# Heading, tone (CSS class) and icon of each page.
_LOOK: Final[dict[Page, tuple[str, str, str]]] = {
    Page.CONNECTED: ("Your organization is connected", "ok", "check"),
    Page.MISSING_ROLES: ("Connected, but some permissions are missing", "warn", "warning"),
    Page.DECLINED: ("Consent was not granted", "warn", "cross"),
    Page.INVALID: ("This link is not valid", "error", "cross"),
    Page.EXPIRED: ("This link has expired", "info", "clock"),
    Page.USED: ("This link was already used", "info", "info"),
    Page.PROPAGATING: ("Almost there: Microsoft is still setting up the connection", "info", "clock"),
    Page.FAILED: ("The connection could not be verified", "error", "warning"),
}
_ICON_PATHS: Final = {
    "check": '<circle cx="12" cy="12" r="10"/><path d="M7 12.5l3.2 3.2L17 9"/>',
    "warning": '<path d="M12 3l10 18H2z"/><path d="M12 10v5M12 18v.5"/>',
    "cross": '<circle cx="12" cy="12" r="10"/><path d="M8.5 8.5l7 7M15.5 8.5l-7 7"/>',
    "clock": '<circle cx="12" cy="12" r="10"/><path d="M12 6.5V12l3.5 2.5"/>',
    "info": '<circle cx="12" cy="12" r="10"/><path d="M12 11v6M12 7.5v.5"/>',
}
# Why a proof failed, in words for the customer's administrator (by the broker's error or AADSTS).
_FAILURE_TEXT: Final = {
    "AADSTS7000112": "the app is disabled in your organization: enable it under Enterprise applications",
    "unknown_tenant": "Microsoft Entra ID does not know this organization",
    "temporarily_unavailable": "Microsoft Entra ID is busy or unreachable",
    "rate_limited": "too many verifications were requested at once",
    "upstream_error": "the partner's app configuration needs attention",
}

_RESTART_LABEL: Final = {
    Page.PROPAGATING: "Open the invitation again",
    Page.USED: "Open the invitation again",
    Page.MISSING_ROLES: "Give consent again",
}

_SECURITY_HEADERS: Final = {
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
    "Pragma": "no-cache",
    "X-Content-Type-Options": "nosniff",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
}


@dataclass(frozen=True, slots=True)
class Templates:
    """The layout, one template per page, the stylesheet and the CSP that allows exactly it."""

    layout: string.Template
    pages: dict[str, string.Template]
    style: str
    csp: str

    @classmethod
    def load(cls) -> Templates:
        files = importlib.resources.files("broker").joinpath("templates")

        def read(name: str) -> str:
            return files.joinpath(name).read_text(encoding="utf-8")

        style = read("onboarding.css")
        digest = base64.b64encode(hashlib.sha256(style.encode()).digest()).decode()
        csp = (
            f"default-src 'none'; style-src 'sha256-{digest}'; img-src 'none'; base-uri 'none'; "
            "form-action 'none'; frame-ancestors 'none'"
        )
        pages = {name: string.Template(read(f"{name}.html")) for name in _PAGES}
        return cls(string.Template(read("layout.html")), pages, style, csp)

    def headers(self) -> dict[str, str]:
        return {**_SECURITY_HEADERS, "Content-Security-Policy": self.csp}


ONBOARDING: Final = web.AppKey("onboarding", Onboarding)
CONSENT_RECORDER: Final = web.AppKey("consent_recorder", ConsentRecorder)
TEMPLATES: Final = web.AppKey("consent_templates", Templates)


def add_onboarding_routes(app: web.Application, recorder: ConsentRecorder) -> None:
    """The invite endpoint and the consent pages; ``app.py`` puts an ``Onboarding`` under
    ``ONBOARDING`` in its cleanup context."""
    app[CONSENT_RECORDER] = recorder
    app[TEMPLATES] = Templates.load()
    app.router.add_post("/v1/tenants/{tenant}/invite", invite_handler)
    app.router.add_get("/consent/start", _page(start_handler))
    app.router.add_get("/consent/callback", _page(callback_handler))


# --- the invite (JSON) ------------------------------------------------------------------------------


async def invite_handler(request: web.Request) -> web.Response:
    """``POST /v1/tenants/{tenant}/invite`` with an optional ``{"app", "resource"}`` body."""
    app = request.app
    settings = app[SETTINGS]
    caller = await app[CALLERS].authenticate(request.headers.get("Authorization"))
    body: Any = {}
    if request.body_exists:
        raw = await read_body(
            request, settings.max_body_bytes, "application/json", settings.body_timeout_seconds
        )
        try:
            body = json.loads(raw) if raw.strip() else {}
        except (ValueError, RecursionError):
            raise InvalidRequestError("the body is not valid JSON") from None
    if not isinstance(body, dict) or not _INVITE_FIELDS.issuperset(body):
        raise InvalidRequestError("the body may hold only 'app' and 'resource'")
    if not all(isinstance(value, str) and 0 < len(value) <= 512 for value in body.values()):
        raise InvalidRequestError("'app' and 'resource' must be strings")
    link = await app[ONBOARDING].invite(
        caller, request.match_info["tenant"], body.get("app"), body.get("resource")
    )
    return web.Response(
        status=201,
        body=orjson.dumps(link.as_json()),
        content_type="application/json",
        headers={"Cache-Control": "no-store", "Pragma": "no-cache"},
    )


# --- the pages (HTML) -------------------------------------------------------------------------------

PageHandler = Callable[[web.Request], Awaitable[web.Response]]


def _page(handler: PageHandler) -> PageHandler:
    """A page handler whose every failure is still an HTML page (never the API's JSON error)."""

    async def page(request: web.Request) -> web.Response:
        try:
            return await handler(request)
        except Exception:  # a page answers whatever happened; the traceback is in the log
            log.exception("consent page failed")
            return render(request.app[TEMPLATES], Outcome(Page.FAILED, "internal error"))

    return page


async def start_handler(request: web.Request) -> web.Response:
    """``GET /consent/start?invite=…``: 302 to Entra's admin-consent page, or an error page."""
    templates = request.app[TEMPLATES]
    result = await request.app[ONBOARDING].start(request.query.get("invite", ""))
    if isinstance(result, Outcome):
        return render(templates, result)
    return web.Response(status=302, headers={**templates.headers(), "Location": result})


async def callback_handler(request: web.Request) -> web.Response:
    """``GET /consent/callback``: Entra's redirect after the administrator's choice."""
    query = {key: request.query.getone(key) for key in request.query}  # the first of repeated keys
    return render(request.app[TEMPLATES], await request.app[ONBOARDING].callback(query))


def render(templates: Templates, outcome: Outcome) -> web.Response:
    """The outcome's page: its template inside the layout, every value escaped."""
    title, tone, icon = _LOOK[outcome.page]
    fields = {
        "details": _details(outcome),
        "restart": _restart(outcome),
        "error_text": _error_text(outcome),
        "reason_text": html.escape(_invalid_text(outcome.reason)) if outcome.page is Page.INVALID else "",
        **_expiry_texts(outcome),
    }
    body = templates.pages[outcome.page.template].substitute(fields)
    header = "Admin consent" if outcome.app is None else f"Admin consent for {html.escape(outcome.app)}"
    document = templates.layout.substitute(
        title=html.escape(title),
        style=templates.style,
        header=header,
        tone=tone,
        icon=_icon(icon),
        body=body,
        request_id=html.escape(request_id_var.get() or "-"),
        time_utc=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    )
    return web.Response(
        status=outcome.page.status,
        text=document,
        content_type="text/html",
        charset="utf-8",
        headers=templates.headers(),
    )


def _icon(name: str) -> str:
    return (
        '<svg viewBox="0 0 24 24" fill="none" stroke="currentColor" stroke-width="2" stroke-linecap="round" '
        f'stroke-linejoin="round" aria-hidden="true" focusable="false">{_ICON_PATHS[name]}</svg>'
    )


def _items(values: Iterable[str], css: str = "") -> str:
    listed = "".join(f"<li{css}>{html.escape(value)}</li>" for value in values)
    return f"<ul>{listed}</ul>" if listed else '<span class="muted">none</span>'


def _details(outcome: Outcome) -> str:
    if outcome.tenant is None:
        return ""
    rows = [("Organization (tenant ID)", f"<code>{html.escape(outcome.tenant)}</code>")]
    if outcome.app is not None:
        client = outcome.client_id
        shown = (
            f' <span class="muted">(client ID <code>{html.escape(client)}</code>)</span>' if client else ""
        )
        rows.append(("App", html.escape(outcome.app) + shown))
    if outcome.resource is not None:
        rows.append(("API", html.escape(outcome.resource)))
    if outcome.page in (Page.CONNECTED, Page.MISSING_ROLES):
        rows.append(("Permissions granted", _items(outcome.roles_granted)))
    if outcome.missing_roles:
        rows.append(("Still missing", _items(outcome.missing_roles, ' class="missing"')))
    return "<dl>" + "".join(f"<dt>{name}</dt><dd>{value}</dd>" for name, value in rows) + "</dl>"


def _restart(outcome: Outcome) -> str:
    if outcome.restart_url is None:
        return ""
    label = _RESTART_LABEL.get(outcome.page, "Start again")
    return f'<p><a class="button" href="{html.escape(outcome.restart_url)}">{label}</a></p>'


def _error_text(outcome: Outcome) -> str:
    if outcome.page is Page.DECLINED:
        codes = [code for code in (outcome.error_code, outcome.aadsts) if code]
        return f" ({html.escape(', '.join(codes))})" if codes else ""
    if outcome.page is Page.FAILED:
        text = _FAILURE_TEXT.get(outcome.aadsts or "") or _FAILURE_TEXT.get(outcome.error_code or "")
        return f": {html.escape(text)}" if text else ""
    return ""


def _invalid_text(reason: str) -> str:
    """The log's precise reason, in the administrator's words."""
    if reason.startswith("invite:"):
        return "The invitation link is incomplete or was altered"
    if reason.startswith("state:"):
        return "The response from Microsoft is incomplete or was altered"
    return reason[:1].upper() + reason[1:]


def _expiry_texts(outcome: Outcome) -> dict[str, str]:
    if outcome.restart_url is not None:
        return {
            "explanation": "The sign-in step took longer than 15 minutes, so this consent response is no "
            "longer accepted.",
            "advice": "Start again from the invitation; it is still valid.",
        }
    return {
        "explanation": "This invitation is no longer valid.",
        "advice": "Ask your partner contact for a new invitation.",
    }
