"""Settings: the frozen configuration model, YAML + ``BROKER_*`` environment loading, validation.

This is the only module that reads the process environment. Validation errors name the offending key
(``apps.defender.client_id: ...``) so an operator can fix the file without reading code, and one
``ConfigError`` lists every problem at once: field errors (with "did you mean" for misspelt keys),
checks across fields, and files the configuration names that do not exist. Messages never quote a value
that may hold a secret (a Redis URL's password). Secrets never live in the file: credentials are
*sources* (Key Vault secret or certificate, environment variable, mounted file; for an app, also a
federated token or a Key Vault key that signs assertions: no secret at all) resolved later by
``vault.py``.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import ssl
import types
import typing
import urllib.parse
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    FilePath,
    ValidationError,
    field_validator,
    model_validator,
)

from broker.errors import ConfigError

# Every pattern here is used with ``fullmatch``, never ``match`` + ``$``: ``$`` also matches before a final
# newline, so "contoso.onmicrosoft.com\n" would pass as a tenant (a second cache key, a forged log line).
GUID_RE = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
# A verified domain: labels of letters, digits and hyphens, at least one dot, no trailing dot.
DOMAIN_RE = re.compile(r"(?=.{4,253}\Z)([a-zA-Z0-9](?:[a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?\.)+[a-zA-Z]{2,63}")
SHA256_HEX_RE = re.compile(r"[0-9a-f]{64}")
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
HTTPS_URL_RE = re.compile(r"https://[^\s/?#]+(/[^\s?#]*)?")
ISSUER_URL_RE = re.compile(r"https?://[^\s/?#]+(/[^\s?#]*)?")

CONFIG_ENV = "BROKER_CONFIG"
LOCAL_MEMORY_MAX_ENTRIES = 2048
# Top-level scalar keys that a ``BROKER_<KEY>`` environment variable may override (so an image or a
# Helm chart can inject, say, a Redis URL holding a password from a Secret instead of the ConfigMap).
ENV_OVERRIDABLE = (
    "authority_host",
    "key_vault_url",
    "outbound_ca_file",
    "redis_url",
    "log_level",
    "azure_credential",
)
# Listener settings a ``BROKER_<SECTION>_<KEY>`` variable may override: a deployment decides where the
# broker listens (a Helm chart's probes and Service target 0.0.0.0:containerPort) even when the
# configuration file is the user's own, mounted from a Secret.
ENV_OVERRIDABLE_NESTED = (("listen", "host"), ("listen", "port"), ("metrics", "host"), ("metrics", "port"))


def is_tenant(value: str) -> bool:
    """True for a tenant GUID or a verified-domain name."""
    return bool(GUID_RE.fullmatch(value) or DOMAIN_RE.fullmatch(value))


def normalise_resource(value: str) -> str:
    """``https://api.security.microsoft.com/`` and ``.../.default`` both become the bare resource."""
    value = value.strip()
    value = value.removesuffix("/.default")
    return value.rstrip("/")


def _check_guid(value: str) -> str:
    if not GUID_RE.fullmatch(value):
        raise ValueError("must be a GUID such as 11111111-2222-3333-4444-555555555555")
    return value.lower()


def _check_https_url(value: str) -> str:
    if not HTTPS_URL_RE.fullmatch(value):
        raise ValueError("must be an https:// URL")
    return value.rstrip("/")


def _check_resource(value: str) -> str:
    resource = normalise_resource(value)
    _check_https_url(resource)
    return resource


def _check_public_url(value: str) -> str:
    """https, or plain http only on a loopback host (a laptop, a test): customers' browsers send
    consent responses here, which must never travel in the clear."""
    parts = urllib.parse.urlsplit(value)
    if parts.query or parts.fragment or not parts.hostname or "@" in parts.netloc:
        raise ValueError("must be a base URL such as https://broker.example.com (no query, fragment or user)")
    if parts.scheme == "http" and parts.hostname in ("127.0.0.1", "localhost", "::1"):
        return value.rstrip("/")
    if parts.scheme != "https":
        raise ValueError("must be an https:// URL (http only for 127.0.0.1, localhost or [::1])")
    return _check_https_url(value)


Guid = Annotated[str, AfterValidator(_check_guid)]
PublicUrl = Annotated[str, AfterValidator(_check_public_url)]
HttpsUrl = Annotated[str, AfterValidator(_check_https_url)]
Resource = Annotated[str, AfterValidator(_check_resource)]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class FederatedSource(_Frozen):
    """A federated app credential: ``managed_identity`` (the broker's own Azure identity's token for
    the token-exchange audience) or ``{token_file: PATH}`` (a projected token, re-read on rotation)."""

    managed_identity: bool = False
    token_file: Path | None = None

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        if value == "managed_identity":
            return {"managed_identity": True}
        if not isinstance(value, Mapping):
            # ValueError, not TypeError: pydantic reports only the former as a validation error.
            raise ValueError("must be managed_identity or {token_file: PATH}")  # noqa: TRY004
        return value

    @model_validator(mode="after")
    def _exactly_one(self) -> FederatedSource:
        if self.managed_identity == (self.token_file is not None):
            raise ValueError("must be managed_identity or {token_file: PATH}")
        return self


class KeyVaultKeySource(_Frozen):
    """A Key Vault certificate whose non-exportable key signs the app's client assertions."""

    certificate: str


