"""In-memory state of the Entra ID + Key Vault emulator.

Holds the directory (tenants, app registrations, consents, unprovisioned resources), the vault
(secrets and their versions, the access list), injected faults, the token lifetime setting and
the request log / counters that tests assert on, and the token-signing key. Everything here is
plain data plus the lookup rules Entra and Key Vault apply; the HTTP layers (``entra``, ``vault``,
``control``) translate requests into calls on :class:`EmulatorState`.

The control API is defined here, once: every :class:`EmulatorState` method marked
:func:`operation` is a control operation (``POST /_emulator/{name}``), its signature is the contract
(``control`` validates requests against it, ``client`` exposes it as an ``Emulator`` method of the
same name and signature), and it returns JSON-ready data. Adding an operation means writing one
such method.

The server runs on one asyncio loop and no method here awaits, so no locking is needed.
"""

from __future__ import annotations

import hmac
import random
import re
import secrets
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar

from cryptography import x509
from cryptography.hazmat.primitives import hashes

from .tokens import SigningKey
from .world import BROKER_CLIENT_ID, BROKER_CLIENT_SECRET, DEMO_WORLD, VAULT_TENANT_DOMAINS, VAULT_TENANT_ID

#: Audience Key Vault accepts and the resource its challenge names.
VAULT_RESOURCE: Final = "https://vault.azure.net"

DEFAULT_TOKEN_LIFETIME: Final = 3600

#: Endpoint classes of the emulated services, as logged, counted and targeted by faults.
ENDPOINTS: Final[frozenset[str]] = frozenset({"discovery", "token", "jwks", "vault"})
FAULT_ENDPOINTS: Final[frozenset[str]] = ENDPOINTS | {"any"}
FAULT_KINDS: Final[frozenset[str]] = frozenset({"429", "429_text", "500", "503", "latency", "drop"})

# Key Vault object names: 1-127 characters, alphanumerics and dashes.
_SECRET_NAME = re.compile(r"^[0-9A-Za-z-]{1,127}$")


class StateError(ValueError):
    """A control-API request that cannot be applied (unknown tenant/app, bad argument)."""


#: The control operations by name: the :class:`EmulatorState` methods marked :func:`operation`.
OPERATIONS: Final[dict[str, Callable[..., Any]]] = {}

_Method = TypeVar("_Method", bound=Callable[..., Any])


def operation(method: _Method) -> _Method:
    """Mark an :class:`EmulatorState` method as a control operation (unchanged otherwise).

    Its parameters must be annotated with JSON-shaped types (``str``, ``int``, ``float``, ``bool``,
    ``Iterable[...]`` / ``list[...]``, ``dict[str, ...]``, ``X | None``) and it must return JSON-ready
    data; ``control`` checks the annotations when it builds its table.
    """
    OPERATIONS[method.__name__] = method
    return method


def normalize_guid(value: str) -> str:
    """Return ``value`` as a lower-case canonical GUID, or raise :class:`StateError`."""
    try:
        return str(uuid.UUID(value))
    except (ValueError, AttributeError, TypeError) as exc:
        raise StateError(f"not a GUID: {value!r}") from exc


def cert_thumbprints(cert_pem: str) -> tuple[bytes, bytes]:
    """Return the (SHA-1, SHA-256) thumbprints of a PEM certificate as raw digests."""
    cert = x509.load_pem_x509_certificate(cert_pem.encode())
    return cert.fingerprint(hashes.SHA1()), cert.fingerprint(hashes.SHA256())  # noqa: S303


def new_client_secret() -> str:
    """Return a fresh secret shaped like an Entra client secret (40 chars, contains ``~``)."""
    return f"{secrets.token_urlsafe(3)[:3]}8Q~{secrets.token_urlsafe(30)[:34]}"


