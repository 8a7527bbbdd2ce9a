"""Entra-compatible surfaces, so code written for Entra ID moves to the broker by changing the host and
putting the caller's key where the app secret was:

    POST /{tenant}/oauth2/v2.0/token   client credentials, scope={resource}/.default (MSAL, curl, ...)
    POST /{tenant}/oauth2/token        v1: resource=..., numbers as strings (PowerShell, urllib)
    GET  /{tenant}/v2.0/.well-known/openid-configuration   (and the v1 one): what MSAL reads first
    GET  /msi/{tenant}/token?resource=...&api-version=2019-08-01   X-IDENTITY-HEADER: <caller key>
                                       (App Service managed identity: IDENTITY_ENDPOINT, IDENTITY_HEADER)

Each token surface is a translation onto ``TokenRequest`` and ``http.issue_token``: the same caller
authentication (``CallerRegistry``), policy, cache, single-flight, metrics and audit line as
``POST /v1/token`` (the audit line names the surface: ``oauth2_v2``, ``oauth2_v1``, ``msi``). No token,
policy or cache logic lives here, only protocol shapes.

The caller proves who it is with its API key (``client_secret``, HTTP Basic per RFC 6749 §2.3.1, or
``X-IDENTITY-HEADER``) or its service-account JWT (``client_assertion`` with the jwt-bearer type);
``client_id`` names the app (its client id, or its name in the configuration). The app's own credential
never leaves the broker, and nothing a caller sends is echoed into an error.

Errors have Entra's body (``error``, ``error_description``, ``error_codes``, ``timestamp``, ``trace_id``,
``correlation_id``). When Entra refused (no consent, unknown tenant, ...) the answer carries Entra's
``error`` code, status and AADSTS number (the description starts ``AADSTSnnnn: `` as Entra's does),
plus ``consent_url`` when consent is missing. The broker's own refusals carry OAuth codes
(``invalid_request``, ``invalid_client`` 401, ``unauthorized_client``, ``invalid_scope``,
``unsupported_grant_type``) and no AADSTS number: Entra never said them. 429 and 503 carry
``Retry-After``. ``trace_id`` is the broker's request id (the audit line's), ``correlation_id`` the
client's ``client-request-id`` when it sent one (MSAL does), as Entra echoes it.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, Final
from urllib.parse import parse_qsl, unquote_plus

import orjson
from aiohttp import web

from broker.callers import Caller
from broker.config import Settings, is_tenant
from broker.errors import (
    AccessDeniedError,
    BrokerError,
    ConsentRequiredError,
    InvalidClientError,
    InvalidRequestError,
    RetryLaterError,
    TenantRefusedError,
    UnknownTenantError,
)
from broker.http import CALLERS, SETTINGS, issue_token, parse_token_request, read_body
from broker.logs import request_id_var
from broker.service import Issued
from broker.tokens import TokenRequest, decode_claims

SURFACE_V2: Final = "oauth2_v2"
SURFACE_V1: Final = "oauth2_v1"
SURFACE_MSI: Final = "msi"

JWT_BEARER: Final = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
MSI_API_VERSION: Final = "2019-08-01"
FORM: Final = "application/x-www-form-urlencoded"
_MAX_FORM_FIELDS: Final = 32
_KNOWN_FIELDS: Final = frozenset(
    {
        "grant_type",
        "client_id",
        "client_secret",
        "client_assertion",
        "client_assertion_type",
        "scope",
        "resource",
    }
)
_CORRELATION_ID_RE: Final = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_NO_STORE: Final = {"Cache-Control": "no-store, no-cache", "Pragma": "no-cache"}


# --- the broker's own refusals that only these protocols have --------------------------------------


class UnsupportedGrantTypeError(InvalidRequestError):
    error = "unsupported_grant_type"


class InvalidScopeError(InvalidRequestError):
    error = "invalid_scope"


class UnauthorizedClientError(BrokerError):
    """``client_id`` names no configured app, or the caller may not use that tenant or app."""

    status = 400
    error = "unauthorized_client"


# --- errors in Entra's shape ------------------------------------------------------------------------

# How Entra's token endpoints answer the AADSTS codes the broker passes on: (status, OAuth error).
ENTRA_ANSWERS: Final[dict[int, tuple[int, str]]] = {
    700016: (400, "unauthorized_client"),  # the app is not in the tenant: never consented
    7000229: (401, "invalid_client"),  # no service principal in the tenant
    65001: (400, "invalid_grant"),  # not consented
    90094: (400, "invalid_grant"),  # admin consent required
    90002: (400, "invalid_request"),  # tenant not found
    500011: (400, "invalid_resource"),  # resource not provisioned in the tenant
}
# The same for a code missing from the table, by the kind of refusal the broker recognised.
_ENTRA_DEFAULTS: Final[dict[type[BrokerError], tuple[int, str]]] = {
    ConsentRequiredError: (400, "invalid_grant"),
    UnknownTenantError: (400, "invalid_request"),
    TenantRefusedError: (400, "invalid_grant"),
}


def aadsts_number(exc: BrokerError) -> int | None:
    """The AADSTS number Entra answered with (``exc.aadsts``), if Entra answered at all."""
    match = re.fullmatch(r"AADSTS(\d{1,9})", exc.aadsts or "")
    return int(match.group(1)) if match else None


def entra_status_and_error(exc: BrokerError) -> tuple[int, str]:
    """The HTTP status and OAuth ``error`` Entra would have answered for this failure."""
    code = aadsts_number(exc)
    for kind, default in _ENTRA_DEFAULTS.items():
        if isinstance(exc, kind):
            return ENTRA_ANSWERS.get(code, default) if code is not None else default
    if exc.status in (429, 503):
        return exc.status, "temporarily_unavailable"
    if isinstance(exc, AccessDeniedError):
        # Policy: a resource the app may not use is a scope the client cannot have; a tenant or
        # app the caller may not use is a client not authorised for this request.
        if "allowed_resources" in exc.details:
            return 400, "invalid_scope"
        return 400, "unauthorized_client"
    if exc.status >= 500:
        return exc.status, "server_error"
    if exc.status == 403:  # insufficient_consent: the roles check, not reachable from these protocols
        return 403, "access_denied"
    return exc.status, exc.error


def entra_error_body(exc: BrokerError, request: web.Request, authority_host: str) -> dict[str, Any]:
    """Entra's error body for ``exc``: the description carries the AADSTS number first when Entra
    gave one, and Entra's trailer (trace id, correlation id, timestamp) last."""
    _, error = entra_status_and_error(exc)
    code = aadsts_number(exc)
    trace_id = request_id_var.get() or uuid.uuid4().hex
    sent = request.headers.get("client-request-id", "")
    correlation_id = sent if _CORRELATION_ID_RE.fullmatch(sent) else str(uuid.uuid4())
    timestamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")
    prefix = f"AADSTS{code}: " if code is not None else ""
    body: dict[str, Any] = {
        "error": error,
        "error_description": f"{prefix}{exc.description} Trace ID: {trace_id} "
        f"Correlation ID: {correlation_id} Timestamp: {timestamp}",
        "error_codes": [code] if code is not None else [],
        "timestamp": timestamp,
        "trace_id": trace_id,
        "correlation_id": correlation_id,
    }
    if code is not None:
        body["error_uri"] = f"{authority_host}/error?code={code}"
    if exc.consent_url is not None:
        body["consent_url"] = exc.consent_url
    return body


