"""App credentials with no secret at all, end to end: broker processes whose app authenticates to Entra
with a federated managed identity, a projected token, or an assertion Key Vault signs, against the
emulator's Entra ID, managed-identity endpoint and Key Vault (real MSAL, azure-identity and
azure-keyvault-keys/-certificates inside the broker).

No configuration here holds a secret: no client secret, no certificate with its key, no cache key,
no ``AZURE_CLIENT_SECRET``; the app registration in the emulator has none either.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests
from azure.identity.aio import ClientSecretCredential
from azure.keyvault.keys.aio import KeyClient
from azure.keyvault.secrets.aio import SecretClient

from broker.callers import new_api_key
from emulator import Emulator
from emulator.world import VAULT_TENANT_ID, managed_identity_environment
from tests.functional.conftest import DEFENDER, GRAPH, MDE, ROLES, TENANT_A, TENANT_B, ask
from tests.support import BrokerProcess

StartBroker = Callable[..., BrokerProcess]

APP = "5ec7e1e5-0000-4000-8000-000000000001"
IDENTITY = "5ec7e1e5-0000-4000-8000-00000000000f"
CLUSTER = "https://oidc.cluster.example/5ec7e1e5/"
SERVICE_ACCOUNT = "system:serviceaccount:security:token-broker"
EXCHANGE = "api://AzureADTokenExchange"
CERTIFICATE = "defender-assertions"
MODES = ("managed_identity", "token_file", "key_vault_key")
# Credential sources that would hold or name a secret (their absence is what "secretless" means).
SECRET_KINDS = ("secret", "certificate", "env", "file")


@dataclass
class Secretless:
    """An app with no secret and no certificate, consented in tenants A and B, and the broker's own
    user-assigned managed identity (App Service protocol: no secret either)."""

    emulator: Emulator
    workdir: Path
    caller_key: str
    callers: dict[str, dict[str, Any]]
    identity: dict[str, str]
    certificate: dict[str, str] = field(default_factory=dict)

    def setup(self, mode: str) -> tuple[dict[str, Any], dict[str, str]]:
        """Federate (or certify) the app for ``mode``; return the broker's credential source and the
        environment its process needs."""
        if mode == "managed_identity":
            self.emulator.add_federated_credential(
                APP, issuer=self.emulator.entra_issuer(VAULT_TENANT_ID), subject=self.identity["object_id"]
            )
            return {"federated": "managed_identity"}, managed_identity_environment(
                self.emulator, self.identity
            )
        if mode == "token_file":
            self.emulator.add_oidc_issuer(CLUSTER)
            self.emulator.add_federated_credential(APP, issuer=CLUSTER, subject=SERVICE_ACCOUNT)
            self.project_token(self.emulator.issue_oidc_token(CLUSTER, SERVICE_ACCOUNT))
            return {"federated": {"token_file": str(self.token_file)}}, {}
        self.certificate = self.emulator.create_certificate(CERTIFICATE)
        self.emulator.add_app_certificate(APP, self.certificate["certificate_pem"])
        source = {"key_vault_key": {"certificate": CERTIFICATE}}
        return source, managed_identity_environment(self.emulator, self.identity)

    @property
    def token_file(self) -> Path:
        return self.workdir / "projected" / "token"

    def project_token(self, token: str) -> None:
        """Write the token as kubelet does: a new file swapped into place, never a partial write."""
        self.token_file.parent.mkdir(exist_ok=True)
        fresh = self.token_file.with_name(f".token.{uuid.uuid4().hex}")
        fresh.write_text(token, encoding="utf-8")
        fresh.replace(self.token_file)

    def config(self, credential: dict[str, Any], **settings: Any) -> dict[str, Any]:
        """A broker configuration with only this credential; Key Vault only when the source needs it."""
        config: dict[str, Any] = {
            "authority_host": self.emulator.base_url,
            "outbound_ca_file": self.emulator.ca_path,
            "azure_credential": "managed_identity",
            "log_level": "DEBUG",
            "credential_min_reload_seconds": 0,
            "apps": {"defender": {"client_id": APP, "credential": credential, "resources": [DEFENDER, MDE]}},
            "callers": self.callers,
        }
        if "key_vault_key" in credential:
            config["key_vault_url"] = self.emulator.vault_url
            config["key_vault_verify_challenge_resource"] = False
        config.update(settings)
        return config

    def start(self, start_broker: StartBroker, mode: str, **settings: Any) -> BrokerProcess:
        credential, env = self.setup(mode)
        config = self.config(credential, **settings)
        assert not [kind for kind in SECRET_KINDS if kind in credential]
        assert "cache_encryption_key" not in config
        assert not {"AZURE_CLIENT_SECRET", "AZURE_CLIENT_CERTIFICATE_PATH"} & set(env)
        return start_broker(config, env)

    def consent(self, tenant: str) -> None:
        self.emulator.add_tenant(tenant)
        for resource in (DEFENDER, MDE):
            self.emulator.grant(tenant, APP, resource, ROLES)


@pytest.fixture
def secretless(emulator: Emulator, tmp_path: Path) -> Secretless:
    emulator.add_app(APP, home_tenant=VAULT_TENANT_ID)  # no secret, no certificate
    identity = emulator.add_managed_identity(IDENTITY)
    key, key_hash = new_api_key()
    callers = {"soar": {"api_key_sha256": key_hash, "tenants": ["*"], "apps": ["defender"]}}
    world = Secretless(emulator, tmp_path, key, callers, identity)
    for tenant in (TENANT_A, TENANT_B):
        world.consent(tenant)
    return world


def _fingerprint(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()[:16]


@pytest.mark.parametrize("mode", MODES)
def test_token_for_two_tenants_with_no_secret_anywhere(
    secretless: Secretless, start_broker: StartBroker, mode: str
) -> None:
    """Each source gets tokens for two customer tenants; Entra (the emulator) saw a federated token or
    an assertion signed with the uploaded certificate's key, never a secret."""
    broker = secretless.start(start_broker, mode)
    for tenant in (TENANT_A, TENANT_B):
        response = ask(broker, secretless.caller_key, {"tenant": tenant, "resource": DEFENDER})
        assert 200 == response.status_code, response.text
        claims = secretless.emulator.verify_token(response.json()["access_token"], DEFENDER)
        assert (tenant, APP, "2", ROLES) == (
            claims["tid"],
            claims["appid"],
            claims["appidacr"],
            claims["roles"],
        )
        (request,) = secretless.emulator.requests("token", tenant=tenant, client_id=APP)
        expected = (
            f"certificate:{secretless.certificate['x5t_s256']}" if mode == "key_vault_key" else "federated:"
        )
        assert str(request["credential"]).startswith(expected)
    if mode == "managed_identity":
        # One exchange token served both tenants.
        assert 1 == len(secretless.emulator.requests("identity", client_id=IDENTITY, resource=EXCHANGE))
    ready = requests.get(f"{broker.url}/readyz", timeout=10).json()
    assert "ok" == ready["checks"]["credentials"]["status"]


