"""broker.client end to end: the sync and asyncio credentials against a real broker process and the
emulator (tokens for several tenants, the client cache, single flight, broker errors, token-file
rotation), and the README flow: listing incidents of several tenants from an emulated Defender API
(TLS, RS256 tokens checked against the emulator's JWKS) through azure-core pipelines."""

from __future__ import annotations

import asyncio
import ssl
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
import pytest
import trustme
from aiohttp import web
from azure.core import AsyncPipelineClient, PipelineClient
from azure.core.exceptions import HttpResponseError
from azure.core.pipeline.policies import (
    AsyncBearerTokenCredentialPolicy,
    AsyncRetryPolicy,
    BearerTokenCredentialPolicy,
    RetryPolicy,
)
from azure.core.rest import HttpRequest, HttpResponse

from broker.client import AsyncBrokerCredential, BrokerAuthenticationError, BrokerCredential
from tests.functional.conftest import (
    APP_ID,
    DEFENDER,
    DOMAIN_C,
    MDE,
    TENANT_A,
    TENANT_B,
    TENANT_C,
    TENANT_UNCONSENTED,
    World,
)
from tests.support import BrokerProcess, free_port, serve_in_thread

StartBroker = Callable[..., BrokerProcess]

SCOPE = f"{DEFENDER}/.default"
TENANTS = {TENANT_A: TENANT_A, TENANT_B: TENANT_B, DOMAIN_C: TENANT_C}  # as asked -> tid in the token
TENANT_NO_ROLE = "ffffffff-6666-4666-8666-ffffffffffff"
INCIDENTS = {
    TENANT_A: [{"incidentId": 101, "incidentName": "Suspicious sign-in", "severity": "Medium"}],
    TENANT_B: [
        {"incidentId": 201, "incidentName": "Ransomware behaviour", "severity": "High"},
        {"incidentId": 202, "incidentName": "Phishing link clicked", "severity": "Low"},
    ],
    TENANT_C: [{"incidentId": 301, "incidentName": "Impossible travel", "severity": "Medium"}],
}


# --- the emulated Defender API ------------------------------------------------------------------


@dataclass
class DefenderApi:
    """An HTTPS server answering ``GET /api/incidents`` like Defender: bearer token checked."""

    url: str
    ca_path: str
    served: list[tuple[str, int]] = field(default_factory=list)  # (tid or "-", status)


@pytest.fixture
def defender_api(world: World, tmp_path: Path) -> Iterator[DefenderApi]:
    """Defender on 127.0.0.1 over TLS (a trustme CA): the token's RS256 signature must verify against
    the emulator's JWKS, its aud must be the Defender API and it must carry Incident.Read.All (403
    otherwise); the incidents listed are those of the token's tid."""
    ca = trustme.CA()
    ca_path = tmp_path / "defender-ca.pem"
    ca.cert_pem.write_to_path(str(ca_path))
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_tls)
    world.emulator.jwks()  # fetched once, here: the handler then verifies offline
    port = free_port()
    api = DefenderApi(f"https://127.0.0.1:{port}", str(ca_path))
    transports: set[asyncio.Transport] = set()

    async def incidents(request: web.Request) -> web.Response:
        if request.transport is not None:
            transports.add(request.transport)
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        try:
            claims = world.emulator.verify_token(token if scheme.lower() == "bearer" else "", DEFENDER)
        except jwt.InvalidTokenError as exc:
            api.served.append(("-", 401))
            return web.json_response(
                {"error": {"code": "Unauthorized", "message": str(exc)}},
                status=401,
                headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
            )
        tid = str(claims["tid"])
        if "Incident.Read.All" not in claims.get("roles", []):
            api.served.append((tid, 403))
            return web.json_response({"error": {"code": "Forbidden", "message": "missing role"}}, status=403)
        api.served.append((tid, 200))
        return web.json_response({"value": INCIDENTS.get(tid, [])})

    async def abort_leftovers() -> None:
        # A TLS connection whose client still holds its socket (a response kept alive by a traceback)
        # would wait for the client's close_notify: abort it, so no transport outlives the loop.
        for transport in transports:
            transport.abort()
        await asyncio.sleep(0.05)

    app = web.Application()
    app.router.add_get("/api/incidents", incidents)
    with serve_in_thread(app, port, ssl_context=server_tls, after_cleanup=abort_leftovers):
        yield api


