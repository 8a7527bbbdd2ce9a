"""Caller authentication and policy: which tenants and apps a caller may ask for.

Two credentials identify a caller:

- an **API key**, stored only as its SHA-256. The presented key is hashed once and the hash looked up:
  comparing hashes, not keys, means timing reveals nothing about a valid key (an attacker cannot steer
  a hash towards a stored one), and it costs one hash per request;
- a **Kubernetes service-account token** (a JWT): signature checked against the issuer's JWKS, then
  ``iss``, ``aud``, ``exp``/``nbf`` (with a small leeway), and ``sub``
  (``system:serviceaccount:NS:NAME``) mapped to a configured caller. A verified token is remembered
  (by its hash) until it expires, so verification stays off the hot path. An unknown ``kid`` refreshes
  the JWKS, at most once per ``jwks_refresh_min_seconds``, so a rotated signing key is picked up and a
  flood of forged kids cannot hammer the issuer. The header's ``alg`` must fit the key its ``kid`` names
  (key type, curve, the JWK's own ``alg``): the token, not the issuer, chooses it.

``authenticate`` raises only ``BrokerError``s for a bad credential, whatever bytes it is made of.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Protocol

import jwt

from broker.config import CallerSettings, ServiceAccountAuthSettings, Settings
from broker.errors import AccessDeniedError, InvalidClientError

MAX_CREDENTIAL_LENGTH = 8192


@dataclass(frozen=True, slots=True)
class Caller:
    name: str
    tenants: frozenset[str]  # lower-cased; "*" means every tenant
    apps: frozenset[str]
    max_acquisitions_per_minute: int = 120  # upstream (Entra) acquisitions; cache hits are free
    admin: bool = False  # may use the tenant administration endpoints (/v1/tenants/...)

    def check(self, *, tenant: str, app: str) -> None:
        """Raise ``AccessDeniedError`` unless this caller may ask for ``tenant`` through ``app``."""
        if "*" not in self.tenants and tenant.lower() not in self.tenants:
            raise AccessDeniedError(f"caller {self.name!r} may not request tokens for tenant {tenant}")
        if "*" not in self.apps and app not in self.apps:
            raise AccessDeniedError(f"caller {self.name!r} may not use app {app!r}")


def hash_api_key(api_key: str) -> str:
    return hashlib.sha256(api_key.encode()).hexdigest()


def new_api_key() -> tuple[str, str]:
    """A fresh caller key and the hash that goes in the config."""
    key = "tbk_" + secrets.token_urlsafe(32)
    return key, hash_api_key(key)


class JwksSource(Protocol):
    """Where the service-account issuer's signing keys come from (``oidc.py``)."""

    async def fetch(self) -> dict[str, Any]: ...


