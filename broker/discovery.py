"""Which tenant a verified domain names: Entra's unauthenticated OIDC discovery document.

An adapter for ``tenants.TenantResolver``: ``GET {authority_host}/{domain}/v2.0/.well-known/
openid-configuration`` names the tenant GUID in ``token_endpoint`` (and ``issuer``). It only fetches
and translates; what is remembered, for how long and by whom is the resolver's decision. Every
failure is a ``BrokerError``: AADSTS90002 is ``UnknownTenantError`` (404), throttling, 5xx and an
unreachable Entra are ``TemporarilyUnavailableError`` (503), anything else ``UpstreamError`` (502).
Entra's error text is never echoed (it quotes the domain asked for, which is input).
"""

from __future__ import annotations

import json
import ssl
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from broker.config import GUID_RE
from broker.errors import (
    BrokerError,
    TemporarilyUnavailableError,
    ThrottledError,
    UnknownTenantError,
    UpstreamError,
)

MAX_DOCUMENT_BYTES = 64 * 1024
MAX_CONNECTIONS = 16
DEFAULT_RETRY_AFTER_SECONDS = 5
UNKNOWN_TENANT_CODE = 90002


class TenantDiscovery:
    """Asks Entra which tenant a domain belongs to; one aiohttp session, created on first use."""

    def __init__(self, authority_host: str, ca_bundle: str | None, timeout_seconds: float) -> None:
        self._authority_host = authority_host.rstrip("/")
        self._ssl = ssl.create_default_context(cafile=ca_bundle) if ca_bundle else True
        self._timeout = aiohttp.ClientTimeout(total=timeout_seconds)
        self._session: aiohttp.ClientSession | None = None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def tenant_id(self, domain: str) -> str:
        """The GUID of the tenant ``domain`` (a validated verified-domain name) belongs to."""
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=self._timeout, connector=aiohttp.TCPConnector(limit=MAX_CONNECTIONS)
            )
        url = f"{self._authority_host}/{domain}/v2.0/.well-known/openid-configuration"
        try:
            async with self._session.get(url, ssl=self._ssl, allow_redirects=False) as response:
                status = response.status
                retry_after = _retry_after(response.headers.get("Retry-After"))
                body = await response.content.read(MAX_DOCUMENT_BYTES)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise TemporarilyUnavailableError(
                f"cannot reach Entra ID to resolve domain {domain} ({type(exc).__name__})",
                retry_after=DEFAULT_RETRY_AFTER_SECONDS,
            ) from None
        document = _json_object(body)
        if status == 200:
            return _tenant_in(document, domain)
        raise _refusal(status, retry_after, document, domain)


def _tenant_in(document: dict[str, Any] | None, domain: str) -> str:
    """The GUID both ``token_endpoint`` and (when present) ``issuer`` name as their first path segment."""
    if document is None:
        raise UpstreamError(f"Entra ID's discovery document for {domain} is not JSON")
    named = {
        _first_segment(document.get(field)) for field in ("token_endpoint", "issuer") if field in document
    }
    named.discard(None)
    tenant = _first_segment(document.get("token_endpoint"))
    if tenant is None or named != {tenant}:
        raise UpstreamError(f"Entra ID's discovery document for {domain} names no single tenant")
    return tenant


def _first_segment(url: Any) -> str | None:
    if not isinstance(url, str):
        return None
    segment = urlsplit(url).path.strip("/").split("/", 1)[0]
    return segment.lower() if GUID_RE.fullmatch(segment) else None


def _refusal(
    status: int, retry_after: int | None, document: dict[str, Any] | None, domain: str
) -> BrokerError:
    codes = document.get("error_codes") if document is not None else None
    code = codes[0] if isinstance(codes, list) and codes and isinstance(codes[0], int) else None
    if code == UNKNOWN_TENANT_CODE:
        return UnknownTenantError(f"Entra ID does not know tenant {domain}", aadsts=f"AADSTS{code}")
    if status == 429 or status >= 500:
        cls = ThrottledError if status == 429 else TemporarilyUnavailableError
        return cls(
            f"Entra ID answered HTTP {status} resolving domain {domain}; retry later",
            retry_after=retry_after or DEFAULT_RETRY_AFTER_SECONDS,
            hinted=retry_after is not None,
        )
    return UpstreamError(
        f"Entra ID answered HTTP {status} resolving domain {domain}",
        aadsts=f"AADSTS{code}" if code is not None else None,
    )


def _json_object(body: bytes) -> dict[str, Any] | None:
    try:
        value = json.loads(body)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _retry_after(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        return max(1, int(float(value)))
    except ValueError:
        return None
