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
from typing import Any, Final, TypeVar, cast

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from .tokens import SigningKey, make_certificate
from .world import BROKER_CLIENT_ID, BROKER_CLIENT_SECRET, DEMO_WORLD, VAULT_TENANT_DOMAINS, VAULT_TENANT_ID

#: Audience Key Vault accepts and the resource its challenge names.
VAULT_RESOURCE: Final = "https://vault.azure.net"

DEFAULT_TOKEN_LIFETIME: Final = 3600

#: The audience of a token presented under a federated identity credential (public cloud).
TOKEN_EXCHANGE_AUDIENCE: Final = "api://AzureADTokenExchange"  # noqa: S105 - an audience, not a password
#: Entra allows at most this many federated identity credentials on one app.
MAX_FEDERATED_CREDENTIALS: Final = 20

#: Endpoint classes of the emulated services, as logged, counted and targeted by faults: "vault" is
#: every Key Vault read (secrets, keys, certificates), "sign" Key Vault's ``keys/sign`` and "identity"
#: the managed-identity endpoint.
ENDPOINTS: Final[frozenset[str]] = frozenset({"discovery", "token", "jwks", "vault", "sign", "identity"})
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


@dataclass(frozen=True)
class FederatedCredential:
    """A federated identity credential on an app: tokens from ``issuer`` about ``subject`` for one of
    ``audiences`` authenticate the app (Entra compares issuer and subject exactly, case included)."""

    name: str
    issuer: str
    subject: str
    audiences: tuple[str, ...]

    def describe(self) -> dict[str, Any]:
        """JSON form for the control API."""
        return {
            "name": self.name,
            "issuer": self.issuer,
            "subject": self.subject,
            "audiences": list(self.audiences),
        }


@dataclass
class App:
    """An app registration (multi-tenant capable) with its credentials."""

    client_id: str
    home_tenant: str
    secrets: list[AppSecret] = field(default_factory=list)
    certificates: list[AppCertificate] = field(default_factory=list)
    federated: list[FederatedCredential] = field(default_factory=list)
    #: Web redirect URIs admin consent may return to (exact match, as Entra compares them).
    redirect_uris: list[str] = field(default_factory=list)
    #: The app roles the registration requests per resource: what admin consent grants.
    permissions: dict[str, list[str]] = field(default_factory=dict)


@dataclass(frozen=True)
class ManagedIdentity:
    """A user-assigned managed identity: a service principal in the vault tenant with no credential
    of its own; the managed-identity endpoint hands out its tokens."""

    client_id: str
    object_id: str
    tenant_id: str


@dataclass
class Consent:
    """A service principal of an app in a foreign tenant: consent plus app roles per resource."""

    roles: dict[str, list[str]] = field(default_factory=dict)
    #: Epoch seconds from which the token endpoint sees this service principal (propagation).
    visible_at: float = 0.0


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
class KeyVersion:
    """One version of a Key Vault key (RSA, created by a certificate): the private half never leaves."""

    version: str
    private_key: rsa.RSAPrivateKey = field(repr=False)
    created: int
    enabled: bool = True


@dataclass
class CertificateVersion:
    """One version of a Key Vault certificate; its key is the key version of the same id."""

    version: str
    cert_pem: str
    created: int
    exportable: bool

    @property
    def der(self) -> bytes:
        """The certificate, DER-encoded (what Key Vault returns as ``cer``)."""
        cert = x509.load_pem_x509_certificate(self.cert_pem.encode())
        return cert.public_bytes(serialization.Encoding.DER)


