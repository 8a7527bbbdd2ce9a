"""Settings: the frozen configuration model, YAML + ``BROKER_*`` environment loading, validation.

This is the only module that reads the process environment. Validation errors name the offending key
(``apps.defender.client_id: ...``) so an operator can fix the file without reading code. Secrets never
live in the file: credentials are *sources* (Key Vault secret or certificate, environment variable,
mounted file) resolved later by ``vault.py``.
"""

from __future__ import annotations

import os
import re
import ssl
from collections.abc import Mapping
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

GUID_RE = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
# A verified domain: labels of letters, digits and hyphens, at least one dot, no trailing dot.
DOMAIN_RE = re.compile(r"^(?=.{4,253}$)([a-zA-Z0-9](?:[a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?\.)+[a-zA-Z]{2,63}$")
SHA256_HEX_RE = re.compile(r"^[0-9a-f]{64}$")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")

CONFIG_ENV = "BROKER_CONFIG"
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


def is_tenant(value: str) -> bool:
    """True for a tenant GUID or a verified-domain name."""
    return bool(GUID_RE.match(value) or DOMAIN_RE.match(value))


def normalise_resource(value: str) -> str:
    """``https://api.security.microsoft.com/`` and ``.../.default`` both become the bare resource."""
    value = value.strip()
    value = value.removesuffix("/.default")
    return value.rstrip("/")


def _check_guid(value: str) -> str:
    if not GUID_RE.match(value):
        raise ValueError("must be a GUID such as 11111111-2222-3333-4444-555555555555")
    return value.lower()


def _check_https_url(value: str) -> str:
    if not re.match(r"^https://[^\s/?#]+(/[^\s?#]*)?$", value):
        raise ValueError("must be an https:// URL")
    return value.rstrip("/")


def _check_resource(value: str) -> str:
    resource = normalise_resource(value)
    _check_https_url(resource)
    return resource


Guid = Annotated[str, AfterValidator(_check_guid)]
HttpsUrl = Annotated[str, AfterValidator(_check_https_url)]
Resource = Annotated[str, AfterValidator(_check_resource)]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class CredentialSource(_Frozen):
    """Where a secret comes from: exactly one of Key Vault secret/certificate, env var, or file."""

    secret: str | None = None
    certificate: str | None = None
    env: str | None = None
    file: Path | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> CredentialSource:
        given = [name for name in ("secret", "certificate", "env", "file") if getattr(self, name)]
        if len(given) != 1:
            raise ValueError("give exactly one of secret, certificate, env, file")
        return self

    @property
    def kind(self) -> Literal["secret", "certificate", "env", "file"]:
        if self.secret:
            return "secret"
        if self.certificate:
            return "certificate"
        if self.env:
            return "env"
        return "file"

    @property
    def uses_key_vault(self) -> bool:
        return self.kind in ("secret", "certificate")

    def describe(self) -> str:
        """A label safe for logs: names the source, never its value."""
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


class AppSettings(_Frozen):
    client_id: Guid
    credential: CredentialSource
    resources: list[Resource] = Field(min_length=1)


