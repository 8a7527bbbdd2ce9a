"""One caller cannot hurt the others, and the HTTP surface answers every failure precisely: the real
``TokenBroker``, ``TokenCache`` and HTTP handlers in process, with a fake of our own ``TokenSource``."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from broker import http
from broker.cache import TokenCache
from broker.callers import CallerRegistry, new_api_key
from broker.config import Settings, parse_settings
from broker.errors import BrokerError, RateLimitedError, UpstreamError
from broker.logs import AuditLog
from broker.metrics import Metrics
from broker.service import TokenBroker
from broker.tokens import AccessToken, TokenKey, TokenRequest, fingerprint
from broker.vault import CredentialStore

DEFENDER = "https://api.security.microsoft.com"
TENANTS = [f"{i:08x}-1111-4111-8111-111111111111" for i in range(1, 6)]


class FakeSource:
    """A ``TokenSource`` that counts acquisitions and answers with chosen tokens or errors."""

    def __init__(self, lifetime_seconds: float = 3600, tid: str | None = None) -> None:
        self.lifetime_seconds = lifetime_seconds
        self.tid = tid
        self.fail_with: Exception | None = None
        self.calls: list[TokenKey] = []

    async def acquire(self, key: TokenKey) -> AccessToken:
        self.calls.append(key)
        if self.fail_with is not None:
            raise self.fail_with
        token = f"token-{len(self.calls)}"
        return AccessToken(
            token=token,
            expires_on=time.time() + self.lifetime_seconds,
            tenant_id=self.tid or key.tenant,
            resource=key.resource,
            fingerprint=fingerprint(token),
        )

    def consent_url(self, key: TokenKey) -> str:
        return f"https://login.example/{key.tenant}/adminconsent"

    def forget_tenant(self, tenant: str) -> None:
        pass  # nothing kept per tenant


def _settings(soar_hash: str, hunter: dict[str, Any] | None = None, **caller: Any) -> Settings:
    """One app; ``soar`` (every tenant, ``caller`` overrides) and ``hunter`` (one tenant, unless
    ``hunter`` overrides it)."""
    return parse_settings(
        {
            "apps": {
                "defender": {
                    "client_id": "0f0e0d0c-0b0a-4999-8888-777766665555",
                    "credential": {"env": "UNIT_TEST_UNSET_SECRET"},
                    "resources": [DEFENDER],
                }
            },
            "callers": {
                "soar": {"api_key_sha256": soar_hash, "tenants": ["*"], "apps": ["defender"], **caller},
                "hunter": {
                    "api_key_sha256": new_api_key()[1],
                    "tenants": [TENANTS[0]],
                    "apps": ["defender"],
                    **(hunter or {}),
                },
            },
        },
        environ={},
    )


def _broker(settings: Settings, source: FakeSource) -> tuple[TokenBroker, Metrics]:
    metrics = Metrics()
    cache = TokenCache(metrics, settings.cache_options(), redis=None, sealer=None)
    return TokenBroker(dict(settings.apps), settings.flight_options(), metrics, cache, source), metrics


async def _caller(settings: Settings, key: str) -> Any:
    return await CallerRegistry(settings, None).authenticate(f"Bearer {key}")


async def test_a_callers_acquisition_budget_is_429_but_cache_hits_are_free() -> None:
    """Two acquisitions a minute: a third new tenant is refused with a Retry-After and no Entra call,
    while the tenants already cached keep being served."""
    key, digest = new_api_key()
    settings = _settings(digest, max_acquisitions_per_minute=2)
    source = FakeSource()
    broker, metrics = _broker(settings, source)
    caller = await _caller(settings, key)
    for tenant in TENANTS[:2]:
        await broker.get_token(caller, TokenRequest(tenant=tenant, resource=DEFENDER))
    with pytest.raises(RateLimitedError) as refused:
        await broker.get_token(caller, TokenRequest(tenant=TENANTS[2], resource=DEFENDER))
    assert 429 == refused.value.status
    assert 30 == refused.value.retry_after
    assert {"Retry-After": "30"} == refused.value.headers()
    assert 2 == len(source.calls)
    for _ in range(10):
        await broker.get_token(caller, TokenRequest(tenant=TENANTS[0], resource=DEFENDER))
    assert 2 == len(source.calls)
    assert 1.0 == metrics.registry.get_sample_value("broker_rate_limited_total", {"caller": "soar"})
    await broker.close()


async def test_a_min_ttl_entra_cannot_satisfy_costs_one_upstream_call() -> None:
    """Tokens live 10 minutes and the callers ask for 20: twenty requests (ten concurrent, ten after)
    cost one Entra acquisition in all, each answered 502 (it cost three per request before)."""
    key, digest = new_api_key()
    settings = _settings(digest)
    source = FakeSource(lifetime_seconds=600)
    broker, _ = _broker(settings, source)
    caller = await _caller(settings, key)
    request = TokenRequest(tenant=TENANTS[0], resource=DEFENDER, min_ttl_seconds=1200)
    concurrent = await asyncio.gather(
        *(broker.get_token(caller, request) for _ in range(10)), return_exceptions=True
    )
    later = [
        (await asyncio.gather(broker.get_token(caller, request), return_exceptions=True))[0]
        for _ in range(10)
    ]
    outcomes = concurrent + later
    assert [UpstreamError] * 20 == [type(outcome) for outcome in outcomes]
    assert 1 == len(source.calls)
    await broker.close()


async def test_a_token_for_another_tenant_is_never_served_nor_cached() -> None:
    """Entra answering with a token whose tid is not the requested tenant GUID: 502, and the next
    request asks again instead of finding it in the cache."""
    key, digest = new_api_key()
    settings = _settings(digest)
    source = FakeSource(tid=TENANTS[4])
    broker, _ = _broker(settings, source)
    caller = await _caller(settings, key)
    for _ in range(2):
        with pytest.raises(UpstreamError, match="another tenant"):
            await broker.get_token(caller, TokenRequest(tenant=TENANTS[0], resource=DEFENDER))
    assert 2 == len(source.calls)
    await broker.close()


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[tuple[TestClient[Any, Any], FakeSource, Path, str]]:
    """The HTTP surface over the real service, callers and cache, with the fake source; the audit
    trail goes to a file."""
    key, digest = new_api_key()
    settings = _settings(digest)
    source = FakeSource()
    broker, metrics = _broker(settings, source)
    audit_path = tmp_path / "audit.log"
    audit_file = audit_path.open("wb")
    app = http.create_api(settings.max_body_bytes)
    app[http.SETTINGS] = settings
    app[http.METRICS] = metrics
    app[http.AUDIT] = AuditLog(audit_file.fileno())
    app[http.OPENAPI] = b"{}"
    app[http.DRAINING] = asyncio.Event()
    app[http.CALLERS] = CallerRegistry(settings, None)
    app[http.CACHE] = TokenCache(metrics, settings.cache_options(), redis=None, sealer=None)
    app[http.CREDENTIALS] = CredentialStore(settings, metrics, None)
    app[http.BROKER] = broker
    async with TestClient(TestServer(app)) as client:
        yield client, source, audit_path, key
    await broker.close()
    audit_file.close()


def _audit(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


async def test_an_unexpected_failure_is_a_500_audited_and_counted_as_server_error(
    api: tuple[TestClient[Any, Any], FakeSource, Path, str],
) -> None:
    """A failure nobody planned for (a bug) is a generic 500 with a request id, and its audit line
    and request counter say server_error, never ok."""
    client, source, audit_path, key = api
    source.fail_with = RuntimeError("a bug with a secret-looking message")
    response = await client.post(
        "/v1/token",
        json={"tenant": TENANTS[0], "resource": DEFENDER},
        headers={"Authorization": f"Bearer {key}"},
    )
    assert 500 == response.status
    body = await response.json()
    assert {"error", "error_description", "request_id"} == set(body)
    assert "secret-looking" not in json.dumps(body)
    [line] = _audit(audit_path)
    assert ("server_error", "defender") == (line["outcome"], line["app"])
    metrics = client.app[http.METRICS]
    assert 1.0 == metrics.registry.get_sample_value(
        "broker_token_requests_total", {"caller": "soar", "outcome": "server_error"}
    )


async def test_a_refused_request_audits_the_app_it_resolved_to(
    api: tuple[TestClient[Any, Any], FakeSource, Path, str],
) -> None:
    """A caller that names no app (there is one) and is refused by policy: the audit line names the
    app it would have used, not null."""
    client, _, audit_path, key = api
    response = await client.post(
        "/v1/token",
        json={"tenant": TENANTS[0], "resource": "https://graph.microsoft.com"},
        headers={"Authorization": f"Bearer {key}"},
    )
    assert 403 == response.status
    [line] = _audit(audit_path)
    assert ("access_denied", "defender") == (line["outcome"], line["app"])


@pytest.mark.parametrize(
    "body",
    [
        {"tenant": "contoso.onmicrosoft.com\n", "resource": DEFENDER},
        {"tenant": f"{TENANTS[0]}\n", "resource": DEFENDER},
    ],
)
async def test_a_trailing_newline_is_not_a_valid_tenant(
    api: tuple[TestClient[Any, Any], FakeSource, Path, str], body: dict[str, str]
) -> None:
    """``$`` matched before a trailing newline: such a tenant became its own cache key and MSAL
    client. Patterns now match the whole value: 400, and nothing is acquired."""
    client, source, _, key = api
    response = await client.post("/v1/token", json=body, headers={"Authorization": f"Bearer {key}"})
    assert 400 == response.status
    assert "invalid_request" == (await response.json())["error"]
    assert [] == source.calls


async def test_a_body_in_several_chunks_is_read_whole(
    api: tuple[TestClient[Any, Any], FakeSource, Path, str],
) -> None:
    """A valid JSON body sent chunked in three pieces is one request (one read() saw only the first
    piece: 400 "not valid JSON")."""
    client, _, _, key = api
    payload = json.dumps({"tenant": TENANTS[0], "resource": DEFENDER}).encode()

    async def pieces() -> AsyncIterator[bytes]:
        for start in range(0, len(payload), 20):
            yield payload[start : start + 20]
            await asyncio.sleep(0.05)

    response = await client.post(
        "/v1/token",
        data=pieces(),
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
    )
    assert 200 == response.status, await response.text()


async def test_the_service_errors_keep_their_typed_fields() -> None:
    """RateLimitedError renders as the contract's 429 body."""
    error: BrokerError = RateLimitedError("over budget", retry_after=2.2)
    assert {"error": "rate_limited", "error_description": "over budget", "retry_after": 3} == error.to_body()
