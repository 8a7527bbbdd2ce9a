"""The Entra ID face of the emulator: OIDC discovery, JWKS and the v2/v1 token endpoints.

Implements the client-credentials grant the way Entra answers it, including the order of its
checks (tenant → grant → client/scope → service principal → enabled → client credential → resource) and its
error bodies (``error``, ``error_description`` = ``"AADSTSnnnn: …"``, ``error_codes``, ``timestamp``,
``trace_id``, ``correlation_id``, ``error_uri``) with the same HTTP statuses. Every URL handed out
names the tenant by GUID: MSAL takes the tenant of its cache key from the token endpoint's path.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import time
import uuid
from typing import Any, Final
from urllib.parse import unquote_plus

import jwt
from aiohttp import web

from .context import REQUEST_INFO, STATE, base_url
from .state import App, EmulatorState, Tenant, normalize_resource, secret_matches
from .tokens import AssertionRejected, SigningKey, verify_client_assertion, verify_federated_assertion

JWT_BEARER: Final = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
# Tenant aliases Entra serves signing keys for without a directory lookup.
_MULTI_TENANT_ALIASES: Final = frozenset({"common", "organizations", "consumers"})
_ENTRA_HEADERS: Final = {"Cache-Control": "no-store, no-cache", "Pragma": "no-cache"}


# ---------------------------------------------------------------------- request parsing
def client_credentials(form: dict[str, str], authorization: str | None) -> tuple[str, str | None]:
    """``(client_id, client_secret)`` from the form, falling back to HTTP Basic (RFC 6749 2.3.1)."""
    client_id = form.get("client_id", "")
    secret = form.get("client_secret")
    if authorization and authorization[:6].lower() == "basic ":
        try:
            user, _, password = base64.b64decode(authorization[6:]).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return client_id, secret
        # RFC 6749 form-urlencodes both halves before base64-encoding them.
        client_id = client_id or unquote_plus(user)
        secret = secret if secret is not None else unquote_plus(password)
    return client_id, secret


def requested_resource(form: dict[str, str], version: str) -> str | None:
    """The resource of a token request: v1 ``resource=``, v2 ``scope={resource}/.default``."""
    if version == "v1":
        resource = form.get("resource")
        return normalize_resource(resource) if resource else None
    scope = form.get("scope", "").strip()
    if scope.endswith("/.default") and " " not in scope:
        return normalize_resource(scope.removesuffix("/.default"))
    return None


# ---------------------------------------------------------------------- responses
def entra_error(
    request: web.Request,
    status: int,
    error: str,
    code: int,
    message: str,
    headers: dict[str, str] | None = None,
) -> web.Response:
    """An Entra-shaped OAuth error response, with the body and headers Entra's token endpoint sends."""
    trace_id = str(uuid.uuid4())
    # Entra echoes the caller's client-request-id (MSAL sends one) as the correlation id.
    correlation_id = request.headers.get("client-request-id") or str(uuid.uuid4())
    timestamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")
    body = {
        "error": error,
        "error_description": f"AADSTS{code}: {message} Trace ID: {trace_id} "
        f"Correlation ID: {correlation_id} Timestamp: {timestamp}",
        "error_codes": [code],
        "timestamp": timestamp,
        "trace_id": trace_id,
        "correlation_id": correlation_id,
        "error_uri": f"{base_url(request)}/error?code={code}",
    }
    all_headers = {
        **_ENTRA_HEADERS,
        "x-ms-request-id": trace_id,
        "client-request-id": correlation_id,
        **(headers or {}),
    }
    return web.json_response(body, status=status, headers=all_headers)


def fault_response(request: web.Request, status: int, headers: dict[str, str]) -> web.Response:
    """The Entra-shaped body of an injected 429/500/503."""
    if status == 429:
        return entra_error(
            request,
            429,
            "temporarily_unavailable",
            90055,
            "There are too many incoming requests. Please try again later.",
            headers,
        )
    if status == 503:
        return entra_error(
            request,
            503,
            "temporarily_unavailable",
            90033,
            "A transient error has occurred. Please try again.",
            headers,
        )
    return entra_error(
        request,
        status,
        "server_error",
        50000,
        "There was an error issuing a token or an issue with our sign-in service.",
        headers,
    )