# The README example, with the API's URL and CA as parameters (the real Defender needs neither).


def list_incidents(
    broker: BrokerCredential, tenants: Iterable[str], api_url: str = DEFENDER, **transport: Any
) -> dict[str, list[dict[str, Any]]]:
    found = {}
    for tenant in tenants:
        auth = BearerTokenCredentialPolicy(broker.for_tenant(tenant), SCOPE)
        with PipelineClient(api_url, policies=[RetryPolicy(), auth], **transport) as defender:
            response = defender.send_request(HttpRequest("GET", f"{api_url}/api/incidents"))
            response.raise_for_status()
            found[tenant] = response.json()["value"]
    return found


async def list_incidents_async(
    broker: AsyncBrokerCredential, tenants: Iterable[str], api_url: str = DEFENDER, **transport: Any
) -> dict[str, list[dict[str, Any]]]:
    async def one(tenant: str) -> tuple[str, list[dict[str, Any]]]:
        auth = AsyncBearerTokenCredentialPolicy(broker.for_tenant(tenant), SCOPE)
        async with AsyncPipelineClient(api_url, policies=[AsyncRetryPolicy(), auth], **transport) as defender:
            response = await defender.send_request(HttpRequest("GET", f"{api_url}/api/incidents"))
            response.raise_for_status()
            return tenant, response.json()["value"]

    return dict(await asyncio.gather(*(one(tenant) for tenant in tenants)))


# --- tokens and the client cache ----------------------------------------------------------------


def test_sync_credential_tokens_for_several_tenants_are_cached(
    world: World, start_broker: StartBroker
) -> None:
    """Each tenant (by GUID or domain) gets a token for its own tid; asking again, by scope or bare
    resource, through a tenant view or with get_token_info, is served from the client cache: three
    broker requests in all. refresh_on is the refresh margin before expiry."""
    broker = start_broker(world.broker_config(), world.env)
    with BrokerCredential(broker.url, api_key=world.soar_key) as credential:
        first = {tenant: credential.get_token(SCOPE, tenant_id=tenant) for tenant in TENANTS}
        again = {tenant: credential.get_token(DEFENDER, tenant_id=tenant) for tenant in TENANTS}
        info = credential.for_tenant(TENANT_B).get_token_info(SCOPE)
    for tenant, tid in TENANTS.items():
        claims = world.emulator.verify_token(first[tenant].token, DEFENDER)
        assert tid == claims["tid"]
        assert abs(claims["exp"] - first[tenant].expires_on) <= 2
    assert first == again
    assert (first[TENANT_B].token, first[TENANT_B].expires_on) == (info.token, info.expires_on)
    assert info.expires_on - 300 == info.refresh_on
    assert list(TENANTS) == [line["tenant_requested"] for line in broker.audit_lines()]
    assert list(TENANTS.values()) == [line["tenant"] for line in broker.audit_lines()]
    assert 3 == world.emulator.token_requests(client_id=APP_ID)


def test_a_token_inside_the_refresh_margin_is_fetched_again(world: World, start_broker: StartBroker) -> None:
    """With a refresh margin longer than the token's life every call asks the broker again (which
    serves its own cached token): the margin decides, not mere validity."""
    broker = start_broker(world.broker_config(), world.env)
    with BrokerCredential(
        broker.url, api_key=world.soar_key, default_tenant_id=TENANT_A, refresh_margin_seconds=7200
    ) as credential:
        tokens = [credential.get_token(SCOPE) for _ in range(2)]
    assert tokens[0] == tokens[1]
    assert ["entra", "l1"] == [line["cache_layer"] for line in broker.audit_lines()]


