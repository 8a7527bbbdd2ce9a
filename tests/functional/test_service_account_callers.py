"""Kubernetes service-account tokens as caller credentials, end to end: a local OIDC issuer over
HTTP (discovery + JWKS), a broker process, real RS256 tokens, and a signing-key rotation."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import jwt

from broker.client import BrokerCredential
from tests.functional.conftest import DEFENDER, TENANT_A, World, ask
from tests.support import BrokerProcess
from tests.test_callers import ACCOUNT, Issuer

StartBroker = Callable[..., BrokerProcess]


def test_service_account_caller_gets_a_token(
    world: World, start_broker: StartBroker, oidc_issuer: tuple[str, Issuer]
) -> None:
    """A pod's projected token (right issuer, audience, account) gets an Entra token; after the
    cluster rotates its signing key, tokens signed by the new key are accepted too; a token for
    another audience is 401."""
    base, issuer = oidc_issuer
    config = world.broker_config(
        service_account_auth={"issuer": base, "audience": "token-broker", "jwks_refresh_min_seconds": 0}
    )
    config["callers"]["siem"] = {"service_account": ACCOUNT, "tenants": [TENANT_A], "apps": ["defender"]}
    broker = start_broker(config, world.env)
    body = {"tenant": TENANT_A, "resource": DEFENDER}
    ok = ask(broker, _token(issuer, base, "k1"), body)
    assert 200 == ok.status_code, ok.text
    issuer.add_key("k2")
    rotated = ask(broker, _token(issuer, base, "k2"), body)
    assert 200 == rotated.status_code, rotated.text
    wrong = ask(broker, _token(issuer, base, "k2", aud="other"), body)
    assert 401 == wrong.status_code
    assert "invalid_client" == wrong.json()["error"]
    assert ["siem", "siem", "-"] == [line["caller"] for line in broker.audit_lines()]


def _token(issuer: Issuer, base: str, kid: str, aud: str = "token-broker") -> str:
    """A projected service-account token as the kubelet would mint it, for issuer ``base``."""
    key, kind = issuer.keys[kid]
    now = int(time.time())
    return jwt.encode(
        {"iss": base, "sub": ACCOUNT, "aud": aud, "iat": now, "nbf": now, "exp": now + 600},
        key,
        algorithm=kind,
        headers={"kid": kid},
    )


def test_client_with_a_projected_token_file(
    world: World, start_broker: StartBroker, oidc_issuer: tuple[str, Issuer], tmp_path: Path
) -> None:
    """BrokerCredential(token_file=...) presents the pod's service-account JWT and gets tokens."""
    base, issuer = oidc_issuer
    config = world.broker_config(service_account_auth={"issuer": base, "audience": "token-broker"})
    config["callers"]["siem"] = {"service_account": ACCOUNT, "tenants": ["*"], "apps": ["defender"]}
    broker = start_broker(config, world.env)
    token_file = tmp_path / "token"
    token_file.write_text(_token(issuer, base, "k1"))
    with BrokerCredential(broker.url, token_file=str(token_file)) as credential:
        token = credential.get_token(f"{DEFENDER}/.default", tenant_id=TENANT_A)
    assert TENANT_A == world.emulator.verify_token(token.token, DEFENDER)["tid"]