def _unknown_tenant(request: web.Request, raw: str, error: str = "invalid_request") -> web.Response:
    return entra_error(
        request,
        400,
        error,
        90002,
        f"Tenant '{raw}' not found. Check to make sure you have the correct tenant ID and are "
        "signing into the correct cloud. Check with your subscription administrator, this may "
        "happen if there are no active subscriptions for the tenant.",
    )


# ---------------------------------------------------------------------- discovery and keys
async def discovery(request: web.Request) -> web.Response:
    """``/{tenant}/v2.0/.well-known/openid-configuration`` and the v1 variant."""
    state = request.app[STATE]
    raw = request.match_info["tenant"]
    tenant = state.resolve_tenant(raw)
    if tenant is None:
        # Entra's discovery document answers an unknown tenant with "invalid_tenant".
        return _unknown_tenant(request, raw, "invalid_tenant")
    base, tid = base_url(request), tenant.tenant_id
    v2 = request.match_info.route.name == "discovery:v2"
    issuer = f"{base}/{tid}/v2.0" if v2 else f"https://sts.windows.net/{tid}/"
    oauth = f"{base}/{tid}/oauth2/v2.0" if v2 else f"{base}/{tid}/oauth2"
    doc: dict[str, Any] = {
        "issuer": issuer,
        "authorization_endpoint": f"{oauth}/authorize",
        "token_endpoint": f"{oauth}/token",
        "device_authorization_endpoint": f"{oauth}/devicecode",
        "end_session_endpoint": f"{oauth}/logout",
        "jwks_uri": f"{base}/{tid}/discovery/v2.0/keys",
        "token_endpoint_auth_methods_supported": [
            "client_secret_post",
            "private_key_jwt",
            "client_secret_basic",
        ],
        "response_modes_supported": ["query", "fragment", "form_post"],
        "response_types_supported": ["code", "id_token", "code id_token", "id_token token"],
        "subject_types_supported": ["pairwise"],
        "id_token_signing_alg_values_supported": ["RS256"],
        "scopes_supported": ["openid", "profile", "email", "offline_access"],
        "claims_supported": [
            "sub",
            "iss",
            "aud",
            "exp",
            "iat",
            "auth_time",
            "acr",
            "nonce",
            "tid",
            "ver",
        ],
        "request_uri_parameter_supported": False,
        "http_logout_supported": True,
        "frontchannel_logout_supported": True,
        "tenant_region_scope": "EU",
        "cloud_instance_name": "microsoftonline.com",
        "cloud_graph_host_name": "graph.windows.net",
        "msgraph_host": "graph.microsoft.com",
        "rbac_url": "https://pas.windows.net",
    }
    return web.json_response(doc)


async def jwks(request: web.Request) -> web.Response:
    """``/{tenant}/discovery/v2.0/keys``, ``/{tenant}/discovery/keys``, ``/common/discovery/keys``."""
    raw = request.match_info["tenant"]
    if raw.lower() not in _MULTI_TENANT_ALIASES and request.app[STATE].resolve_tenant(raw) is None:
        return _unknown_tenant(request, raw, "invalid_tenant")
    return web.json_response(request.app[STATE].signer.jwks())