def test_sync_threads_share_one_broker_request(world: World, start_broker: StartBroker) -> None:
    """20 threads asking at once for one tenant cost one broker request and get the same token; 5
    threads asking for an unconsented tenant share one request and its consent_required."""
    broker = start_broker(world.broker_config(), world.env)
    start = threading.Barrier(25)

    def ask_for(tenant: str) -> Any:
        start.wait(10)
        try:
            return credential.get_token(SCOPE, tenant_id=tenant)
        except BrokerAuthenticationError as exc:
            return exc.error

    with BrokerCredential(broker.url, api_key=world.soar_key) as credential, ThreadPoolExecutor(25) as pool:
        results = list(pool.map(ask_for, [TENANT_A] * 20 + [TENANT_UNCONSENTED] * 5))
    assert 1 == len(set(results[:20]))
    assert ["consent_required"] * 5 == results[20:]
    assert [(TENANT_A, "ok"), (TENANT_UNCONSENTED, "consent_required")] == sorted(
        (line["tenant"], line["outcome"]) for line in broker.audit_lines()
    )


async def test_async_credential_single_flight_and_cache(world: World, start_broker: StartBroker) -> None:
    """20 concurrent calls for one tenant cost one broker request; three tenants asked concurrently
    (10 calls each, through tenant views) cost one each; later calls are cache hits."""
    broker = start_broker(world.broker_config(), world.env)
    async with AsyncBrokerCredential(broker.url, api_key=world.soar_key) as credential:
        herd = await asyncio.gather(*(credential.get_token(SCOPE, tenant_id=TENANT_A) for _ in range(20)))
        assert 1 == len(broker.audit_lines())
        assert {herd[0]} == set(herd)
        views = {tenant: credential.for_tenant(tenant) for tenant in TENANTS}
        mixed = await asyncio.gather(*(view.get_token(SCOPE) for view in views.values() for _ in range(10)))
        info = await views[DOMAIN_C].get_token_info(SCOPE)
    assert 3 == len({token.token for token in mixed})
    assert herd[0] in mixed
    assert TENANT_C == world.emulator.verify_token(info.token, DEFENDER)["tid"]
    assert sorted(TENANTS) == sorted(line["tenant_requested"] for line in broker.audit_lines())


# --- errors -------------------------------------------------------------------------------------


def test_broker_errors_are_broker_authentication_errors(world: World, start_broker: StartBroker) -> None:
    """A tenant without consent: consent_required (403) with the consent link in body and message; a
    wrong key: invalid_client (401). Neither message shows the key."""
    broker = start_broker(world.broker_config(), world.env)
    with (
        BrokerCredential(broker.url, api_key=world.soar_key) as credential,
        pytest.raises(BrokerAuthenticationError) as consent,
    ):
        credential.get_token(SCOPE, tenant_id=TENANT_UNCONSENTED)
    assert ("consent_required", 403) == (consent.value.error, consent.value.status_code)
    assert consent.value.error_description in str(consent.value)
    assert consent.value.body["consent_url"] in str(consent.value)
    assert world.soar_key not in str(consent.value)

    wrong_key = "tbk_" + "0" * 43
    with (
        BrokerCredential(broker.url, api_key=wrong_key) as credential,
        pytest.raises(BrokerAuthenticationError) as unknown,
    ):
        credential.get_token(SCOPE, tenant_id=TENANT_A)
    assert ("invalid_client", 401) == (unknown.value.error, unknown.value.status_code)
    assert "invalid_client" in str(unknown.value)
    assert wrong_key not in str(unknown.value) + repr(unknown.value)


async def test_async_failures_are_single_flighted_too(world: World, start_broker: StartBroker) -> None:
    """Five concurrent calls for an unconsented tenant share one broker request and all see
    consent_required."""
    broker = start_broker(world.broker_config(), world.env)
    async with AsyncBrokerCredential(broker.url, api_key=world.soar_key) as credential:
        results = await asyncio.gather(
            *(credential.get_token(SCOPE, tenant_id=TENANT_UNCONSENTED) for _ in range(5)),
            return_exceptions=True,
        )
    assert ["consent_required"] * 5 == [
        r.error if isinstance(r, BrokerAuthenticationError) else repr(r) for r in results
    ]
    assert ["consent_required"] == [line["outcome"] for line in broker.audit_lines()]