@dataclass
class Tenant:
    """A directory: its GUID and the verified domains it can also be addressed by."""

    tenant_id: str
    domains: list[str]

    @property
    def display_name(self) -> str:
        """Name Entra uses in error messages: the first domain, else the GUID."""
        return self.domains[0] if self.domains else self.tenant_id


@dataclass
class AppSecret:
    """One client secret of an app registration; ``expires_at`` is epoch seconds or None."""

    value: str
    expires_at: float | None = None

    def expired(self, now: float) -> bool:
        """True once the secret's end date has passed."""
        return self.expires_at is not None and self.expires_at <= now


@dataclass
class AppCertificate:
    """A certificate registered on an app, indexed by its thumbprints as Entra does."""

    pem: str
    sha1: bytes
    sha256: bytes


@dataclass
class App:
    """An app registration (multi-tenant capable) with its credentials."""

    client_id: str
    home_tenant: str
    secrets: list[AppSecret] = field(default_factory=list)
    certificates: list[AppCertificate] = field(default_factory=list)


@dataclass
class Consent:
    """A service principal of an app in a foreign tenant: consent plus app roles per resource."""

    roles: dict[str, list[str]] = field(default_factory=dict)


@dataclass
class SecretVersion:
    """One version of a Key Vault secret."""

    version: str
    value: str
    content_type: str | None
    enabled: bool
    created: int
    updated: int
    tags: dict[str, str] | None = None


@dataclass
class VaultSecret:
    """A Key Vault secret: its name as first written and its versions, oldest first."""

    name: str
    versions: list[SecretVersion] = field(default_factory=list)

    def current(self) -> SecretVersion | None:
        """The newest version, which ``GET /secrets/{name}`` returns.

        Key Vault does not fall back to an older enabled version: when the newest one is
        disabled, reading the secret without a version fails with 403 SecretDisabled.
        """
        return self.versions[-1] if self.versions else None

    def find(self, version: str) -> SecretVersion | None:
        """The version with this id (case-insensitive, as Key Vault), if any."""
        wanted = version.lower()
        return next((v for v in self.versions if v.version == wanted), None)


@dataclass
class Fault:
    """An injected failure for matching requests; fires ``remaining`` times (-1: forever)."""

    fault_id: int
    endpoint: str
    kind: str
    tenant: str | None
    remaining: int
    retry_after: int | None
    latency_seconds: float | None

    def describe(self) -> dict[str, Any]:
        """JSON form for the control API."""
        return {
            "id": self.fault_id,
            "endpoint": self.endpoint,
            "kind": self.kind,
            "tenant": self.tenant,
            "remaining": self.remaining,
            "retry_after": self.retry_after,
            "latency_seconds": self.latency_seconds,
        }


@dataclass
class RequestRecord:
    """One emulated-service request as the log keeps it (never credentials or token values)."""

    endpoint: str
    tenant_id: str | None
    client_id: str | None
    resource: str | None
    status: int  # 0 when a "drop" fault closed the connection without a response
    time: float

    def as_json(self) -> dict[str, Any]:
        """JSON form for the control API."""
        return {
            "endpoint": self.endpoint,
            "tenant_id": self.tenant_id,
            "client_id": self.client_id,
            "resource": self.resource,
            "status": self.status,
            "time": self.time,
        }


