"""The service-account issuer's signing keys (JWKS): from its OIDC discovery, or a static file.

An adapter for ``callers.CallerRegistry``: it only fetches; when and how often is the registry's
decision. Fetch failures raise ``OSError``/``ValueError``, which the registry turns into a 401.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from typing import Any

import aiohttp

from broker.config import ServiceAccountAuthSettings

_TIMEOUT = aiohttp.ClientTimeout(total=10)


class JwksFetcher:
    """Fetches the JWKS named by ``{issuer}/.well-known/openid-configuration``, or reads a file."""

    def __init__(self, settings: ServiceAccountAuthSettings, ca_bundle: str | None) -> None:
        self._settings = settings
        self._ssl = ssl.create_default_context(cafile=ca_bundle) if ca_bundle else True
        self._session: aiohttp.ClientSession | None = None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def fetch(self) -> dict[str, Any]:
        if self._settings.jwks_file is not None:
            text = await asyncio.to_thread(self._settings.jwks_file.read_text, encoding="utf-8")
            return _object(json.loads(text))
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=_TIMEOUT)
        discovery_url = self._settings.issuer.rstrip("/") + "/.well-known/openid-configuration"
        try:
            discovery = _object(await self._get_json(discovery_url))
            return _object(await self._get_json(str(discovery["jwks_uri"])))
        except (aiohttp.ClientError, TimeoutError, KeyError) as exc:
            raise OSError(f"JWKS fetch failed: {type(exc).__name__}") from exc

    async def _get_json(self, url: str) -> Any:
        assert self._session is not None  # noqa: S101 - created by fetch()
        async with self._session.get(url, ssl=self._ssl) as response:
            response.raise_for_status()
            return await response.json(content_type=None)


def _object(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValueError("expected a JSON object")  # noqa: TRY004 - a malformed document, reported as such
    return value