def entra_error_response(
    exc: BrokerError, request: web.Request, *, basic_auth: bool = False, msi: bool = False
) -> web.Response:
    status, _ = entra_status_and_error(exc)
    body = entra_error_body(exc, request, request.app[SETTINGS].authority_host)
    headers = {**_NO_STORE, "client-request-id": body["correlation_id"]}
    if isinstance(exc, RetryLaterError):
        headers["Retry-After"] = str(exc.retry_after)
    if status == 401 and basic_auth:
        # RFC 6749 §5.2: a client that authenticated with a header gets a challenge in its scheme.
        headers["WWW-Authenticate"] = 'Basic realm="token-broker"'
    if msi:
        # The App Service protocol's own fields: MSAL's managed-identity client reports these.
        body["statusCode"] = status
        body["message"] = body["error_description"]
    return web.Response(
        body=orjson.dumps(body), status=status, content_type="application/json", headers=headers
    )


def _json(body: dict[str, Any], headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        body=orjson.dumps(body), content_type="application/json", headers={**_NO_STORE, **(headers or {})}
    )


# --- the token endpoints -------------------------------------------------------------------------


def _app_named_by(settings: Settings, client_id: str) -> str:
    """The configured app a ``client_id`` names: by its client id (any case) or by its name."""
    wanted = client_id.strip()
    for name, app in settings.apps.items():
        if wanted.lower() == app.client_id or wanted == name:
            return name
    raise UnauthorizedClientError(
        "client_id names no app configured in the broker: give the app's client id (or its name)"
    )