class CredentialSource(_Frozen):
    """Where a credential comes from: exactly one of Key Vault secret/certificate, env var, file, or,
    for an app's credential only, a federated token or a Key Vault key that signs assertions."""

    secret: str | None = None
    certificate: str | None = None
    env: str | None = None
    file: Path | None = None
    federated: FederatedSource | None = None
    key_vault_key: KeyVaultKeySource | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> CredentialSource:
        kinds = ("secret", "certificate", "env", "file", "federated", "key_vault_key")
        given = [name for name in kinds if getattr(self, name)]
        if len(given) != 1:
            raise ValueError("give exactly one of " + ", ".join(kinds))
        return self

    @property
    def kind(self) -> Literal["secret", "certificate", "env", "file", "federated", "key_vault_key"]:
        if self.secret:
            return "secret"
        if self.certificate:
            return "certificate"
        if self.env:
            return "env"
        if self.federated:
            return "federated"
        if self.key_vault_key:
            return "key_vault_key"
        return "file"

    @property
    def uses_key_vault(self) -> bool:
        return self.kind in ("secret", "certificate", "key_vault_key")

    @property
    def is_assertion(self) -> bool:
        """An app credential presented as a client assertion: no secret or private key is loaded."""
        return self.kind in ("federated", "key_vault_key")

    def describe(self) -> str:
        """A label safe for logs: names the source, never its value."""
        if self.federated is not None:
            where = self.federated.token_file or "managed_identity"
            return f"federated:{'token_file:' if self.federated.token_file else ''}{where}"
        if self.key_vault_key is not None:
            return f"key_vault_key:{self.key_vault_key.certificate}"
        return f"{self.kind}:{self.secret or self.certificate or self.env or self.file}"


class ListenTlsSettings(_Frozen):
    """The API listener's own certificate (PEM chain, leaf first) and unencrypted PEM key: HTTPS is
    what MSAL and azure-identity require of an authority. Re-read when the files change (``tls.py``)."""

    cert_file: FilePath
    key_file: FilePath

    @model_validator(mode="after")
    def _loadable(self) -> ListenTlsSettings:
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(self.cert_file, self.key_file)
        except (ssl.SSLError, OSError) as exc:
            # OpenSSL's reason ("KEY_VALUES_MISMATCH", "NO_START_LINE"), never the files' contents.
            raise ValueError(f"cannot load the certificate and key: {exc.strerror or exc}") from None
        return self


class ListenSettings(_Frozen):
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    tls: ListenTlsSettings | None = None


class MetricsSettings(_Frozen):
    host: str = "127.0.0.1"
    port: int = Field(default=9090, ge=0, le=65535)


RoleName = Annotated[str, Field(min_length=1, max_length=256)]


class AppSettings(_Frozen):
    client_id: Guid
    credential: CredentialSource
    resources: list[Resource] = Field(min_length=1)
    # The app roles the product needs, per resource, in every tenant. Entra gives no error when a
    # customer removes a role (the token just lacks it): the registry compares each token's roles with
    # these and marks the tenant ``missing_roles``.
    required_roles: dict[Resource, list[RoleName]] = {}


SERVICE_ACCOUNT_RE = re.compile(
    r"system:serviceaccount:[a-z0-9]([-a-z0-9]*[a-z0-9])?:[a-z0-9]([-.a-z0-9]*[a-z0-9])?"
)


class ServiceAccountAuthSettings(_Frozen):
    """Callers proving who they are with a Kubernetes projected service-account token."""

    issuer: str  # the cluster's OIDC issuer: its discovery document names the JWKS
    audience: str = "token-broker"
    jwks_file: Path | None = None  # a static JWKS instead of discovery (re-read on an unknown kid)
    leeway_seconds: float = Field(default=30.0, ge=0, le=300)
    jwks_refresh_min_seconds: float = Field(default=30.0, ge=0, le=3600)
    algorithms: list[Literal["RS256", "RS384", "RS512", "ES256", "ES384", "PS256"]] = ["RS256", "ES256"]
    verified_cache_max: int = Field(default=10_000, ge=1)

    @field_validator("issuer")
    @classmethod
    def _issuer(cls, value: str) -> str:
        if not ISSUER_URL_RE.fullmatch(value):
            raise ValueError("must be the issuer URL (https:// in production)")
        return value


class CallerSettings(_Frozen):
    api_key_sha256: str | None = None
    service_account: str | None = None  # system:serviceaccount:NAMESPACE:NAME
    tenants: list[str] = Field(min_length=1)
    apps: list[str] = Field(min_length=1)
    # Entra acquisitions this caller may cause per minute (a token bucket; cache hits never count):
    # one runaway or compromised caller cannot spend the shared app's Entra budget.
    max_acquisitions_per_minute: int = Field(default=120, ge=1, le=100_000)
    # May use the tenant admin API (/v1/tenants: registry, check, remove, invite).
    admin: bool = False

    @model_validator(mode="after")
    def _one_credential(self) -> CallerSettings:
        if (self.api_key_sha256 is None) == (self.service_account is None):
            raise ValueError("give exactly one of api_key_sha256, service_account")
        return self

    @field_validator("service_account")
    @classmethod
    def _service_account(cls, value: str | None) -> str | None:
        if value is not None and not SERVICE_ACCOUNT_RE.fullmatch(value):
            raise ValueError("must be system:serviceaccount:NAMESPACE:NAME")
        return value

    @field_validator("api_key_sha256")
    @classmethod
    def _hex(cls, value: str | None) -> str | None:
        if value is None:
            return None
        value = value.lower()
        if not SHA256_HEX_RE.fullmatch(value):
            raise ValueError("must be 64 hex characters (token-broker hash-key prints one)")
        return value

    @field_validator("tenants")
    @classmethod
    def _tenants(cls, value: list[str]) -> list[str]:
        bad = [repr(tenant) for tenant in value if tenant != "*" and not is_tenant(tenant)]
        if bad:
            raise ValueError(f"{', '.join(bad)}: neither '*', a tenant GUID nor a domain")
        return [tenant.lower() for tenant in value]