class CallerRegistry:
    """Maps presented credentials (API keys, service-account tokens) to configured callers."""

    def __init__(self, settings: Settings, jwks_source: JwksSource | None = None) -> None:
        self._by_hash: dict[str, Caller] = {}
        self._by_account: dict[str, Caller] = {}
        for name, caller in settings.callers.items():
            if caller.api_key_sha256:
                self._by_hash[caller.api_key_sha256] = _caller(name, caller)
            if caller.service_account:
                self._by_account[caller.service_account] = _caller(name, caller)
        self._sa = settings.service_account_auth
        self._jwks_source = jwks_source
        self._keys: dict[str, tuple[jwt.PyJWK, frozenset[str]]] = {}
        self._jwks_fetched_at = float("-inf")
        self._jwks_lock = asyncio.Lock()
        self._verified: OrderedDict[str, tuple[float, Caller]] = OrderedDict()

    async def authenticate(self, authorization: str | None) -> Caller:
        """The caller behind an ``Authorization: Bearer <credential>`` header, or ``InvalidClientError``."""
        credential = _bearer(authorization)
        if credential.count(".") == 2 and self._sa is not None:
            return await self.authenticate_assertion(credential)
        return self.authenticate_api_key(credential)

    def known_bearer(self, authorization: str | None) -> Caller | None:
        """``authenticate`` when it costs one hash: ``Bearer <credential>`` exactly, the credential a
        configured API key or a service-account token verified before and not yet expired. ``None``
        for anything else, valid or not (``authenticate`` then decides, and raises what it must).
        Remembers nothing new. A credential found here is one ``authenticate`` accepts: a configured
        key is printable ASCII without surrounding blanks (``new_api_key``), a remembered token
        passed its checks."""
        if authorization is None or not authorization.startswith("Bearer "):
            return None
        credential = authorization[7:]
        try:
            digest = hash_api_key(credential)
        except UnicodeEncodeError:  # lone surrogates: non-UTF-8 header bytes, never a credential
            return None
        if self._sa is not None and credential.count(".") == 2:
            return self._verified_caller(digest, self._sa)
        return self._by_hash.get(digest)

    def authenticate_api_key(self, api_key: str) -> Caller:
        """The caller whose API key this is (a bearer credential, an OAuth ``client_secret``, an
        ``X-IDENTITY-HEADER``), or ``InvalidClientError``."""
        _check_credential_text(api_key)
        caller = self._by_hash.get(hash_api_key(api_key))
        if caller is None:
            raise InvalidClientError("unknown caller credential")
        return caller

    async def authenticate_assertion(self, token: str) -> Caller:
        """The caller whose service-account JWT this is (a bearer credential or an OAuth
        ``client_assertion``), or ``InvalidClientError``."""
        if self._sa is None:
            raise InvalidClientError("service-account tokens are not accepted here")
        _check_credential_text(token)
        return await self._authenticate_jwt(token, self._sa)

    async def _authenticate_jwt(self, token: str, sa: ServiceAccountAuthSettings) -> Caller:
        digest = hash_api_key(token)
        remembered = self._verified_caller(digest, sa)
        if remembered is not None:
            return remembered
        self._verified.pop(digest, None)  # expired, if it was there
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError:
            raise InvalidClientError("caller token is not a valid JWT") from None
        algorithm = header.get("alg")
        if algorithm not in sa.algorithms:
            raise InvalidClientError("caller token uses a signing algorithm that is not allowed")
        key, key_algorithms = await self._signing_key(str(header.get("kid", "")), sa)
        # The header picks the algorithm, so it must be one this key is for: otherwise PyJWT is asked to
        # verify, say, ES256 with an RSA key (a TypeError), or PS256 with a key published for RS256 only.
        if algorithm not in key_algorithms:
            raise InvalidClientError("caller token's signing algorithm does not fit its key")
        try:
            claims = jwt.decode(
                token,
                key.key,
                algorithms=[algorithm],
                audience=sa.audience,
                issuer=sa.issuer,
                leeway=sa.leeway_seconds,
                options={"require": ["exp", "iss", "aud", "sub"]},
            )
        except jwt.ExpiredSignatureError:
            raise InvalidClientError("caller token has expired") from None
        except jwt.InvalidAudienceError:
            raise InvalidClientError(f"caller token is not for audience {sa.audience!r}") from None
        except jwt.InvalidTokenError as exc:
            # PyJWT's messages name the failed check, never the token's contents.
            raise InvalidClientError(f"caller token rejected: {exc}") from None
        except (jwt.PyJWTError, TypeError, ValueError):
            # A key PyJWT cannot use for this token (checked above; kept so that a bad credential can
            # never become a 500 if PyJWT grows another key check).
            raise InvalidClientError("caller token rejected: its key cannot verify it") from None
        account = self._by_account.get(str(claims["sub"]))
        if account is None:
            raise InvalidClientError("this service account is not a configured caller")
        self._verified[digest] = (float(claims["exp"]), account)
        while len(self._verified) > sa.verified_cache_max:
            self._verified.popitem(last=False)
        return account

    def _verified_caller(self, digest: str, sa: ServiceAccountAuthSettings) -> Caller | None:
        """The caller of the verified service-account token with this SHA-256, until it expires."""
        remembered = self._verified.get(digest)
        if remembered is None or time.time() >= remembered[0] + sa.leeway_seconds:
            return None
        return remembered[1]

    async def _signing_key(
        self, kid: str, sa: ServiceAccountAuthSettings
    ) -> tuple[jwt.PyJWK, frozenset[str]]:
        """The key ``kid`` names and the algorithms it may verify."""
        found = self._keys.get(kid)
        if found is not None:
            return found
        async with self._jwks_lock:
            found = self._keys.get(kid)
            if found is None and time.monotonic() - self._jwks_fetched_at >= sa.jwks_refresh_min_seconds:
                await self._refresh_keys()
                found = self._keys.get(kid)
        if found is None:
            raise InvalidClientError("caller token is signed by an unknown key")
        return found

    async def _refresh_keys(self) -> None:
        if self._jwks_source is None:
            raise InvalidClientError("service-account tokens are not accepted here")
        self._jwks_fetched_at = time.monotonic()
        try:
            document = await self._jwks_source.fetch()
            keys = _usable_keys(document)
        except (OSError, ValueError, jwt.PyJWKSetError, json.JSONDecodeError) as exc:
            raise InvalidClientError(
                f"cannot verify caller tokens now: signing keys unavailable ({type(exc).__name__})"
            ) from None
        self._keys = keys


