"""A non-Python client: Node.js (Debian's, or whatever node is on PATH) running the unmodified npm
packages @azure/identity and @azure/msal-node from tests/node's lockfile against a broker serving TLS,
trusting its CA through NODE_EXTRA_CA_CERTS (tests/node/get-token.mjs is the partner's code)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.functional.conftest import APP_ID, DEFENDER, MDE, TENANT_A, TENANT_B, TENANT_C, World
from tests.functional.dropin.conftest import StartTlsBroker, TlsBrokerProcess, clean_env


def run_node(node_dir: Path, mode: str, broker: TlsBrokerProcess, **env: str) -> dict[str, Any]:
    node = shutil.which("node")
    assert node is not None
    result = subprocess.run(
        [node, "get-token.mjs", mode],
        cwd=node_dir,
        capture_output=True,
        text=True,
        timeout=120,
        env=clean_env(NODE_EXTRA_CA_CERTS=str(broker.ca_file), BROKER_URL=broker.url, **env),
        check=False,
    )
    lines = result.stdout.strip().splitlines()
    assert lines, f"no output from node (exit {result.returncode}): {result.stderr}"
    answer: dict[str, Any] = json.loads(lines[-1])
    return answer


@pytest.mark.parametrize("mode", ["client-secret", "msal-node"])
def test_node_confidential_clients(
    world: World, start_tls_broker: StartTlsBroker, node_clients: Path, mode: str
) -> None:
    """@azure/identity's ClientSecretCredential (disableInstanceDiscovery) and @azure/msal-node's
    ConfidentialClientApplication (knownAuthorities) get tenant tokens with the caller key as the
    secret; a wrong key fails with Entra's invalid_client."""
    broker = start_tls_broker(world.broker_config(), world.env)
    answer = run_node(
        node_clients,
        mode,
        broker,
        TENANT_ID=TENANT_C,
        CLIENT_ID=APP_ID,
        CALLER_KEY=world.soar_key,
        SCOPE=f"{MDE}/.default",
    )
    assert "token" in answer, answer
    claims = world.emulator.verify_token(answer["token"], MDE)
    assert TENANT_C == claims["tid"]
    assert abs(answer["expiresOnTimestamp"] / 1000 - claims["exp"]) <= 2
    refused = run_node(
        node_clients,
        mode,
        broker,
        TENANT_ID=TENANT_B,
        CLIENT_ID=APP_ID,
        CALLER_KEY="tbk_not-a-caller",
        SCOPE=f"{MDE}/.default",
    )
    assert "invalid_client" in refused["error"]
    assert ["oauth2_v2", "oauth2_v2"] == [line["surface"] for line in broker.audit_lines()]


def test_node_managed_identity_credential(
    world: World, start_tls_broker: StartTlsBroker, node_clients: Path
) -> None:
    """@azure/identity's ManagedIdentityCredential picks the App Service source from IDENTITY_ENDPOINT
    and IDENTITY_HEADER and gets the tenant's token from the broker's managed-identity endpoint."""
    broker = start_tls_broker(world.broker_config(), world.env)
    answer = run_node(
        node_clients,
        "managed-identity",
        broker,
        IDENTITY_ENDPOINT=f"{broker.url}/msi/{TENANT_A}/token",
        IDENTITY_HEADER=world.soar_key,
        SCOPE=f"{DEFENDER}/.default",
    )
    assert "token" in answer, answer
    assert TENANT_A == world.emulator.verify_token(answer["token"], DEFENDER)["tid"]
    assert ["msi"] == [line["surface"] for line in broker.audit_lines()]