class Settings(_Frozen):
    """The whole broker configuration, validated once at start.

    Build it with ``parse_settings``/``load_settings``: the checks across fields and of the files the
    configuration names live there, so that they are reported together with every field error.
    """

    listen: ListenSettings = ListenSettings()
    metrics: MetricsSettings = MetricsSettings()
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    authority_host: HttpsUrl = "https://login.microsoftonline.com"
    key_vault_url: HttpsUrl | None = None
    key_vault_verify_challenge_resource: bool = True
    azure_credential: Literal["default", "workload_identity", "managed_identity", "environment"] = "default"
    outbound_ca_file: Path | None = None
    redis_url: str | None = None
    # How the broker reaches Redis (README "Redis"): one server (or a proxy such as Azure Cache for
    # Redis), a Redis Cluster (every node's slots), or a master found through Sentinel (failovers
    # followed). In sentinel mode the URL gives the scheme, database and credentials; the sentinels
    # name the master, so the URL's host and port are not used.
    redis_mode: Literal["standalone", "cluster", "sentinel"] = "standalone"
    redis_sentinels: list[str] = []  # host:port of each sentinel
    redis_sentinel_service: str | None = None  # the master's name the sentinels monitor
    # password: the URL's or redis_password (an ACL user with redis_username); entra: a token for
    # https://redis.azure.com/.default from the broker's own Azure identity (azure_credential).
    redis_auth: Literal["password", "entra"] = "password"
    redis_username: str | None = None  # ACL user; with entra, the identity's object id (default: oid)
    redis_password: CredentialSource | None = None  # env or file: read at every new connection
    redis_ca_file: Path | None = None  # CA that signed the server's certificate (rediss:// only)
    redis_client_cert_file: Path | None = None  # mTLS: the broker's certificate ...
    redis_client_key_file: Path | None = None  # ... and its private key (PEM)
    cache_encryption_key: CredentialSource | None = None
    apps: dict[str, AppSettings] = Field(min_length=1)
    callers: dict[str, CallerSettings] = Field(min_length=1)
    service_account_auth: ServiceAccountAuthSettings | None = None
    # Onboarding (admin consent): where customers' browsers reach the broker's /consent/ pages, the
    # HMAC key signing invites and consent `state`, and how long an invite stays valid.
    public_base_url: PublicUrl | None = None
    consent_signing_key: CredentialSource | None = None
    invite_ttl_seconds: int = Field(default=7 * 24 * 3600, ge=300, le=90 * 24 * 3600)
    # How long a consent callback keeps re-trying the proof token while Entra propagates the new
    # service principal (AADSTS700016/7000229 right after consent), before it says "not yet".
    consent_propagation_seconds: float = Field(default=60.0, ge=0, le=300)

    # Tuning; the defaults suit a few thousand tenants per replica.
    msal_max_workers: int = Field(default=8, ge=1, le=64)
    msal_clients_max: int = Field(default=2048, ge=1)
    l1_max_tokens: int = Field(default=100_000, ge=1)
    upstream_timeout_seconds: float = Field(default=10.0, gt=0, le=120)
    # Retries of throttled or failed Entra calls (exponential backoff, full jitter, Retry-After
    # honoured) stop when the next wait would end after this many seconds: the caller then gets 503.
    upstream_retry_seconds: float = Field(default=8.0, ge=0, le=60)
    redis_timeout_seconds: float = Field(default=0.5, gt=0, le=30)  # one command (the read)
    # Opening a connection: TCP, the TLS handshake and AUTH (a TLS handshake to a cloud cache over a
    # loaded network can take longer than a command should).
    redis_connect_timeout_seconds: float = Field(default=2.0, gt=0, le=60)
    redis_max_connections: int = Field(default=64, ge=2, le=10_000)  # per replica
    negative_cache_seconds: float = Field(default=30.0, ge=0, le=3600)
    credential_refresh_seconds: float = Field(default=3600.0, ge=1)
    # A rejected credential triggers a reload at most this often (Key Vault allows ~4,000 GETs/10 s).
    credential_min_reload_seconds: float = Field(default=5.0, ge=0, le=3600)
    max_body_bytes: int = Field(default=4096, ge=256, le=1_048_576)
    drain_seconds: float = Field(default=10.0, ge=0, le=300)
    # Connections: an idle connection, or one whose request headers have not all arrived, is closed
    # after keepalive_seconds; a body must arrive within body_timeout_seconds (else 408); beyond
    # max_connections open connections a new one is answered 503 and closed.
    keepalive_seconds: float = Field(default=15.0, gt=0, le=3600)
    body_timeout_seconds: float = Field(default=10.0, gt=0, le=300)
    max_connections: int = Field(default=4096, ge=1, le=1_000_000)
    # How long one replica may hold a key's acquisition lease before another takes over (a crashed
    # holder blocks the key this long at most).
    # Default: upstream_retry_seconds + 2 x upstream_timeout_seconds + 5.
    lease_seconds: float | None = Field(default=None, gt=0, le=600)
    # Tenants: a verified domain's GUID (from Entra's discovery document) is remembered this long,
    # shared through Redis. The registry's re-validation sweep re-acquires each (tenant, app, resource)
    # whose last check is older than tenant_check_interval_seconds, at most tenant_check_rate Entra
    # requests per second for the whole cluster (one replica sweeps at a time).
    tenant_domain_ttl_seconds: float = Field(default=86400.0, ge=60, le=30 * 86400)
    tenant_check_interval_seconds: float = Field(default=21600.0, ge=1, le=30 * 86400)
    tenant_check_rate: float = Field(default=1.0, gt=0, le=100)

    @field_validator("redis_url")
    @classmethod
    def _redis(cls, value: str | None) -> str | None:
        problem = None if value is None else redis_url_problem(value)
        if problem is not None:
            raise ValueError(problem)
        return value

    @field_validator("redis_sentinels")
    @classmethod
    def _sentinels(cls, value: list[str]) -> list[str]:
        bad = [repr(address) for address in value if _host_port(address) is None]
        if bad:
            raise ValueError(f"{', '.join(bad)}: not host:port")
        return value

    @field_validator("redis_password")
    @classmethod
    def _redis_password(cls, value: CredentialSource | None) -> CredentialSource | None:
        if value is not None and value.uses_key_vault:
            raise ValueError(
                "give {env: VAR} or {file: PATH} (a Key Vault secret can be mounted as a file by the "
                "Secrets Store CSI driver)"
            )
        return value

    @field_validator("apps", "callers")
    @classmethod
    def _names(cls, value: dict[str, Any]) -> dict[str, Any]:
        bad = [repr(name) for name in value if not NAME_RE.fullmatch(name)]
        if bad:
            raise ValueError(f"not a valid name: {', '.join(bad)} (letters, digits, _ . -)")
        return value

    # --- what each component needs, derived once (one owner per derived value) -------------------

    def flight_options(self) -> FlightOptions:
        return FlightOptions(
            # The lease must outlive the holder's whole acquisition, retries included.
            lease_seconds=self.lease_seconds
            or self.upstream_retry_seconds + self.upstream_timeout_seconds * 2 + 5,
            upstream_retry_seconds=self.upstream_retry_seconds,
            upstream_timeout_seconds=self.upstream_timeout_seconds,
            negative_cache_seconds=self.negative_cache_seconds,
            max_concurrent_acquisitions=self.msal_max_workers,
        )

    def cache_options(self) -> CacheOptions:
        return CacheOptions(
            l1_max_tokens=self.l1_max_tokens,
            # Remembered failures, throttles and single-use claims kept in process: they only spare
            # Entra repeats for a few seconds (the per-caller budget bounds the rest), so a flood of
            # distinct failing tenants must not grow a replica's memory with it.
            local_max_entries=LOCAL_MEMORY_MAX_ENTRIES,
            redis_max_concurrent_calls=self.redis_max_connections,
            redis_wait_seconds=max(2.0, self.redis_timeout_seconds * 4),
        )

    def redis_options(self) -> RedisOptions | None:
        if not self.redis_url:
            return None
        password = self.redis_password
        return RedisOptions(
            url=self.redis_url,
            timeout_seconds=self.redis_timeout_seconds,
            max_connections=self.redis_max_connections,
            pool_timeout_seconds=max(2.0, self.redis_timeout_seconds * 4),
            connect_timeout_seconds=self.redis_connect_timeout_seconds,
            mode=self.redis_mode,
            sentinels=tuple(address for a in self.redis_sentinels if (address := _host_port(a))),
            sentinel_service=self.redis_sentinel_service,
            entra=self.redis_auth == "entra",
            username=self.redis_username,
            password_env=password.env if password is not None else None,
            password_file=password.file if password is not None else None,
            ca_file=self.redis_ca_file,
            client_cert_file=self.redis_client_cert_file,
            client_key_file=self.redis_client_key_file,
        )

    def entra_options(self) -> EntraOptions:
        return EntraOptions(
            authority_host=self.authority_host,
            apps=dict(self.apps),
            max_workers=self.msal_max_workers,
            clients_max=self.msal_clients_max,
            timeout_seconds=self.upstream_timeout_seconds,
        )

    def onboarding_options(self) -> OnboardingOptions | None:
        """``onboarding``'s options, or ``None`` when onboarding is not configured."""
        if self.public_base_url is None:
            return None
        return OnboardingOptions(
            public_base_url=self.public_base_url,
            authority_host=self.authority_host,
            apps=dict(self.apps),
            invite_ttl_seconds=self.invite_ttl_seconds,
            propagation_seconds=self.consent_propagation_seconds,
        )

    def tenant_options(self) -> TenantOptions:
        return TenantOptions(
            authority_host=self.authority_host,
            domain_ttl_seconds=self.tenant_domain_ttl_seconds,
            unknown_domain_seconds=self.negative_cache_seconds,
            timeout_seconds=self.upstream_timeout_seconds,
            check_interval_seconds=self.tenant_check_interval_seconds,
            check_rate=self.tenant_check_rate,
            # The sweeper renews its lease before each check; one check may take the whole upstream
            # timeout (twice: discovery, token) plus the pause between checks.
            sweep_lease_seconds=max(
                30.0, 3 * (2 * self.upstream_timeout_seconds + 1 / self.tenant_check_rate)
            ),
            required_roles={
                name: {resource: tuple(roles) for resource, roles in app.required_roles.items()}
                for name, app in self.apps.items()
            },
            resources={name: tuple(app.resources) for name, app in self.apps.items()},
            local_max_entries=self.l1_max_tokens,
        )

    def app_for(self, name: str | None) -> tuple[str, AppSettings] | None:
        """The named app, or the only app when no name is given and exactly one is configured."""
        if name is None:
            if len(self.apps) == 1:
                return next(iter(self.apps.items()))
            return None
        app = self.apps.get(name)
        return (name, app) if app is not None else None