@dataclass
class VaultCertificate:
    """A Key Vault certificate and the key of the same name behind it, versions oldest first."""

    name: str
    subject: str
    versions: list[CertificateVersion] = field(default_factory=list)
    keys: list[KeyVersion] = field(default_factory=list)

    def current(self) -> CertificateVersion | None:
        """The newest version, which ``GET /certificates/{name}`` returns."""
        return self.versions[-1] if self.versions else None

    def key(self, version: str | None) -> KeyVersion | None:
        """The key version with this id (the newest for None or an empty version)."""
        if not version:
            return self.keys[-1] if self.keys else None
        wanted = version.lower()
        return next((k for k in self.keys if k.version == wanted), None)

    def certificate(self, version: str | None) -> CertificateVersion | None:
        """The certificate version with this id (the newest for None)."""
        if not version:
            return self.current()
        wanted = version.lower()
        return next((c for c in self.versions if c.version == wanted), None)


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
    # How a token request authenticated, when it did: "secret", "certificate:<SHA-256 thumbprint of
    # the registered certificate that verified the assertion>" or "federated:<SHA-256 of the presented
    # token, first 16 hex digits>" (a fingerprint, never the token).
    credential: str | None = None

    def as_json(self) -> dict[str, Any]:
        """JSON form for the control API."""
        return {
            "endpoint": self.endpoint,
            "tenant_id": self.tenant_id,
            "client_id": self.client_id,
            "resource": self.resource,
            "status": self.status,
            "time": self.time,
            "credential": self.credential,
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
        self.vault_certificates: dict[str, VaultCertificate] = {}
        self.vault_access: set[str] | None = None
        self.managed_identities: dict[str, ManagedIdentity] = {}
        #: The App Service managed-identity protocol's shared header value (IDENTITY_HEADER).
        self.identity_header = ""
        #: Signing keys of OIDC issuers outside Entra (a Kubernetes cluster's), by issuer URL: what
        #: Entra would fetch from the issuer's discovery document and JWKS.
        self.oidc_issuers: dict[str, SigningKey] = {}
        #: Entra names the mismatched part of a federated credential (700211/700212/700213) unless
        #: this is False, when it answers the older combined AADSTS70021.
        self.federated_errors_detailed = True
        self.pending_faults: list[Fault] = []
        self.token_lifetime = DEFAULT_TOKEN_LIFETIME
        self.token_lifetime_jitter = 0
        self.consent_delay_seconds = 0.0
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
        self.vault_certificates.clear()
        self.vault_access = None
        self.managed_identities.clear()
        self.identity_header = secrets.token_urlsafe(24)
        self.oidc_issuers.clear()
        self.federated_errors_detailed = True
        self.pending_faults.clear()
        self.token_lifetime = DEFAULT_TOKEN_LIFETIME
        self.token_lifetime_jitter = 0
        self.consent_delay_seconds = 0.0
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
    def add_federated_credential(
        self,
        client_id: str,
        *,
        issuer: str,
        subject: str,
        audiences: Iterable[str] = (TOKEN_EXCHANGE_AUDIENCE,),
        name: str | None = None,
    ) -> dict[str, Any]:
        """Add a federated identity credential to the app (``az ad app federated-credential create``):
        a token from ``issuer`` whose ``sub`` is ``subject`` and whose ``aud`` is one of ``audiences``
        then authenticates it as a client assertion, in every tenant it is consented in."""
        app = self.require_app(client_id)
        if len(app.federated) >= MAX_FEDERATED_CREDENTIALS:
            raise StateError(f"an app holds at most {MAX_FEDERATED_CREDENTIALS} federated credentials")
        wanted = tuple(audiences)
        if not issuer or not subject or len(wanted) != 1:
            raise StateError("a federated credential needs an issuer, a subject and exactly one audience")
        if any(f.issuer == issuer and f.subject == subject for f in app.federated):
            raise StateError("the app already has a federated credential for this issuer and subject")
        credential = FederatedCredential(name or f"fic-{len(app.federated) + 1}", issuer, subject, wanted)
        app.federated.append(credential)
        return credential.describe()

    @operation
    def remove_federated_credentials(self, client_id: str) -> None:
        """Remove every federated identity credential of the app."""
        self.require_app(client_id).federated.clear()

    @operation
    def set_federated_errors(self, detailed: bool) -> None:
        """Answer a federated credential that matches no record with the part that differs
        (AADSTS700211 issuer, 700213 subject, 700212 audience: ``detailed``) or with the older
        combined AADSTS70021."""
        self.federated_errors_detailed = detailed

    @operation
    def add_managed_identity(self, client_id: str, object_id: str | None = None) -> dict[str, Any]:
        """Create a user-assigned managed identity in the vault tenant (a service principal the vault
        admits like any app of its tenant); return ``{"client_id", "object_id", "tenant_id",
        "identity_header"}``. Its tokens come from ``GET /msi/token`` (App Service's protocol)."""
        guid = normalize_guid(client_id)
        oid = normalize_guid(object_id) if object_id else str(uuid.uuid5(uuid.NAMESPACE_URL, f"mi:{guid}"))
        self.apps[guid] = App(guid, VAULT_TENANT_ID)
        identity = ManagedIdentity(guid, oid, VAULT_TENANT_ID)
        self.managed_identities[guid] = identity
        return {
            "client_id": guid,
            "object_id": oid,
            "tenant_id": VAULT_TENANT_ID,
            "identity_header": self.identity_header,
        }

    def find_managed_identity(self, client_id: str | None, object_id: str | None) -> ManagedIdentity | None:
        """The user-assigned identity a managed-identity request names by client or object id."""
        for identity in self.managed_identities.values():
            if client_id is not None and identity.client_id == client_id.strip().lower():
                return identity
            if object_id is not None and identity.object_id == object_id.strip().lower():
                return identity
        return None

    @operation
    def add_oidc_issuer(self, issuer: str) -> dict[str, Any]:
        """Create an OIDC issuer outside Entra (a Kubernetes cluster's service-account issuer) with its
        own signing key; return its JWKS. Entra would fetch the JWKS from the issuer's discovery
        document: the emulator keeps it instead."""
        if not issuer:
            raise StateError("issuer must not be empty")
        signer = self.oidc_issuers.setdefault(issuer, SigningKey())
        return signer.jwks()

    @operation
    def issue_oidc_token(
        self,
        issuer: str,
        subject: str,
        audience: str = TOKEN_EXCHANGE_AUDIENCE,
        lifetime_seconds: int = 3600,
        issued_seconds_ago: int = 0,
    ) -> str:
        """A token of an issuer made with :meth:`add_oidc_issuer`, shaped like a Kubernetes projected
        service-account token (what kubelet writes into the pod)."""
        signer = self.oidc_issuers.get(issuer)
        if signer is None:
            raise StateError(f"unknown OIDC issuer {issuer!r}: add_oidc_issuer first")
        if lifetime_seconds <= 0:
            raise StateError("lifetime_seconds must be positive")
        now = int(time.time()) - issued_seconds_ago
        claims = {
            "iss": issuer,
            "sub": subject,
            "aud": [audience],
            "iat": now,
            "nbf": now,
            "exp": now + lifetime_seconds,
            "jti": str(uuid.uuid4()),
        }
        return signer.sign(claims)

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

    @operation
    def add_redirect_uri(self, client_id: str, uri: str) -> None:
        """Register a Web redirect URI on the app (admin consent only returns to registered ones)."""
        if not uri.startswith(("https://", "http://localhost", "http://127.0.0.1")):
            raise StateError("a redirect URI must be https (or http on localhost / 127.0.0.1)")
        app = self.require_app(client_id)
        if uri not in app.redirect_uris:
            app.redirect_uris.append(uri)

    @operation
    def set_app_permissions(self, client_id: str, resource: str, roles: Iterable[str]) -> None:
        """Set the app roles the registration requests on ``resource`` (granted by admin consent)."""
        self.require_app(client_id).permissions[_required_resource(resource)] = list(roles)

    @operation
    def set_consent_delay(self, seconds: float) -> None:
        """A service principal created by admin consent from now on stays invisible to the token
        endpoint (AADSTS700016) for ``seconds``, as a real one takes a while to propagate."""
        if seconds < 0:
            raise StateError("seconds must not be negative")
        self.consent_delay_seconds = seconds

    def admin_consent(self, tenant_id: str, app: App) -> None:
        """What the admin-consent page's Accept does: a service principal with every app role the
        registration requests, visible after the consent delay (an existing one stays visible)."""
        consent = self.consents.get((tenant_id, app.client_id))
        if consent is None:
            consent = Consent(visible_at=time.time() + self.consent_delay_seconds)
            self.consents[(tenant_id, app.client_id)] = consent
        for resource, roles in app.permissions.items():
            consent.roles[resource] = list(roles)

    def is_consented(self, tenant_id: str, app: App) -> bool:
        """An app has a service principal in its home tenant and wherever it was granted (once the
        grant has propagated)."""
        if app.home_tenant == tenant_id:
            return True
        consent = self.consents.get((tenant_id, app.client_id))
        return consent is not None and consent.visible_at <= time.time()

    def roles_for(self, tenant_id: str, app: App, resource: str) -> list[str]:
        """App roles ``tenant_id`` granted ``app`` on ``resource`` (empty when none)."""
        consent = self.consents.get((tenant_id, app.client_id))
        if consent is None or consent.visible_at > time.time():
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

    @operation
    def create_certificate(
        self, name: str, *, subject: str = "CN=token-broker-assertions", exportable: bool = False
    ) -> dict[str, Any]:
        """Create a new version of Key Vault certificate ``name`` with a fresh RSA-2048 key (self-signed,
        as ``az keyvault certificate create`` with the default policy); return ``{"version",
        "certificate_pem", "x5t_s256"}``: the public part, for ``add_app_certificate``.

        ``exportable=False`` (the point of it): the private key exists only inside the vault. As in
        Key Vault, the certificate's secret of the same name then holds the certificate alone, and the
        key answers with its public half only; ``exportable=True`` puts the private key in the secret
        too (what the broker's ``{certificate: NAME}`` source reads).
        """
        if not _SECRET_NAME.match(name):
            raise StateError(f"invalid certificate name {name!r}")
        key_pem, cert_pem = make_certificate(subject.removeprefix("CN="), days=365)
        # make_certificate makes RSA keys.
        private_key = cast("rsa.RSAPrivateKey", serialization.load_pem_private_key(key_pem.encode(), None))
        entry = self.vault_certificates.setdefault(name.lower(), VaultCertificate(name, subject))
        now = int(time.time())
        version = uuid.uuid4().hex
        entry.keys.append(KeyVersion(version, private_key, now))
        entry.versions.append(CertificateVersion(version, cert_pem, now, exportable))
        self.set_secret(
            name, key_pem + cert_pem if exportable else cert_pem, content_type="application/x-pem-file"
        )
        _, sha256 = cert_thumbprints(cert_pem)
        return {"version": version, "certificate_pem": cert_pem, "x5t_s256": sha256.hex().upper()}

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

        ``endpoint``: "discovery", "token", "jwks", "vault", "sign", "identity" or "any". ``kind``:
        "429" (service-shaped JSON + Retry-After, default 1 s), "429_text" (plain text + Retry-After), "500",
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
        """Requests per endpoint class ("discovery", "token", "jwks", "vault", "sign", "identity"),
        "issued_tokens", "signatures" (Key Vault signatures made) and "faults_fired", zeros included."""
        every = dict.fromkeys((*sorted(ENDPOINTS), "issued_tokens", "signatures", "faults_fired"), 0)
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
