"""Seed data for the emulator ("worlds") and the broker configuration that runs against it.

A world is what a run needs to exist in Entra ID and Key Vault: customer tenants (by GUID, some also
by verified domain), one multi-tenant app registration whose client secret lives only in the emulated
Key Vault, the admin consents (app roles per resource) some tenants granted it, and the broker's cache
encryption key, also in the vault. One world per user of the emulator:

* :data:`DEMO_WORLD` — ``python -m emulator --demo``, ``make demo`` and deploy/docker-compose.yml:
  contoso has consented the Defender app, fabrikam has not;
* :data:`TEST_WORLD` — tests/functional: three consented tenants (one also addressed by two domains)
  and one that has not consented;
* :data:`BENCH_WORLD` — bench/: the app in its home tenant; the benchmark adds its thousands of
  consenting tenants with :meth:`World.add_customer`.

Under every world lies the base state the emulator always has (a reset recreates it): the vault's own
tenant and, registered there, the broker's own Key Vault identity (:data:`VAULT_TENANT_ID`,
:data:`BROKER_CLIENT_ID`, :data:`BROKER_CLIENT_SECRET`; deploy/docker-compose.yml repeats these values
as the defaults of its DEMO_BROKER_* variables: change them together).

:meth:`World.seed` works the same on the server's ``EmulatorState`` (``--demo``) and through the
control API (an ``Emulator`` handle): both offer the same operations. :func:`broker_config` and
:func:`broker_environment` give the configuration (the YAML document, as a dict) and the ``AZURE_*``
environment of a broker that uses a running emulator as its Entra ID and Key Vault.

This module must never do I/O other than through the directory it is handed, nor read the
environment: the server imports it.
"""

from __future__ import annotations

import base64
import copy
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, NamedTuple

if TYPE_CHECKING:
    from .client import Emulator
    from .state import EmulatorState

# ---------------------------------------------------------------------- the base state
#: The tenant the emulated Key Vault lives in. Fixed so a run (and the ``Emulator`` handle) knows it
#: without asking.
VAULT_TENANT_ID: Final = "00000000-0000-0000-0000-00000000b0b0"
VAULT_TENANT_DOMAINS: Final = ("emulator-home.onmicrosoft.com",)
#: The broker's own identity to Key Vault: an app registered in the vault tenant. The secret is a
#: public fake value that exists only inside this emulator.
BROKER_CLIENT_ID: Final = "00000000-0000-0000-0000-00000000b0b1"
BROKER_CLIENT_SECRET: Final = "demo-broker-secret"  # noqa: S105 - a public fake, see above

# ---------------------------------------------------------------------- resources and app roles
DEFENDER_XDR: Final = "https://api.security.microsoft.com"
DEFENDER_ENDPOINT: Final = "https://api.securitycenter.microsoft.com"
#: A real resource no world's app has roles on.
GRAPH: Final = "https://graph.microsoft.com"
XDR_ROLES: Final = ("Incident.Read.All", "AdvancedHunting.Read.All")
ENDPOINT_ROLES: Final = ("Alert.Read.All",)
#: What a consenting tenant grants the Defender app, per resource.
DEFENDER_ROLES: Final[Mapping[str, tuple[str, ...]]] = {
    DEFENDER_XDR: XDR_ROLES,
    DEFENDER_ENDPOINT: ENDPOINT_ROLES,
}

#: Key Vault secret names (names, not values).
APP_SECRET_NAME: Final = "defender-app-secret"  # noqa: S105 - a Key Vault secret name
CACHE_KEY_NAME: Final = "broker-cache-key"


@dataclass(frozen=True)
class TenantSeed:
    """A customer tenant: its GUID, its verified domains, whether it consented the world's app."""

    tenant_id: str
    domains: tuple[str, ...] = ()
    consented: bool = True