@dataclass(frozen=True, slots=True)
class FlightOptions:
    """``service.TokenBroker``: how long one acquisition may take and what is remembered."""

    lease_seconds: float
    upstream_retry_seconds: float
    upstream_timeout_seconds: float
    negative_cache_seconds: float
    max_concurrent_acquisitions: int = 8  # slots of the fair scheduler: the MSAL workers


@dataclass(frozen=True, slots=True)
class CacheOptions:
    """``cache.TokenCache``: bounds of the in-process layers."""

    l1_max_tokens: int
    # Remembered failures and throttles kept in process (bounded: one caller's random tenants must
    # not grow a replica's memory).
    local_max_entries: int
    # Redis calls in flight at once (the rest wait, at most redis_wait_seconds: then that call is late).
    redis_max_concurrent_calls: int = 64
    redis_wait_seconds: float = 2.0


@dataclass(frozen=True, slots=True)
class RedisOptions:
    """``cache.connect_redis``: the one place Redis clients are built from."""

    url: str = dataclasses.field(repr=False)  # may hold a password
    timeout_seconds: float  # a command's reply
    max_connections: int = 64  # per pool (per node in cluster mode)
    pool_timeout_seconds: float = 2.0  # waiting for a free pooled connection
    connect_timeout_seconds: float = 2.0  # TCP + TLS handshake + AUTH
    mode: Literal["standalone", "cluster", "sentinel"] = "standalone"
    sentinels: tuple[tuple[str, int], ...] = ()
    sentinel_service: str | None = None
    entra: bool = False  # AUTH with Entra tokens from the broker's own Azure identity
    username: str | None = None
    password_env: str | None = None  # the password is read at each new connection (rotation)
    password_file: Path | None = None
    ca_file: Path | None = None
    client_cert_file: Path | None = None
    client_key_file: Path | None = None


