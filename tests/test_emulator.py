"""Tests of the Entra ID + Key Vault emulator, driven by the real SDK clients.

MSAL, azure-identity and the Key Vault SDK are used exactly as production code would use them,
with only the options any local TLS endpoint needs (the emulator's CA, MSAL's
``instance_discovery=False``, Key Vault's ``verify_challenge_resource=False``). Raw ``requests``
calls check wire-level details (status codes, headers, body shapes) the SDKs hide.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import jwt
import msal
import pytest
import requests
from azure.core.exceptions import (
    HttpResponseError,
    ResourceNotFoundError,
)
from azure.identity.aio import ClientSecretCredential
from azure.keyvault.secrets.aio import SecretClient
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from emulator import Emulator, EmulatorError, make_certificate, start_emulator
from emulator.client import remote
from emulator.state import OPERATIONS
from emulator.tokens import b64url

TENANT = "aaaaaaaa-1111-4111-8111-00000000000a"
TENANT_DOMAIN = "customer-a.onmicrosoft.com"
OTHER_TENANT = "bbbbbbbb-2222-4222-8222-00000000000b"
OTHER_DOMAIN = "customer-b.onmicrosoft.com"
PUBLISHER_TENANT = "cccccccc-3333-4333-8333-00000000000c"
APP = "11111111-2222-3333-4444-555555555555"
APP_SECRET = "app-secret-value~1"
XDR = "https://api.security.microsoft.com"
XDR_ROLES = ["Incident.Read.All", "AdvancedHunting.Read.All"]
VAULT_SCOPE = "https://vault.azure.net/.default"


@dataclass(frozen=True)
class Customer:
    """The standard scenario: a multi-tenant app consented in TENANT with Defender roles."""

    tenant: str
    domain: str
    client_id: str
    secret: str


@pytest.fixture
def customer(emulator: Emulator) -> Customer:
    """A publisher tenant owning APP, and customer TENANT that granted APP roles on XDR."""
    emulator.add_tenant(PUBLISHER_TENANT, ["publisher.onmicrosoft.com"])
    emulator.add_tenant(TENANT, [TENANT_DOMAIN, "customer-a.com"])
    emulator.add_tenant(OTHER_TENANT, [OTHER_DOMAIN])
    emulator.add_app(APP, home_tenant=PUBLISHER_TENANT, secret=APP_SECRET)
    emulator.grant(TENANT, APP, XDR, XDR_ROLES)
    return Customer(TENANT, TENANT_DOMAIN, APP, APP_SECRET)


@pytest.fixture
def http(emulator: Emulator) -> Iterator[requests.Session]:
    """A requests session trusting the emulator's CA (also MSAL's http_client); closed after."""
    with emulator.http_session() as session:
        yield session


def make_cca(
    emulator: Emulator,
    http: requests.Session,
    tenant: str,
    credential: str | dict[str, str],
    client_id: str = APP,
) -> msal.ConfidentialClientApplication:
    """A real MSAL confidential client pointed at the emulator: a local authority needs only
    ``instance_discovery=False`` (no lookup at login.microsoftonline.com) and a session trusting
    its CA; ``azure_region=False`` as for any multi-tenant app."""
    return msal.ConfidentialClientApplication(
        client_id,
        client_credential=credential,
        authority=emulator.authority(tenant),
        instance_discovery=False,
        azure_region=False,
        http_client=http,
    )


def token_form(client_id: str, secret: str, resource: str) -> dict[str, str]:
    """A v2 client-credentials form body."""
    return {
        "grant_type": "client_credentials",
        "client_id": client_id,
        "client_secret": secret,
        "scope": f"{resource}/.default",
    }


# --------------------------------------------------------------------------- MSAL, secrets
def test_msal_secret_token_claims_verified_and_cached(
    emulator: Emulator, customer: Customer, http: requests.Session
) -> None:
    """MSAL gets a token whose verified claims carry tid/aud/roles; a repeat is a cache hit."""
    app = make_cca(emulator, http, customer.tenant, customer.secret)

    first = app.acquire_token_for_client(scopes=[f"{XDR}/.default"])
    second = app.acquire_token_for_client(scopes=[f"{XDR}/.default"])

    claims = emulator.verify_token(first["access_token"], XDR)
    assert "Bearer" == first["token_type"]
    assert customer.tenant == claims["tid"]
    assert XDR == claims["aud"]
    assert XDR_ROLES == claims["roles"]
    assert APP == claims["appid"] == claims["azp"]
    assert f"https://sts.windows.net/{customer.tenant}/" == claims["iss"]
    assert "1.0" == claims["ver"]
    assert 3600 == claims["exp"] - claims["iat"]
    assert "cache" == second["token_source"]
    assert first["access_token"] == second["access_token"]
    assert 1 == emulator.token_requests(tenant=customer.tenant, client_id=APP, resource=XDR)


def test_msal_by_domain_resolves_to_guid(
    emulator: Emulator, customer: Customer, http: requests.Session
) -> None:
    """An authority naming the tenant by domain (any case) yields a token for the tenant GUID."""
    app = make_cca(emulator, http, customer.domain.upper(), customer.secret)

    result = app.acquire_token_for_client(scopes=[f"{XDR}/.default"])

    claims = emulator.verify_token(result["access_token"], XDR)
    assert customer.tenant == claims["tid"]
    # Discovery hands out GUID URLs, so MSAL posts to the GUID token endpoint.
    assert [customer.tenant] == [r["tenant_id"] for r in emulator.requests("token")]
    assert 1 == emulator.token_requests(tenant=customer.domain)


def test_token_without_roles_omits_claim(
    emulator: Emulator, customer: Customer, http: requests.Session
) -> None:
    """A consented app asking for a resource it holds no roles on gets a token without roles."""
    app = make_cca(emulator, http, customer.tenant, customer.secret)

    result = app.acquire_token_for_client(scopes=["https://graph.microsoft.com/.default"])

    claims = emulator.verify_token(result["access_token"], "https://graph.microsoft.com")
    assert "roles" not in claims


# --------------------------------------------------------------------------- MSAL, certificates
def test_msal_certificate_credential(emulator: Emulator, customer: Customer, http: requests.Session) -> None:
    """MSAL's PS256 client assertion, signed by a registered certificate, is accepted."""
    key_pem, cert_pem = make_certificate("customer-app")
    emulator.add_app_certificate(APP, cert_pem)
    app = make_cca(emulator, http, customer.tenant, {"private_key": key_pem, "public_certificate": cert_pem})

    result = app.acquire_token_for_client(scopes=[f"{XDR}/.default"])

    claims = emulator.verify_token(result["access_token"], XDR)
    assert XDR_ROLES == claims["roles"]
    assert "2" == claims["appidacr"]  # certificate, not secret


