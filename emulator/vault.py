"""The Key Vault face of the emulator: secret reads behind the bearer-challenge flow.

The vault URL is the server's base URL. A request without a bearer token gets the 401 challenge
the Azure SDK parses (``WWW-Authenticate: Bearer authorization="{base}/{tenant}",
resource="https://vault.azure.net"``; the SDK takes the tenant from the first path segment of
``authorization``). Bearer tokens must be ones this emulator signed, for the vault audience and the
vault's tenant, and the app must be allowed by the vault's access policy. Errors are Key
Vault-shaped: ``{"error": {"code", "message", "innererror"?}}``.
"""

from __future__ import annotations

import re
from typing import Any, Final

import jwt
from aiohttp import web

from .context import REQUEST_INFO, STATE, base_url
from .state import VAULT_RESOURCE, SecretVersion, VaultSecret
from .world import VAULT_TENANT_ID

_VERSION: Final = re.compile(r"^[0-9a-fA-F]{32}$")
_RECOVERY_LEVEL: Final = "Recoverable+Purgeable"


def vault_error(
    status: int,
    code: str,
    message: str,
    *,
    inner: str | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    """A Key Vault error body."""
    error: dict[str, Any] = {"code": code, "message": message}
    if inner is not None:
        error["innererror"] = {"code": inner}
    return web.json_response({"error": error}, status=status, headers=headers)


def fault_response(status: int, headers: dict[str, str]) -> web.Response:
    """The Key Vault-shaped body of an injected 429/500/503."""
    if status == 429:
        return vault_error(
            429,
            "Throttled",
            "Request was not processed because too many requests were received. "
            "Reason: VaultRequestTypeLimitReached",
            headers=headers,
        )
    if status == 503:
        return vault_error(
            503, "ServiceUnavailable", "The service is temporarily unavailable.", headers=headers
        )
    return vault_error(status, "InternalServerError", "An unexpected error occurred.", headers=headers)


def _challenge(request: web.Request, message: str) -> web.Response:
    challenge = f'Bearer authorization="{base_url(request)}/{VAULT_TENANT_ID}", resource="{VAULT_RESOURCE}"'
    return vault_error(401, "Unauthorized", message, headers={"WWW-Authenticate": challenge})


def _authorize(request: web.Request) -> web.Response | None:
    """None when the bearer token may read secrets, else the 401/403 Key Vault would send."""
    auth = request.headers.get("Authorization", "")
    scheme, _, token = auth.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return _challenge(request, "AKV10000: Request is missing a Bearer or PoP token.")
    try:
        claims = request.app[STATE].signer.verify(token.strip(), [VAULT_RESOURCE, VAULT_RESOURCE + "/"])
    except jwt.InvalidAudienceError:
        return _challenge(request, f"AKV10022: Invalid audience. Expected {VAULT_RESOURCE}.")
    except jwt.ExpiredSignatureError:
        return _challenge(request, "AKV10013: Token has expired.")
    except jwt.InvalidTokenError:
        return _challenge(request, "AKV10031: Token signature validation failed.")
    if claims.get("tid") != VAULT_TENANT_ID:
        expected = f"https://sts.windows.net/{VAULT_TENANT_ID}/"
        return _challenge(
            request,
            f"AKV10032: Invalid issuer. Expected one of {expected}, found {claims.get('iss')}.",
        )
    client_id = str(claims.get("appid", ""))
    info = request.get(REQUEST_INFO)
    if info is not None:
        info.client_id = client_id
    if not request.app[STATE].vault_allows(client_id):
        return vault_error(
            403,
            "Forbidden",
            f"The user, group or application 'appid={client_id};oid={claims.get('oid')};"
            f"iss={claims.get('iss')}' does not have secrets get permission on key vault "
            f"'{request.host}'. For help resolving this issue, please see "
            "https://go.microsoft.com/fwlink/?linkid=2125287",
            inner="AccessDenied",
        )
    return None


def _not_found(name: str, version: str | None) -> web.Response:
    ident = f"{name}/{version}" if version else name
    return vault_error(
        404,
        "SecretNotFound",
        f"A secret with (name/id) {ident} was not found in this key vault. If you recently "
        "deleted this secret you may be able to recover it using the correct recovery command. "
        "For help resolving this issue, please see https://go.microsoft.com/fwlink/?linkid=2125182",
    )


def _disabled() -> web.Response:
    return vault_error(
        403,
        "Forbidden",
        "Operation get is not allowed on a disabled secret.",
        inner="SecretDisabled",
    )


def _bundle(request: web.Request, secret: VaultSecret, version: SecretVersion) -> dict[str, Any]:
    body: dict[str, Any] = {
        "value": version.value,
        "id": f"{base_url(request)}/secrets/{secret.name}/{version.version}",
        "attributes": {
            "enabled": version.enabled,
            "created": version.created,
            "updated": version.updated,
            "recoveryLevel": _RECOVERY_LEVEL,
            "recoverableDays": 90,
        },
    }
    if version.content_type is not None:
        body["contentType"] = version.content_type
    if version.tags is not None:
        body["tags"] = version.tags
    return body


async def get_secret(request: web.Request) -> web.Response:
    """``GET /secrets/{name}[/]`` (the newest version) and ``GET /secrets/{name}/{version}``.

    A disabled version answers 403 SecretDisabled, also when it is the newest one and no
    version was named: real Key Vault does not skip to an older enabled version.
    """
    denied = _authorize(request)
    if denied is not None:
        return denied
    name = request.match_info["name"]
    version_id = request.match_info.get("version")
    secret = request.app[STATE].vault.get(name.lower())
    if version_id is not None and not _VERSION.match(version_id):
        return _not_found(name, version_id)
    if secret is None:
        return _not_found(name, version_id)
    version = secret.current() if version_id is None else secret.find(version_id)
    if version is None:
        return _not_found(name, version_id)
    if not version.enabled:
        return _disabled()
    return web.json_response(_bundle(request, secret, version))


def add_routes(router: web.UrlDispatcher) -> None:
    """Register the Key Vault endpoints (the SDK reads the latest version with a trailing /)."""
    router.add_get("/secrets/{name}", get_secret, name="vault:latest")
    router.add_get("/secrets/{name}/", get_secret, name="vault:latest-slash")
    router.add_get("/secrets/{name}/{version}", get_secret, name="vault:version")