async def test_key_vault_signed_assertion_verified_against_the_uploaded_certificate(
    secretless: Secretless, start_broker: StartBroker
) -> None:
    """Until the certificate's public part is uploaded to the app, Entra refuses the Key Vault-signed
    assertion (AADSTS700027); once it is, the same broker is served without a restart. The private
    key stays in the vault: its secret holds the certificate alone, its key answers n and e only."""
    credential, env = secretless.setup("key_vault_key")
    # A certificate the app does not know: the one uploaded in setup is replaced by a fresh version.
    created = secretless.emulator.create_certificate(CERTIFICATE)
    broker = start_broker(secretless.config(credential), env)
    refused = ask(broker, secretless.caller_key, {"tenant": TENANT_A, "resource": DEFENDER})
    secretless.emulator.add_app_certificate(APP, created["certificate_pem"])
    accepted = ask(broker, secretless.caller_key, {"tenant": TENANT_A, "resource": DEFENDER})

    assert (502, "upstream_error", "AADSTS700027") == (
        refused.status_code,
        refused.json()["error"],
        refused.json()["aadsts"],
    )
    assert 200 == accepted.status_code, accepted.text
    assert f"certificate:{created['x5t_s256']}" == secretless.emulator.requests("token")[-1]["credential"]
    tenant_id, client_id, secret = secretless.emulator.broker_identity  # the test's own reader
    vault = {"verify_challenge_resource": False, "connection_verify": secretless.emulator.ca_path}
    async with (
        ClientSecretCredential(
            tenant_id,
            client_id,
            secret,
            authority=secretless.emulator.base_url,
            connection_verify=vault["connection_verify"],
        ) as reader,
        SecretClient(secretless.emulator.vault_url, reader, **vault) as secrets,
        KeyClient(secretless.emulator.vault_url, reader, **vault) as keys,
    ):
        stored = await secrets.get_secret(CERTIFICATE)
        key = await keys.get_key(CERTIFICATE)
    assert stored.value is not None
    assert "PRIVATE KEY" not in stored.value
    assert [None] * 6 == [getattr(key.key, part, None) for part in ("d", "p", "q", "dp", "dq", "qi")]