@dataclass(frozen=True, slots=True)
class EntraOptions:
    """``entra.EntraClient``: the authority, the apps, and MSAL's executor bounds."""

    authority_host: str
    apps: dict[str, AppSettings]
    max_workers: int
    clients_max: int
    timeout_seconds: float


@dataclass(frozen=True, slots=True)
class OnboardingOptions:
    """``onboarding``: where the consent pages live, the apps invites may name, and the time limits."""

    public_base_url: str
    authority_host: str
    apps: dict[str, AppSettings]
    invite_ttl_seconds: int
    propagation_seconds: float


@dataclass(frozen=True, slots=True)
class TenantOptions:
    """``tenants.py`` and ``discovery.py``: resolving domains, the registry and its sweep."""

    authority_host: str
    domain_ttl_seconds: float  # a domain's GUID, remembered (Redis and in process)
    unknown_domain_seconds: float  # a domain Entra does not know, remembered (0: not at all)
    timeout_seconds: float  # one discovery request
    check_interval_seconds: float
    check_rate: float  # Entra requests per second, cluster-wide
    sweep_lease_seconds: float
    required_roles: dict[str, dict[str, tuple[str, ...]]]  # app -> resource -> roles
    resources: dict[str, tuple[str, ...]]  # app -> resources
    local_max_entries: int  # registry entries kept in process when there is no Redis


# --- validation beyond single fields ---------------------------------------------------------------------
#
# Everything below reports *problems* as (dotted key, message) pairs, so that one run of ``check-config``
# or ``serve`` names every mistake in the file at once. Messages never quote a value that may hold a
# secret (a Redis URL's password): they name the key and say what is wrong with it.

Problem = tuple[str, str]

_PERCENT_ENCODE = (
    "; if the password holds '/', '?', '#', '@' or '%', percent-encode the password "
    "('/' is %2F, '?' %3F, '#' %23, '@' %40, '%' %25)"
)
# Query parameters redis-py converts (redis.connection.URL_QUERY_ARGUMENT_PARSERS) and refuses if
# they do not convert; the boolean and list ones accept anything.
_REDIS_NUMERIC_QUERY: dict[str, type[int | float]] = {
    "db": int,
    "socket_timeout": float,
    "socket_connect_timeout": float,
    "socket_read_size": int,
    "max_connections": int,
    "health_check_interval": int,
    "ssl_min_version": int,
    "timeout": float,
    "protocol": int,
}