def test_msal_unregistered_certificate_is_700027(
    emulator: Emulator, customer: Customer, http: requests.Session
) -> None:
    """An assertion signed by a certificate the app never registered fails with AADSTS700027."""
    _, registered = make_certificate("registered")
    emulator.add_app_certificate(APP, registered)
    key_pem, cert_pem = make_certificate("stranger")
    app = make_cca(emulator, http, customer.tenant, {"private_key": key_pem, "public_certificate": cert_pem})

    result = app.acquire_token_for_client(scopes=[f"{XDR}/.default"])

    assert "invalid_client" == result["error"]
    assert [700027] == result["error_codes"]
    assert result["error_description"].startswith("AADSTS700027: ")


@pytest.mark.parametrize(
    ("algorithm", "thumbprint_header", "audience_ok", "expected"),
    [
        ("RS256", "x5t", True, (200, None)),
        ("PS256", "x5t#S256", False, (401, [700027])),
    ],
    ids=["rs256-x5t-accepted", "wrong-audience-rejected"],
)
def test_hand_made_client_assertions(
    emulator: Emulator,
    customer: Customer,
    http: requests.Session,
    algorithm: str,
    thumbprint_header: str,
    audience_ok: bool,
    expected: tuple[int, list[int] | None],
) -> None:
    """RS256 assertions with an x5t (SHA-1) header work; an assertion for another aud does not."""
    key_pem, cert_pem = make_certificate("customer-app")
    emulator.add_app_certificate(APP, cert_pem)
    cert = x509.load_pem_x509_certificate(cert_pem.encode())
    digest = hashes.SHA1() if thumbprint_header == "x5t" else hashes.SHA256()  # noqa: S303
    token_url = emulator.token_url(customer.tenant)
    now = int(time.time())
    assertion = jwt.encode(
        {
            "aud": token_url if audience_ok else "https://login.microsoftonline.com/x/token",
            "iss": APP,
            "sub": APP,
            "exp": now + 600,
            "iat": now,
            "jti": "assertion-1",
        },
        key_pem,
        algorithm=algorithm,
        headers={thumbprint_header: b64url(cert.fingerprint(digest))},
    )

    response = http.post(
        token_url,
        data={
            "grant_type": "client_credentials",
            "client_id": APP,
            "scope": f"{XDR}/.default",
            "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            "client_assertion": assertion,
        },
    )

    assert expected == (response.status_code, response.json().get("error_codes"))


