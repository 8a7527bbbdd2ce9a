"""Local TLS emulator of Microsoft Entra ID and Azure Key Vault for tests and demos.

The real ``msal.ConfidentialClientApplication``, ``azure.identity.aio.ClientSecretCredential`` and
``azure.keyvault.secrets.aio.SecretClient`` talk to it unchanged (see /work/shared/FIELD-NOTES.md
for the options that point them at it). Modules:

* ``state``   — in-memory directory, vault, faults, request log (no I/O);
* ``tokens``  — signing key, JWKS, client-assertion verification, test certificates;
* ``entra``   — OIDC discovery, JWKS and v2/v1 token endpoints (Entra-shaped errors);
* ``vault``   — Key Vault secret reads behind the bearer challenge;
* ``control`` — the ``/_emulator/`` control API; ``demo`` — the ``--demo`` data set;
* ``app``     — the aiohttp app, request logging and fault injection middleware;
* ``context`` — typed aiohttp keys and helpers shared by the HTTP modules;
* ``server``  / ``__main__`` — TLS, listening, ready file (``python -m tests.emulator``);
* ``client``  — :class:`Emulator` (sync control handle) and :func:`start_emulator`;
* ``pytest_plugin`` — the ``emulator_process`` / ``emulator`` fixtures.
"""

from .client import BrokerIdentity, Emulator, EmulatorError, start_emulator
from .tokens import make_certificate

__all__ = ["BrokerIdentity", "Emulator", "EmulatorError", "make_certificate", "start_emulator"]
