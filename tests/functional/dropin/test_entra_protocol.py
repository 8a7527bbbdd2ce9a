"""The Entra-compatible endpoints on the wire, over TLS: exact response and error shapes (types as Entra
sends them), the broker's policy applied to them, one Entra request shared by every surface, and the
surface named in the audit line."""

from __future__ import annotations

import base64
import importlib.resources
import json
import re
import threading
from typing import Any

import jsonschema
import requests

from tests.functional.conftest import (
    APP_ID,
    DEFENDER,
    GRAPH,
    MDE,
    TENANT_A,
    TENANT_B,
    TENANT_MISSING,
    TENANT_UNCONSENTED,
    World,
)
from tests.functional.dropin.conftest import StartTlsBroker, TlsBrokerProcess

ENTRA_ERROR_FIELDS = {"error", "error_description", "error_codes", "timestamp", "trace_id", "correlation_id"}
DOCUMENT = json.loads(importlib.resources.files("broker").joinpath("openapi.json").read_bytes())


def conforms(body: dict[str, Any], schema: str) -> None:
    """``body`` matches the committed OpenAPI document's schema (as the /v1/token fuzz test checks)."""
    jsonschema.validate(
        body, {**DOCUMENT["components"]["schemas"][schema], "components": DOCUMENT["components"]}
    )


def post_form(broker: TlsBrokerProcess, path: str, form: dict[str, str], **kwargs: Any) -> requests.Response:
    return requests.post(f"{broker.url}{path}", data=form, verify=str(broker.ca_file), timeout=30, **kwargs)


def v2_form(key: str, *, client_id: str = APP_ID, scope: str = DEFENDER + "/.default") -> dict[str, str]:
    return {"grant_type": "client_credentials", "client_id": client_id, "client_secret": key, "scope": scope}