def test_cold_herd_signs_once_per_tenant_per_assertion_lifetime(
    secretless: Secretless, start_broker: StartBroker
) -> None:
    """Many tenants asked for at once, two resources each, several callers per key: one Key Vault
    signature per tenant (the resources share it, concurrent requests wait on it), one Entra request
    per key; a third resource later reuses the same signatures."""
    tenants = [str(uuid.UUID(int=0x5EC7_0000_0000_4000_8000_000000000000 + n)) for n in range(40)]
    for tenant in tenants:
        secretless.consent(tenant)
    broker = secretless.start(
        start_broker,
        "key_vault_key",
        callers={"soar": {**secretless.callers["soar"], "max_acquisitions_per_minute": 10_000}},
    )
    secretless.emulator.reset_counters()
    wanted = [(tenant, resource) for tenant in tenants for resource in (DEFENDER, MDE) for _ in range(3)]

    def one(pair: tuple[str, str]) -> int:
        return ask(broker, secretless.caller_key, {"tenant": pair[0], "resource": pair[1]}).status_code

    with ThreadPoolExecutor(max_workers=24) as pool:
        statuses = list(pool.map(one, wanted))
    herd = secretless.emulator.counters()

    assert [200] * len(wanted) == statuses
    assert len(tenants) == herd["signatures"]
    assert 2 * len(tenants) == len(secretless.emulator.requests("token", client_id=APP))


def test_third_resource_reuses_signatures(secretless: Secretless, start_broker: StartBroker) -> None:
    """Within an assertion's lifetime a new key for a tenant already signed for costs Entra a request
    and Key Vault nothing."""
    credential, env = secretless.setup("key_vault_key")
    config = secretless.config(credential)
    config["apps"]["defender"]["resources"] = [DEFENDER, MDE, GRAPH]
    broker = start_broker(config, env)
    for resource in (DEFENDER, MDE, GRAPH):
        assert (
            200 == ask(broker, secretless.caller_key, {"tenant": TENANT_A, "resource": resource}).status_code
        )
    assert 1 == secretless.emulator.counters()["signatures"]
    assert 3 == len(secretless.emulator.requests("token", tenant=TENANT_A, client_id=APP))