# ---------------------------------------------------------------------- token endpoint
async def token(request: web.Request) -> web.Response:
    """``POST /{tenant}/oauth2/v2.0/token`` and ``/{tenant}/oauth2/token``: client credentials."""
    state = request.app[STATE]
    version = (request.match_info.route.name or "token:v2").partition(":")[2]
    raw = request.match_info["tenant"]
    tenant = state.resolve_tenant(raw)
    if tenant is None:
        return _unknown_tenant(request, raw)
    form = {k: v for k, v in (await request.post()).items() if isinstance(v, str)}

    grant_type = form.get("grant_type")
    if not grant_type:
        return _missing_parameter(request, "grant_type")
    if grant_type != "client_credentials":
        return entra_error(
            request,
            400,
            "unsupported_grant_type",
            70003,
            f"The app requested an unsupported grant type '{grant_type}'.",
        )
    client_id, secret = client_credentials(form, request.headers.get("Authorization"))
    client_id = client_id.strip().lower()
    if not client_id:
        return _missing_parameter(request, "client_id")

    resource = requested_resource(form, version)
    if resource is None:
        return _bad_resource_parameter(request, form, version)

    app = state.apps.get(client_id)
    if app is None or not state.is_consented(tenant.tenant_id, app):
        return entra_error(
            request,
            400,
            "unauthorized_client",
            700016,
            f"Application with identifier '{client_id}' was not found in the directory "
            f"'{tenant.display_name}'. This can happen if the application has not been installed "
            "by the administrator of the tenant or consented to by any user in the tenant. You "
            "may have sent your authentication request to the wrong tenant.",
        )

    if state.is_disabled(tenant.tenant_id, app):
        return entra_error(
            request,
            400,
            "unauthorized_client",
            7000112,
            f"Application '{app.client_id}' is disabled.",
        )

    raw_tid = raw.strip().lower()
    path = "oauth2/v2.0/token" if version == "v2" else "oauth2/token"
    audiences = {f"{base_url(request)}/{t}/{path}" for t in (tenant.tenant_id, raw_tid)}
    auth_method = _authenticate(request, form, app, secret, audiences)
    if isinstance(auth_method, web.Response):
        return auth_method
    if auth_method == "1":
        _note_credential(request, "secret")

    if not state.is_provisioned(tenant.tenant_id, resource):
        return entra_error(
            request,
            400,
            "invalid_resource",
            500011,
            f"The resource principal named {resource} was not found in the tenant named "
            f"{tenant.display_name}. This can happen if the application has not been installed by "
            "the administrator of the tenant or consented to by any user in the tenant. You might "
            "have sent your authentication request to the wrong tenant.",
        )
    return _issue(state, tenant, app, resource, auth_method, version)


def _missing_parameter(request: web.Request, name: str) -> web.Response:
    return entra_error(
        request,
        400,
        "invalid_request",
        900144,
        f"The request body must contain the following parameter: '{name}'.",
    )


def _bad_resource_parameter(request: web.Request, form: dict[str, str], version: str) -> web.Response:
    if version == "v1":
        return _missing_parameter(request, "resource")
    scope = form.get("scope")
    if not scope:
        return _missing_parameter(request, "scope")
    return entra_error(
        request,
        400,
        "invalid_scope",
        70011,
        f"The provided request must include a 'scope' input parameter. The provided value for "
        f"the input parameter 'scope' is not valid. The scope {scope} is not valid. Client "
        "credential flows must have a scope value with /.default suffixed to the resource "
        "identifier (application ID URI).",
    )


def _note_credential(request: web.Request, credential: str) -> None:
    info = request.get(REQUEST_INFO)
    if info is not None:
        info.credential = credential


def _is_self_signed(assertion: str, client_id: str) -> bool:
    """A ``private_key_jwt`` assertion names the app itself as issuer; anything else is a token of
    another issuer, presented under a federated identity credential."""
    try:
        claims = jwt.decode(assertion, options={"verify_signature": False})
    except jwt.InvalidTokenError:
        return True  # let the certificate path describe what is wrong with it
    return str(claims.get("iss", "")).lower() == client_id


def _authenticate(
    request: web.Request,
    form: dict[str, str],
    app: App,
    secret: str | None,
    audiences: set[str],
) -> str | web.Response:
    """Check the client credential; return ``appidacr`` ("1" secret, "2" cert or federated) or an
    error."""
    assertion = form.get("client_assertion")
    if assertion is not None:
        if form.get("client_assertion_type") != JWT_BEARER:
            return entra_error(
                request,
                400,
                "invalid_request",
                700026,
                "Client assertion type must be 'urn:ietf:params:oauth:client-assertion-type:jwt-bearer'.",
            )
        try:
            if _is_self_signed(assertion, app.client_id):
                cert = verify_client_assertion(
                    assertion,
                    client_id=app.client_id,
                    certificates=app.certificates,
                    audiences=audiences,
                )
                _note_credential(request, f"certificate:{cert.sha256.hex().upper()}")
            else:
                _verify_federated(request, assertion, app)
                _note_credential(request, f"federated:{hashlib.sha256(assertion.encode()).hexdigest()[:16]}")
        except AssertionRejected as exc:
            return entra_error(request, 401, "invalid_client", exc.code, exc.description)
        return "2"
    if not secret:
        return entra_error(
            request,
            401,
            "invalid_client",
            7000218,
            "The request body must contain the following parameter: 'client_assertion' or 'client_secret'.",
        )
    now = time.time()
    matching = [s for s in app.secrets if secret_matches(secret, s.value)]
    if not matching:
        return entra_error(
            request,
            401,
            "invalid_client",
            7000215,
            "Invalid client secret provided. Ensure the secret being sent in the request is the "
            "client secret value, not the client secret ID, for a secret added to app "
            f"'{app.client_id}'.",
        )
    if all(s.expired(now) for s in matching):
        return entra_error(
            request,
            401,
            "invalid_client",
            7000222,
            f"The provided client secret keys for app '{app.client_id}' are expired. Visit the "
            "Azure portal to create new keys for your app: https://aka.ms/NewClientSecret, or "
            "consider using certificate credentials for added security: "
            "https://aka.ms/certCreds.",
        )
    return "1"


