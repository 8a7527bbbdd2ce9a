"""Tests of the emulator's credentials without a secret, driven by the real SDK clients: federated
identity credentials on an app (managed identity and Kubernetes issuers), the managed-identity endpoint
azure-identity's ``ManagedIdentityCredential`` talks to, and Key Vault certificates whose
non-exportable key signs but never leaves the vault.
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
import uuid
from collections.abc import Iterator

import msal
import pytest
import requests
from azure.identity.aio import ClientSecretCredential, ManagedIdentityCredential
from azure.keyvault.certificates.aio import CertificateClient
from azure.keyvault.keys.aio import KeyClient
from azure.keyvault.keys.crypto import SignatureAlgorithm
from azure.keyvault.keys.crypto.aio import CryptographyClient
from azure.keyvault.secrets.aio import SecretClient
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from emulator import Emulator, EmulatorError
from emulator.tokens import b64url
from emulator.world import managed_identity_environment

HOME = "00000000-0000-0000-0000-00000000b0b0"  # the vault tenant: home of the app and the identity
CUSTOMER = "aaaaaaaa-1111-4111-8111-00000000000a"
OTHER_TENANT = "bbbbbbbb-2222-4222-8222-00000000000b"
APP = "11111111-2222-3333-4444-555555555555"
IDENTITY = "99999999-8888-4777-8666-555555555555"
XDR = "https://api.security.microsoft.com"
EXCHANGE = "api://AzureADTokenExchange"
CLUSTER = "https://oidc.aks.example/11111111-0000-0000-0000-000000000000/"
SERVICE_ACCOUNT = "system:serviceaccount:security:token-broker"
JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"


@pytest.fixture
def directory(emulator: Emulator) -> Emulator:
    """An app without any secret or certificate in the vault tenant, consented in CUSTOMER."""
    emulator.add_tenant(CUSTOMER, ["customer.onmicrosoft.com"])
    emulator.add_tenant(OTHER_TENANT)
    emulator.add_app(APP, home_tenant=HOME)
    emulator.grant(CUSTOMER, APP, XDR, ["Incident.Read.All"])
    return emulator


@pytest.fixture
def http(emulator: Emulator) -> Iterator[requests.Session]:
    with emulator.http_session() as session:
        yield session


def managed_identity_token(emulator: Emulator, http: requests.Session, identity: dict[str, str]) -> str:
    """The identity's exchange token, as App Service's endpoint hands it out."""
    response = http.get(
        emulator.identity_endpoint,
        params={"api-version": "2019-08-01", "resource": EXCHANGE, "client_id": identity["client_id"]},
        headers={"X-IDENTITY-HEADER": identity["identity_header"]},
        timeout=10,
    )
    assert 200 == response.status_code, response.text
    return str(response.json()["access_token"])


def post_assertion(
    emulator: Emulator, http: requests.Session, assertion: str, client_id: str = APP
) -> requests.Response:
    """A v2 client-credentials request for CUSTOMER authenticated by ``assertion``."""
    return http.post(
        emulator.token_url(CUSTOMER),
        data={
            "grant_type": "client_credentials",
            "client_id": client_id,
            "client_assertion_type": JWT_BEARER,
            "client_assertion": assertion,
            "scope": f"{XDR}/.default",
        },
        timeout=10,
    )


async def test_managed_identity_credential_gets_exchange_and_vault_tokens(
    directory: Emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """azure-identity's ManagedIdentityCredential, given App Service's two variables, gets the
    user-assigned identity's v2 exchange token (issuer {base}/{tenant}/v2.0, subject its object id)
    and a vault token the vault accepts: no secret anywhere."""
    identity = directory.add_managed_identity(IDENTITY)
    for name, value in managed_identity_environment(directory, identity).items():
        monkeypatch.setenv(name, value)
    directory.set_secret("some-secret", "value")
    async with ManagedIdentityCredential(
        client_id=IDENTITY, connection_verify=directory.ca_path
    ) as credential:
        exchange = await credential.get_token(f"{EXCHANGE}/.default")
        async with SecretClient(
            directory.vault_url,
            credential,
            verify_challenge_resource=False,
            connection_verify=directory.ca_path,
        ) as secrets:
            secret = await secrets.get_secret("some-secret")

    claims = directory.verify_token(exchange.token, EXCHANGE)
    assert (directory.entra_issuer(HOME), identity["object_id"], HOME) == (
        claims["iss"],
        claims["sub"],
        claims["tid"],
    )
    assert "value" == secret.value
    assert [IDENTITY, IDENTITY] == [r["client_id"] for r in directory.requests("identity")]


def test_managed_identity_endpoint_refuses_a_wrong_header_or_no_identity(
    directory: Emulator, http: requests.Session
) -> None:
    """The identity header is the endpoint's only protection; an unnamed (system-assigned) identity
    does not exist here."""
    identity = directory.add_managed_identity(IDENTITY)
    params = {"api-version": "2019-08-01", "resource": EXCHANGE}
    wrong = http.get(
        directory.identity_endpoint, params=params, headers={"X-IDENTITY-HEADER": "x"}, timeout=10
    )
    unnamed = http.get(
        directory.identity_endpoint,
        params=params,
        headers={"X-IDENTITY-HEADER": identity["identity_header"]},
        timeout=10,
    )
    assert (401, 400) == (wrong.status_code, unnamed.status_code)


def test_msal_assertion_callable_with_a_managed_identity_credential(
    directory: Emulator, http: requests.Session
) -> None:
    """A federated credential naming the managed identity makes its exchange token the app's
    credential in a customer tenant; MSAL hands the callable the tenant's token endpoint."""
    identity = directory.add_managed_identity(IDENTITY)
    directory.add_federated_credential(
        APP, issuer=directory.entra_issuer(HOME), subject=identity["object_id"]
    )
    seen: list[dict[str, str]] = []

    def assertion(context: dict[str, str]) -> str:
        seen.append(context)
        return managed_identity_token(directory, http, identity)

    cca = msal.ConfidentialClientApplication(
        APP,
        client_credential={"client_assertion": assertion},
        authority=directory.authority(CUSTOMER),
        instance_discovery=False,
        azure_region=False,
        http_client=http,
    )
    result = cca.acquire_token_for_client(scopes=[f"{XDR}/.default"])

    assert "access_token" in result, result
    claims = directory.verify_token(result["access_token"], XDR)
    assert (CUSTOMER, APP, "2") == (claims["tid"], claims["appid"], claims["appidacr"])
    assert [{"client_id": APP, "token_endpoint": directory.token_url(CUSTOMER)}] == seen
    (record,) = directory.requests("token", tenant=CUSTOMER)
    assert str(record["credential"]).startswith("federated:")