def test_token_file_rotation_is_picked_up(world: World, start_broker: StartBroker, tmp_path: Path) -> None:
    """The caller's credential is read from token_file; when the file is replaced (another caller's
    key, allowed only TENANT_A), the next request presents the new one."""
    broker = start_broker(world.broker_config(), world.env)
    path = tmp_path / "caller-token"
    path.write_text(world.soar_key + "\n")
    with BrokerCredential(broker.url, token_file=path) as credential:
        credential.get_token(SCOPE, tenant_id=TENANT_B)
        replacement = tmp_path / "caller-token.new"
        replacement.write_text(world.hunter_key)
        replacement.replace(path)
        with pytest.raises(BrokerAuthenticationError) as denied:
            credential.get_token(SCOPE, tenant_id=TENANT_C)
        credential.get_token(SCOPE, tenant_id=TENANT_A)
    assert "access_denied" == denied.value.error
    assert [("soar", TENANT_B, "ok"), ("hunter", TENANT_C, "access_denied"), ("hunter", TENANT_A, "ok")] == [
        (line["caller"], line["tenant"], line["outcome"]) for line in broker.audit_lines()
    ]


# --- the README flow ----------------------------------------------------------------------------


def test_readme_flow_lists_defender_incidents_for_several_tenants(
    world: World, start_broker: StartBroker, defender_api: DefenderApi
) -> None:
    """Through PipelineClient + BearerTokenCredentialPolicy on for_tenant() views, each tenant sees
    its own incidents (DOMAIN_C resolves to TENANT_C's); a second listing reuses every token; a
    tenant whose consent lacks Incident.Read.All gets 403 and a token for another audience 401."""
    world.emulator.add_tenant(TENANT_NO_ROLE)
    world.emulator.grant(TENANT_NO_ROLE, APP_ID, DEFENDER, ["AdvancedHunting.Read.All"])
    broker = start_broker(world.broker_config(), world.env)
    verify = {"connection_verify": defender_api.ca_path}
    with BrokerCredential(broker.url, api_key=world.soar_key) as credential:
        found = list_incidents(credential, TENANTS, defender_api.url, **verify)
        assert found == list_incidents(credential, TENANTS, defender_api.url, **verify)
        with pytest.raises(HttpResponseError) as forbidden:
            list_incidents(credential, [TENANT_NO_ROLE], defender_api.url, **verify)
        auth = BearerTokenCredentialPolicy(credential.for_tenant(TENANT_A), f"{MDE}/.default")
        wrong_audience: PipelineClient[HttpRequest, HttpResponse] = PipelineClient(
            defender_api.url, policies=[auth], connection_verify=defender_api.ca_path
        )
        with wrong_audience:
            response = wrong_audience.send_request(HttpRequest("GET", f"{defender_api.url}/api/incidents"))
    assert {tenant: INCIDENTS[tid] for tenant, tid in TENANTS.items()} == found
    assert 403 == forbidden.value.status_code
    assert 401 == response.status_code
    assert [(tid, 200) for tid in TENANTS.values()] * 2 + [(TENANT_NO_ROLE, 403), ("-", 401)] == (
        defender_api.served
    )
    assert 5 == len(broker.audit_lines())  # three Defender tokens, the role-less tenant's, one MDE token


async def test_readme_flow_async_lists_tenants_concurrently(
    world: World, start_broker: StartBroker, defender_api: DefenderApi
) -> None:
    """The asyncio flavour: AsyncPipelineClient + AsyncBearerTokenCredentialPolicy per tenant view,
    all tenants at once, twice: each tenant's own incidents, one broker request per tenant."""
    broker = start_broker(world.broker_config(), world.env)
    verify = {"connection_verify": defender_api.ca_path}
    async with AsyncBrokerCredential(broker.url, api_key=world.soar_key) as credential:
        found = await list_incidents_async(credential, TENANTS, defender_api.url, **verify)
        assert found == await list_incidents_async(credential, TENANTS, defender_api.url, **verify)
    assert {tenant: INCIDENTS[tid] for tenant, tid in TENANTS.items()} == found
    assert sorted([*TENANTS.values()] * 2) == sorted(tid for tid, _ in defender_api.served)
    assert 3 == len(broker.audit_lines())