@dataclass(frozen=True)
class AppSeed:
    """The multi-tenant app: its client id and home tenant, the name the broker configuration gives
    it, the Key Vault secret holding its client secret, and the app roles each consenting tenant
    grants it per resource (which are also the resources the broker may ask for)."""

    client_id: str
    home_tenant: str
    roles: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: dict(DEFENDER_ROLES))
    name: str = "defender"
    secret_name: str = APP_SECRET_NAME


class Seeded(NamedTuple):
    """The secret values :meth:`World.seed` generated (tests look for them in logs)."""

    app_secret: str
    cache_key: str


@dataclass(frozen=True)
class World:
    """Tenants, one app whose secret lives in Key Vault, its consents, and the cache key."""

    app: AppSeed
    tenants: tuple[TenantSeed, ...] = ()
    cache_key_name: str = CACHE_KEY_NAME

    def seed(self, directory: EmulatorState | Emulator) -> Seeded:
        """Create the world on top of the base state; secret values are generated afresh.

        Seeding the same world twice rotates the app secret and the cache key.
        """
        for tenant in self.tenants:
            directory.add_tenant(tenant.tenant_id, tenant.domains)
        directory.add_app(self.app.client_id, home_tenant=self.app.home_tenant)
        for resource, roles in self.app.roles.items():
            # What the registration requests: admin consent on the emulator's consent page grants it.
            directory.set_app_permissions(self.app.client_id, resource, roles)
        app_secret = directory.rotate_app_secret(self.app.client_id, vault_secret=self.app.secret_name)
        for tenant in self.tenants:
            if tenant.consented:
                self.consent(directory, tenant.tenant_id)
        cache_key = base64.b64encode(os.urandom(32)).decode()  # AES-256, as the broker expects
        directory.set_secret(self.cache_key_name, cache_key)
        return Seeded(app_secret, cache_key)

    def consent(self, directory: EmulatorState | Emulator, tenant: str) -> None:
        """Admin-consent the app in ``tenant`` (GUID or domain) with its roles on every resource."""
        for resource, roles in self.app.roles.items():
            directory.grant(tenant, self.app.client_id, resource, roles)

    def add_customer(
        self, directory: EmulatorState | Emulator, tenant_id: str, domains: Iterable[str] = ()
    ) -> None:
        """Add one more tenant that has consented the app (after :meth:`seed`)."""
        directory.add_tenant(tenant_id, domains)
        self.consent(directory, tenant_id)

    def caller(self, api_key_sha256: str, tenants: Sequence[str] = ("*",)) -> dict[str, Any]:
        """A ``callers.NAME`` entry allowed this world's app for ``tenants``."""
        return {"api_key_sha256": api_key_sha256, "tenants": list(tenants), "apps": [self.app.name]}


# ---------------------------------------------------------------------- the worlds
CONTOSO_TENANT_ID: Final = "c0c0c0c0-0000-4000-8000-000000000001"
FABRIKAM_TENANT_ID: Final = "fa0fa0fa-0000-4000-8000-000000000002"
#: The client id of the example broker configuration (README, deploy/).
DEFENDER_CLIENT_ID: Final = "11111111-2222-3333-4444-555555555555"

#: The app is registered in the vault tenant; its client secret exists only in the vault.
DEMO_WORLD: Final = World(
    app=AppSeed(DEFENDER_CLIENT_ID, home_tenant=VAULT_TENANT_ID),
    tenants=(
        TenantSeed(CONTOSO_TENANT_ID, ("contoso.onmicrosoft.com", "contoso.com")),
        TenantSeed(FABRIKAM_TENANT_ID, ("fabrikam.onmicrosoft.com",), consented=False),
    ),
)