# --------------------------------------------------------------------------- MSAL, errors
def _no_consent(emulator: Emulator) -> tuple[str, str]:
    return OTHER_TENANT, APP_SECRET  # OTHER_TENANT never granted APP


def _wrong_secret(emulator: Emulator) -> tuple[str, str]:
    return TENANT, "not-the-secret"


def _expired_secret(emulator: Emulator) -> tuple[str, str]:
    emulator.add_app_secret(APP, "expired-secret", expires_in_seconds=-1)
    return TENANT, "expired-secret"


def _unprovisioned(emulator: Emulator) -> tuple[str, str]:
    emulator.set_unprovisioned(TENANT_DOMAIN, XDR)
    return TENANT, APP_SECRET


def _disabled(emulator: Emulator) -> tuple[str, str]:
    emulator.set_service_principal_enabled(TENANT_DOMAIN, APP, enabled=False)
    return TENANT, APP_SECRET


@pytest.mark.parametrize(
    ("arrange", "status_error", "code"),
    [
        (_no_consent, "unauthorized_client", 700016),
        (_wrong_secret, "invalid_client", 7000215),
        (_expired_secret, "invalid_client", 7000222),
        (_unprovisioned, "invalid_resource", 500011),
        (_disabled, "unauthorized_client", 7000112),
    ],
    ids=["no-consent", "wrong-secret", "expired-secret", "unprovisioned-resource", "disabled-principal"],
)
def test_msal_error_dicts(
    emulator: Emulator,
    customer: Customer,
    http: requests.Session,
    arrange: Callable[[Emulator], tuple[str, str]],
    status_error: str,
    code: int,
) -> None:
    """Each Entra failure reaches MSAL as an error dict with the right error and AADSTS code."""
    tenant, secret = arrange(emulator)
    app = make_cca(emulator, http, tenant, secret)

    result = app.acquire_token_for_client(scopes=[f"{XDR}/.default"])

    assert status_error == result["error"]
    assert [code] == result["error_codes"]
    assert result["error_description"].startswith(f"AADSTS{code}: ")
    assert 0 == emulator.issued_tokens()


def test_removed_role_and_re_enabled_principal(
    emulator: Emulator, customer: Customer, http: requests.Session
) -> None:
    """Removing an app role gives no error, the next token just lacks it (removing one never granted
    is refused); a re-enabled service principal gets tokens again."""
    emulator.remove_role(customer.domain, APP, XDR + "/", "AdvancedHunting.Read.All")
    with pytest.raises(EmulatorError, match="has not granted role"):
        emulator.remove_role(TENANT, APP, XDR, "AdvancedHunting.Read.All")
    emulator.set_service_principal_enabled(TENANT, APP, enabled=False)
    emulator.set_service_principal_enabled(TENANT, APP, enabled=True)
    app = make_cca(emulator, http, customer.tenant, customer.secret)

    result = app.acquire_token_for_client(scopes=[f"{XDR}/.default"])

    assert ["Incident.Read.All"] == emulator.verify_token(result["access_token"], XDR)["roles"]