@pytest.mark.parametrize(
    ("mismatch", "detailed", "aadsts"),
    [
        ("subject", False, "AADSTS70021"),
        ("audience", True, "AADSTS700212"),
        ("subject", True, "AADSTS700213"),
    ],
)
def test_mismatched_federated_credential_is_a_502_with_a_readable_log(
    secretless: Secretless, start_broker: StartBroker, mismatch: str, detailed: bool, aadsts: str
) -> None:
    """A federated credential on the app that does not match the managed identity's token (another
    subject, another audience): reloaded once, then 502 with Entra's code, counted, on /readyz, and
    one error line saying what the code means and what was presented (issuer, subject, audience)."""
    env = managed_identity_environment(secretless.emulator, secretless.identity)
    issuer = secretless.emulator.entra_issuer(VAULT_TENANT_ID)
    subject, audience = secretless.identity["object_id"], EXCHANGE
    if mismatch == "subject":
        subject = str(uuid.uuid4())
    else:
        audience = "api://AzureADTokenExchangeUSGov"
    secretless.emulator.add_federated_credential(APP, issuer=issuer, subject=subject, audiences=[audience])
    secretless.emulator.set_federated_errors(detailed=detailed)
    broker = start_broker(secretless.config({"federated": "managed_identity"}), env)

    response = ask(broker, secretless.caller_key, {"tenant": TENANT_A, "resource": DEFENDER})

    assert (502, "upstream_error", aadsts) == (
        response.status_code,
        response.json()["error"],
        response.json()["aadsts"],
    )
    assert "federated identity credential" in response.json()["error_description"]
    assert 2 == secretless.emulator.token_requests(tenant=TENANT_A, client_id=APP)  # reloaded once
    assert 1 == broker.metric("broker_credential_failures_total")
    ready = requests.get(f"{broker.url}/readyz", timeout=10).json()
    assert {"defender": aadsts} == ready["checks"]["credentials"]["rejected_by_entra"]
    (line,) = [line for line in broker.log_lines() if line["message"].startswith("Entra ID rejected the app")]
    assert ("ERROR", "federated:managed_identity", aadsts) == (
        line["level"],
        line["credential_source"],
        line["aadsts"],
    )
    assert "no federated identity credential" in line["meaning"]
    assert (issuer, secretless.identity["object_id"], EXCHANGE) == (
        line["presented"]["iss"],
        line["presented"]["sub"],
        line["presented"]["aud"],
    )


def test_rotated_projected_token_is_picked_up_without_restart(
    secretless: Secretless, start_broker: StartBroker
) -> None:
    """Kubelet replaces the projected token file: the next acquisition presents the new token (one
    Entra request, no rejected attempt first), with no restart and no reload signal."""
    broker = secretless.start(start_broker, "token_file")
    first = secretless.token_file.read_text(encoding="utf-8")
    assert 200 == ask(broker, secretless.caller_key, {"tenant": TENANT_A, "resource": DEFENDER}).status_code
    rotated = secretless.emulator.issue_oidc_token(CLUSTER, SERVICE_ACCOUNT)
    secretless.project_token(rotated)

    response = ask(broker, secretless.caller_key, {"tenant": TENANT_B, "resource": DEFENDER})

    assert 200 == response.status_code, response.text
    (request,) = secretless.emulator.requests("token", tenant=TENANT_B, client_id=APP)
    assert f"federated:{_fingerprint(rotated)}" == request["credential"]
    (earlier,) = secretless.emulator.requests("token", tenant=TENANT_A, client_id=APP)
    assert f"federated:{_fingerprint(first)}" == earlier["credential"]
    assert first != rotated
    assert first not in broker.log_text()
    assert rotated not in broker.log_text()


def test_key_vault_sign_throttled_is_retried_after_its_retry_after(
    secretless: Secretless, start_broker: StartBroker
) -> None:
    """Key Vault answers the first signature 429 with Retry-After: 2: the broker waits that long, signs
    again and the caller gets its token; a Retry-After beyond the request's budget is a 503 that
    passes the wait on instead of holding the caller."""
    broker = secretless.start(start_broker, "key_vault_key", upstream_retry_seconds=6)
    secretless.emulator.add_fault("sign", "429", count=1, retry_after=2)
    started = time.monotonic()
    response = ask(broker, secretless.caller_key, {"tenant": TENANT_A, "resource": DEFENDER})
    took = time.monotonic() - started

    assert 200 == response.status_code, response.text
    assert took >= 2
    counters = secretless.emulator.counters()
    assert (2, 1) == (counters["sign"], counters["signatures"])
    assert 1 == broker.metric_samples()['broker_keyvault_requests_total{outcome="throttled"}']

    secretless.emulator.add_fault("sign", "429", count=1, retry_after=30)
    started = time.monotonic()
    throttled = ask(broker, secretless.caller_key, {"tenant": TENANT_B, "resource": DEFENDER})
    assert 503 == throttled.status_code, throttled.text
    assert 25 <= int(throttled.headers["Retry-After"]) <= 30
    assert time.monotonic() - started < 5
    assert 0 == secretless.emulator.token_requests(tenant=TENANT_B, client_id=APP)
