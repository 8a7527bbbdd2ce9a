"""Unmodified Python clients pointed at a broker serving TLS, each trusting its CA the way that client
normally does: MSAL's ConfidentialClientApplication (caller key, and a service-account assertion),
azure-identity's ClientSecretCredential, ManagedIdentityCredential and DefaultAzureCredential through
the managed-identity endpoint, and a generic OAuth 2 client (requests-oauthlib)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jwt
import msal
import requests
from azure.identity import ClientSecretCredential
from oauthlib.oauth2 import BackendApplicationClient
from requests_oauthlib import OAuth2Session

from tests.functional.conftest import APP_ID, DEFENDER, MDE, ROLES, TENANT_A, TENANT_B, TENANT_C, World
from tests.functional.dropin.conftest import StartTlsBroker, TlsBrokerProcess, clean_env
from tests.test_callers import ACCOUNT, Issuer


def _session(broker: TlsBrokerProcess) -> requests.Session:
    # FIELD-NOTES: trust_env=False, or REQUESTS_CA_BUNDLE would silently override verify.
    session = requests.Session()
    session.verify = str(broker.ca_file)
    session.trust_env = False
    return session


def test_msal_confidential_client_with_the_broker_as_authority(
    world: World, start_tls_broker: StartTlsBroker
) -> None:
    """MSAL Python discovers the broker's endpoints from its v2 document and gets each tenant's token
    with the caller key as client_credential; the app secret is never involved."""
    broker = start_tls_broker(world.broker_config(), world.env)
    with _session(broker) as session:
        for tenant in (TENANT_A, TENANT_B):
            app = msal.ConfidentialClientApplication(
                APP_ID,
                client_credential=world.soar_key,
                authority=f"{broker.url}/{tenant}",
                instance_discovery=False,
                http_client=session,
            )
            result = app.acquire_token_for_client(scopes=[f"{DEFENDER}/.default"])
            assert "access_token" in result, result
            claims = world.emulator.verify_token(result["access_token"], DEFENDER)
            assert (tenant, sorted(ROLES)) == (claims["tid"], sorted(claims["roles"]))
        refused = msal.ConfidentialClientApplication(
            APP_ID,
            client_credential="tbk_not-a-caller",
            authority=f"{broker.url}/{TENANT_A}",
            instance_discovery=False,
            http_client=session,
        ).acquire_token_for_client(scopes=[f"{DEFENDER}/.default"])
    assert "invalid_client" == refused["error"]
    assert 2 == world.emulator.token_requests(client_id=APP_ID)
    assert {"oauth2_v2"} == {line["surface"] for line in broker.audit_lines()}


def test_msal_with_a_service_account_assertion(
    world: World, start_tls_broker: StartTlsBroker, oidc_issuer: tuple[str, Issuer], tmp_path: Path
) -> None:
    """A pod's projected service-account token works as MSAL's client_assertion (jwt-bearer, read from
    the token file at each request as a pod would): the broker verifies it as it does a bearer token
    and applies that caller's policy."""
    base, issuer = oidc_issuer
    config = world.broker_config(service_account_auth={"issuer": base, "audience": "token-broker"})
    config["callers"]["siem"] = {"service_account": ACCOUNT, "tenants": [TENANT_C], "apps": ["defender"]}
    broker = start_tls_broker(config, world.env)
    key, alg = issuer.keys["k1"]
    now = int(time.time())
    token_file = tmp_path / "token"
    token_file.write_text(
        jwt.encode(
            {"iss": base, "sub": ACCOUNT, "aud": "token-broker", "iat": now, "nbf": now, "exp": now + 600},
            key,
            algorithm=alg,
            headers={"kid": "k1"},
        )
    )
    with _session(broker) as session:
        results = {
            tenant: msal.ConfidentialClientApplication(
                APP_ID,
                client_credential={"client_assertion": token_file.read_text},
                authority=f"{broker.url}/{tenant}",
                instance_discovery=False,
                http_client=session,
            ).acquire_token_for_client(scopes=[f"{DEFENDER}/.default"])
            for tenant in (TENANT_C, TENANT_A)
        }
    assert TENANT_C == world.emulator.verify_token(results[TENANT_C]["access_token"], DEFENDER)["tid"]
    assert "unauthorized_client" == results[TENANT_A]["error"]  # outside the siem caller's policy
    assert ["siem", "siem"] == [line["caller"] for line in broker.audit_lines()]


