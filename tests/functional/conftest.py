"""The test world in the emulator (``emulator.world.TEST_WORLD``) and the broker config that goes with it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests
from aiohttp import web

from broker.callers import new_api_key
from emulator import Emulator
from emulator.world import (
    DEFENDER_ENDPOINT,
    DEFENDER_XDR,
    DOMAIN_C,
    GRAPH,
    TENANT_A,
    TENANT_B,
    TENANT_C,
    TENANT_MISSING,
    TENANT_UNCONSENTED,
    TEST_APP_ID,
    TEST_WORLD,
    XDR_ROLES,
    broker_config,
    broker_environment,
)
from tests.support import BrokerProcess, free_port, serve_in_thread
from tests.test_callers import Issuer

# The names the functional tests use for the test world's identifiers.
__all__ = [
    "APP_ID",
    "DEFENDER",
    "DOMAIN_C",
    "GRAPH",
    "MDE",
    "ROLES",
    "TENANT_A",
    "TENANT_B",
    "TENANT_C",
    "TENANT_MISSING",
    "TENANT_UNCONSENTED",
    "World",
    "ask",
]
APP_ID = TEST_APP_ID
DEFENDER = DEFENDER_XDR
MDE = DEFENDER_ENDPOINT
ROLES = list(XDR_ROLES)


@dataclass
class World:
    """What a test needs to talk to the broker about the emulator's tenants."""

    emulator: Emulator
    app_secret: str
    cache_key: str
    soar_key: str
    hunter_key: str
    callers: dict[str, dict[str, Any]]
    env: dict[str, str]
    extra_resources: list[str] = field(default_factory=list)  # allowed for every app besides the world's

    def broker_config(self, redis_url: str | None = None, **overrides: Any) -> dict[str, Any]:
        settings = {"log_level": "DEBUG", "credential_min_reload_seconds": 0, **overrides}
        config = broker_config(self.emulator, TEST_WORLD, self.callers, redis_url=redis_url, **settings)
        for app in config["apps"].values():
            app["resources"] = [*app["resources"], *self.extra_resources]
        return config


@pytest.fixture
def world(emulator: Emulator) -> World:
    """Three consented tenants (two by GUID, one also by domain), one unconsented, an app whose
    secret and the cache key live in Key Vault, and two callers with different policies."""
    seeded = TEST_WORLD.seed(emulator)
    soar_key, soar_hash = new_api_key()
    hunter_key, hunter_hash = new_api_key()
    callers = {
        "soar": TEST_WORLD.caller(soar_hash),
        "hunter": TEST_WORLD.caller(hunter_hash, tenants=[TENANT_A]),
    }
    return World(
        emulator,
        seeded.app_secret,
        seeded.cache_key,
        soar_key,
        hunter_key,
        callers,
        broker_environment(emulator),
    )


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


@pytest.fixture
def oidc_issuer(tmp_path: Path) -> Iterator[tuple[str, Issuer]]:
    """A Kubernetes-style OIDC issuer on 127.0.0.1: its discovery document and the JWKS file's current
    keys, for service-account tokens (callers' bearer tokens and client assertions)."""
    port = free_port()
    base = f"http://127.0.0.1:{port}/issuer"
    issuer = Issuer(tmp_path / "jwks.json")
    issuer.add_key("k1")

    async def discovery(_r: web.Request) -> web.Response:
        return web.json_response({"issuer": base, "jwks_uri": f"{base}/keys"})

    async def keys(_r: web.Request) -> web.Response:
        return web.json_response(json.loads(issuer.path.read_text()))

    app = web.Application()
    app.router.add_get("/issuer/.well-known/openid-configuration", discovery)
    app.router.add_get("/issuer/keys", keys)
    with serve_in_thread(app, port):
        yield base, issuer
