"""App credentials and the cache key, loaded from their sources and held in memory.

Sources: Key Vault secret or certificate (async SDK clients, authenticated by azure-identity), an
environment variable, or a mounted file. Decided failure mode: once a value is loaded, a Key Vault
outage never takes it away (we keep serving with it and count the failure); a value that was never
loaded is a 502. A forced reload (on Entra's ``invalid_client``) and a periodic one pick up rotation.
Values never leave this module except as ``AppCredential``s, whose ``repr`` hides them.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import re
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Self

from azure.core.exceptions import AzureError, ResourceNotFoundError
from azure.identity.aio import (
    DefaultAzureCredential,
    EnvironmentCredential,
    ManagedIdentityCredential,
    WorkloadIdentityCredential,
)
from azure.keyvault.secrets.aio import SecretClient
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs12

from broker.config import CredentialSource, Settings, read_env_secret
from broker.errors import CredentialLoadError
from broker.tokens import fingerprint

if TYPE_CHECKING:
    from azure.core.credentials_async import AsyncTokenCredential

    from broker.metrics import Metrics

log = logging.getLogger(__name__)

# Key Vault calls are bounded: a hung vault must not hold a request (or a reload) for minutes.
_KEY_VAULT_TRANSPORT = {
    "retry_total": 2,
    "retry_backoff_factor": 0.3,
    "retry_backoff_max": 2,
    "connection_timeout": 5,
    "read_timeout": 10,
}
_PEM_BLOCK = re.compile(r"-----BEGIN ([A-Z0-9 ]+)-----[^-]+-----END \1-----", re.DOTALL)


@dataclass(frozen=True, slots=True)
class AppCredential:
    """A client secret, or a certificate's private key and public certificate (PEM)."""

    client_secret: str | None = field(default=None, repr=False)
    private_key_pem: str | None = field(default=None, repr=False)
    certificate_pem: str | None = field(default=None, repr=False)
    fingerprint: str = ""

    @property
    def is_certificate(self) -> bool:
        return self.private_key_pem is not None


def _certificate_from_secret(value: str, content_type: str | None) -> AppCredential:
    """Key Vault exposes a certificate's private key as a secret: PEM or base64 PKCS#12."""
    if content_type == "application/x-pkcs12" or "-----BEGIN" not in value:
        try:
            key, cert, _ = pkcs12.load_key_and_certificates(base64.b64decode(value), None)
        except ValueError as exc:
            raise CredentialLoadError("certificate credential is not a valid PKCS#12 bundle") from exc
        if key is None or cert is None:
            raise CredentialLoadError("certificate credential lacks a private key or certificate")
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode()
        cert_pem = cert.public_bytes(serialization.Encoding.PEM).decode()
    else:
        blocks = {m.group(1): m.group(0) for m in reversed(list(_PEM_BLOCK.finditer(value)))}
        key_pem = next((b for kind, b in blocks.items() if kind.endswith("PRIVATE KEY")), "")
        cert_pem = blocks.get("CERTIFICATE", "")
        if not key_pem or not cert_pem:
            raise CredentialLoadError("certificate credential lacks a private key or certificate")
    return AppCredential(private_key_pem=key_pem, certificate_pem=cert_pem, fingerprint=fingerprint(cert_pem))


@dataclass(slots=True)
class _Loaded:
    value: str = field(repr=False)
    content_type: str | None = None