def _verify_federated(request: web.Request, assertion: str, app: App) -> None:
    """A token of another issuer as the app's credential: this emulator's own Entra tokens (a managed
    identity's, issuer ``{base}/{tenant}/v2.0``) are checked with its signing key, other issuers'
    with the keys the control API registered for them."""
    state = request.app[STATE]
    entra_prefix = base_url(request) + "/"

    def entra_tenant_of(issuer: str) -> str | None:
        if not (issuer.startswith(entra_prefix) and issuer.endswith("/v2.0")):
            return None
        tenant = state.resolve_tenant(issuer.removeprefix(entra_prefix).removesuffix("/v2.0"))
        return tenant.tenant_id if tenant is not None else None

    def signer_for(issuer: str) -> SigningKey | None:
        return state.signer if entra_tenant_of(issuer) is not None else state.oidc_issuers.get(issuer)

    verify_federated_assertion(
        assertion,
        home_tenant=app.home_tenant,
        credentials=app.federated,
        signer_for=signer_for,
        entra_tenant_of=entra_tenant_of,
        detailed=state.federated_errors_detailed,
    )


def _issue(
    state: EmulatorState,
    tenant: Tenant,
    app: App,
    resource: str,
    appidacr: str,
    version: str,
) -> web.Response:
    now = int(time.time())
    lifetime = state.token_lifetime_now()
    tid = tenant.tenant_id
    # The service principal's object id: stable per (tenant, app), as in a real directory.
    oid = str(uuid.uuid5(uuid.NAMESPACE_URL, f"sp:{tid}:{app.client_id}"))
    issuer = f"https://sts.windows.net/{tid}/"
    claims: dict[str, Any] = {
        "aud": resource,
        "iss": issuer,
        "iat": now,
        "nbf": now,
        "exp": now + lifetime,
        "appid": app.client_id,
        "appidacr": appidacr,
        "azp": app.client_id,
        "azpacr": appidacr,
        "idp": issuer,
        "idtyp": "app",
        "oid": oid,
        "sub": oid,
        "tid": tid,
        "uti": base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode(),
        "ver": "1.0",
    }
    roles = state.roles_for(tid, app, resource)
    if roles:
        claims["roles"] = roles
    access_token = state.signer.sign(claims)
    state.counts["issued_tokens"] += 1
    body: dict[str, Any]
    if version == "v1":
        # The v1 endpoint answers with strings throughout and echoes the resource.
        body = {
            "token_type": "Bearer",
            "expires_in": str(lifetime),
            "ext_expires_in": str(lifetime),
            "expires_on": str(now + lifetime),
            "not_before": str(now),
            "resource": resource,
            "access_token": access_token,
        }
    else:
        body = {
            "token_type": "Bearer",
            "expires_in": lifetime,
            "ext_expires_in": lifetime,
            "access_token": access_token,
        }
    return web.json_response(body, headers=_ENTRA_HEADERS)


def add_routes(router: web.UrlDispatcher) -> None:
    """Register the Entra endpoints; route names tell the middleware the endpoint class."""
    router.add_get("/{tenant}/v2.0/.well-known/openid-configuration", discovery, name="discovery:v2")
    router.add_get("/{tenant}/.well-known/openid-configuration", discovery, name="discovery:v1")
    router.add_get("/{tenant}/discovery/v2.0/keys", jwks, name="jwks:v2")
    router.add_get("/{tenant}/discovery/keys", jwks, name="jwks:v1")
    router.add_post("/{tenant}/oauth2/v2.0/token", token, name="token:v2")
    router.add_post("/{tenant}/oauth2/token", token, name="token:v1")