def test_azure_identity_client_secret_credential(world: World, start_tls_broker: StartTlsBroker) -> None:
    """azure-identity's ClientSecretCredential with the broker as authority (disable_instance_discovery,
    connection_verify): the caller key goes where the app secret was."""
    broker = start_tls_broker(world.broker_config(), world.env)
    credential = ClientSecretCredential(
        TENANT_B,
        APP_ID,
        world.soar_key,
        authority=broker.url,
        disable_instance_discovery=True,
        connection_verify=str(broker.ca_file),
    )
    try:
        token = credential.get_token(f"{MDE}/.default")
    finally:
        credential.close()
    claims = world.emulator.verify_token(token.token, MDE)
    assert (TENANT_B, ["Alert.Read.All"]) == (claims["tid"], claims["roles"])
    assert abs(token.expires_on - claims["exp"]) <= 2


# Run in a fresh interpreter: azure-identity (and MSAL under it) read IDENTITY_ENDPOINT/IDENTITY_HEADER
# from the environment, and azure-core's requests transport takes the CA from REQUESTS_CA_BUNDLE.
_MANAGED_IDENTITY_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from azure.identity import DefaultAzureCredential, ManagedIdentityCredential

    scope = sys.argv[1]
    print(json.dumps({
        "managed_identity": ManagedIdentityCredential().get_token(scope).token,
        "default": DefaultAzureCredential().get_token(scope).token,
    }))
    """
)


def test_managed_identity_and_default_credential_via_the_msi_endpoint(
    world: World, start_tls_broker: StartTlsBroker
) -> None:
    """IDENTITY_ENDPOINT=https://broker/msi/{tenant}/token and IDENTITY_HEADER=<caller key> are all
    ManagedIdentityCredential and DefaultAzureCredential need (App Service protocol): both get the
    tenant's token, the second from the broker's cache."""
    broker = start_tls_broker(world.broker_config(), world.env)
    env = clean_env(
        IDENTITY_ENDPOINT=f"{broker.url}/msi/{TENANT_A}/token",
        IDENTITY_HEADER=world.soar_key,
        REQUESTS_CA_BUNDLE=str(broker.ca_file),
    )
    result = subprocess.run(
        [sys.executable, "-c", _MANAGED_IDENTITY_SCRIPT, f"{DEFENDER}/.default"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )
    assert 0 == result.returncode, result.stderr
    tokens = json.loads(result.stdout)
    assert TENANT_A == world.emulator.verify_token(tokens["managed_identity"], DEFENDER)["tid"]
    assert tokens["managed_identity"] == tokens["default"]
    assert ["msi", "msi"] == [line["surface"] for line in broker.audit_lines()]
    assert 1 == world.emulator.token_requests(client_id=APP_ID)


def test_generic_oauth2_client_credentials_library(world: World, start_tls_broker: StartTlsBroker) -> None:
    """requests-oauthlib's backend-application flow (HTTP Basic client authentication by default, and
    https only) gets a token from the v2 endpoint."""
    broker = start_tls_broker(world.broker_config(), world.env)
    oauth = OAuth2Session(client=BackendApplicationClient(client_id=APP_ID))
    token = oauth.fetch_token(
        token_url=f"{broker.url}/{TENANT_C}/oauth2/v2.0/token",
        client_id=APP_ID,
        client_secret=world.soar_key,
        scope=[f"{DEFENDER}/.default"],
        verify=str(broker.ca_file),  # type: ignore[arg-type]  # requests takes a CA bundle path; the stub says bool
    )
    assert "Bearer" == token["token_type"]
    assert TENANT_C == world.emulator.verify_token(token["access_token"], DEFENDER)["tid"]