def redis_url_problem(url: str) -> str | None:
    """What would make redis-py refuse or misread ``url`` (mirroring ``redis.connection.parse_url``
    without importing redis), in words that quote none of it; ``None`` when it is fine.

    A raw '/', '?' or '#' in the password silently ends the authority part: the rest of the password
    becomes a port, path, query or fragment, and redis-py's own error would quote it.
    """
    if not url.startswith(("redis://", "rediss://", "unix://")):
        return "must start with redis://, rediss:// or unix://"
    if any(char.isspace() or not char.isprintable() for char in url):
        return "must not contain spaces, newlines or control characters"
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port  # raises ValueError when what follows the last ':' is not a port number
    except ValueError:
        return "cannot be parsed: the host or port is malformed" + _PERCENT_ENCODE
    if parts.fragment or url.endswith("#"):
        return "cannot be parsed: it contains a raw '#'" + _PERCENT_ENCODE
    if parts.scheme == "unix":
        if not parts.path:
            return "a unix socket URL needs the socket's path after the scheme"
    else:
        if not parts.hostname:
            return "cannot be parsed: it names no host" + _PERCENT_ENCODE
        if port == 0:
            return "cannot be parsed: port 0" + _PERCENT_ENCODE
        if parts.path not in ("", "/") and not parts.path[1:].isdigit():
            return "cannot be parsed: the database (the path) must be a number such as /0" + _PERCENT_ENCODE
    for name, values in urllib.parse.parse_qs(parts.query).items():
        convert = _REDIS_NUMERIC_QUERY.get(name)
        if convert is not None:
            try:
                convert(values[0])
            except ValueError:
                return f"query parameter {name!r} must be a number"
    return None