def test_msal_unknown_tenant_raises_at_construction(
    emulator: Emulator, customer: Customer, http: requests.Session
) -> None:
    """An unknown tenant fails MSAL's discovery with ValueError (AADSTS90002), not an error dict."""
    with pytest.raises(ValueError, match="Unable to get authority configuration"):
        make_cca(emulator, http, "no-such-tenant.onmicrosoft.com", APP_SECRET)

    [record] = emulator.requests("discovery")
    assert 400 == record["status"]
    body = http.get(
        f"{emulator.base_url}/no-such-tenant.onmicrosoft.com/v2.0/.well-known/openid-configuration"
    ).json()
    assert [90002] == body["error_codes"]


def test_error_body_shape(emulator: Emulator, customer: Customer, http: requests.Session) -> None:
    """Token errors carry every field of Entra's error body, with its HTTP status."""
    response = http.post(
        emulator.token_url(customer.tenant),
        data=token_form(APP, "wrong", XDR),
        headers={"client-request-id": "11111111-0000-4000-8000-000000000000"},
    )

    body = response.json()
    assert 401 == response.status_code
    expected_keys = {
        "error",
        "error_description",
        "error_codes",
        "timestamp",
        "trace_id",
        "correlation_id",
        "error_uri",
    }
    assert expected_keys == set(body)
    assert "11111111-0000-4000-8000-000000000000" == body["correlation_id"]


@pytest.mark.parametrize(
    ("form", "status", "error", "code"),
    [
        ({"grant_type": "password"}, 400, "unsupported_grant_type", 70003),
        ({"scope": f"{XDR}/Incident.Read.All"}, 400, "invalid_scope", 70011),
        ({"client_secret": ""}, 401, "invalid_client", 7000218),
    ],
    ids=["grant-type", "scope-format", "no-credential"],
)
def test_request_validation_errors(
    emulator: Emulator,
    customer: Customer,
    http: requests.Session,
    form: dict[str, str],
    status: int,
    error: str,
    code: int,
) -> None:
    """Malformed token requests get Entra's error, code and HTTP status."""
    data = token_form(APP, APP_SECRET, XDR) | form

    response = http.post(emulator.token_url(customer.tenant), data=data)

    assert (status, error, [code]) == (
        response.status_code,
        response.json()["error"],
        response.json()["error_codes"],
    )


def test_basic_auth_and_v1_endpoint(emulator: Emulator, customer: Customer, http: requests.Session) -> None:
    """The v1 endpoint takes resource= and HTTP Basic client auth, and answers with strings."""
    response = http.post(
        emulator.token_url(customer.domain, v1=True),
        data={"grant_type": "client_credentials", "resource": XDR},
        auth=(APP, APP_SECRET),
    )

    body = response.json()
    assert 200 == response.status_code
    assert XDR == body["resource"]
    assert "3600" == body["expires_in"]
    assert 3600 == int(body["expires_on"]) - int(body["not_before"])
    assert customer.tenant == emulator.verify_token(body["access_token"], XDR)["tid"]


def test_discovery_and_jwks(emulator: Emulator, customer: Customer, http: requests.Session) -> None:
    """Discovery (v2 and v1) names GUID URLs; JWKS is served per tenant and under /common."""
    v2 = http.get(f"{emulator.base_url}/{customer.domain}/v2.0/.well-known/openid-configuration")
    v1 = http.get(f"{emulator.base_url}/{customer.domain}/.well-known/openid-configuration")
    keys = http.get(v2.json()["jwks_uri"]).json()
    common = http.get(f"{emulator.base_url}/common/discovery/keys").json()

    base = emulator.base_url
    assert f"{base}/{customer.tenant}/oauth2/v2.0/token" == v2.json()["token_endpoint"]
    assert f"{base}/{customer.tenant}/oauth2/token" == v1.json()["token_endpoint"]
    assert emulator.jwks() == keys == common
    assert {"kty", "kid", "x5t", "n", "e"} <= set(keys["keys"][0])


def test_token_lifetime_setting(emulator: Emulator, customer: Customer, http: requests.Session) -> None:
    """set_token_lifetime changes expires_in and exp; jitter keeps it within the range."""
    emulator.set_token_lifetime(600, jitter_seconds=60)

    body = http.post(emulator.token_url(customer.tenant), data=token_form(APP, APP_SECRET, XDR))

    token = body.json()
    claims = emulator.verify_token(token["access_token"], XDR)
    assert 600 <= token["expires_in"] <= 660
    assert token["expires_in"] == claims["exp"] - claims["iat"]