def test_kubernetes_projected_token_as_credential(directory: Emulator, http: requests.Session) -> None:
    """A cluster's service-account token, federated directly on the app, is checked against the
    cluster issuer's keys."""
    directory.add_oidc_issuer(CLUSTER)
    directory.add_federated_credential(APP, issuer=CLUSTER, subject=SERVICE_ACCOUNT)
    token = directory.issue_oidc_token(CLUSTER, SERVICE_ACCOUNT)

    response = post_assertion(directory, http, token)

    assert 200 == response.status_code, response.text
    (record,) = directory.requests("token", tenant=CUSTOMER)
    assert f"federated:{hashlib.sha256(token.encode()).hexdigest()[:16]}" == record["credential"]


@pytest.mark.parametrize(
    ("mismatch", "detailed", "code"),
    [
        ("issuer", True, 700211),
        ("subject", True, 700213),
        ("audience", True, 700212),
        ("subject", False, 70021),
        ("audience", False, 70021),
        ("expired", True, 700024),
        ("lives_too_long", True, 70023),
        ("forged", True, 700027),
    ],
)
def test_federated_refusals_carry_entras_codes(
    directory: Emulator, http: requests.Session, mismatch: str, detailed: bool, code: int
) -> None:
    """Each way a federated assertion can fail answers 401 invalid_client with Entra's code: no
    record for the issuer/subject/audience (newer detailed codes, or the older combined 70021), out
    of its time range, living longer than a day, or signed by another key."""
    directory.add_oidc_issuer(CLUSTER)
    directory.add_oidc_issuer("https://attacker.example/")
    directory.add_federated_credential(APP, issuer=CLUSTER, subject=SERVICE_ACCOUNT)
    directory.set_federated_errors(detailed=detailed)
    issuer, subject, audience, lifetime, age = CLUSTER, SERVICE_ACCOUNT, EXCHANGE, 3600, 0
    if mismatch == "issuer":
        issuer = "https://attacker.example/"
    elif mismatch == "subject":
        subject = "system:serviceaccount:other:other"
    elif mismatch == "audience":
        audience = "api://something-else"
    elif mismatch == "expired":
        lifetime, age = 600, 3600
    elif mismatch == "lives_too_long":
        lifetime = 3 * 24 * 3600
    token = directory.issue_oidc_token(
        issuer, subject, audience, lifetime_seconds=lifetime, issued_seconds_ago=age
    )
    if mismatch == "forged":
        # The attacker's key, claiming the cluster's issuer.
        forged = directory.issue_oidc_token("https://attacker.example/", SERVICE_ACCOUNT)
        header, payload, signature = forged.split(".")
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        claims["iss"] = CLUSTER
        token = ".".join([header, b64url(json.dumps(claims).encode()), signature])

    response = post_assertion(directory, http, token)

    assert (401, "invalid_client") == (response.status_code, response.json()["error"])
    assert [code] == response.json()["error_codes"]


def test_managed_identity_of_another_tenant_is_700236(directory: Emulator, http: requests.Session) -> None:
    """A managed identity can be the federated credential of an app of its own tenant only: the same
    exchange token works for APP (home: the identity's tenant) and is refused for an app of another."""
    foreign_app = "22222222-3333-4444-5555-666666666666"
    identity = directory.add_managed_identity(IDENTITY)
    directory.add_app(foreign_app, home_tenant=OTHER_TENANT)
    directory.grant(CUSTOMER, foreign_app, XDR, [])
    for app in (APP, foreign_app):
        directory.add_federated_credential(
            app, issuer=directory.entra_issuer(HOME), subject=identity["object_id"]
        )
    token = managed_identity_token(directory, http, identity)

    own = post_assertion(directory, http, token)
    foreign = post_assertion(directory, http, token, client_id=foreign_app)

    assert 200 == own.status_code, own.text
    assert [700236] == foreign.json()["error_codes"]


