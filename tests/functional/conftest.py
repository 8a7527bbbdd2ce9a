"""A small world in the emulator (tenants, an app, consents, Key Vault secrets) and its broker config."""

from __future__ import annotations

import base64
import copy
import os
from dataclasses import dataclass, field
from typing import Any

import pytest
import requests

from broker.callers import new_api_key
from emulator import Emulator
from tests.support import BrokerProcess

APP_ID = "0f0e0d0c-0b0a-4999-8888-777766665555"
TENANT_A = "aaaaaaaa-1111-4111-8111-aaaaaaaaaaaa"
TENANT_B = "bbbbbbbb-2222-4222-8222-bbbbbbbbbbbb"
TENANT_C = "cccccccc-3333-4333-8333-cccccccccccc"
DOMAIN_C = "fabrikam.onmicrosoft.com"
TENANT_UNCONSENTED = "dddddddd-4444-4444-8444-dddddddddddd"
TENANT_MISSING = "eeeeeeee-5555-4555-8555-eeeeeeeeeeee"
DEFENDER = "https://api.security.microsoft.com"
MDE = "https://api.securitycenter.microsoft.com"
GRAPH = "https://graph.microsoft.com"
ROLES = ["Incident.Read.All", "AdvancedHunting.Read.All"]
APP_SECRET_NAME = "defender-app-secret"
CACHE_KEY_NAME = "broker-cache-key"


@dataclass
class World:
    """What a test needs to talk to the broker about the emulator's tenants."""

    emulator: Emulator
    app_secret: str
    cache_key: str
    soar_key: str
    hunter_key: str
    config: dict[str, Any] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)

    def broker_config(self, redis_url: str | None = None, **overrides: Any) -> dict[str, Any]:
        config = copy.deepcopy({**self.config, **overrides})
        if redis_url is not None:
            config["redis_url"] = redis_url
            config["cache_encryption_key"] = {"secret": CACHE_KEY_NAME}
        return config


@pytest.fixture
def world(emulator: Emulator) -> World:
    """Three consented tenants (two by GUID, one also by domain), one unconsented, an app whose
    secret and the cache key live in Key Vault, and two callers with different policies."""
    app_secret = base64.b64encode(os.urandom(24)).decode()
    emulator.add_tenant(TENANT_A)
    emulator.add_tenant(TENANT_B)
    emulator.add_tenant(TENANT_C, domains=[DOMAIN_C])
    emulator.add_tenant(TENANT_UNCONSENTED)
    emulator.add_app(APP_ID, home_tenant=TENANT_A, secret=app_secret)
    for tenant in (TENANT_A, TENANT_B, TENANT_C):
        emulator.grant(tenant, APP_ID, DEFENDER, ROLES)
        emulator.grant(tenant, APP_ID, MDE, ["Alert.Read.All"])
    emulator.set_secret(APP_SECRET_NAME, app_secret)
    cache_key = base64.b64encode(os.urandom(32)).decode()
    emulator.set_secret(CACHE_KEY_NAME, cache_key)
    soar_key, soar_hash = new_api_key()
    hunter_key, hunter_hash = new_api_key()
    identity = emulator.broker_identity
    world = World(emulator, app_secret, cache_key, soar_key, hunter_key)
    world.config = {
        "authority_host": emulator.base_url,
        "key_vault_url": emulator.base_url,
        "key_vault_verify_challenge_resource": False,
        "azure_credential": "environment",
        "outbound_ca_file": str(emulator.ca_path),
        "log_level": "DEBUG",
        "credential_min_reload_seconds": 0,
        "apps": {
            "defender": {
                "client_id": APP_ID,
                "credential": {"secret": APP_SECRET_NAME},
                "resources": [DEFENDER, MDE],
            }
        },
        "callers": {
            "soar": {"api_key_sha256": soar_hash, "tenants": ["*"], "apps": ["defender"]},
            "hunter": {"api_key_sha256": hunter_hash, "tenants": [TENANT_A], "apps": ["defender"]},
        },
    }
    world.env = {
        "AZURE_TENANT_ID": identity.tenant_id,
        "AZURE_CLIENT_ID": identity.client_id,
        "AZURE_CLIENT_SECRET": identity.client_secret,
        "AZURE_AUTHORITY_HOST": emulator.base_url,
    }
    return world


def ask(
    broker: BrokerProcess,
    key: str | None,
    body: Any,
    *,
    headers: dict[str, str] | None = None,
    raw: bytes | None = None,
) -> requests.Response:
    """POST /v1/token as a caller would."""
    sent = {"Content-Type": "application/json"}
    if key is not None:
        sent["Authorization"] = f"Bearer {key}"
    sent.update(headers or {})
    if raw is not None:
        return requests.post(f"{broker.url}/v1/token", data=raw, headers=sent, timeout=30)
    return requests.post(f"{broker.url}/v1/token", json=body, headers=sent, timeout=30)