# --------------------------------------------------------------------------- azure-identity / KV
def broker_credential(emulator: Emulator) -> ClientSecretCredential:
    """The broker's Key Vault identity as a real azure-identity credential."""
    tenant_id, client_id, secret = emulator.broker_identity
    return ClientSecretCredential(
        tenant_id, client_id, secret, authority=emulator.base_url, connection_verify=emulator.ca_path
    )


def secret_client(emulator: Emulator, credential: ClientSecretCredential) -> SecretClient:
    """A real SecretClient on the emulated vault."""
    return SecretClient(
        emulator.vault_url,
        credential,
        verify_challenge_resource=False,
        connection_verify=emulator.ca_path,
    )


async def test_azure_identity_client_secret_credential(emulator: Emulator) -> None:
    """azure-identity's async ClientSecretCredential gets a vault token for the broker identity."""
    async with broker_credential(emulator) as credential:
        token = await credential.get_token(VAULT_SCOPE)

    claims = emulator.verify_token(token.token, "https://vault.azure.net")
    assert emulator.vault_tenant_id == claims["tid"]
    assert emulator.broker_identity.client_id == claims["appid"]
    assert "roles" not in claims


async def test_secret_client_reads_versions(emulator: Emulator) -> None:
    """SecretClient: challenge flow, latest version, explicit version, content type.

    Like real Key Vault, a disabled newest version makes the versionless read fail with 403
    SecretDisabled instead of falling back to an older enabled version.
    """
    first = emulator.set_secret("app-secret", "one")
    second = emulator.set_secret("app-secret", "two", content_type="text/plain")
    emulator.set_secret_enabled("app-secret", second, enabled=False)

    async with broker_credential(emulator) as credential, secret_client(emulator, credential) as client:
        with pytest.raises(HttpResponseError) as disabled:
            await client.get_secret("app-secret")
        by_version = await client.get_secret("app-secret", first)
        emulator.set_secret_enabled("app-secret", second, enabled=True)
        latest = await client.get_secret("app-secret")

    assert (403, "Forbidden") == (disabled.value.status_code, disabled.value.error.code)  # type: ignore[union-attr]
    assert ("one", first) == (by_version.value, by_version.properties.version)
    assert ("two", "text/plain") == (latest.value, latest.properties.content_type)
    assert f"{emulator.vault_url}/secrets/app-secret/{second}" == latest.id
    # One unauthenticated challenge, then three authorised reads; one token for all of them.
    assert [401, 403, 200, 200] == [r["status"] for r in emulator.requests("vault")]
    assert 1 == emulator.token_requests(client_id=emulator.broker_identity.client_id)


async def test_secret_client_errors(emulator: Emulator) -> None:
    """A disabled version is 403 SecretDisabled; a missing secret or version is 404."""
    version = emulator.set_secret("app-secret", "v", enabled=False)

    async with broker_credential(emulator) as credential, secret_client(emulator, credential) as client:
        with pytest.raises(HttpResponseError) as disabled:
            await client.get_secret("app-secret", version)
        with pytest.raises(ResourceNotFoundError) as missing:
            await client.get_secret("no-such-secret")
        with pytest.raises(ResourceNotFoundError):
            await client.get_secret("app-secret", "0" * 32)

    assert 403 == disabled.value.status_code
    assert "Forbidden" == disabled.value.error.code  # type: ignore[union-attr]
    assert "SecretNotFound" == missing.value.error.code  # type: ignore[union-attr]


async def test_certificate_stored_as_pem_secret(emulator: Emulator, http: requests.Session) -> None:
    """A certificate's key + cert PEM, stored like a Key Vault certificate, drives MSAL."""
    emulator.add_tenant(TENANT, [TENANT_DOMAIN])
    key_pem, cert_pem = make_certificate("cert-app")
    emulator.add_app(APP, home_tenant=TENANT, certificate_pem=cert_pem)
    emulator.set_secret("app-cert", key_pem + cert_pem, content_type="application/x-pem-file")

    async with broker_credential(emulator) as credential, secret_client(emulator, credential) as client:
        stored = await client.get_secret("app-cert")
    assert stored.value is not None
    app = make_cca(emulator, http, TENANT, {"private_key": stored.value, "public_certificate": stored.value})
    result = app.acquire_token_for_client(scopes=[VAULT_SCOPE])

    assert "application/x-pem-file" == stored.properties.content_type
    assert TENANT == emulator.verify_token(result["access_token"], "https://vault.azure.net")["tid"]