def _tenant_of(request: web.Request) -> str:
    tenant = request.match_info["tenant"]
    if not is_tenant(tenant):
        raise InvalidRequestError("the tenant in the path must be a tenant GUID or a verified domain")
    return tenant


async def _read_form(request: web.Request) -> dict[str, str]:
    settings = request.app[SETTINGS]
    raw = await read_body(request, settings.max_body_bytes, FORM, settings.body_timeout_seconds)
    try:
        pairs = parse_qsl(
            raw.decode("utf-8"), keep_blank_values=True, strict_parsing=False, max_num_fields=_MAX_FORM_FIELDS
        )
    except (UnicodeDecodeError, ValueError):
        raise InvalidRequestError(f"the body is not a valid {FORM} form") from None
    form: dict[str, str] = {}
    for name, value in pairs:
        if name in form:
            # RFC 6749 §3.2: parameters must not repeat (and which one would count is ambiguous).
            shown = repr(name) if name in _KNOWN_FIELDS else "a parameter"
            raise InvalidRequestError(f"{shown} is given more than once")
        form[name] = value
    return form


class _TokenExchange:
    """One request to a token endpoint. Its form is read while authenticating (the credential is in
    it); the ``TokenRequest`` is built from the same form afterwards, so an unauthenticated caller
    learns nothing about the configured apps or resources."""

    def __init__(self, request: web.Request, *, v2: bool) -> None:
        self._request = request
        self._v2 = v2
        self._form: dict[str, str] = {}
        self._client_id = ""
        self.basic_auth = False

    async def authenticate(self) -> Caller:
        request = self._request
        form = self._form = await _read_form(request)
        grant_type = form.get("grant_type")
        if not grant_type:
            raise InvalidRequestError("the request body must contain 'grant_type'")
        if grant_type != "client_credentials":
            raise UnsupportedGrantTypeError(
                "only grant_type=client_credentials is supported: the broker hands out app-only tokens"
            )
        client_id, secret = self._basic_credentials(form)
        self._client_id = client_id or form.get("client_id", "")
        if not self._client_id:
            raise InvalidRequestError("the request body must contain 'client_id' (the app's client id)")
        assertion = form.get("client_assertion")
        if secret is None:
            secret = form.get("client_secret")
        if assertion is not None and secret is not None:
            raise InvalidRequestError("use one client authentication: client_secret or client_assertion")
        callers = self._request.app[CALLERS]
        if assertion is not None:
            if form.get("client_assertion_type") != JWT_BEARER:
                raise InvalidRequestError(f"client_assertion_type must be '{JWT_BEARER}'")
            return await callers.authenticate_assertion(assertion)
        if not secret:
            raise InvalidClientError(
                "the request must contain 'client_secret' (the caller's key) or 'client_assertion' "
                "(the caller's service-account token)"
            )
        return callers.authenticate_api_key(secret)

    def _basic_credentials(self, form: dict[str, str]) -> tuple[str | None, str | None]:
        """``(client_id, key)`` from ``Authorization: Basic`` (both halves form-urlencoded first,
        RFC 6749 §2.3.1), or ``(None, None)`` without the header."""
        authorization = self._request.headers.get("Authorization")
        if authorization is None:
            return None, None
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() != "basic":
            raise InvalidClientError("the Authorization header must be HTTP Basic: client id and caller key")
        self.basic_auth = True
        try:
            user, colon, password = base64.b64decode(value.strip(), validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            raise InvalidClientError("malformed HTTP Basic credentials") from None
        if not colon or not password:
            raise InvalidClientError("malformed HTTP Basic credentials")
        if "client_secret" in form or "client_assertion" in form:
            raise InvalidRequestError("use one client authentication: HTTP Basic or the form's credentials")
        client_id = unquote_plus(user)
        if form.get("client_id") not in (None, client_id):
            raise InvalidRequestError("client_id in the body differs from the HTTP Basic user name")
        return client_id, unquote_plus(password)

    async def parse(self) -> TokenRequest:
        tenant = _tenant_of(self._request)
        app = _app_named_by(self._request.app[SETTINGS], self._client_id)
        if not self._v2:
            resource = self._form.get("resource")
            if not resource:
                raise InvalidRequestError("the request body must contain 'resource'")
            return parse_token_request({"tenant": tenant, "resource": resource, "app": app})
        scope = self._form.get("scope", "").strip()
        if not scope:
            raise InvalidRequestError("the request body must contain 'scope' ({resource}/.default)")
        if " " in scope or not scope.endswith("/.default"):
            raise InvalidScopeError(
                "client credentials take one scope, '{resource}/.default' (the app's permissions)"
            )
        try:
            return parse_token_request({"tenant": tenant, "scope": scope, "app": app})
        except InvalidRequestError as exc:
            raise InvalidScopeError(exc.description) from None


async def _token_endpoint(
    request: web.Request, surface: str, render: Callable[[Issued], dict[str, Any]]
) -> web.Response:
    exchange = _TokenExchange(request, v2=surface == SURFACE_V2)
    try:
        issued = await issue_token(request.app, surface, exchange.authenticate, exchange.parse)
    except BrokerError as exc:
        return entra_error_response(exc, request, basic_auth=exchange.basic_auth)
    return _json(render(issued))


def _v2_body(issued: Issued) -> dict[str, Any]:
    remaining = int(issued.token.remaining_seconds())
    return {
        "token_type": "Bearer",
        "expires_in": remaining,
        "ext_expires_in": remaining,
        "access_token": issued.token.token,
    }


def _v1_body(issued: Issued) -> dict[str, Any]:
    # v1 sends every number as a string.
    token = issued.token
    remaining = int(token.remaining_seconds())
    not_before = decode_claims(token.token).get("nbf")
    return {
        "token_type": "Bearer",
        "expires_in": str(remaining),
        "ext_expires_in": str(remaining),
        "expires_on": str(int(token.expires_on)),
        "not_before": str(int(not_before) if isinstance(not_before, int | float) else int(time.time())),
        "resource": token.resource,
        "access_token": token.token,
    }


async def token_v2(request: web.Request) -> web.Response:
    return await _token_endpoint(request, SURFACE_V2, _v2_body)


async def token_v1(request: web.Request) -> web.Response:
    return await _token_endpoint(request, SURFACE_V1, _v1_body)


# --- managed identity (App Service protocol) ---------------------------------------------------------

# Ways to name a user-assigned identity that have no meaning here: the app is named by client_id.
_MSI_UNSUPPORTED: Final = ("mi_res_id", "msi_res_id", "object_id", "principal_id")


class _MsiExchange:
    def __init__(self, request: web.Request) -> None:
        self._request = request

    async def authenticate(self) -> Caller:
        key = self._request.headers.get("X-IDENTITY-HEADER")
        if not key:
            raise InvalidClientError("missing X-IDENTITY-HEADER: set IDENTITY_HEADER to the caller's key")
        return self._request.app[CALLERS].authenticate_api_key(key)

    async def parse(self) -> TokenRequest:
        query = self._request.query
        if any(len(query.getall(name)) > 1 for name in query):
            raise InvalidRequestError("a query parameter is given more than once")
        if query.get("api-version") != MSI_API_VERSION:
            raise InvalidRequestError(f"api-version must be {MSI_API_VERSION} (App Service managed identity)")
        if any(name in query for name in _MSI_UNSUPPORTED):
            raise InvalidRequestError("name the app with client_id (its client id or name), nothing else")
        tenant = _tenant_of(self._request)
        resource = query.get("resource")
        if not resource:
            raise InvalidRequestError("the query must contain 'resource'")
        client_id = query.get("client_id")
        app = _app_named_by(self._request.app[SETTINGS], client_id) if client_id else None
        return parse_token_request({"tenant": tenant, "resource": resource, "app": app})


async def msi_token(request: web.Request) -> web.Response:
    exchange = _MsiExchange(request)
    try:
        issued = await issue_token(request.app, SURFACE_MSI, exchange.authenticate, exchange.parse)
    except BrokerError as exc:
        return entra_error_response(exc, request, msi=True)
    token = issued.token
    # As App Service answers: expires_on in epoch seconds (a string), and the identity's client id.
    return _json(
        {
            "access_token": token.token,
            "expires_on": str(int(token.expires_on)),
            "resource": token.resource,
            "token_type": "Bearer",
            "client_id": request.app[SETTINGS].apps[issued.app].client_id,
        }
    )


# --- discovery documents ----------------------------------------------------------------------------


def base_url(request: web.Request) -> str:
    """Where this request reached the broker (``https://host:port``): the documents name it, so an
    authority of ``https://broker.example/{tenant}`` leads MSAL back to the same listener."""
    return f"{request.scheme}://{request.host}"


def openid_configuration(base: str, tenant: str, authority_host: str, *, v2: bool) -> dict[str, Any]:
    """The discovery document MSAL and azure-identity read for authority ``{base}/{tenant}``.

    ``token_endpoint`` is the broker's (MSAL also takes the tenant of its cache key from its path);
    ``authorization_endpoint`` and ``issuer`` are required by MSAL but unused for app-only tokens.
    ``jwks_uri`` is Entra's: the tokens handed out are Entra's, signed with Entra's keys.
    """
    oauth = f"{base}/{tenant}/oauth2/v2.0" if v2 else f"{base}/{tenant}/oauth2"
    return {
        "issuer": f"{base}/{tenant}/v2.0" if v2 else f"{base}/{tenant}/",
        "token_endpoint": f"{oauth}/token",
        "authorization_endpoint": f"{oauth}/authorize",
        "jwks_uri": f"{authority_host}/{tenant}/discovery{'/v2.0' if v2 else ''}/keys",
        "token_endpoint_auth_methods_supported": [
            "client_secret_post",
            "client_secret_basic",
            "private_key_jwt",
        ],
        "grant_types_supported": ["client_credentials"],
        "response_types_supported": ["token"],
        "subject_types_supported": ["pairwise"],
        "id_token_signing_alg_values_supported": ["RS256"],
    }


async def _discovery(request: web.Request, *, v2: bool) -> web.Response:
    try:
        tenant = _tenant_of(request)
    except BrokerError as exc:
        return entra_error_response(exc, request)
    settings = request.app[SETTINGS]
    document = openid_configuration(base_url(request), tenant, settings.authority_host, v2=v2)
    return web.Response(
        body=orjson.dumps(document),
        content_type="application/json",
        headers={"Cache-Control": "max-age=3600, private"},
    )


async def discovery_v2(request: web.Request) -> web.Response:
    return await _discovery(request, v2=True)


async def discovery_v1(request: web.Request) -> web.Response:
    return await _discovery(request, v2=False)


def add_compat_routes(app: web.Application) -> None:
    """Register every Entra-compatible route on the API application."""
    routes: list[tuple[str, str, Callable[[web.Request], Awaitable[web.StreamResponse]]]] = [
        ("POST", "/{tenant}/oauth2/v2.0/token", token_v2),
        ("POST", "/{tenant}/oauth2/token", token_v1),
        ("GET", "/{tenant}/v2.0/.well-known/openid-configuration", discovery_v2),
        ("GET", "/{tenant}/.well-known/openid-configuration", discovery_v1),
        ("GET", "/msi/{tenant}/token", msi_token),
    ]
    for method, path, handler in routes:
        app.router.add_route(method, path, handler)