class CredentialStore:
    """Loads credential sources once, keeps them in memory, reloads on demand and on a schedule."""

    def __init__(self, settings: Settings, metrics: Metrics, ca_bundle: str | None) -> None:
        self._settings = settings
        self._metrics = metrics
        self._ca_bundle = ca_bundle
        self._loaded: dict[CredentialSource, _Loaded] = {}
        self._locks: dict[CredentialSource, asyncio.Lock] = {}
        self._azure_credential: AsyncTokenCredential | None = None
        self._client: SecretClient | None = None
        self._fetched_at: dict[CredentialSource, float] = {}
        self.last_error: str | None = None
        # Apps whose credential Entra refused even after a reload: app -> AADSTS code (for /readyz).
        self.rejected: dict[str, str] = {}

    async def __aenter__(self) -> Self:
        if self._settings.key_vault_url:
            # The credential and the client have separate pipelines: both need the CA bundle.
            transport: dict[str, Any] = {}
            if self._ca_bundle:
                transport["connection_verify"] = self._ca_bundle
            self._azure_credential = _build_azure_credential(self._settings.azure_credential, transport)
            self._client = SecretClient(
                self._settings.key_vault_url,
                self._azure_credential,
                verify_challenge_resource=self._settings.key_vault_verify_challenge_resource,
                **transport,
                **_KEY_VAULT_TRANSPORT,
            )
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._client is not None:
            await self._client.close()
        if self._azure_credential is not None:
            await self._azure_credential.close()

    def _sources(self) -> list[CredentialSource]:
        sources = [app.credential for app in self._settings.apps.values()]
        if self._settings.cache_encryption_key is not None:
            sources.append(self._settings.cache_encryption_key)
        if self._settings.consent_signing_key is not None:
            sources.append(self._settings.consent_signing_key)
        return sources

    async def load_all(self, *, force: bool = False) -> None:
        """Load (or reload) every configured source; used at start and by the periodic refresh."""
        for source in self._sources():
            await self._get(source, force=force)

    async def app_credential(self, app: str, *, force: bool = False) -> AppCredential:
        source = self._settings.apps[app].credential
        loaded = await self._get(source, force=force)
        if source.kind == "certificate":
            return _certificate_from_secret(loaded.value, loaded.content_type)
        return AppCredential(client_secret=loaded.value, fingerprint=fingerprint(loaded.value))

    async def cache_key_text(self) -> str | None:
        source = self._settings.cache_encryption_key
        return None if source is None else (await self._get(source)).value

    async def consent_signing_key_text(self) -> str | None:
        """The onboarding HMAC key's text (``None`` when onboarding is not configured)."""
        source = self._settings.consent_signing_key
        return None if source is None else (await self._get(source)).value

    def mark_rejected(self, app: str, aadsts: str) -> None:
        self.rejected[app] = aadsts

    def mark_accepted(self, app: str) -> None:
        self.rejected.pop(app, None)

    def is_loaded(self, app: str) -> bool:
        return self._settings.apps[app].credential in self._loaded

    async def _get(self, source: CredentialSource, *, force: bool = False) -> _Loaded:
        loaded = self._loaded.get(source)
        if loaded is not None and not force:
            return loaded
        lock = self._locks.setdefault(source, asyncio.Lock())
        async with lock:
            current = self._loaded.get(source)
            if current is not None and current is not loaded:
                return current  # someone reloaded while we waited: one fetch serves both
            if (
                current is not None
                and time.monotonic() - self._fetched_at.get(source, 0)
                < self._settings.credential_min_reload_seconds
            ):
                # A bad secret makes every cold request ask for a reload; Key Vault is read at most
                # once per interval for it (its limit is ~4,000 GETs per 10 s per vault).
                return current
            try:
                fresh = await self._fetch(source)
            except CredentialLoadError as exc:
                self.last_error = f"{source.describe()}: {exc.description}"
                if current is not None:
                    # Key Vault down or the value unreadable: keep what works rather than fail.
                    log.warning(
                        "credential reload failed, keeping the loaded value",
                        extra={"source": source.describe(), "reason": exc.description},
                    )
                    return current
                raise
            self.last_error = None
            self._fetched_at[source] = time.monotonic()
            if current is None or fingerprint(current.value) != fingerprint(fresh.value):
                log.info(
                    "credential loaded",
                    extra={"source": source.describe(), "fingerprint": fingerprint(fresh.value)},
                )
            self._loaded[source] = fresh
            return fresh

    async def _fetch(self, source: CredentialSource) -> _Loaded:
        if source.env is not None:
            value = read_env_secret(source.env)
            if not value:
                raise CredentialLoadError(f"environment variable {source.env} is not set")
            return _Loaded(value)
        if source.file is not None:
            path = source.file
            try:
                text = await asyncio.to_thread(path.read_text, encoding="utf-8")
            except OSError as exc:
                raise CredentialLoadError(f"cannot read {path}: {exc.strerror}") from None
            return _Loaded(text.strip())
        name = source.secret or source.certificate or ""
        return await self._fetch_key_vault(name)

    async def _fetch_key_vault(self, name: str) -> _Loaded:
        if self._client is None:
            raise CredentialLoadError("key_vault_url is not configured")
        try:
            secret = await self._client.get_secret(name)
        except ResourceNotFoundError as exc:
            self._metrics.keyvault_requests.labels(outcome="not_found").inc()
            raise CredentialLoadError(f"Key Vault has no enabled secret {name!r}") from exc
        except AzureError as exc:
            self._metrics.keyvault_requests.labels(outcome="error").inc()
            # The SDK's message can quote response bodies; keep only the class name.
            raise CredentialLoadError(
                f"Key Vault request for {name!r} failed ({type(exc).__name__})"
            ) from exc
        self._metrics.keyvault_requests.labels(outcome="ok").inc()
        if secret.value is None:
            raise CredentialLoadError(f"Key Vault secret {name!r} has no value")
        return _Loaded(secret.value, secret.properties.content_type)


def _build_azure_credential(kind: str, transport: dict[str, Any]) -> AsyncTokenCredential:
    """The broker's own identity to Key Vault; pinning one avoids DefaultAzureCredential's fall-through."""
    if kind == "workload_identity":
        return WorkloadIdentityCredential(**transport)
    if kind == "managed_identity":
        return ManagedIdentityCredential(**transport)
    if kind == "environment":
        return EnvironmentCredential(**transport)
    return DefaultAzureCredential(**transport)