async def test_app_not_allowed_on_vault_is_forbidden(emulator: Emulator) -> None:
    """A valid vault token for an app outside the vault's access list gets 403 AccessDenied."""
    outsider = "dddddddd-4444-4444-8444-00000000000d"
    emulator.add_app(outsider, home_tenant=emulator.vault_tenant_id, secret="outsider-secret")
    emulator.set_vault_access([emulator.broker_identity.client_id])
    emulator.set_secret("app-secret", "v")

    async with (
        ClientSecretCredential(
            emulator.vault_tenant_id,
            outsider,
            "outsider-secret",
            authority=emulator.base_url,
            connection_verify=emulator.ca_path,
        ) as credential,
        secret_client(emulator, credential) as client,
    ):
        with pytest.raises(HttpResponseError) as denied:
            await client.get_secret("app-secret")

    assert 403 == denied.value.status_code
    assert "Forbidden" == denied.value.error.code  # type: ignore[union-attr]
    assert outsider == emulator.requests("vault")[-1]["client_id"]


async def test_foreign_tenant_token_is_rejected_by_vault(
    emulator: Emulator, customer: Customer, http: requests.Session
) -> None:
    """A vault-audience token from another tenant is answered with the 401 challenge."""
    emulator.grant(TENANT, APP, "https://vault.azure.net")
    token = make_cca(emulator, http, TENANT, APP_SECRET).acquire_token_for_client(scopes=[VAULT_SCOPE])[
        "access_token"
    ]
    emulator.set_secret("app-secret", "v")

    response = http.get(
        f"{emulator.vault_url}/secrets/app-secret/",
        params={"api-version": "7.5"},
        headers={"Authorization": f"Bearer {token}"},
    )

    assert 401 == response.status_code
    assert "Unauthorized" == response.json()["error"]["code"]
    challenge = response.headers["WWW-Authenticate"]
    assert f'authorization="{emulator.base_url}/{emulator.vault_tenant_id}"' in challenge


# --------------------------------------------------------------------------- rotation
async def test_rotation_invalidates_old_secret(
    emulator: Emulator, customer: Customer, http: requests.Session
) -> None:
    """After rotation the old secret fails 7000215 and the vault's latest version works."""
    emulator.set_secret("customer-app-secret", APP_SECRET)

    new_secret = emulator.rotate_app_secret(APP, vault_secret="customer-app-secret")
    old = make_cca(emulator, http, TENANT, APP_SECRET).acquire_token_for_client(scopes=[f"{XDR}/.default"])
    async with broker_credential(emulator) as credential, secret_client(emulator, credential) as client:
        stored = await client.get_secret("customer-app-secret")
    assert stored.value is not None
    fresh = make_cca(emulator, http, TENANT, stored.value).acquire_token_for_client(
        scopes=[f"{XDR}/.default"]
    )

    assert [7000215] == old["error_codes"]
    assert new_secret == stored.value
    assert XDR_ROLES == emulator.verify_token(fresh["access_token"], XDR)["roles"]


# --------------------------------------------------------------------------- faults
def test_fault_429_json(emulator: Emulator, customer: Customer, http: requests.Session) -> None:
    """A "429" fault answers once with Entra's JSON body and Retry-After, then recovers."""
    emulator.add_fault("token", "429", retry_after=7)
    url, form = emulator.token_url(TENANT), token_form(APP, APP_SECRET, XDR)

    throttled = http.post(url, data=form)
    recovered = http.post(url, data=form)

    assert 429 == throttled.status_code
    assert "7" == throttled.headers["Retry-After"]
    assert [90055] == throttled.json()["error_codes"]
    assert 200 == recovered.status_code
    assert [429, 200] == [r["status"] for r in emulator.requests("token")]
    assert APP == emulator.requests("token")[0]["client_id"]  # faulted requests are attributed


