"""App credentials and the cache key, loaded from their sources and held in memory.

Sources: Key Vault secret or certificate (async SDK clients, authenticated by azure-identity), an
environment variable, or a mounted file. Decided failure mode: once a value is loaded, a Key Vault
outage never takes it away (we keep serving with it and count the failure); a value that was never
loaded is a 502. A forced reload (on Entra's ``invalid_client``) and a periodic one pick up rotation.
Values never leave this module except as ``AppCredential``s, whose ``repr`` hides them.

App credentials with no secret are client assertions (``AppCredential.assertion``):

* ``{federated: managed_identity}``: the broker's own azure-identity credential's token for the
  token-exchange audience of its cloud, refreshed before it expires;
* ``{federated: {token_file: PATH}}``: a projected token, re-read whenever the file changes (kubelet
  rotates it by replacing the file);
* ``{key_vault_key: {certificate: NAME}}``: the certificate's public part from Key Vault and
  ``assertions.SignedAssertions`` signing with its key through ``keys/sign``. Key Vault's throttling
  (429 + Retry-After) is waited out within ``upstream_retry_seconds``, once for every tenant waiting
  (a vault that says "wait" is not asked again before then), then answered 503 with that wait.

A federated token that has expired is never kept as "the last value that worked": Entra would refuse it.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import functools
import hashlib
import logging
import random
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

from azure.core.exceptions import AzureError, HttpResponseError, ResourceNotFoundError
from azure.identity.aio import (
    DefaultAzureCredential,
    EnvironmentCredential,
    ManagedIdentityCredential,
    WorkloadIdentityCredential,
)
from azure.keyvault.certificates.aio import CertificateClient
from azure.keyvault.keys.crypto import SignatureAlgorithm
from azure.keyvault.keys.crypto.aio import CryptographyClient
from azure.keyvault.secrets.aio import SecretClient
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs12

from broker.assertions import (
    AssertionSource,
    SignedAssertions,
    SigningCertificate,
    exchange_audience,
    presented_claims,
)
from broker.config import CredentialSource, Settings, managed_identity_client_id, read_env_secret
from broker.errors import CredentialLoadError, TemporarilyUnavailableError
from broker.tokens import decode_claims, fingerprint

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
# Key Vault signs; a 429/5xx is answered here (with its Retry-After), not by azure-core, whose retries
# would wait however long the vault says, past the request's budget.
_SIGN_TRANSPORT = {**_KEY_VAULT_TRANSPORT, "retry_status": 0}
_SIGN_BACKOFF_SECONDS = 0.25
_SIGN_BACKOFF_CAP_SECONDS = 4.0
# An exchange token is replaced this long before it expires (Entra must still accept it on arrival).
_EXCHANGE_REFRESH_MARGIN_SECONDS = 300


@dataclass(frozen=True, slots=True)
class AppCredential:
    """A client secret, a certificate's private key and public certificate (PEM), or a source of
    client assertions (no secret: federated or Key Vault-signed)."""

    client_secret: str | None = field(default=None, repr=False)
    private_key_pem: str | None = field(default=None, repr=False)
    certificate_pem: str | None = field(default=None, repr=False)
    fingerprint: str = ""
    assertion: AssertionSource | None = field(default=None, repr=False, compare=False)
    source: str = ""  # CredentialSource.describe(): safe for logs

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
    expires_on: float | None = None  # a federated token's exp
    stamp: tuple[int, int, int] | None = None  # a token file's (inode, size, mtime) when it was read
    certificate: SigningCertificate | None = None  # a key_vault_key source's public side

    def expired(self) -> bool:
        return self.expires_on is not None and self.expires_on <= time.time()


class _FederatedAssertion:
    """A federated source as the app's assertion source: the same token for every tenant."""

    def __init__(self, token: Callable[[], Awaitable[str]], last: Callable[[], str | None]) -> None:
        self._token = token
        self._last = last

    async def assertion(self, token_endpoint: str) -> str:  # noqa: ARG002 - one token serves every tenant
        return await self._token()

    def presented(self, token_endpoint: str) -> dict[str, Any]:  # noqa: ARG002 - same
        last = self._last()
        return presented_claims(last) if last is not None else {}


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
        self._certificates: CertificateClient | None = None
        self._crypto: dict[str, CryptographyClient] = {}
        self._transport: dict[str, Any] = {}
        self._signed: dict[str, SignedAssertions] = {}
        # Key Vault said "retry after": no signature is asked for before then (monotonic time).
        self._sign_not_before = 0.0
        self._fetched_at: dict[CredentialSource, float] = {}
        self.last_error: str | None = None
        # Apps whose credential Entra refused even after a reload: app -> AADSTS code (for /readyz).
        self.rejected: dict[str, str] = {}

    async def __aenter__(self) -> Self:
        # The credential and the clients have separate pipelines: each needs the CA bundle.
        transport: dict[str, Any] = {}
        if self._ca_bundle:
            transport["connection_verify"] = self._ca_bundle
        self._transport = transport
        sources = [app.credential for app in self._settings.apps.values()]
        needs_identity = any(s.federated is not None and s.federated.managed_identity for s in sources)
        if self._settings.key_vault_url or needs_identity:
            self._azure_credential = _build_azure_credential(self._settings.azure_credential, transport)
        if self._settings.key_vault_url and self._azure_credential is not None:
            self._client = SecretClient(
                self._settings.key_vault_url,
                self._azure_credential,
                verify_challenge_resource=self._settings.key_vault_verify_challenge_resource,
                **transport,
                **_KEY_VAULT_TRANSPORT,
            )
            if any(s.key_vault_key is not None for s in sources):
                self._certificates = CertificateClient(
                    self._settings.key_vault_url,
                    self._azure_credential,
                    verify_challenge_resource=self._settings.key_vault_verify_challenge_resource,
                    **transport,
                    **_KEY_VAULT_TRANSPORT,
                )
        for name, app in self._settings.apps.items():
            source = app.credential
            if source.key_vault_key is not None:
                self._signed[name] = SignedAssertions(
                    app.client_id, functools.partial(self._signing_certificate, source), self._sign
                )
        return self

    async def __aexit__(self, *exc: object) -> None:
        for crypto in self._crypto.values():
            await crypto.close()
        if self._certificates is not None:
            await self._certificates.close()
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
        if source.is_assertion:
            # The MSAL client keeps one assertion callable for its life: its label stays the same
            # while the assertions it hands out change.
            label = fingerprint(source.describe())
            signed = self._signed.get(app)
            if signed is not None:
                if force:
                    signed.forget()
                return AppCredential(assertion=signed, fingerprint=label, source=source.describe())
            federated = _FederatedAssertion(
                functools.partial(self._federated_token, source), functools.partial(self._last_value, source)
            )
            return AppCredential(assertion=federated, fingerprint=label, source=source.describe())
        if source.kind == "certificate":
            certificate = _certificate_from_secret(loaded.value, loaded.content_type)
            return dataclasses.replace(certificate, source=source.describe())
        return AppCredential(
            client_secret=loaded.value, fingerprint=fingerprint(loaded.value), source=source.describe()
        )

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
        if loaded is not None and not force and not await self._stale(source, loaded):
            return loaded
        lock = self._locks.setdefault(source, asyncio.Lock())
        async with lock:
            current = self._loaded.get(source)
            if current is not None and current is not loaded:
                return current  # someone reloaded while we waited: one fetch serves both
            if (
                force
                and current is not None
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
                if current is not None and not current.expired():
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

    async def _stale(self, source: CredentialSource, loaded: _Loaded) -> bool:
        """A loaded federated token that must be read again: its file changed, or it is about to expire."""
        if source.federated is None:
            return False
        if source.federated.token_file is not None:
            try:
                stamp = await asyncio.to_thread(_file_stamp, source.federated.token_file)
            except OSError:
                return True  # let the fetch say what is wrong (and keep the token while it is valid)
            return stamp != loaded.stamp
        return (
            loaded.expires_on is not None
            and loaded.expires_on - time.time() < _EXCHANGE_REFRESH_MARGIN_SECONDS
        )

    async def _fetch(self, source: CredentialSource) -> _Loaded:
        if source.federated is not None:
            if source.federated.token_file is not None:
                return await self._read_token_file(source.federated.token_file)
            return await self._fetch_exchange_token()
        if source.key_vault_key is not None:
            return await self._fetch_signing_certificate(source.key_vault_key.certificate)
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

    # --- credentials with no secret -----------------------------------------------------------

    async def _read_token_file(self, path: Path) -> _Loaded:
        """A projected token: read with its file's stamp, so a rotation (a new file) is noticed."""
        try:
            stamp = await asyncio.to_thread(_file_stamp, path)
            text = await asyncio.to_thread(path.read_text, encoding="utf-8")
        except OSError as exc:
            raise CredentialLoadError(
                f"cannot read the federated token file {path}: {exc.strerror}"
            ) from None
        token = text.strip()
        if not token:
            raise CredentialLoadError(f"the federated token file {path} is empty")
        exp = decode_claims(token).get("exp")
        expires_on = float(exp) if isinstance(exp, int | float) else None
        if expires_on is not None and expires_on <= time.time():
            # Not refused here: Entra is the judge, and says so with AADSTS700024.
            log.warning(
                "the federated token file holds an expired token: is its issuer (kubelet) rotating it?",
                extra={"path": str(path), "expired_at": int(expires_on)},
            )
        return _Loaded(token, expires_on=expires_on, stamp=stamp)

    async def _fetch_exchange_token(self) -> _Loaded:
        """The broker's own identity's token for the token-exchange audience of its cloud."""
        if self._azure_credential is None:
            raise CredentialLoadError("the broker has no Azure identity to federate")
        audience = exchange_audience(self._settings.authority_host)
        try:
            token = await self._azure_credential.get_token(f"{audience}/.default")
        except AzureError as exc:
            # The message can quote a response body: keep the class name only.
            raise CredentialLoadError(
                f"the broker's Azure identity ({self._settings.azure_credential}) could not get a token "
                f"for {audience} ({type(exc).__name__})"
            ) from exc
        return _Loaded(token.token, expires_on=float(token.expires_on))

    async def _fetch_signing_certificate(self, name: str) -> _Loaded:
        """The Key Vault certificate's public part: which key signs, and its SHA-256 thumbprint."""
        if self._certificates is None:
            raise CredentialLoadError("key_vault_url is not configured")
        try:
            certificate = await self._certificates.get_certificate(name)
        except ResourceNotFoundError as exc:
            self._metrics.keyvault_requests.labels(outcome="not_found").inc()
            raise CredentialLoadError(f"Key Vault has no certificate {name!r}") from exc
        except AzureError as exc:
            self._metrics.keyvault_requests.labels(outcome="error").inc()
            raise CredentialLoadError(
                f"Key Vault request for certificate {name!r} failed ({type(exc).__name__})"
            ) from exc
        self._metrics.keyvault_requests.labels(outcome="ok").inc()
        if not certificate.cer or not certificate.key_id:
            raise CredentialLoadError(f"Key Vault certificate {name!r} has no enabled version")
        if certificate.policy is not None and certificate.policy.exportable:
            log.warning(
                "the signing certificate's key is exportable: anyone allowed to read its secret can "
                "copy the private key; create it with an exportable=false policy",
                extra={"certificate": name},
            )
        thumbprint = hashlib.sha256(certificate.cer).digest()
        signing = SigningCertificate(certificate.key_id, thumbprint)
        return _Loaded(thumbprint.hex(), certificate=signing)

    async def _federated_token(self, source: CredentialSource) -> str:
        return (await self._get(source)).value

    def _last_value(self, source: CredentialSource) -> str | None:
        loaded = self._loaded.get(source)
        return loaded.value if loaded is not None else None

    async def _signing_certificate(self, source: CredentialSource) -> SigningCertificate:
        loaded = await self._get(source)
        if loaded.certificate is None:  # pragma: no cover - _fetch sets it for this kind of source
            raise CredentialLoadError(f"{source.describe()} holds no certificate")
        return loaded.certificate

    async def _sign(self, key_id: str, digest: bytes) -> bytes:
        """PS256 over ``digest`` with Key Vault key ``key_id``; throttling waited out within budget."""
        crypto = self._crypto.get(key_id)
        if crypto is None:
            if self._azure_credential is None:  # pragma: no cover - built whenever key_vault_url is set
                raise CredentialLoadError("key_vault_url is not configured")
            crypto = self._crypto[key_id] = CryptographyClient(
                key_id,
                self._azure_credential,
                verify_challenge_resource=self._settings.key_vault_verify_challenge_resource,
                **self._transport,
                **_SIGN_TRANSPORT,
            )
        deadline = time.monotonic() + self._settings.upstream_retry_seconds
        attempt = 0
        while True:
            wait = self._sign_not_before - time.monotonic()
            if wait > 0:
                if time.monotonic() + wait > deadline:
                    raise TemporarilyUnavailableError(
                        "Key Vault is throttling signatures; retry later", retry_after=wait, hinted=True
                    )
                await asyncio.sleep(wait)
            try:
                result = await crypto.sign(SignatureAlgorithm.ps256, digest)
            except HttpResponseError as exc:
                status = exc.status_code or 0
                if status != 429 and status < 500:
                    self._metrics.keyvault_requests.labels(outcome="error").inc()
                    raise CredentialLoadError(
                        f"Key Vault refused to sign with {_key_name(key_id)!r} (HTTP {status}): does the "
                        "broker's identity hold the Key Vault Crypto User role on the vault?"
                    ) from exc
                hinted = _retry_after_seconds(exc)
                backoff = min(_SIGN_BACKOFF_CAP_SECONDS, _SIGN_BACKOFF_SECONDS * 2**attempt)
                wait = hinted if hinted is not None else backoff * (0.5 + random.random() / 2)  # noqa: S311
                attempt += 1
                self._metrics.keyvault_requests.labels(
                    outcome="throttled" if status == 429 else "error"
                ).inc()
                log.warning(
                    "key vault could not sign now; retrying",
                    extra={"status": status, "retry_after": wait, "hinted": hinted is not None},
                )
                if hinted is not None:
                    self._sign_not_before = max(self._sign_not_before, time.monotonic() + hinted)
                if time.monotonic() + wait > deadline:
                    raise TemporarilyUnavailableError(
                        f"Key Vault answered HTTP {status} to a signature; retry later",
                        retry_after=wait,
                        hinted=hinted is not None,
                    ) from None
                if hinted is None:
                    await asyncio.sleep(wait)
                continue
            except AzureError as exc:
                self._metrics.keyvault_requests.labels(outcome="error").inc()
                raise TemporarilyUnavailableError(
                    f"Key Vault could not be reached to sign ({type(exc).__name__})", retry_after=5
                ) from exc
            self._metrics.keyvault_requests.labels(outcome="ok").inc()
            return result.signature


def _file_stamp(path: Path) -> tuple[int, int, int]:
    """What changes when a file is replaced or rewritten (kubelet swaps a symlink; editors rewrite)."""
    info = path.stat()
    return info.st_ino, info.st_size, info.st_mtime_ns


def _key_name(key_id: str) -> str:
    """``https://vault/keys/NAME/VERSION`` -> ``NAME``."""
    parts = key_id.rstrip("/").split("/")
    return parts[-2] if len(parts) >= 2 else key_id


def _retry_after_seconds(exc: HttpResponseError) -> float | None:
    value = getattr(exc.response, "headers", {}).get("Retry-After")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


def _build_azure_credential(kind: str, transport: dict[str, Any]) -> AsyncTokenCredential:
    """The broker's own identity (to Key Vault, and the managed identity a federated app credential
    names); pinning one avoids DefaultAzureCredential's fall-through."""
    if kind == "workload_identity":
        return WorkloadIdentityCredential(**transport)
    if kind == "managed_identity":
        # A user-assigned identity (AZURE_CLIENT_ID) is the one a federated credential can name.
        return ManagedIdentityCredential(client_id=managed_identity_client_id(), **transport)
    if kind == "environment":
        return EnvironmentCredential(**transport)
    return DefaultAzureCredential(**transport)