SERVICE_ACCOUNT_RE = re.compile(
    r"^system:serviceaccount:[a-z0-9]([-a-z0-9]*[a-z0-9])?:[a-z0-9]([-.a-z0-9]*[a-z0-9])?$"
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
        if not re.match(r"^https?://[^\s/?#]+", value):
            raise ValueError("must be the issuer URL (https:// in production)")
        return value


class CallerSettings(_Frozen):
    api_key_sha256: str | None = None
    service_account: str | None = None  # system:serviceaccount:NAMESPACE:NAME
    tenants: list[str] = Field(min_length=1)
    apps: list[str] = Field(min_length=1)

    @model_validator(mode="after")
    def _one_credential(self) -> CallerSettings:
        if (self.api_key_sha256 is None) == (self.service_account is None):
            raise ValueError("give exactly one of api_key_sha256, service_account")
        return self

    @field_validator("service_account")
    @classmethod
    def _service_account(cls, value: str | None) -> str | None:
        if value is not None and not SERVICE_ACCOUNT_RE.match(value):
            raise ValueError("must be system:serviceaccount:NAMESPACE:NAME")
        return value

    @field_validator("api_key_sha256")
    @classmethod
    def _hex(cls, value: str | None) -> str | None:
        if value is None:
            return None
        value = value.lower()
        if not SHA256_HEX_RE.match(value):
            raise ValueError("must be 64 hex characters (token-broker hash-key prints one)")
        return value

    @field_validator("tenants")
    @classmethod
    def _tenants(cls, value: list[str]) -> list[str]:
        for tenant in value:
            if tenant != "*" and not is_tenant(tenant):
                raise ValueError(f"{tenant!r} is neither '*', a tenant GUID nor a domain")
        return [tenant.lower() for tenant in value]


class Settings(_Frozen):
    """The whole broker configuration, validated once at start."""

    listen: ListenSettings = ListenSettings()
    metrics: MetricsSettings = MetricsSettings()
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    authority_host: HttpsUrl = "https://login.microsoftonline.com"
    key_vault_url: HttpsUrl | None = None
    key_vault_verify_challenge_resource: bool = True
    azure_credential: Literal["default", "workload_identity", "managed_identity", "environment"] = "default"
    outbound_ca_file: Path | None = None
    redis_url: str | None = None
    cache_encryption_key: CredentialSource | None = None
    apps: dict[str, AppSettings] = Field(min_length=1)
    callers: dict[str, CallerSettings] = Field(min_length=1)
    service_account_auth: ServiceAccountAuthSettings | None = None

    # Tuning; the defaults suit a few thousand tenants per replica.
    msal_max_workers: int = Field(default=8, ge=1, le=64)
    msal_clients_max: int = Field(default=2048, ge=1)
    l1_max_tokens: int = Field(default=100_000, ge=1)
    upstream_timeout_seconds: float = Field(default=10.0, gt=0, le=120)
    # Retries of throttled or failed Entra calls (exponential backoff, full jitter, Retry-After
    # honoured) stop when the next wait would end after this many seconds: the caller then gets 503.
    upstream_retry_seconds: float = Field(default=8.0, ge=0, le=60)
    redis_timeout_seconds: float = Field(default=0.5, gt=0, le=30)
    negative_cache_seconds: float = Field(default=30.0, ge=0, le=3600)
    credential_refresh_seconds: float = Field(default=3600.0, ge=1)
    # A rejected credential triggers a reload at most this often (Key Vault allows ~4,000 GETs/10 s).
    credential_min_reload_seconds: float = Field(default=5.0, ge=0, le=3600)
    max_body_bytes: int = Field(default=4096, ge=256, le=1_048_576)
    drain_seconds: float = Field(default=10.0, ge=0, le=300)
    # How long one replica may hold a key's acquisition lease before another takes over (a crashed
    # holder blocks the key this long at most).
    # Default: upstream_retry_seconds + 2 x upstream_timeout_seconds + 5.
    lease_seconds: float | None = Field(default=None, gt=0, le=600)

    @field_validator("redis_url")
    @classmethod
    def _redis(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^(redis|rediss|unix)://", value):
            raise ValueError("must start with redis://, rediss:// or unix://")
        return value

    @field_validator("apps", "callers")
    @classmethod
    def _names(cls, value: dict[str, Any]) -> dict[str, Any]:
        for name in value:
            if not NAME_RE.match(name):
                raise ValueError(f"{name!r} is not a valid name (letters, digits, _ . -)")
        return value

    @model_validator(mode="after")
    def _cross_checks(self) -> Settings:
        for name, caller in self.callers.items():
            for app in caller.apps:
                if app != "*" and app not in self.apps:
                    raise ValueError(f"callers.{name}.apps: unknown app {app!r}")
        if self.redis_url and self.cache_encryption_key is None:
            raise ValueError("cache_encryption_key: required when redis_url is set")
        sources = [(f"apps.{n}.credential", a.credential) for n, a in self.apps.items()]
        if self.cache_encryption_key is not None:
            sources.append(("cache_encryption_key", self.cache_encryption_key))
        for where, source in sources:
            if source.uses_key_vault and not self.key_vault_url:
                raise ValueError(f"key_vault_url: required by {where} ({source.kind})")
        hashes = [c.api_key_sha256 for c in self.callers.values() if c.api_key_sha256]
        if len(hashes) != len(set(hashes)):
            raise ValueError("callers: two callers share one api_key_sha256")
        accounts = [c.service_account for c in self.callers.values() if c.service_account]
        if len(accounts) != len(set(accounts)):
            raise ValueError("callers: two callers share one service_account")
        if accounts and self.service_account_auth is None:
            raise ValueError("service_account_auth: required by callers with service_account")
        return self

    def app_for(self, name: str | None) -> tuple[str, AppSettings] | None:
        """The named app, or the only app when no name is given and exactly one is configured."""
        if name is None:
            if len(self.apps) == 1:
                return next(iter(self.apps.items()))
            return None
        app = self.apps.get(name)
        return (name, app) if app is not None else None


def _format_validation_error(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        path = ".".join(str(part) for part in err["loc"] if not str(part).startswith("function-"))
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            message = "unknown key"
        lines.append(f"{path}: {message}" if path else message)
    return "; ".join(lines)


def parse_settings(raw: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> Settings:
    """Validate a mapping (plus ``BROKER_*`` overrides) into ``Settings`` or raise ``ConfigError``."""
    environ = os.environ if environ is None else environ
    data = dict(raw)
    for key in ENV_OVERRIDABLE:
        value = environ.get(f"BROKER_{key.upper()}")
        if value:
            data[key] = value
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc)) from None


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


def load_settings(path: str | Path | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Load the YAML file at ``path`` (or ``$BROKER_CONFIG``; else the embedded defaults)."""
    environ = os.environ if environ is None else environ
    path = path or environ.get(CONFIG_ENV) or None
    if path is None:
        try:
            return parse_settings(default_raw_settings(environ), environ)
        except ConfigError as exc:
            raise ConfigError(
                f"{exc} (no --config or BROKER_CONFIG given: the embedded defaults need "
                "BROKER_CLIENT_ID, BROKER_CLIENT_SECRET and BROKER_CALLER_KEY_SHA256)"
            ) from None
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys")
    return parse_settings(raw, environ)


def read_env_secret(name: str) -> str | None:
    """The value of an ``{env: NAME}`` credential source (kept here: the one module reading env)."""
    return os.environ.get(name)