def test_msal_replays_a_429_without_asking_again(
    emulator: Emulator, customer: Customer, http: requests.Session
) -> None:
    """MSAL returns a JSON 429 as an error dict and replays it within Retry-After itself."""
    emulator.add_fault("token", "429", retry_after=30, count=-1)
    app = make_cca(emulator, http, TENANT, APP_SECRET)

    first = app.acquire_token_for_client(scopes=[f"{XDR}/.default"])
    second = app.acquire_token_for_client(scopes=[f"{XDR}/.default"])

    assert [90055] == first["error_codes"] == second["error_codes"]
    assert 1 == emulator.token_requests(tenant=TENANT)  # the second answer came from MSAL


def test_fault_429_text_reaches_msal_as_value_error(
    emulator: Emulator, customer: Customer, http: requests.Session
) -> None:
    """A plain-text 429 carries Retry-After, and MSAL raises ValueError on its body."""
    emulator.add_fault("token", "429_text", count=2)

    raw = http.post(emulator.token_url(TENANT), data=token_form(APP, APP_SECRET, XDR))
    with pytest.raises(ValueError, match="Expecting value"):
        make_cca(emulator, http, TENANT, APP_SECRET).acquire_token_for_client(scopes=[f"{XDR}/.default"])

    assert (429, "1") == (raw.status_code, raw.headers["Retry-After"])
    assert raw.headers["Content-Type"].startswith("text/plain")


def test_fault_503_reaches_msal_as_service_error(
    emulator: Emulator, customer: Customer, http: requests.Session
) -> None:
    """A 503 on the token endpoint makes MSAL raise (it does not retry)."""
    emulator.add_fault("token", "503")

    with pytest.raises(msal.exceptions.MsalServiceError, match="503"):
        make_cca(emulator, http, TENANT, APP_SECRET).acquire_token_for_client(scopes=[f"{XDR}/.default"])

    assert [503] == [r["status"] for r in emulator.requests("token")]


def test_fault_latency(emulator: Emulator, customer: Customer, http: requests.Session) -> None:
    """A latency fault delays the answer, which is then normal."""
    emulator.add_fault("discovery", "latency", latency_seconds=0.3)

    started = time.monotonic()
    response = http.get(f"{emulator.base_url}/{TENANT}/v2.0/.well-known/openid-configuration")

    assert 200 == response.status_code
    assert time.monotonic() - started >= 0.3


def test_fault_drop(emulator: Emulator, customer: Customer, http: requests.Session) -> None:
    """A drop fault closes the connection with no response; the log records status 0."""
    emulator.add_fault("token", "drop")

    with pytest.raises(requests.ConnectionError):
        http.post(emulator.token_url(TENANT), data=token_form(APP, APP_SECRET, XDR))
    after = http.post(emulator.token_url(TENANT), data=token_form(APP, APP_SECRET, XDR))

    assert 200 == after.status_code
    assert [0, 200] == [r["status"] for r in emulator.requests("token")]


def test_tenant_scoped_fault(emulator: Emulator, customer: Customer, http: requests.Session) -> None:
    """A fault scoped to one tenant (by domain) hits it by GUID too, and spares other tenants."""
    emulator.grant(OTHER_TENANT, APP, XDR)
    emulator.add_fault("token", "500", tenant=TENANT_DOMAIN, count=-1)

    faulted = http.post(emulator.token_url(TENANT), data=token_form(APP, APP_SECRET, XDR))
    spared = http.post(emulator.token_url(OTHER_TENANT), data=token_form(APP, APP_SECRET, XDR))
    again = http.post(emulator.token_url(TENANT), data=token_form(APP, APP_SECRET, XDR))
    emulator.clear_faults()
    cleared = http.post(emulator.token_url(TENANT), data=token_form(APP, APP_SECRET, XDR))

    assert [500, 200, 500, 200] == [r.status_code for r in (faulted, spared, again, cleared)]
    assert "server_error" == faulted.json()["error"]


