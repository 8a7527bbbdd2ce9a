"""Client assertions for app credentials with no secret: the token-exchange audience of each cloud, and
JWTs signed by a key that never leaves Key Vault, reused per tenant within their lifetime.

A federated credential's assertion is a token someone else issued (the broker's managed identity's, or
a projected service-account token); a Key Vault-signed one is assembled here and signed elsewhere.
``SignedAssertions`` builds the JWT Entra expects of a certificate credential (header ``alg: PS256``,
``x5t#S256``; claims ``aud`` = the tenant's token endpoint, ``iss`` = ``sub`` = the client id,
``jti``, ``nbf``, ``exp`` ten minutes on), and because ``aud`` names the tenant, one signature per
tenant. Key Vault allows about 4,000 RSA operations per 10 s per vault and the broker serves thousands
of tenants, so an assertion is reused until shortly before it expires, and concurrent requests for the
same tenant wait on one signature (single-flight): a cold herd over N tenants costs N signatures, not
one per request.

No SDK and no I/O here: the certificate and the signer are handed in (``vault.py`` adapts Key Vault's),
so this module decides only what is signed and when. Nothing it logs or returns names a whole assertion.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Protocol
from urllib.parse import urlsplit

from broker.tokens import decode_claims

#: The audience of a token presented under a federated identity credential, by cloud (the identity
#: platform's host): public cloud, US Government, China (21Vianet).
EXCHANGE_AUDIENCES: Final[Mapping[str, str]] = {
    "login.microsoftonline.us": "api://AzureADTokenExchangeUSGov",
    "login.chinacloudapi.cn": "api://AzureADTokenExchangeChina",
    "login.partner.microsoftonline.cn": "api://AzureADTokenExchangeChina",
}
PUBLIC_EXCHANGE_AUDIENCE: Final = "api://AzureADTokenExchange"

ASSERTION_LIFETIME_SECONDS: Final = 600
# Reused while at least this much of its life is left: Entra must still find it valid when the
# request (retries and clock skew included) reaches it.
REUSE_MARGIN_SECONDS: Final = 120
# Entries are per tenant; beyond this the least recently used are dropped (a replica's memory must not
# grow with the number of tenants ever asked for).
MAX_CACHED_ASSERTIONS: Final = 20_000


def exchange_audience(authority_host: str) -> str:
    """The token-exchange audience for the cloud ``authority_host`` belongs to."""
    host = (urlsplit(authority_host).hostname or "").lower()
    return EXCHANGE_AUDIENCES.get(host, PUBLIC_EXCHANGE_AUDIENCE)


def presented_claims(assertion: str) -> dict[str, Any]:
    """What an operator compares with the app's federated credential or certificate: the assertion's
    issuer, subject, audience and expiry (never the token itself)."""
    claims = decode_claims(assertion)
    return {name: claims[name] for name in ("iss", "sub", "aud", "exp") if name in claims}


class AssertionSource(Protocol):
    """An app credential presented as a client assertion (MSAL's ``client_assertion`` callable is a
    bridge to this)."""

    async def assertion(self, token_endpoint: str) -> str:
        """The assertion to present at ``token_endpoint`` (a tenant's), valid now."""
        ...

    def presented(self, token_endpoint: str) -> dict[str, Any]:
        """The claims of the last assertion handed out for ``token_endpoint`` (``{}`` if none)."""
        ...


@dataclass(frozen=True, slots=True)
class SigningCertificate:
    """The public side of a Key Vault certificate: the key that signs, and the thumbprint Entra looks
    the registered certificate up by."""

    key_id: str  # the Key Vault key identifier, with its version
    sha256_thumbprint: bytes  # SHA-256 of the certificate's DER


#: Signs a SHA-256 digest with PS256 using the key ``key_id``; returns the signature.
Signer = Callable[[str, bytes], Awaitable[bytes]]


@dataclass(frozen=True, slots=True)
class _Signed:
    assertion: str
    expires_at: float
    thumbprint: bytes


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class SignedAssertions:
    """Client assertions signed by a Key Vault key, one per token endpoint, reused within their life.

    ``certificate()`` is asked on every call (cheap when loaded; it is how a rotated certificate is
    noticed): an assertion naming another certificate than the current one is signed anew.
    """

    def __init__(
        self,
        client_id: str,
        certificate: Callable[[], Awaitable[SigningCertificate]],
        sign: Signer,
        *,
        lifetime_seconds: float = ASSERTION_LIFETIME_SECONDS,
        reuse_margin_seconds: float = REUSE_MARGIN_SECONDS,
        max_entries: int = MAX_CACHED_ASSERTIONS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._client_id = client_id
        self._certificate = certificate
        self._sign = sign
        self._lifetime_seconds = lifetime_seconds
        self._reuse_margin_seconds = reuse_margin_seconds
        self._max_entries = max_entries
        self._clock = clock
        self._signed: OrderedDict[str, _Signed] = OrderedDict()
        self._flights: dict[str, asyncio.Future[str]] = {}

    async def assertion(self, token_endpoint: str) -> str:
        """A valid assertion for ``token_endpoint``: the reused one, the one being signed, or a new one."""
        current = await self._certificate()
        found = self._signed.get(token_endpoint)
        if (
            found is not None
            and found.thumbprint == current.sha256_thumbprint
            and found.expires_at - self._clock() > self._reuse_margin_seconds
        ):
            self._signed.move_to_end(token_endpoint)
            return found.assertion
        flight = self._flights.get(token_endpoint)
        if flight is None:
            flight = asyncio.ensure_future(self._make(token_endpoint, current))
            self._flights[token_endpoint] = flight
            flight.add_done_callback(lambda _: self._flights.pop(token_endpoint, None))
        # shield: a caller that gives up (timeout, disconnect) must not cancel the signature others
        # are waiting for.
        return await asyncio.shield(flight)

    def presented(self, token_endpoint: str) -> dict[str, Any]:
        found = self._signed.get(token_endpoint)
        return presented_claims(found.assertion) if found is not None else {}

    def forget(self) -> None:
        """Drop every reused assertion (Entra rejected one: the certificate may have changed)."""
        self._signed.clear()

    async def _make(self, token_endpoint: str, certificate: SigningCertificate) -> str:
        now = int(self._clock())
        expires_at = now + int(self._lifetime_seconds)
        header = {"alg": "PS256", "typ": "JWT", "x5t#S256": _b64url(certificate.sha256_thumbprint)}
        claims = {
            "aud": token_endpoint,
            "iss": self._client_id,
            "sub": self._client_id,
            "jti": str(uuid.uuid4()),
            "iat": now,
            "nbf": now,
            "exp": expires_at,
        }
        signing_input = ".".join(
            _b64url(json.dumps(part, separators=(",", ":")).encode()) for part in (header, claims)
        )
        signature = await self._sign(certificate.key_id, hashlib.sha256(signing_input.encode()).digest())
        assertion = f"{signing_input}.{_b64url(signature)}"
        self._signed[token_endpoint] = _Signed(assertion, expires_at, certificate.sha256_thumbprint)
        self._signed.move_to_end(token_endpoint)
        while len(self._signed) > self._max_entries:
            self._signed.popitem(last=False)
        return assertion
