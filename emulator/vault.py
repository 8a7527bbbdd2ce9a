"""The Key Vault face of the emulator: secret, certificate and key reads and ``keys/sign``, behind the
bearer-challenge flow.

The vault URL is the server's base URL. A request without a bearer token gets the 401 challenge
the Azure SDK parses (``WWW-Authenticate: Bearer authorization="{base}/{tenant}",
resource="https://vault.azure.net"``; the SDK takes the tenant from the first path segment of
``authorization``). Bearer tokens must be ones this emulator signed, for the vault audience and the
vault's tenant, and the app must be allowed by the vault's access policy. Errors are Key
Vault-shaped: ``{"error": {"code", "message", "innererror"?}}``.

Certificates (``GET /certificates/{name}[/{version}]``) answer with their public part (``cer``,
``x5t``, ``kid``, the policy with ``exportable``); the key of the same name (``GET /keys/...``) with
its public half (``n``, ``e``) only; ``POST /keys/{name}/{version}/sign`` signs a digest (RS256 and
PS256 and their 384/512 variants) with the private half, which no request ever returns.
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import Any, Final

import jwt
from aiohttp import web
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, utils

from .context import REQUEST_INFO, STATE, base_url
from .state import (
    VAULT_RESOURCE,
    CertificateVersion,
    KeyVersion,
    SecretVersion,
    VaultCertificate,
    VaultSecret,
)
from .tokens import b64url
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


# ---------------------------------------------------------------------- certificates and keys
_HASHES: Final[dict[str, type[hashes.HashAlgorithm]]] = {
    "256": hashes.SHA256,
    "384": hashes.SHA384,
    "512": hashes.SHA512,
}


def _entry(request: web.Request) -> VaultCertificate | None:
    return request.app[STATE].vault_certificates.get(request.match_info["name"].lower())


def _object_not_found(kind: str, name: str, version: str | None) -> web.Response:
    ident = f"{name}/{version}" if version else name
    code = "CertificateNotFound" if kind == "certificate" else "KeyNotFound"
    return vault_error(404, code, f"A {kind} with (name/id) {ident} was not found in this key vault.")


def _attributes(created: int, enabled: bool = True) -> dict[str, Any]:
    return {
        "enabled": enabled,
        "created": created,
        "updated": created,
        "recoveryLevel": _RECOVERY_LEVEL,
        "recoverableDays": 90,
    }


def _certificate_bundle(
    request: web.Request, entry: VaultCertificate, cert: CertificateVersion
) -> dict[str, Any]:
    base = base_url(request)
    der = cert.der
    return {
        "id": f"{base}/certificates/{entry.name}/{cert.version}",
        "kid": f"{base}/keys/{entry.name}/{cert.version}",
        "sid": f"{base}/secrets/{entry.name}/{cert.version}",
        "x5t": b64url(_sha1(der)),
        "cer": base64.b64encode(der).decode(),
        "contentType": "application/x-pem-file",
        "attributes": _attributes(cert.created),
        "policy": {
            "id": f"{base}/certificates/{entry.name}/policy",
            "key_props": {"exportable": cert.exportable, "kty": "RSA", "key_size": 2048, "reuse_key": False},
            "secret_props": {"contentType": "application/x-pem-file"},
            "x509_props": {"subject": entry.subject, "validity_months": 12},
            "issuer": {"name": "Self"},
            "attributes": {"enabled": True, "created": cert.created, "updated": cert.created},
        },
    }


def _sha1(data: bytes) -> bytes:
    digest = hashes.Hash(hashes.SHA1())  # noqa: S303 - Key Vault's x5t is a SHA-1 thumbprint
    digest.update(data)
    return digest.finalize()


def _key_bundle(request: web.Request, entry: VaultCertificate, key: KeyVersion) -> dict[str, Any]:
    numbers = key.private_key.public_key().public_numbers()
    return {
        "key": {
            "kid": f"{base_url(request)}/keys/{entry.name}/{key.version}",
            "kty": "RSA",
            "key_ops": ["sign", "verify"],
            # The public half only: nothing in this API ever returns d, p, q, dp, dq or qi.
            "n": b64url(numbers.n.to_bytes((numbers.n.bit_length() + 7) // 8, "big")),
            "e": b64url(numbers.e.to_bytes((numbers.e.bit_length() + 7) // 8, "big")),
        },
        "attributes": {**_attributes(key.created, key.enabled), "exportable": False},
        "managed": True,  # a key that belongs to a certificate
    }


async def get_certificate(request: web.Request) -> web.Response:
    """``GET /certificates/{name}[/]`` (the newest version) and ``/certificates/{name}/{version}``."""
    denied = _authorize(request)
    if denied is not None:
        return denied
    name, version = request.match_info["name"], request.match_info.get("version")
    entry = _entry(request)
    cert = entry.certificate(version) if entry is not None else None
    if entry is None or cert is None:
        return _object_not_found("certificate", name, version)
    return web.json_response(_certificate_bundle(request, entry, cert))


async def get_key(request: web.Request) -> web.Response:
    """``GET /keys/{name}[/]`` and ``/keys/{name}/{version}``: the public half of the key."""
    denied = _authorize(request)
    if denied is not None:
        return denied
    name, version = request.match_info["name"], request.match_info.get("version")
    entry = _entry(request)
    key = entry.key(version) if entry is not None else None
    if entry is None or key is None:
        return _object_not_found("key", name, version)
    return web.json_response(_key_bundle(request, entry, key))


async def sign(request: web.Request) -> web.Response:
    """``POST /keys/{name}/{version}/sign`` with ``{"alg", "value": base64url(digest)}``: the
    signature, made with the private half inside the vault."""
    denied = _authorize(request)
    if denied is not None:
        return denied
    name, version = request.match_info["name"], request.match_info.get("version")
    entry = _entry(request)
    key = entry.key(version) if entry is not None else None
    if entry is None or key is None:
        return _object_not_found("key", name, version)
    try:
        body = await request.json()
        alg = str(body["alg"])
        digest = base64.urlsafe_b64decode(str(body["value"]) + "=" * (-len(str(body["value"])) % 4))
    except (ValueError, KeyError, TypeError, binascii.Error):
        return vault_error(400, "BadParameter", "The request body must be {alg, value}.")
    family, size = alg[:2], alg[2:]
    hash_type = _HASHES.get(size)
    if family not in ("RS", "PS") or hash_type is None:
        return vault_error(400, "BadParameter", f"Invalid algorithm {alg!r} for an RSA key.")
    hash_algorithm = hash_type()
    if len(digest) != hash_algorithm.digest_size:
        return vault_error(400, "BadParameter", f"The digest is not {hash_algorithm.digest_size} bytes long.")
    scheme: padding.AsymmetricPadding = (
        padding.PKCS1v15()
        if family == "RS"
        # JWS (RFC 7518 3.5): salt as long as the hash.
        else padding.PSS(mgf=padding.MGF1(hash_type()), salt_length=hash_algorithm.digest_size)
    )
    signature = key.private_key.sign(digest, scheme, utils.Prehashed(hash_algorithm))
    state = request.app[STATE]
    state.counts["signatures"] += 1
    kid = f"{base_url(request)}/keys/{entry.name}/{key.version}"
    return web.json_response({"kid": kid, "value": b64url(signature)})


def add_routes(router: web.UrlDispatcher) -> None:
    """Register the Key Vault endpoints (the SDK reads the latest version with a trailing /)."""
    router.add_get("/secrets/{name}", get_secret, name="vault:latest")
    router.add_get("/secrets/{name}/", get_secret, name="vault:latest-slash")
    router.add_get("/secrets/{name}/{version}", get_secret, name="vault:version")
    router.add_get("/certificates/{name}", get_certificate, name="vault:certificate")
    router.add_get("/certificates/{name}/", get_certificate, name="vault:certificate-slash")
    router.add_get("/certificates/{name}/{version}", get_certificate, name="vault:certificate-version")
    router.add_get("/keys/{name}", get_key, name="vault:key")
    router.add_get("/keys/{name}/", get_key, name="vault:key-slash")
    router.add_get("/keys/{name}/{version}", get_key, name="vault:key-version")
    router.add_post("/keys/{name}/{version}/sign", sign, name="sign:key")