async def test_vault_503_is_retried_by_azure_core(emulator: Emulator) -> None:
    """A single Key Vault 503 (Key Vault-shaped body) is absorbed by azure-core's retry."""
    emulator.set_secret("app-secret", "v")
    emulator.add_fault("vault", "503")

    async with broker_credential(emulator) as credential, secret_client(emulator, credential) as client:
        secret = await client.get_secret("app-secret")

    assert "v" == secret.value
    assert [503, 401, 200] == [r["status"] for r in emulator.requests("vault")]


def test_counters_and_reset(emulator: Emulator, customer: Customer, http: requests.Session) -> None:
    """Counters count requests per endpoint, tokens and faults; reset_counters zeroes them."""
    emulator.add_fault("jwks", "503")
    http.get(f"{emulator.base_url}/{TENANT}/discovery/v2.0/keys")
    make_cca(emulator, http, TENANT, APP_SECRET).acquire_token_for_client(scopes=[f"{XDR}/.default"])

    before = emulator.counters()
    emulator.reset_counters()

    expected = {
        "discovery": 1,
        "token": 1,
        "jwks": 1,
        "vault": 0,
        "sign": 0,
        "identity": 0,
        "issued_tokens": 1,
        "signatures": 0,
        "faults_fired": 1,
    }
    assert expected == before
    assert dict.fromkeys(expected, 0) == emulator.counters()
    assert [] == emulator.requests()


def test_control_api_rejects_bad_arguments(emulator: Emulator) -> None:
    """Misconfiguring the emulator fails at the control call, not later."""
    with pytest.raises(EmulatorError, match="unknown tenant"):
        emulator.add_app(APP, home_tenant="nowhere.example")
    with pytest.raises(EmulatorError, match="kind must be"):
        emulator.add_fault("token", "teapot")


def test_control_api_checks_arguments_against_the_operation(emulator: Emulator) -> None:
    """Arguments are checked against the state method's signature before it runs: types, names,
    required ones; an unknown operation is a 404."""
    with pytest.raises(EmulatorError, match="'count' must be an integer"):
        emulator.call("add_fault", {"endpoint": "token", "kind": "500", "count": True})
    with pytest.raises(EmulatorError, match=r"needs argument\(s\) \['client_id', 'resource'\]"):
        emulator.call("grant", {"tenant": TENANT})
    with pytest.raises(EmulatorError, match="takes no argument"):
        emulator.call("reset", {"everything": True})
    with pytest.raises(EmulatorError, match="HTTP 404"):
        emulator.call("format_disk")
    with pytest.raises(TypeError):
        emulator.grant(TENANT)  # type: ignore[call-arg]  # bound to the signature before sending
    assert [] == emulator.faults()


def test_client_offers_every_control_operation() -> None:
    """Every operation written in EmulatorState is an Emulator method of the same name."""
    offered = {name for name, value in vars(Emulator).items() if isinstance(value, remote)}
    assert set(OPERATIONS) == offered


# --------------------------------------------------------------------------- process / demo
def test_demo_process(tmp_path: Path) -> None:
    """``--demo`` seeds tenants and the Defender app whose secret lives in the vault."""
    with start_emulator(tmp_path, demo=True) as demo, demo.http_session() as session:
        ready = json.loads((tmp_path / "emulator.json").read_text())
        tenant_id, client_id, secret = demo.broker_identity
        vault_app = make_cca(demo, session, tenant_id, secret, client_id)
        vault_token = vault_app.acquire_token_for_client(scopes=[VAULT_SCOPE])["access_token"]
        stored = session.get(
            f"{demo.vault_url}/secrets/defender-app-secret/",
            params={"api-version": "7.5"},
            headers={"Authorization": f"Bearer {vault_token}"},
        ).json()
        defender = make_cca(demo, session, "contoso.onmicrosoft.com", stored["value"], APP)
        result = defender.acquire_token_for_client(scopes=[f"{XDR}/.default"])
        pid = demo.process.pid if demo.process else None

        assert (demo.base_url, pid) == (ready["base_url"], ready["pid"])
        assert XDR_ROLES == demo.verify_token(result["access_token"], XDR)["roles"]
    assert not (tmp_path / "emulator.json").exists()  # removed on clean shutdown