# What each key type may verify (RFC 7518 §3.1): RSA keys the RSASSA algorithms, an EC key only the one
# algorithm of its curve. A JWK's own ``alg``, when given, narrows that to exactly one.
_RSA_ALGORITHMS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
_EC_ALGORITHM_BY_CURVE = {"P-256": "ES256", "P-384": "ES384", "P-521": "ES512"}


def _key_algorithms(jwk: dict[str, Any]) -> frozenset[str]:
    if isinstance(jwk.get("alg"), str):
        return frozenset({jwk["alg"]})
    if jwk.get("kty") == "RSA":
        return _RSA_ALGORITHMS
    if jwk.get("kty") == "EC" and jwk.get("crv") in _EC_ALGORITHM_BY_CURVE:
        return frozenset({_EC_ALGORITHM_BY_CURVE[jwk["crv"]]})
    return frozenset()


def _usable_keys(document: dict[str, Any]) -> dict[str, tuple[jwt.PyJWK, frozenset[str]]]:
    """Kid -> (key, algorithms it may verify) for every usable signing key of a JWKS document.

    Keys without a kid, of an unknown type or unparsable are skipped (as ``PyJWKSet`` does); a document
    with none left is a ``PyJWKSetError``.
    """
    entries = document.get("keys")
    if not isinstance(entries, list):
        raise jwt.PyJWKSetError("the JWKS has no keys list")
    keys: dict[str, tuple[jwt.PyJWK, frozenset[str]]] = {}
    for entry in entries:
        if not isinstance(entry, dict) or not entry.get("kid") or entry.get("use", "sig") != "sig":
            continue
        try:
            key = jwt.PyJWK.from_dict(entry)
        except (jwt.PyJWTError, ValueError, TypeError, KeyError):
            continue
        keys[str(entry["kid"])] = (key, _key_algorithms(entry))
    if not keys:
        raise jwt.PyJWKSetError("the JWKS has no usable signing keys")
    return keys


def _bearer(authorization: str | None) -> str:
    """The credential of an ``Authorization: Bearer <credential>`` header, or ``InvalidClientError``."""
    if not authorization:
        raise InvalidClientError("missing Authorization: Bearer credential")
    scheme, _, credential = authorization.partition(" ")
    credential = credential.strip()
    if scheme.lower() != "bearer" or not credential:
        raise InvalidClientError("Authorization must be a Bearer credential")
    return credential


def _check_credential_text(credential: str) -> None:
    """API keys and JWTs are short printable ASCII, whichever surface carried them. aiohttp hands
    header bytes that are not UTF-8 over as lone surrogates, which cannot even be hashed (encoded):
    refuse them, and anything oversized, as a bad credential."""
    if len(credential) > MAX_CREDENTIAL_LENGTH:
        raise InvalidClientError("unknown caller credential")
    if not (credential.isascii() and credential.isprintable()):
        raise InvalidClientError("caller credential must be printable ASCII")


def _caller(name: str, settings: CallerSettings) -> Caller:
    return Caller(
        name=name,
        tenants=frozenset(settings.tenants),
        apps=frozenset(settings.apps),
        max_acquisitions_per_minute=settings.max_acquisitions_per_minute,
        admin=settings.admin,
    )
