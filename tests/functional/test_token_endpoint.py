"""POST /v1/token end to end: Key Vault → MSAL → encrypted Redis → caller, against real processes."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from redis.asyncio import Redis

from emulator import make_certificate
from tests.functional.conftest import (
    APP_ID,
    DEFENDER,
    DOMAIN_C,
    GRAPH,
    MDE,
    ROLES,
    TENANT_A,
    TENANT_B,
    TENANT_C,
    TENANT_MISSING,
    TENANT_UNCONSENTED,
    World,
    ask,
)
from tests.support import BrokerProcess, run_cli

StartBroker = Callable[..., BrokerProcess]


def test_tokens_for_three_tenants_by_guid_and_domain(world: World, start_broker: StartBroker) -> None:
    """Each tenant gets its own valid token (verified against the emulator's keys), with no-store."""
    broker = start_broker(world.broker_config(), world.env)
    for tenant, expected_tid in ((TENANT_A, TENANT_A), (TENANT_B, TENANT_B), (DOMAIN_C, TENANT_C)):
        response = ask(broker, world.soar_key, {"tenant": tenant, "resource": DEFENDER})
        assert 200 == response.status_code, response.text
        body = response.json()
        claims = world.emulator.verify_token(body["access_token"], DEFENDER)
        assert (expected_tid, DEFENDER, expected_tid) == (claims["tid"], claims["aud"], body["tenant_id"])
        assert sorted(ROLES) == sorted(body["roles"])
        assert "Bearer" == body["token_type"]
        assert 3300 < body["expires_in"] <= 3600
        assert abs(body["expires_on"] - claims["exp"]) <= 2
        assert "no-store" == response.headers["Cache-Control"]
        assert "no-cache" == response.headers["Pragma"]
    assert 3 == world.emulator.token_requests(client_id=APP_ID)


def test_second_request_is_a_cache_hit(world: World, start_broker: StartBroker) -> None:
    """The same (tenant, resource) twice costs one Entra request and returns the same token;
    another resource in the same tenant is a separate entry."""
    broker = start_broker(world.broker_config(), world.env)
    first = ask(broker, world.soar_key, {"tenant": TENANT_A, "resource": DEFENDER}).json()
    second = ask(broker, world.soar_key, {"tenant": TENANT_A, "scope": DEFENDER + "/.default"}).json()
    assert first["access_token"] == second["access_token"]
    assert 1 == world.emulator.token_requests(tenant=TENANT_A, client_id=APP_ID)
    other = ask(broker, world.soar_key, {"tenant": TENANT_A, "resource": MDE}).json()
    assert MDE == world.emulator.verify_token(other["access_token"], MDE)["aud"]
    assert ["Alert.Read.All"] == other["roles"]
    assert 2 == world.emulator.token_requests(tenant=TENANT_A, client_id=APP_ID)


async def _raw_redis_values(url: str) -> dict[bytes, bytes]:
    redis = Redis.from_url(url)
    try:
        values: dict[bytes, bytes] = {}
        async for key in redis.scan_iter(match="tb:v1:tok:*"):
            value = await redis.get(key)
            values[key] = value if isinstance(value, bytes) else b""
        return values
    finally:
        await redis.aclose()


def test_redis_holds_only_ciphertext_and_a_second_replica_reads_it(
    world: World, start_broker: StartBroker, redis_url: str
) -> None:
    """Redis values contain no token (nor its claims); a second process with the same key serves
    the first one's entry without asking Entra."""
    config = world.broker_config(redis_url)
    first = start_broker(config, world.env, name="replica1")
    token = ask(first, world.soar_key, {"tenant": TENANT_B, "resource": DEFENDER}).json()["access_token"]
    values = asyncio.run(_raw_redis_values(redis_url))
    assert 1 == len(values)
    payload = token.split(".")[1].encode()
    for key, value in values.items():
        assert TENANT_B.encode() in key
        assert token.encode() not in value
        assert payload[:40] not in value
        assert payload[:40] not in base64.b64encode(value)
    second = start_broker(config, world.env, name="replica2")
    again = ask(second, world.soar_key, {"tenant": TENANT_B, "resource": DEFENDER}).json()
    assert token == again["access_token"]
    assert 1 == world.emulator.token_requests(tenant=TENANT_B, client_id=APP_ID)


def test_min_ttl_beyond_the_cached_token_forces_a_fresh_one(world: World, start_broker: StartBroker) -> None:
    """A cached token with less life left than min_ttl is not handed out; a fresh one is."""
    world.emulator.set_token_lifetime(900)
    broker = start_broker(world.broker_config(), world.env)
    short = ask(broker, world.soar_key, {"tenant": TENANT_A, "resource": DEFENDER, "min_ttl": 60}).json()
    assert short["expires_in"] <= 900
    world.emulator.set_token_lifetime(3600)
    longer = ask(broker, world.soar_key, {"tenant": TENANT_A, "resource": DEFENDER, "min_ttl": 1200}).json()
    assert short["access_token"] != longer["access_token"]
    assert longer["expires_in"] >= 1200
    assert 2 == world.emulator.token_requests(tenant=TENANT_A)
    # ...and the longer-lived token now serves the short-min_ttl callers too.
    again = ask(broker, world.soar_key, {"tenant": TENANT_A, "resource": DEFENDER, "min_ttl": 60}).json()
    assert longer["access_token"] == again["access_token"]


def test_certificate_credential_from_key_vault(world: World, start_broker: StartBroker) -> None:
    """An app authenticating with a certificate whose key Key Vault holds (PEM, as a secret) works."""
    key_pem, cert_pem = make_certificate("token-broker-test")
    cert_app = "12121212-3434-4565-8787-909090909090"
    world.emulator.add_app(cert_app, home_tenant=TENANT_A, certificate_pem=cert_pem)
    world.emulator.grant(TENANT_B, cert_app, DEFENDER, ["Incident.Read.All"])
    world.emulator.set_secret("cert-app", key_pem + cert_pem, content_type="application/x-pem-file")
    config = world.broker_config()
    config["apps"] = {
        "certapp": {"client_id": cert_app, "credential": {"certificate": "cert-app"}, "resources": [DEFENDER]}
    }
    config["callers"]["soar"]["apps"] = ["certapp"]
    config["callers"]["hunter"]["apps"] = ["certapp"]
    broker = start_broker(config, world.env)
    response = ask(broker, world.soar_key, {"tenant": TENANT_B, "resource": DEFENDER})
    assert 200 == response.status_code, response.text
    claims = world.emulator.verify_token(response.json()["access_token"], DEFENDER)
    assert (cert_app, ["Incident.Read.All"]) == (claims["appid"], claims["roles"])


# --- every row of the error table, each from a real cause ----------------------------------------


def _error(response: object, status: int, error: str) -> dict[str, object]:
    assert status == response.status_code, response.text  # type: ignore[attr-defined]
    body = response.json()  # type: ignore[attr-defined]
    assert error == body["error"]
    assert body["error_description"]
    assert body["request_id"] == response.headers["X-Request-ID"]  # type: ignore[attr-defined]
    return body  # type: ignore[no-any-return]


def test_error_rows_request_and_caller(world: World, start_broker: StartBroker) -> None:
    """400, 401, 403 access_denied, 413 and 415 from malformed requests and policy."""
    broker = start_broker(world.broker_config(), world.env)
    ok = {"tenant": TENANT_A, "resource": DEFENDER}
    _error(ask(broker, world.soar_key, None, raw=b"{not json"), 400, "invalid_request")
    _error(ask(broker, world.soar_key, {**ok, "colour": "red"}), 400, "invalid_request")
    _error(ask(broker, world.soar_key, {**ok, "tenant": "bad tenant"}), 400, "invalid_request")
    _error(ask(broker, world.soar_key, {**ok, "min_ttl": 99999}), 400, "invalid_request")
    _error(ask(broker, world.soar_key, {**ok, "app": "nope"}), 400, "invalid_request")
    missing = ask(broker, None, ok)
    _error(missing, 401, "invalid_client")
    assert missing.headers["WWW-Authenticate"].startswith("Bearer")
    _error(ask(broker, "not-a-key", ok), 401, "invalid_client")
    _error(ask(broker, world.hunter_key, {**ok, "tenant": TENANT_B}), 403, "access_denied")
    _error(ask(broker, world.soar_key, {**ok, "resource": GRAPH}), 403, "access_denied")
    _error(ask(broker, world.soar_key, None, raw=b"{" + b" " * 10_000 + b"}"), 413, "invalid_request")
    _error(
        ask(broker, world.soar_key, None, raw=b"tenant=x", headers={"Content-Type": "text/plain"}),
        415,
        "invalid_request",
    )
    # Nothing of the above reached Entra, and the hunter still gets its own tenant.
    assert 0 == world.emulator.token_requests(client_id=APP_ID)
    assert 200 == ask(broker, world.hunter_key, ok).status_code


def test_error_rows_from_entra(world: World, start_broker: StartBroker) -> None:
    """consent_required, insufficient_consent, unknown_tenant, 503 with Retry-After, each caused by
    the emulator answering as Entra does."""
    broker = start_broker(world.broker_config(), world.env)
    body = _error(
        ask(broker, world.soar_key, {"tenant": TENANT_UNCONSENTED, "resource": DEFENDER}),
        403,
        "consent_required",
    )
    assert "AADSTS700016" == body["aadsts"]
    assert f"/{TENANT_UNCONSENTED}/v2.0/adminconsent?client_id={APP_ID}" in str(body["consent_url"])

    body = _error(
        ask(
            broker,
            world.soar_key,
            {"tenant": TENANT_A, "resource": DEFENDER, "roles": ["Incident.Read.All", "Machine.Isolate"]},
        ),
        403,
        "insufficient_consent",
    )
    assert ["Machine.Isolate"] == body["missing_roles"]
    assert "adminconsent" in str(body["consent_url"])

    body = _error(
        ask(broker, world.soar_key, {"tenant": TENANT_MISSING, "resource": DEFENDER}), 404, "unknown_tenant"
    )
    assert "AADSTS90002" == body["aadsts"]

    # Entra asks for 30 s, longer than the broker's retry budget (8 s): answer at once, passing it on.
    world.emulator.add_fault("token", "503", tenant=TENANT_B, count=-1, retry_after=30)
    response = ask(broker, world.soar_key, {"tenant": TENANT_B, "resource": DEFENDER})
    body = _error(response, 503, "temporarily_unavailable")
    assert "30" == response.headers["Retry-After"]
    assert 30 == body["retry_after"]


def test_bad_app_secret_is_502_after_one_reload(world: World, start_broker: StartBroker) -> None:
    """A wrong secret in Key Vault: the broker re-reads it once, then answers 502 with the AADSTS code
    and never echoes the secret."""
    world.emulator.set_secret("defender-app-secret", "definitely-wrong-secret")
    broker = start_broker(world.broker_config(), world.env)
    before = world.emulator.counters().get("vault", 0)
    response = ask(broker, world.soar_key, {"tenant": TENANT_A, "resource": DEFENDER})
    body = _error(response, 502, "upstream_error")
    assert "AADSTS7000215" == body["aadsts"]
    assert "definitely-wrong-secret" not in response.text
    assert 2 == world.emulator.token_requests(tenant=TENANT_A)
    assert world.emulator.counters().get("vault", 0) > before
    assert "definitely-wrong-secret" not in broker.log_text()


def test_rotated_secret_is_picked_up_without_restart(world: World, start_broker: StartBroker) -> None:
    """After a rotation (old secret dead, new version in Key Vault) the next acquisition succeeds."""
    broker = start_broker(world.broker_config(), world.env)
    assert 200 == ask(broker, world.soar_key, {"tenant": TENANT_A, "resource": DEFENDER}).status_code
    world.emulator.rotate_app_secret(APP_ID, vault_secret="defender-app-secret")
    response = ask(broker, world.soar_key, {"tenant": TENANT_B, "resource": DEFENDER})
    assert 200 == response.status_code, response.text


def test_config_errors_name_the_key_and_exit_2(world: World, tmp_path: Path) -> None:
    """check-config and serve both refuse a bad file with exit 2 and the key's path on stderr."""
    config = world.broker_config()
    config["apps"]["defender"]["client_id"] = "not-a-guid"
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    for command in ("check-config", "serve"):
        result = run_cli(command, "--config", str(path))
        assert 2 == result.returncode
        assert "apps.defender.client_id" in result.stderr
    path.write_text(yaml.safe_dump(world.broker_config()))
    result = run_cli("check-config", "--config", str(path))
    assert 0 == result.returncode, result.stderr


@pytest.mark.parametrize("tenant", [TENANT_A, DOMAIN_C])
def test_consent_url_command(world: World, tmp_path: Path, tenant: str) -> None:
    """consent-url prints the v2 admin-consent link for the tenant and the app's resource."""
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(world.broker_config()))
    result = run_cli("consent-url", "--config", str(path), "--tenant", tenant)
    assert 0 == result.returncode, result.stderr
    assert (
        f"{world.emulator.base_url}/{tenant}/v2.0/adminconsent?client_id={APP_ID}"
        "&scope=https%3A%2F%2Fapi.security.microsoft.com%2F.default\n"
    ) == result.stdout