class EmulatorState:
    """Everything the emulator knows; reset between tests through the control API."""

    def __init__(self, signing_key: SigningKey | None = None) -> None:
        #: Signs every token; lives as long as the process (a reset keeps it, so a JWKS stays valid).
        self.signer = signing_key or SigningKey()
        self.tenants: dict[str, Tenant] = {}
        self.apps: dict[str, App] = {}
        self.consents: dict[tuple[str, str], Consent] = {}
        self.unprovisioned: set[tuple[str, str]] = set()
        #: (tenant, client id) of service principals their tenant's admin disabled.
        self.disabled: set[tuple[str, str]] = set()
        self.vault: dict[str, VaultSecret] = {}
        self.vault_access: set[str] | None = None
        self.pending_faults: list[Fault] = []
        self.token_lifetime = DEFAULT_TOKEN_LIFETIME
        self.token_lifetime_jitter = 0
        self.log: list[RequestRecord] = []
        self.counts: Counter[str] = Counter()
        self._next_fault_id = 1
        self.reset()

    # ------------------------------------------------------------------ lifecycle
    @operation
    def reset(self) -> None:
        """Empty everything, then recreate the base state: the vault tenant and the broker identity."""
        self.tenants.clear()
        self.apps.clear()
        self.consents.clear()
        self.unprovisioned.clear()
        self.disabled.clear()
        self.vault.clear()
        self.vault_access = None
        self.pending_faults.clear()
        self.token_lifetime = DEFAULT_TOKEN_LIFETIME
        self.token_lifetime_jitter = 0
        self.reset_counters()
        self.add_tenant(VAULT_TENANT_ID, VAULT_TENANT_DOMAINS)
        self.add_app(BROKER_CLIENT_ID, home_tenant=VAULT_TENANT_ID, secret=BROKER_CLIENT_SECRET)

    @operation
    def seed_demo(self) -> None:
        """Add the demo world (``emulator.world.DEMO_WORLD``) on top of the current state."""
        DEMO_WORLD.seed(self)

    @operation
    def reset_counters(self) -> None:
        """Forget the request log and all counters."""
        self.log.clear()
        self.counts.clear()

    # ------------------------------------------------------------------ directory
    def resolve_tenant(self, tenant: str) -> Tenant | None:
        """Find a tenant by GUID or by any of its domains, case-insensitively."""
        key = tenant.strip().lower()
        found = self.tenants.get(key)
        if found is not None:
            return found
        return next((t for t in self.tenants.values() if key in t.domains), None)

    def require_tenant(self, tenant: str) -> Tenant:
        """Like :meth:`resolve_tenant` but raise :class:`StateError` when unknown."""
        found = self.resolve_tenant(tenant)
        if found is None:
            raise StateError(f"unknown tenant {tenant!r}")
        return found

    def require_app(self, client_id: str) -> App:
        """The app registration with this client id, or :class:`StateError`."""
        app = self.apps.get(client_id.strip().lower())
        if app is None:
            raise StateError(f"unknown app {client_id!r}")
        return app

    @operation
    def add_tenant(self, tenant_id: str, domains: Iterable[str] = ()) -> None:
        """Create (or replace the domains of) a tenant, addressable by its GUID and by each domain."""
        guid = normalize_guid(tenant_id)
        wanted = [d.strip().lower() for d in domains]
        for other in self.tenants.values():
            clash = set(wanted) & set(other.domains)
            if other.tenant_id != guid and clash:
                raise StateError(f"domain(s) {sorted(clash)} already belong to another tenant")
        self.tenants[guid] = Tenant(guid, wanted)

    @operation
    def add_app(
        self,
        client_id: str,
        *,
        home_tenant: str,
        secret: str | None = None,
        certificate_pem: str | None = None,
    ) -> None:
        """Register an app in ``home_tenant`` (implicitly consented there) with an optional first
        secret / certificate."""
        app = App(normalize_guid(client_id), self.require_tenant(home_tenant).tenant_id)
        self.apps[app.client_id] = app
        if secret is not None:
            self.add_app_secret(app.client_id, secret)
        if certificate_pem is not None:
            self.add_app_certificate(app.client_id, certificate_pem)

    @operation
    def add_app_secret(self, client_id: str, secret: str, expires_in_seconds: float | None = None) -> None:
        """Add a client secret; ``expires_in_seconds <= 0`` makes it already expired (7000222)."""
        if not secret:
            raise StateError("secret must not be empty")
        expires_at = None if expires_in_seconds is None else time.time() + expires_in_seconds
        self.require_app(client_id).secrets.append(AppSecret(secret, expires_at))

    @operation
    def add_app_certificate(self, client_id: str, cert_pem: str) -> None:
        """Register a certificate whose key may sign client assertions for this app."""
        try:
            sha1, sha256 = cert_thumbprints(cert_pem)
        except ValueError as exc:
            raise StateError("certificate_pem is not a PEM certificate") from exc
        self.require_app(client_id).certificates.append(AppCertificate(cert_pem, sha1, sha256))

    @operation
    def rotate_app_secret(self, client_id: str, vault_secret: str | None = None) -> str:
        """Replace ALL secrets of the app with a new one and return it.

        Old secrets then fail with AADSTS7000215. With ``vault_secret``, the new value is also
        stored as a new version of that vault secret.
        """
        app = self.require_app(client_id)
        value = new_client_secret()
        app.secrets = [AppSecret(value)]
        if vault_secret is not None:
            self.set_secret(vault_secret, value)
        return value

    @operation
    def grant(self, tenant: str, client_id: str, resource: str, roles: Iterable[str] = ()) -> None:
        """Admin-consent ``client_id`` in ``tenant`` and set its app roles on ``resource``."""
        tid = self.require_tenant(tenant).tenant_id
        app = self.require_app(client_id)
        consent = self.consents.setdefault((tid, app.client_id), Consent())
        consent.roles[_required_resource(resource)] = list(roles)

    @operation
    def revoke(self, tenant: str, client_id: str) -> None:
        """Remove the app's service principal (consent and all roles) from ``tenant``."""
        tid = self.require_tenant(tenant).tenant_id
        self.consents.pop((tid, client_id.strip().lower()), None)

    @operation
    def remove_role(self, tenant: str, client_id: str, resource: str, role: str) -> None:
        """Remove one app-role assignment (as a tenant admin can): no error anywhere, the next token
        for ``resource`` simply lacks ``role``."""
        tid = self.require_tenant(tenant).tenant_id
        consent = self.consents.get((tid, self.require_app(client_id).client_id))
        roles = consent.roles.get(_required_resource(resource)) if consent else None
        if roles is None or role not in roles:
            raise StateError(f"{tenant!r} has not granted role {role!r} on {resource!r}")
        roles.remove(role)

    @operation
    def set_service_principal_enabled(self, tenant: str, client_id: str, enabled: bool) -> None:
        """Disable (or re-enable) the app's service principal in ``tenant``, as its admin can in the
        portal's Enterprise applications: while disabled, token requests get AADSTS7000112."""
        key = (self.require_tenant(tenant).tenant_id, self.require_app(client_id).client_id)
        if enabled:
            self.disabled.discard(key)
        else:
            self.disabled.add(key)

    def is_disabled(self, tenant_id: str, app: App) -> bool:
        """Whether ``tenant_id``'s admin disabled the app's service principal there."""
        return (tenant_id, app.client_id) in self.disabled

    @operation
    def set_unprovisioned(self, tenant: str, resource: str) -> None:
        """Make ``resource`` unknown in ``tenant`` (token requests get AADSTS500011)."""
        tid = self.require_tenant(tenant).tenant_id
        self.unprovisioned.add((tid, _required_resource(resource)))

    def is_consented(self, tenant_id: str, app: App) -> bool:
        """An app has a service principal in its home tenant and wherever it was granted."""
        return app.home_tenant == tenant_id or (tenant_id, app.client_id) in self.consents

    def roles_for(self, tenant_id: str, app: App, resource: str) -> list[str]:
        """App roles ``tenant_id`` granted ``app`` on ``resource`` (empty when none)."""
        consent = self.consents.get((tenant_id, app.client_id))
        if consent is None:
            return []
        return list(consent.roles.get(normalize_resource(resource), []))

    def is_provisioned(self, tenant_id: str, resource: str) -> bool:
        """Every resource exists in every tenant unless marked otherwise."""
        return (tenant_id, normalize_resource(resource)) not in self.unprovisioned

    def token_lifetime_now(self) -> int:
        """A token lifetime in [lifetime, lifetime + jitter], as Entra randomises it."""
        if self.token_lifetime_jitter <= 0:
            return self.token_lifetime
        return self.token_lifetime + random.randint(0, self.token_lifetime_jitter)  # noqa: S311 - not a secret

    @operation
    def set_token_lifetime(self, seconds: int, jitter_seconds: int = 0) -> None:
        """Tokens issued from now on live ``seconds`` + uniform(0..``jitter_seconds``)."""
        if seconds <= 0 or jitter_seconds < 0:
            raise StateError("lifetime must be positive and jitter non-negative")
        self.token_lifetime = seconds
        self.token_lifetime_jitter = jitter_seconds

    # ------------------------------------------------------------------ vault
    @operation
    def set_secret(
        self,
        name: str,
        value: str,
        *,
        content_type: str | None = None,
        enabled: bool = True,
        tags: dict[str, str] | None = None,
    ) -> str:
        """Store a new version of vault secret ``name``; return its 32-hex version id."""
        if not _SECRET_NAME.match(name):
            raise StateError(f"invalid secret name {name!r}")
        entry = self.vault.setdefault(name.lower(), VaultSecret(name))
        now = int(time.time())
        version = SecretVersion(uuid.uuid4().hex, value, content_type, enabled, now, now, tags)
        entry.versions.append(version)
        return version.version

    @operation
    def set_secret_enabled(self, name: str, version: str, enabled: bool) -> None:
        """Enable or disable one version of a vault secret."""
        entry = self.vault.get(name.lower())
        found = entry.find(version) if entry else None
        if found is None:
            raise StateError(f"unknown secret version {name}/{version}")
        found.enabled = enabled
        found.updated = int(time.time())

    @operation
    def set_vault_access(self, client_ids: Iterable[str] | None) -> None:
        """Allow exactly these apps on the vault; None restores "any app of the vault tenant"."""
        self.vault_access = None if client_ids is None else {normalize_guid(c) for c in client_ids}

    def vault_allows(self, client_id: str) -> bool:
        """Whether a token for ``client_id`` may read secrets (the vault's access policy)."""
        if self.vault_access is not None:
            return client_id in self.vault_access
        app = self.apps.get(client_id)
        return app is not None and app.home_tenant == VAULT_TENANT_ID

    # ------------------------------------------------------------------ faults
    @operation
    def add_fault(
        self,
        endpoint: str,
        kind: str,
        *,
        tenant: str | None = None,
        count: int = 1,
        retry_after: int | None = None,
        latency_seconds: float | None = None,
    ) -> dict[str, Any]:
        """Inject a fault; return its description.

        ``endpoint``: "discovery", "token", "jwks", "vault" or "any". ``kind``: "429" (service-
        shaped JSON + Retry-After, default 1 s), "429_text" (plain text + Retry-After), "500",
        "503", "latency" (sleep ``latency_seconds``, then answer normally) or "drop" (close the
        connection without a response). ``tenant`` (GUID or domain) scopes it; it fires ``count``
        times (-1: until :meth:`clear_faults`).
        """
        if endpoint not in FAULT_ENDPOINTS:
            raise StateError(f"endpoint must be one of {sorted(FAULT_ENDPOINTS)}")
        if kind not in FAULT_KINDS:
            raise StateError(f"kind must be one of {sorted(FAULT_KINDS)}")
        if count == 0 or count < -1:
            raise StateError("count must be positive, or -1 for 'until cleared'")
        if kind == "latency" and (latency_seconds is None or latency_seconds < 0):
            raise StateError("a latency fault needs latency_seconds >= 0")
        fault = Fault(self._next_fault_id, endpoint, kind, tenant, count, retry_after, latency_seconds)
        self._next_fault_id += 1
        self.pending_faults.append(fault)
        return fault.describe()

    @operation
    def faults(self) -> list[dict[str, Any]]:
        """Pending faults with their remaining counts."""
        return [fault.describe() for fault in self.pending_faults]

    @operation
    def clear_faults(self) -> None:
        """Remove every pending fault."""
        self.pending_faults.clear()

    def take_fault(self, endpoint: str, tenant_id: str | None, raw_tenant: str | None) -> Fault | None:
        """Consume one firing of the first fault matching this request, if any.

        A tenant-scoped fault matches when it names the request's tenant by GUID or domain; when
        the request's tenant is unknown to the directory, the raw path segment is compared.
        """
        for fault in self.pending_faults:
            if fault.endpoint not in ("any", endpoint):
                continue
            if fault.tenant is not None and not self._tenant_matches(fault.tenant, tenant_id, raw_tenant):
                continue
            if fault.remaining > 0:
                fault.remaining -= 1
                if fault.remaining == 0:
                    self.pending_faults.remove(fault)
            self.counts["faults_fired"] += 1
            return fault
        return None

    def _tenant_matches(self, wanted: str, tenant_id: str | None, raw: str | None) -> bool:
        resolved = self.resolve_tenant(wanted)
        if resolved is not None and tenant_id is not None:
            return resolved.tenant_id == tenant_id
        return raw is not None and wanted.strip().lower() == raw.strip().lower()

    # ------------------------------------------------------------------ log
    def record(self, entry: RequestRecord) -> None:
        """Append to the request log and bump the per-endpoint counter."""
        self.log.append(entry)
        self.counts[entry.endpoint] += 1

    @operation
    def counters(self) -> dict[str, int]:
        """Requests per endpoint class ("discovery", "token", "jwks", "vault"), "issued_tokens"
        and "faults_fired", zeros included."""
        every = {name: 0 for name in (*sorted(ENDPOINTS), "issued_tokens", "faults_fired")}
        return {**every, **self.counts}

    @operation
    def requests(
        self,
        endpoint: str | None = None,
        *,
        tenant: str | None = None,
        client_id: str | None = None,
        resource: str | None = None,
    ) -> list[dict[str, Any]]:
        """The request log (oldest first), filtered: entries are ``{"endpoint", "tenant_id",
        "client_id", "resource", "status", "time"}``; status 0 means the connection was dropped.

        Tenants match by GUID or domain.
        """
        wanted_tid: str | None = None
        if tenant is not None:
            resolved = self.resolve_tenant(tenant)
            wanted_tid = resolved.tenant_id if resolved else tenant.strip().lower()
        wanted_client = client_id.strip().lower() if client_id else None
        wanted_resource = normalize_resource(resource) if resource else None
        return [
            r.as_json()
            for r in self.log
            if (endpoint is None or r.endpoint == endpoint)
            and (wanted_tid is None or (r.tenant_id or "").lower() == wanted_tid)
            and (wanted_client is None or r.client_id == wanted_client)
            and (wanted_resource is None or r.resource == wanted_resource)
        ]

    # ------------------------------------------------------------------ keys
    @operation
    def signing_key(self) -> dict[str, Any]:
        """The token-signing key: ``{"kid", "public_key_pem", "jwks"}``."""
        signer = self.signer
        return {"kid": signer.kid, "public_key_pem": signer.public_key_pem, "jwks": signer.jwks()}


def normalize_resource(resource: str) -> str:
    """Resource identifiers compare without a trailing slash (``https://x/`` == ``https://x``)."""
    return resource.strip().rstrip("/")


def _required_resource(resource: str) -> str:
    normalized = normalize_resource(resource)
    if not normalized:
        raise StateError("resource must not be empty")
    return normalized


def secret_matches(candidate: str, stored: str) -> bool:
    """Constant-time comparison so the emulator does not model a timing oracle."""
    return hmac.compare_digest(candidate.encode(), stored.encode())
