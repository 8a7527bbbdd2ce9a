"""The managed-identity face of the emulator: App Service's token endpoint for user-assigned identities.

``GET /msi/token?api-version=2019-08-01&resource=R&client_id=C`` with header ``X-IDENTITY-HEADER``
is the protocol azure-identity's ``ManagedIdentityCredential`` speaks when ``IDENTITY_ENDPOINT`` and
``IDENTITY_HEADER`` are set (App Service, Container Apps, Functions), and the only one of its
environments that works over HTTPS with a custom CA (IMDS is plain HTTP at a fixed link-local
address). The answer is the identity's token for ``resource``: for Key Vault an ordinary v1 access
token; for ``api://AzureADTokenExchange`` the v2 token whose issuer (``{base}/{tenant}/v2.0``) and
subject (the identity's object id) a federated identity credential on an app names, which is what
makes the identity a credential with no secret.

Only user-assigned identities exist here (a federated credential must name one); a request that
names none is refused as App Service refuses a missing system-assigned identity.
"""

from __future__ import annotations

import base64
import hmac
import time
import uuid
from typing import Any, Final

from aiohttp import web

from .context import REQUEST_INFO, STATE, base_url
from .state import TOKEN_EXCHANGE_AUDIENCE, ManagedIdentity, normalize_resource

API_VERSION: Final = "2019-08-01"


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    """App Service's error body."""
    return web.json_response({"statusCode": status, "message": message}, status=status, headers=headers)


def fault_response(status: int, headers: dict[str, str]) -> web.Response:
    """The body of an injected 429/500/503."""
    return _error(status, "Injected fault: the managed identity endpoint is unavailable.", headers)


def _claims(base: str, identity: ManagedIdentity, resource: str, lifetime: int) -> dict[str, Any]:
    now = int(time.time())
    tid = identity.tenant_id
    common = {
        "aud": resource,
        "iat": now,
        "nbf": now,
        "exp": now + lifetime,
        "idtyp": "app",
        "oid": identity.object_id,
        "sub": identity.object_id,
        "tid": tid,
        "uti": base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode(),
    }
    if resource.startswith(TOKEN_EXCHANGE_AUDIENCE):
        # The exchange audience (and its USGov/China twins) takes v2 tokens: the issuer a federated
        # identity credential for a managed identity names.
        return {**common, "iss": f"{base}/{tid}/v2.0", "azp": identity.client_id, "azpacr": "2", "ver": "2.0"}
    issuer = f"https://sts.windows.net/{tid}/"
    return {
        **common,
        "iss": issuer,
        "idp": issuer,
        "appid": identity.client_id,
        "appidacr": "2",
        "ver": "1.0",
    }


async def token(request: web.Request) -> web.Response:
    """``GET /msi/token``: the named user-assigned identity's token for ``resource``."""
    state = request.app[STATE]
    presented = request.headers.get("X-IDENTITY-HEADER", "")
    if not hmac.compare_digest(presented.encode(), state.identity_header.encode()):
        return _error(401, "The X-IDENTITY-HEADER header is missing or wrong.")
    query = request.query
    if query.get("api-version") != API_VERSION:
        return _error(400, f"api-version must be {API_VERSION}.")
    resource = normalize_resource(query.get("resource", ""))
    if not resource:
        return _error(400, "The resource parameter is required.")
    identity = state.find_managed_identity(
        query.get("client_id"), query.get("object_id") or query.get("principal_id")
    )
    if identity is None:
        return _error(
            400,
            "No User Assigned or Delegated Managed Identity found for specified "
            "ClientId/ResourceId/PrincipalId.",
        )
    info = request.get(REQUEST_INFO)
    if info is not None:
        info.client_id, info.resource = identity.client_id, resource
    lifetime = state.token_lifetime_now()
    access_token = state.signer.sign(_claims(base_url(request), identity, resource, lifetime))
    state.counts["issued_tokens"] += 1
    return web.json_response(
        {
            "access_token": access_token,
            "expires_on": str(int(time.time()) + lifetime),
            "resource": resource,
            "token_type": "Bearer",
            "client_id": identity.client_id,
        }
    )


def add_routes(router: web.UrlDispatcher) -> None:
    """Register the managed-identity endpoint."""
    router.add_get("/msi/token", token, name="identity:app-service")
