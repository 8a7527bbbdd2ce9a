"""A local Microsoft Entra ID + Azure Key Vault, served over TLS, for running token-broker without Azure.

What it emulates: the parts of Entra ID a confidential client uses for the client-credentials grant
(per-tenant OIDC discovery and JWKS, the v2 and v1 token endpoints issuing RS256 JWTs with ``tid``,
``aud``, ``roles``, ``exp``, client secrets, certificate assertions and federated identity
credentials, admin consent per tenant (also through the v2 admin-consent page, with a configurable
propagation delay) and Entra-shaped ``AADSTS`` errors), the managed-identity
endpoint of App Service for user-assigned identities, and the Key Vault secrets, certificates and
keys APIs behind its bearer challenge (versions, enabled flags, an access policy, non-exportable keys
that sign but never leave). The real ``msal.ConfidentialClientApplication``,
``azure.identity.aio.ClientSecretCredential`` and ``azure.keyvault.secrets.aio.SecretClient`` talk to
it unchanged, given only the options any local TLS endpoint needs (a CA file, MSAL's
``instance_discovery=False``, Key Vault's ``verify_challenge_resource=False``).

What it is for: the test suite, the benchmarks, ``make demo`` and the compose stack all run the broker
against it; a control API (loopback only) seeds tenants, apps, consents and secrets, plays the
customer's admin (revokes consent, removes an app role, disables the app's service principal), injects
faults (429 + Retry-After, 5xx, latency, dropped connections) and counts requests for assertions. It is not
a security boundary and holds nothing real: every secret in it is generated or a public fake value.

Run it with ``python -m emulator`` (see ``__main__``). Modules:

* ``world``   — seed data (the demo, test and bench worlds, the base identities) and the broker
  configuration pointed at a running emulator;
* ``tokens``  — signing key, JWKS, client-assertion verification, test certificates;
* ``state``   — in-memory directory, vault, faults, request log (no I/O), and the control
  operations, each written once as an ``@operation`` method;
* ``entra``   — OIDC discovery, JWKS and v2/v1 token endpoints (Entra-shaped errors);
* ``consent`` — the v2 admin-consent page (Accept / Cancel, redirect to the app's redirect URI);
* ``vault``   — Key Vault secret, certificate and key reads and ``keys/sign``, behind the bearer challenge;
* ``identity`` — the managed-identity endpoint (App Service's protocol);
* ``control`` — the control API, ``POST /_emulator/{operation}``, derived from ``state``;
* ``app``     — the aiohttp app, request logging and fault injection middleware;
* ``context`` — typed aiohttp keys and helpers shared by the HTTP modules;
* ``server``  / ``__main__`` — TLS, listening, ready file (``python -m emulator``);
* ``client``  — :class:`Emulator` (sync control handle) and :func:`start_emulator`;
* ``stack``   — the redis-server and ``token-broker serve`` processes a local stack runs with it;
* ``pytest_plugin`` — the ``emulator_process`` / ``emulator`` fixtures.
"""

from .client import BrokerIdentity, Emulator, EmulatorError, start_emulator
from .tokens import make_certificate

__all__ = ["BrokerIdentity", "Emulator", "EmulatorError", "make_certificate", "start_emulator"]