async def test_non_exportable_certificate_signs_and_never_leaves(
    directory: Emulator, http: requests.Session
) -> None:
    """A certificate made in the vault: its public part is readable (certificate, key's n and e),
    its private key is not (the secret holds the certificate alone, the key has no private fields);
    keys/sign makes a PS256 signature the certificate verifies, and an assertion so signed is
    accepted once the certificate is uploaded to the app."""
    created = directory.create_certificate("assertion-signer")
    tenant_id, client_id, secret = directory.broker_identity
    async with (
        ClientSecretCredential(
            tenant_id, client_id, secret, authority=directory.base_url, connection_verify=directory.ca_path
        ) as credential,
        CertificateClient(
            directory.vault_url,
            credential,
            verify_challenge_resource=False,
            connection_verify=directory.ca_path,
        ) as certificates,
        KeyClient(
            directory.vault_url,
            credential,
            verify_challenge_resource=False,
            connection_verify=directory.ca_path,
        ) as keys,
        SecretClient(
            directory.vault_url,
            credential,
            verify_challenge_resource=False,
            connection_verify=directory.ca_path,
        ) as secrets,
    ):
        certificate = await certificates.get_certificate("assertion-signer")
        key = await keys.get_key("assertion-signer")
        stored = await secrets.get_secret("assertion-signer")
        assert certificate.key_id is not None
        assert certificate.cer is not None
        async with CryptographyClient(
            certificate.key_id,
            credential,
            verify_challenge_resource=False,
            connection_verify=directory.ca_path,
        ) as crypto:
            x5t = b64url(hashlib.sha256(certificate.cer).digest())
            header = b64url(json.dumps({"alg": "PS256", "typ": "JWT", "x5t#S256": x5t}).encode())
            now = int(time.time())
            payload = b64url(
                json.dumps(
                    {
                        "aud": directory.token_url(CUSTOMER),
                        "iss": APP,
                        "sub": APP,
                        "jti": str(uuid.uuid4()),
                        "nbf": now,
                        "exp": now + 600,
                    }
                ).encode()
            )
            signed = f"{header}.{payload}".encode()
            result = await crypto.sign(SignatureAlgorithm.ps256, hashlib.sha256(signed).digest())

    assert certificate.cer is not None
    cert = x509.load_der_x509_certificate(bytes(certificate.cer))
    public_key = cert.public_key()
    assert isinstance(public_key, rsa.RSAPublicKey)
    public_key.verify(
        result.signature,
        signed,
        padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32),
        hashes.SHA256(),
    )
    assert created["x5t_s256"] == hashlib.sha256(bytes(certificate.cer)).hexdigest().upper()
    assert certificate.policy is not None
    assert certificate.policy.exportable is False
    assert getattr(key.key, "n", None)
    assert getattr(key.key, "e", None)
    assert all(getattr(key.key, part, None) is None for part in ("d", "p", "q", "dp", "dq", "qi"))
    assert stored.value is not None
    assert "PRIVATE KEY" not in stored.value
    assert 1 == directory.counters()["signatures"]
    assertion = f"{header}.{payload}.{b64url(result.signature)}"
    refused = post_assertion(directory, http, assertion)
    directory.add_app_certificate(APP, created["certificate_pem"])
    accepted = post_assertion(directory, http, assertion)
    assert [700027] == refused.json()["error_codes"]
    assert 200 == accepted.status_code, accepted.text
    assert f"certificate:{created['x5t_s256']}" == directory.requests("token")[-1]["credential"]


def test_sign_throttled_answers_429_with_retry_after(directory: Emulator, http: requests.Session) -> None:
    """A fault on "sign" answers Key Vault's throttling body with Retry-After (before any auth)."""
    directory.create_certificate("assertion-signer")
    directory.add_fault("sign", "429", retry_after=3)
    response = http.post(
        f"{directory.vault_url}/keys/assertion-signer/{'0' * 32}/sign",
        params={"api-version": "7.6"},
        json={"alg": "PS256", "value": b64url(b"\0" * 32)},
        timeout=10,
    )
    assert (429, "3", "Throttled") == (
        response.status_code,
        response.headers["Retry-After"],
        response.json()["error"]["code"],
    )
    assert 1 == directory.counters()["sign"]


def test_federated_credentials_are_bounded(directory: Emulator) -> None:
    """Entra allows 20 federated credentials per app, one per issuer and subject."""
    for number in range(20):
        directory.add_federated_credential(
            APP, issuer=CLUSTER, subject=f"system:serviceaccount:ns:sa{number}"
        )
    with pytest.raises(EmulatorError, match="at most 20"):
        directory.add_federated_credential(APP, issuer=CLUSTER, subject="system:serviceaccount:ns:one-more")