def _suggestion(word: str, candidates: typing.Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest candidate, or nothing."""
    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The settings model an annotation holds (``X``, ``X | None``), if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            found = _model_in(arg)
            if found is not None:
                return found
    return None


def _keys_at(loc: tuple[int | str, ...]) -> list[str]:
    """The keys the settings model accepts at ``loc`` (a path from the top of the file), for
    did-you-mean: through models by field name, through ``dict``/``list`` values by any key or index."""
    annotation: Any = Settings
    for part in loc:
        model = _model_in(annotation)
        if model is not None:
            field = model.model_fields.get(str(part))
            if field is None:
                return []
            annotation = field.annotation
            continue
        origin, args = typing.get_origin(annotation), typing.get_args(annotation)
        if origin is dict and len(args) == 2:
            annotation = args[1]
        elif origin is list and args:
            annotation = args[0]
        else:
            return []
    model = _model_in(annotation)
    return list(model.model_fields) if model is not None else []


def _validation_problems(exc: ValidationError) -> list[Problem]:
    problems = []
    for err in exc.errors(include_input=False, include_url=False):
        loc = tuple(part for part in err["loc"] if not str(part).startswith("function-"))
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden" and loc:
            message = "unknown key" + _suggestion(str(loc[-1]), _keys_at(loc[:-1]))
        problems.append((".".join(str(part) for part in loc), message))
    return problems


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _credential_sources(data: Mapping[str, Any]) -> Iterator[tuple[str, Mapping[str, Any]]]:
    """(key, source) for every credential source in the raw configuration, however malformed."""
    for name, app in _mapping(data.get("apps")).items():
        yield f"apps.{name}.credential", _mapping(_mapping(app).get("credential"))
    yield "cache_encryption_key", _mapping(data.get("cache_encryption_key"))
    yield "consent_signing_key", _mapping(data.get("consent_signing_key"))


def _cross_field_problems(data: Mapping[str, Any]) -> list[Problem]:
    """Checks that span several settings, on the raw data: they run (and report) even when some field
    is invalid, skipping only what they cannot read."""
    problems: list[Problem] = []
    apps = _mapping(data.get("apps"))
    callers = {name: _mapping(caller) for name, caller in _mapping(data.get("callers")).items()}
    for name, caller in callers.items():
        wanted = caller.get("apps")
        problems.extend(
            (f"callers.{name}.apps", f"unknown app {app!r}" + _suggestion(app, apps))
            for app in (wanted if isinstance(wanted, list) else [])
            if isinstance(app, str) and app != "*" and app not in apps
        )
    if data.get("redis_url") and data.get("cache_encryption_key") is None:
        problems.append(("cache_encryption_key", "required when redis_url is set"))
    if data.get("public_base_url") and data.get("consent_signing_key") is None:
        problems.append(("consent_signing_key", "required when public_base_url is set (onboarding)"))
    if data.get("consent_signing_key") is not None and not data.get("public_base_url"):
        problems.append(("public_base_url", "required when consent_signing_key is set (onboarding)"))
    for name, app in apps.items():
        app_map = _mapping(app)
        resources = app_map.get("resources")
        allowed = (
            {normalise_resource(r) for r in resources if isinstance(r, str)}
            if isinstance(resources, list)
            else set()
        )
        problems.extend(
            (f"apps.{name}.required_roles", f"{resource!r} is not one of the app's resources")
            for resource in _mapping(app_map.get("required_roles"))
            if isinstance(resource, str) and allowed and normalise_resource(resource) not in allowed
        )
    problems += _redis_problems(data)
    if not data.get("key_vault_url"):
        problems.extend(
            ("key_vault_url", f"required by {where} ({kind})")
            for where, source in _credential_sources(data)
            for kind in ("secret", "certificate", "key_vault_key")
            if source.get(kind)
        )
    # Assertions authenticate an app to Entra; they are no value a key can be read from.
    problems.extend(
        (f"{where}.{kind}", "only an app credential can be federated or Key Vault-signed")
        for where, source in _credential_sources(data)
        for kind in ("federated", "key_vault_key")
        if source.get(kind) and not where.startswith("apps.")
    )
    for field in ("api_key_sha256", "service_account"):
        first_with: dict[str, str] = {}
        for name, caller in callers.items():
            value = caller.get(field)
            if not isinstance(value, str) or not value:
                continue
            value = value.lower() if field == "api_key_sha256" else value
            if value in first_with:
                problems.append(("callers", f"{first_with[value]} and {name} share one {field}"))
            else:
                first_with[value] = name
    if any(caller.get("service_account") for caller in callers.values()) and not data.get(
        "service_account_auth"
    ):
        problems.append(("service_account_auth", "required by callers with service_account"))
    return problems


_REDIS_TLS_FILES = ("redis_ca_file", "redis_client_cert_file", "redis_client_key_file")


def _host_port(address: str) -> tuple[str, int] | None:
    """``("host", port)`` of a ``host:port`` (``[v6]:port`` too), or ``None``."""
    host, _, port = address.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not host or not port.isdigit() or not 0 < int(port) < 65536 or any(c.isspace() for c in host):
        return None
    return host, int(port)


def _redis_problems(data: Mapping[str, Any]) -> list[Problem]:
    """The Redis settings that only make sense together (the URL's password is never quoted)."""
    problems: list[Problem] = []
    url = data.get("redis_url")
    url = url if isinstance(url, str) and url else None
    mode = data.get("redis_mode", "standalone")
    if url is None:
        named = ["redis_sentinels", "redis_sentinel_service", "redis_username", "redis_password"]
        named += [key for key in _REDIS_TLS_FILES if data.get(key)]
        named += [
            key
            for key, plain in (("redis_mode", "standalone"), ("redis_auth", "password"))
            if data.get(key, plain) != plain
        ]
        return [(key, "needs redis_url") for key in named if data.get(key)]
    parts = urllib.parse.urlsplit(url) if redis_url_problem(url) is None else None
    if mode == "sentinel":
        problems.extend(
            (key, "required when redis_mode is sentinel")
            for key in ("redis_sentinels", "redis_sentinel_service")
            if not data.get(key)
        )
    else:
        problems.extend(
            (key, "only used when redis_mode is sentinel")
            for key in ("redis_sentinels", "redis_sentinel_service")
            if data.get(key)
        )
    if parts is not None and mode in ("cluster", "sentinel") and parts.scheme == "unix":
        problems.append(("redis_url", f"a unix socket cannot reach a {mode}"))
    if parts is not None and mode == "cluster" and parts.path not in ("", "/", "/0"):
        problems.append(("redis_url", "Redis Cluster has database 0 only: drop the /N path or use /0"))
    if parts is not None and parts.scheme != "rediss":
        problems += [(key, "needs a rediss:// redis_url (TLS)") for key in _REDIS_TLS_FILES if data.get(key)]
    if bool(data.get("redis_client_cert_file")) != bool(data.get("redis_client_key_file")):
        problems.append(
            ("redis_client_key_file", "give redis_client_cert_file and redis_client_key_file together")
        )
    url_password = parts is not None and parts.password is not None
    uses_provider = data.get("redis_auth") == "entra" or bool(data.get("redis_password"))
    if parts is not None and uses_provider and parts.username:
        problems.append(("redis_url", "name the ACL user in redis_username, not in the URL"))
    if data.get("redis_username") and not uses_provider:
        problems.append(
            (
                "redis_username",
                (
                    "used with redis_password or redis_auth: entra (else put the "
                    "user in redis_url: redis://USER:PASSWORD@host)"
                ),
            )
        )
    if data.get("redis_auth") == "entra":
        if url_password or data.get("redis_password"):
            problems.append(
                (
                    "redis_auth",
                    "entra authenticates with tokens: remove the password from redis_url and redis_password",
                )
            )
    elif url_password and data.get("redis_password"):
        problems.append(("redis_password", "redis_url holds a password too: give one of them"))
    return problems


def _file_problem(path: Path) -> str | None:
    if not path.exists():
        return f"file {path} does not exist"
    if not path.is_file():
        return f"{path} is not a file"
    if not os.access(path, os.R_OK):
        return f"file {path} is not readable by this user (uid {os.getuid()})"
    return None


def _missing_file_problems(data: Mapping[str, Any]) -> list[Problem]:
    """Every file the configuration names must exist and be readable now: a typo in a path is found at
    start, not at the first token request."""
    named: list[tuple[str, Any]] = [
        ("outbound_ca_file", data.get("outbound_ca_file")),
        ("service_account_auth.jwks_file", _mapping(data.get("service_account_auth")).get("jwks_file")),
    ]
    named += [(f"{where}.file", source.get("file")) for where, source in _credential_sources(data)]
    named += [
        (f"{where}.federated.token_file", _mapping(source.get("federated")).get("token_file"))
        for where, source in _credential_sources(data)
    ]
    named += [(key, data.get(key)) for key in _REDIS_TLS_FILES]
    named.append(("redis_password.file", _mapping(data.get("redis_password")).get("file")))
    problems = []
    for key, value in named:
        if isinstance(value, str | Path) and str(value):
            problem = _file_problem(Path(value))
            if problem is None and key in ("outbound_ca_file", "redis_ca_file", "redis_client_cert_file"):
                problem = _ca_file_problem(Path(value))
            if problem is not None:
                problems.append((key, problem))
    return problems


def _ca_file_problem(path: Path) -> str | None:
    """The extra CA is appended to the public roots at start (``tls.build_ca_bundle``): it must be
    ASCII PEM holding at least one certificate."""
    try:
        text = path.read_text(encoding="ascii")
    except UnicodeDecodeError:
        return f"{path} is not ASCII PEM text"
    except OSError as exc:
        return f"cannot read {path}: {exc.strerror}"
    if "-----BEGIN CERTIFICATE-----" not in text:
        return f"{path} holds no PEM certificate"
    return None


def _format_problems(problems: list[Problem], from_env: Mapping[str, str]) -> str:
    lines = []
    for key, message in dict.fromkeys(problems):  # in order, each once
        variable = from_env.get(key) or from_env.get(key.split(".", 1)[0])
        suffix = f" (set by {variable})" if variable else ""
        lines.append(f"{key}: {message}{suffix}" if key else message)
    if len(lines) == 1:
        return lines[0]
    return f"{len(lines)} problems in the configuration:\n" + "\n".join(f"  {line}" for line in lines)


def _with_env_overrides(
    raw: Mapping[str, Any], environ: Mapping[str, str]
) -> tuple[dict[str, Any], dict[str, str]]:
    """``raw`` with the ``BROKER_*`` overrides applied, and which key each variable set."""
    data = dict(raw)
    from_env: dict[str, str] = {}
    for key in ENV_OVERRIDABLE:
        variable = f"BROKER_{key.upper()}"
        value = environ.get(variable)
        if value:
            data[key] = value
            from_env[key] = variable
    for section, key in ENV_OVERRIDABLE_NESTED:
        variable = f"BROKER_{section.upper()}_{key.upper()}"
        value = environ.get(variable)
        current = data.get(section)
        # A section that is not a mapping is left for validation to report.
        if value and (current is None or isinstance(current, Mapping)):
            data[section] = {**(current or {}), key: value}
            from_env[f"{section}.{key}"] = variable
    return data, from_env


def parse_settings(
    raw: Mapping[str, Any], environ: Mapping[str, str] | None = None, *, check_files: bool = True
) -> Settings:
    """Validate a mapping (plus ``BROKER_*`` overrides) into ``Settings`` or raise ``ConfigError``
    naming every problem. ``check_files=False`` skips the checks that the files named exist (for static
    checks of a configuration meant for another machine, such as a rendered Helm chart)."""
    environ = os.environ if environ is None else environ
    data, from_env = _with_env_overrides(raw, environ)
    problems: list[Problem] = []
    settings: Settings | None = None
    try:
        settings = Settings.model_validate(data)
    except ValidationError as exc:
        problems += _validation_problems(exc)
    problems += _cross_field_problems(data)
    if check_files:
        problems += _missing_file_problems(data)
    if problems or settings is None:
        raise ConfigError(_format_problems(problems, from_env))
    return settings


def default_raw_settings(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The embedded defaults: one app whose secret is in an env var, one caller, in-process cache.

    For a laptop: ``BROKER_CLIENT_ID`` names the app registration, ``BROKER_CLIENT_SECRET`` holds its
    secret, ``BROKER_CALLER_KEY_SHA256`` is the caller key's hash (``token-broker hash-key``).
    """
    environ = os.environ if environ is None else environ
    return {
        "apps": {
            "default": {
                "client_id": environ.get("BROKER_CLIENT_ID", ""),
                "credential": {"env": "BROKER_CLIENT_SECRET"},
                "resources": [
                    "https://api.security.microsoft.com",
                    "https://api.securitycenter.microsoft.com",
                ],
            }
        },
        "callers": {
            "local": {
                "api_key_sha256": environ.get("BROKER_CALLER_KEY_SHA256", ""),
                "tenants": ["*"],
                "apps": ["default"],
            }
        },
    }


def load_settings(
    path: str | Path | None = None, environ: Mapping[str, str] | None = None, *, check_files: bool = True
) -> Settings:
    """Load the YAML file at ``path`` (or ``$BROKER_CONFIG``; else the embedded defaults)."""
    environ = os.environ if environ is None else environ
    path = path or environ.get(CONFIG_ENV) or None
    if path is None:
        try:
            return parse_settings(default_raw_settings(environ), environ, check_files=check_files)
        except ConfigError as exc:
            raise ConfigError(
                f"{exc} (no --config or BROKER_CONFIG given: the embedded defaults need "
                "BROKER_CLIENT_ID, BROKER_CLIENT_SECRET and BROKER_CALLER_KEY_SHA256)"
            ) from None
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        # Not str(exc): PyYAML quotes the offending line, which may hold a Redis password.
        raise ConfigError(f"{path}: not valid YAML: {_yaml_error_summary(exc)}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys")
    return parse_settings(raw, environ, check_files=check_files)


def _yaml_error_summary(exc: yaml.YAMLError) -> str:
    """The problem and where it is (line, column), without the snippet of the file PyYAML adds."""
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        return f"{exc.problem or exc.context or 'syntax error'}{where}"
    return type(exc).__name__


def read_env_secret(name: str) -> str | None:
    """The value of an ``{env: NAME}`` credential source (kept here: the one module reading env)."""
    return os.environ.get(name)


def managed_identity_client_id() -> str | None:
    """``AZURE_CLIENT_ID``: the user-assigned managed identity ``azure_credential: managed_identity``
    uses (as DefaultAzureCredential does); a federated credential must name a user-assigned one."""
    return os.environ.get("AZURE_CLIENT_ID") or None
