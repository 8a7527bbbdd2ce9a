"""The demo data set (``python -m emulator --demo`` or ``Emulator.seed_demo()``).

On top of the base state (vault tenant + broker identity) it adds:

* tenant **contoso** ``c0c0c0c0-0000-4000-8000-000000000001`` (``contoso.onmicrosoft.com``,
  ``contoso.com``), which has consented the Defender app with roles ``Incident.Read.All`` and
  ``AdvancedHunting.Read.All`` on ``https://api.security.microsoft.com`` and ``Alert.Read.All``
  on ``https://api.securitycenter.microsoft.com``;
* tenant **fabrikam** ``fa0fa0fa-0000-4000-8000-000000000002`` (``fabrikam.onmicrosoft.com``),
  which has *not* consented (token requests answer AADSTS700016);
* app **defender** ``11111111-2222-3333-4444-555555555555`` (the client id of the example broker
  configuration), registered in the vault tenant, whose freshly generated client secret is stored
  only in the vault as secret ``defender-app-secret`` — read it from there, as the broker does.
"""

from __future__ import annotations

from typing import Final

from .state import VAULT_TENANT_ID, EmulatorState

CONTOSO_TENANT_ID: Final = "c0c0c0c0-0000-4000-8000-000000000001"
FABRIKAM_TENANT_ID: Final = "fa0fa0fa-0000-4000-8000-000000000002"
DEFENDER_CLIENT_ID: Final = "11111111-2222-3333-4444-555555555555"
DEFENDER_SECRET_NAME: Final = "defender-app-secret"  # noqa: S105 - a Key Vault secret name
DEFENDER_XDR: Final = "https://api.security.microsoft.com"
DEFENDER_ENDPOINT: Final = "https://api.securitycenter.microsoft.com"


def seed_demo(state: EmulatorState) -> None:
    """Add the demo tenants, app, consents and vault secret (idempotent: re-seeding rotates)."""
    state.add_tenant(CONTOSO_TENANT_ID, ["contoso.onmicrosoft.com", "contoso.com"])
    state.add_tenant(FABRIKAM_TENANT_ID, ["fabrikam.onmicrosoft.com"])
    state.add_app(DEFENDER_CLIENT_ID, home_tenant=VAULT_TENANT_ID)
    state.rotate_app_secret(DEFENDER_CLIENT_ID, vault_secret=DEFENDER_SECRET_NAME)
    state.grant(
        CONTOSO_TENANT_ID,
        DEFENDER_CLIENT_ID,
        DEFENDER_XDR,
        ["Incident.Read.All", "AdvancedHunting.Read.All"],
    )
    state.grant(CONTOSO_TENANT_ID, DEFENDER_CLIENT_ID, DEFENDER_ENDPOINT, ["Alert.Read.All"])