def entra_error(
    response: requests.Response, status: int, error: str, code: int | None = None
) -> dict[str, Any]:
    """Assert Entra's error shape: its fields and their types, the AADSTS prefix when Entra refused."""
    assert status == response.status_code, response.text
    body: dict[str, Any] = response.json()
    assert ENTRA_ERROR_FIELDS <= set(body)
    conforms(body, "EntraError")
    assert error == body["error"]
    assert ([code] if code else []) == body["error_codes"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\dZ", body["timestamp"])
    assert body["trace_id"] == response.headers["X-Request-ID"]
    assert f"Trace ID: {body['trace_id']}" in body["error_description"]
    if code:
        assert body["error_description"].startswith(f"AADSTS{code}: ")
    else:
        assert not body["error_description"].startswith("AADSTS")
    assert "no-store" in response.headers["Cache-Control"]
    return body


def test_v2_and_v1_success_shapes(world: World, start_tls_broker: StartTlsBroker) -> None:
    """v2 answers numbers as numbers and nothing else; v1 answers every number as a string and echoes
    the resource; both hand out the same cached token, valid for the tenant, with no-store."""
    broker = start_tls_broker(world.broker_config(), world.env)
    v2 = post_form(broker, f"/{TENANT_A}/oauth2/v2.0/token", v2_form(world.soar_key))
    assert 200 == v2.status_code, v2.text
    body = v2.json()
    assert {"token_type", "expires_in", "ext_expires_in", "access_token"} == set(body)
    conforms(body, "EntraTokenV2")
    assert "Bearer" == body["token_type"]
    assert isinstance(body["expires_in"], int)
    assert 3300 < body["expires_in"] <= 3600
    assert body["expires_in"] == body["ext_expires_in"]
    assert "no-store" in v2.headers["Cache-Control"]
    claims = world.emulator.verify_token(body["access_token"], DEFENDER)
    assert TENANT_A == claims["tid"]

    v1 = post_form(
        broker,
        f"/{TENANT_A}/oauth2/token",
        {
            "grant_type": "client_credentials",
            "client_id": APP_ID,
            "client_secret": world.soar_key,
            "resource": DEFENDER,
        },
    )
    assert 200 == v1.status_code, v1.text
    old = v1.json()
    assert [
        "access_token",
        "expires_in",
        "expires_on",
        "ext_expires_in",
        "not_before",
        "resource",
        "token_type",
    ] == sorted(old)
    assert all(isinstance(value, str) for value in old.values())
    conforms(old, "EntraTokenV1")
    assert (DEFENDER, body["access_token"]) == (old["resource"], old["access_token"])
    assert abs(int(old["expires_on"]) - claims["exp"]) <= 2
    assert claims["nbf"] == int(old["not_before"])
    assert 1 == world.emulator.token_requests(tenant=TENANT_A)


def test_client_id_may_be_the_app_name_and_basic_auth_is_accepted(
    world: World, start_tls_broker: StartTlsBroker
) -> None:
    """client_id is the app's client id in any case or its configured name; HTTP Basic carries the
    client id and the caller key form-urlencoded (RFC 6749 §2.3.1), instead of the form fields."""
    broker = start_tls_broker(world.broker_config(), world.env)
    by_name = post_form(
        broker, f"/{TENANT_A}/oauth2/v2.0/token", v2_form(world.soar_key, client_id="defender")
    )
    assert 200 == by_name.status_code, by_name.text
    upper = post_form(
        broker, f"/{TENANT_A}/oauth2/v2.0/token", v2_form(world.soar_key, client_id=APP_ID.upper())
    )
    assert 200 == upper.status_code, upper.text
    basic = base64.b64encode(f"{APP_ID}:{world.soar_key}".encode()).decode()
    response = post_form(
        broker,
        f"/{TENANT_A}/oauth2/v2.0/token",
        {"grant_type": "client_credentials", "scope": DEFENDER + "/.default"},
        headers={"Authorization": f"Basic {basic}"},
    )
    assert 200 == response.status_code, response.text
    wrong = base64.b64encode(f"{APP_ID}:not-the-key".encode()).decode()
    refused = post_form(
        broker,
        f"/{TENANT_A}/oauth2/v2.0/token",
        {"grant_type": "client_credentials", "scope": DEFENDER + "/.default"},
        headers={"Authorization": f"Basic {wrong}"},
    )
    entra_error(refused, 401, "invalid_client")
    assert refused.headers["WWW-Authenticate"].startswith("Basic")


def test_wrong_key_is_invalid_client_401_in_entras_shape(
    world: World, start_tls_broker: StartTlsBroker
) -> None:
    """A wrong or missing caller key is 401 invalid_client with Entra's fields, no AADSTS number (the
    broker refused, not Entra), correlation_id echoing the client's client-request-id; nothing reached
    Entra and the key is not echoed."""
    broker = start_tls_broker(world.broker_config(), world.env)
    response = post_form(
        broker,
        f"/{TENANT_A}/oauth2/v2.0/token",
        v2_form("tbk_wrong-key-123"),
        headers={"client-request-id": "5d1c7e4a-0000-4000-8000-000000000001"},
    )
    body = entra_error(response, 401, "invalid_client")
    assert "5d1c7e4a-0000-4000-8000-000000000001" == body["correlation_id"]
    assert "tbk_wrong-key-123" not in response.text
    missing = post_form(
        broker,
        f"/{TENANT_A}/oauth2/token",
        {"grant_type": "client_credentials", "client_id": APP_ID, "resource": DEFENDER},
    )
    entra_error(missing, 401, "invalid_client")
    msi = requests.get(
        f"{broker.url}/msi/{TENANT_A}/token",
        params={"resource": DEFENDER, "api-version": "2019-08-01"},
        headers={"X-IDENTITY-HEADER": "tbk_wrong"},
        verify=str(broker.ca_file),
        timeout=30,
    )
    msi_body = entra_error(msi, 401, "invalid_client")
    assert (401, msi_body["error_description"]) == (msi_body["statusCode"], msi_body["message"])
    assert 0 == world.emulator.token_requests(client_id=APP_ID)


def test_our_refusals_use_oauth_codes(world: World, start_tls_broker: StartTlsBroker) -> None:
    """Tenant outside the caller's policy: unauthorized_client; a resource the app may not use or a
    malformed scope: invalid_scope; an unknown client_id: unauthorized_client; another grant type:
    unsupported_grant_type; no grant type, a bad tenant, a JSON body: invalid_request. None reaches Entra."""
    broker = start_tls_broker(world.broker_config(), world.env)
    v2 = f"/{TENANT_B}/oauth2/v2.0/token"
    entra_error(post_form(broker, v2, v2_form(world.hunter_key)), 400, "unauthorized_client")
    entra_error(
        post_form(broker, v2, v2_form(world.soar_key, scope=GRAPH + "/.default")), 400, "invalid_scope"
    )
    entra_error(post_form(broker, v2, v2_form(world.soar_key, scope=DEFENDER)), 400, "invalid_scope")
    entra_error(
        post_form(broker, v2, v2_form(world.soar_key, scope=f"{DEFENDER}/.default {MDE}/.default")),
        400,
        "invalid_scope",
    )
    entra_error(
        post_form(broker, v2, v2_form(world.soar_key, client_id="11111111-0000-4000-8000-000000000000")),
        400,
        "unauthorized_client",
    )
    entra_error(
        post_form(broker, v2, {**v2_form(world.soar_key), "grant_type": "password"}),
        400,
        "unsupported_grant_type",
    )
    entra_error(
        post_form(broker, v2, {k: v for k, v in v2_form(world.soar_key).items() if k != "grant_type"}),
        400,
        "invalid_request",
    )
    entra_error(
        post_form(broker, "/not_a_tenant/oauth2/v2.0/token", v2_form(world.soar_key)), 400, "invalid_request"
    )
    as_json = requests.post(
        f"{broker.url}{v2}", json=v2_form(world.soar_key), verify=str(broker.ca_file), timeout=30
    )
    entra_error(as_json, 415, "invalid_request")
    hunter_v1 = post_form(
        broker,
        f"/{TENANT_B}/oauth2/token",
        {
            "grant_type": "client_credentials",
            "client_id": APP_ID,
            "client_secret": world.hunter_key,
            "resource": DEFENDER,
        },
    )
    entra_error(hunter_v1, 400, "unauthorized_client")
    assert 0 == world.emulator.token_requests(client_id=APP_ID)


def test_entras_refusals_keep_entras_code_and_aadsts(world: World, start_tls_broker: StartTlsBroker) -> None:
    """No consent: Entra's unauthorized_client with AADSTS700016 and the consent_url; an unknown
    tenant: invalid_request with AADSTS90002; Entra down: 503 temporarily_unavailable with Retry-After."""
    broker = start_tls_broker(world.broker_config(), world.env)
    body = entra_error(
        post_form(broker, f"/{TENANT_UNCONSENTED}/oauth2/v2.0/token", v2_form(world.soar_key)),
        400,
        "unauthorized_client",
        700016,
    )
    assert f"/{TENANT_UNCONSENTED}/v2.0/adminconsent?client_id={APP_ID}" in body["consent_url"]
    assert body["error_uri"].endswith("/error?code=700016")
    entra_error(
        post_form(
            broker,
            f"/{TENANT_MISSING}/oauth2/token",
            {
                "grant_type": "client_credentials",
                "client_id": APP_ID,
                "client_secret": world.soar_key,
                "resource": DEFENDER,
            },
        ),
        400,
        "invalid_request",
        90002,
    )
    world.emulator.add_fault("token", "503", tenant=TENANT_B, count=-1, retry_after=30)
    response = post_form(broker, f"/{TENANT_B}/oauth2/v2.0/token", v2_form(world.soar_key))
    entra_error(response, 503, "temporarily_unavailable")
    assert "30" == response.headers["Retry-After"]


def test_discovery_documents_name_the_broker(world: World, start_tls_broker: StartTlsBroker) -> None:
    """The v2 and v1 documents name the broker's token endpoint on the host the client used, with
    the fields MSAL (Python and Node) require; a malformed tenant is refused in Entra's shape."""
    broker = start_tls_broker(world.broker_config(), world.env)
    for host in ("127.0.0.1", "localhost"):
        base = f"https://{host}:{broker.port}"
        v2 = requests.get(
            f"{base}/{TENANT_A}/v2.0/.well-known/openid-configuration", verify=str(broker.ca_file), timeout=10
        ).json()
        assert f"{base}/{TENANT_A}/oauth2/v2.0/token" == v2["token_endpoint"]
        assert f"{base}/{TENANT_A}/v2.0" == v2["issuer"]
        assert {"authorization_endpoint", "jwks_uri"} <= set(v2)
        assert "client_credentials" in v2["grant_types_supported"]
        conforms(v2, "OpenIdConfiguration")
        v1 = requests.get(
            f"{base}/{TENANT_A}/.well-known/openid-configuration", verify=str(broker.ca_file), timeout=10
        ).json()
        assert f"{base}/{TENANT_A}/oauth2/token" == v1["token_endpoint"]
    bad = requests.get(
        f"{broker.url}/common/v2.0/.well-known/openid-configuration", verify=str(broker.ca_file), timeout=10
    )
    entra_error(bad, 400, "invalid_request")


def test_every_surface_shares_one_entra_request_and_is_audited(
    world: World, start_tls_broker: StartTlsBroker
) -> None:
    """Cold, concurrent requests for one (app, tenant, resource) through /v1/token, the v2 and v1
    token endpoints and the managed-identity endpoint cost Entra one request and get one token;
    each has an audit line naming its surface, counted in the same request metric."""
    world.emulator.add_fault("token", "latency", tenant=TENANT_B, latency_seconds=1.0)
    broker = start_tls_broker(world.broker_config(), world.env)
    verify = str(broker.ca_file)
    tokens: dict[str, str] = {}

    def v1_api() -> str:
        response = requests.post(
            f"{broker.url}/v1/token",
            json={"tenant": TENANT_B, "resource": DEFENDER},
            headers={"Authorization": f"Bearer {world.soar_key}"},
            verify=verify,
            timeout=30,
        )
        return str(response.json()["access_token"])

    def oauth_v2() -> str:
        return str(
            post_form(broker, f"/{TENANT_B}/oauth2/v2.0/token", v2_form(world.soar_key)).json()[
                "access_token"
            ]
        )

    def oauth_v1() -> str:
        form = {
            "grant_type": "client_credentials",
            "client_id": APP_ID,
            "client_secret": world.soar_key,
            "resource": DEFENDER,
        }
        return str(post_form(broker, f"/{TENANT_B}/oauth2/token", form).json()["access_token"])

    def msi() -> str:
        response = requests.get(
            f"{broker.url}/msi/{TENANT_B}/token",
            params={"resource": DEFENDER, "api-version": "2019-08-01"},
            headers={"X-IDENTITY-HEADER": world.soar_key},
            verify=verify,
            timeout=30,
        )
        body = response.json()
        conforms(body, "ManagedIdentityToken")
        assert (APP_ID, DEFENDER, "Bearer") == (body["client_id"], body["resource"], body["token_type"])
        assert isinstance(body["expires_on"], str)
        return str(body["access_token"])

    surfaces = {"v1": v1_api, "oauth2_v2": oauth_v2, "oauth2_v1": oauth_v1, "msi": msi}

    def run(name: str) -> None:
        tokens[name] = surfaces[name]()

    threads = [threading.Thread(target=run, args=(name,)) for name in surfaces]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert set(surfaces) == set(tokens)
    assert 1 == len(set(tokens.values()))
    assert 1 == world.emulator.token_requests(tenant=TENANT_B)
    audit = broker.audit_lines()
    assert sorted(surfaces) == sorted(line["surface"] for line in audit)
    assert {("soar", TENANT_B, "defender", DEFENDER, "ok")} == {
        (line["caller"], line["tenant"], line["app"], line["resource"], line["outcome"]) for line in audit
    }
    assert 1 == sum(line["cache_layer"] == "entra" for line in audit)
    assert 4 == broker.metric_samples()['broker_token_requests_total{caller="soar",outcome="ok"}']
    # ... and /v1/token itself is unchanged by the refactoring: its refusals still count and audit.
    assert 401 == ask_tls(broker, "wrong", {"tenant": TENANT_B, "resource": DEFENDER}).status_code
    assert ("v1", "-", "invalid_client") == tuple(
        broker.audit_lines()[-1][k] for k in ("surface", "caller", "outcome")
    )


def ask_tls(broker: TlsBrokerProcess, key: str, body: dict[str, Any]) -> requests.Response:
    return requests.post(
        f"{broker.url}/v1/token",
        json=body,
        headers={"Authorization": f"Bearer {key}"},
        verify=str(broker.ca_file),
        timeout=30,
    )


def test_msi_endpoint_protocol(world: World, start_tls_broker: StartTlsBroker) -> None:
    """The managed-identity endpoint: client_id selects the app (client id or name), the
    api-version is required, identity selectors the broker has no meaning for are refused."""
    broker = start_tls_broker(world.broker_config(), world.env)

    def msi(**params: str) -> requests.Response:
        return requests.get(
            f"{broker.url}/msi/{TENANT_A}/token",
            params=params,
            headers={"X-IDENTITY-HEADER": world.soar_key},
            verify=str(broker.ca_file),
            timeout=30,
        )

    assert 200 == msi(resource=DEFENDER, **{"api-version": "2019-08-01", "client_id": "defender"}).status_code
    entra_error(msi(resource=DEFENDER), 400, "invalid_request")
    entra_error(
        msi(resource=DEFENDER, **{"api-version": "2019-08-01", "mi_res_id": "/subscriptions/x"}),
        400,
        "invalid_request",
    )
    entra_error(
        msi(resource=DEFENDER, **{"api-version": "2019-08-01", "client_id": "nope"}),
        400,
        "unauthorized_client",
    )
    entra_error(msi(resource=GRAPH, **{"api-version": "2019-08-01"}), 400, "invalid_scope")