TEST_APP_ID: Final = "0f0e0d0c-0b0a-4999-8888-777766665555"
TENANT_A: Final = "aaaaaaaa-1111-4111-8111-aaaaaaaaaaaa"
TENANT_B: Final = "bbbbbbbb-2222-4222-8222-bbbbbbbbbbbb"
TENANT_C: Final = "cccccccc-3333-4333-8333-cccccccccccc"
DOMAIN_C: Final = "fabrikam.onmicrosoft.com"
#: Tenant C's second verified domain.
DOMAIN_C2: Final = "fabrikam.example.com"
TENANT_UNCONSENTED: Final = "dddddddd-4444-4444-8444-dddddddddddd"
#: A well-formed GUID no world creates.
TENANT_MISSING: Final = "eeeeeeee-5555-4555-8555-eeeeeeeeeeee"

#: The app's home is customer tenant A.
TEST_WORLD: Final = World(
    app=AppSeed(TEST_APP_ID, home_tenant=TENANT_A),
    tenants=(
        TenantSeed(TENANT_A),
        TenantSeed(TENANT_B),
        TenantSeed(TENANT_C, (DOMAIN_C, DOMAIN_C2)),
        TenantSeed(TENANT_UNCONSENTED, consented=False),
    ),
)

#: Only Defender XDR, so that adding thousands of customers costs one grant each.
BENCH_WORLD: Final = World(
    app=AppSeed(TEST_APP_ID, home_tenant=TENANT_A, roles={DEFENDER_XDR: XDR_ROLES}),
    tenants=(TenantSeed(TENANT_A),),
)


# ---------------------------------------------------------------------- the broker's side
def broker_config(
    emulator: Emulator,
    world: World,
    callers: Mapping[str, Mapping[str, Any]],
    *,
    redis_url: str | None = None,
    **settings: Any,
) -> dict[str, Any]:
    """A broker configuration (the YAML document, as a dict) using ``emulator`` as Entra ID and Key Vault.

    The world's app reads its client secret from Key Vault and may ask for every resource it has
    roles on; the broker's own Key Vault identity comes from the environment
    (:func:`broker_environment`). With ``redis_url`` the shared cache is on, sealed with the world's
    cache key from Key Vault. ``settings`` are more top-level keys; they win over all of the above.
    """
    config: dict[str, Any] = {
        "authority_host": emulator.base_url,
        "key_vault_url": emulator.vault_url,
        # The vault is not under vault.azure.net; keep this true in production.
        "key_vault_verify_challenge_resource": False,
        "azure_credential": "environment",
        "outbound_ca_file": str(emulator.ca_path),
        "apps": {
            world.app.name: {
                "client_id": world.app.client_id,
                "credential": {"secret": world.app.secret_name},
                "resources": list(world.app.roles),
            }
        },
        "callers": callers,
    }
    if redis_url is not None:
        config["redis_url"] = redis_url
        config["cache_encryption_key"] = {"secret": world.cache_key_name}
    config.update(settings)
    return copy.deepcopy(config)


def broker_environment(emulator: Emulator) -> dict[str, str]:
    """The ``AZURE_*`` variables that make the broker's ``azure_credential: environment`` the
    emulator's broker identity, authenticating at the emulator."""
    identity = emulator.broker_identity
    return {
        "AZURE_TENANT_ID": identity.tenant_id,
        "AZURE_CLIENT_ID": identity.client_id,
        "AZURE_CLIENT_SECRET": identity.client_secret,
        "AZURE_AUTHORITY_HOST": emulator.base_url,
    }


def managed_identity_environment(emulator: Emulator, identity: Mapping[str, Any]) -> dict[str, str]:
    """The variables that make azure-identity's ``ManagedIdentityCredential`` (and so the broker's
    ``azure_credential: managed_identity``) the user-assigned ``identity`` (a result of
    ``Emulator.add_managed_identity``), through the emulator's App Service endpoint: no secret."""
    return {
        "IDENTITY_ENDPOINT": emulator.identity_endpoint,
        "IDENTITY_HEADER": str(identity["identity_header"]),
        "AZURE_CLIENT_ID": str(identity["client_id"]),
    }
