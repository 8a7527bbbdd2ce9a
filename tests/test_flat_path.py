"""The cache hit's flat path against the general path: ``POST /v1/token`` answered ahead of the router
by ``http.answer_from_memory`` must be indistinguishable from ``http.answer_token`` (the path of every
token surface): the same bodies get the same statuses, headers, bodies, audit lines and metrics.

Two apps share one set of components (callers, tenant resolver, service, L1 cache, metrics): *flat*
is served as ``app.serve`` serves it (``dispatch_token_requests_first``), *general* routes
``POST /v1/token`` straight to ``answer_token``. Each has its own audit file and a middleware that
counts what reached its router.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from broker import http
from broker.app import dispatch_token_requests_first
from broker.cache import TokenCache
from broker.callers import CallerRegistry, new_api_key
from broker.config import Settings
from broker.logs import AuditLog
from broker.metrics import Metrics
from broker.service import TokenBroker
from broker.tenants import TenantResolver
from broker.vault import CredentialStore
from tests.support import free_port
from tests.test_service_limits import DEFENDER, TENANTS, FakeSource
from tests.test_service_limits import _settings as settings_with_callers
from tests.test_tenants import CountingDiscovery

CONTOSO = TENANTS[1]
CALLER_KEY, CALLER_HASH = new_api_key()
HUNTER_KEY, HUNTER_HASH = new_api_key()  # its policy names contoso by domain only


def _settings() -> Settings:
    return settings_with_callers(CALLER_HASH, {"api_key_sha256": HUNTER_HASH, "tenants": ["contoso.com"]})


@dataclass
class Served:
    url: str
    audit: Path
    routed: list[str]  # paths that reached this app's router


@dataclass
class Pair:
    flat: Served
    general: Served
    metrics: Metrics
    source: FakeSource


def _routed_counter(seen: list[str]) -> Callable[..., Awaitable[web.StreamResponse]]:
    @web.middleware
    async def count(request: web.Request, handler: http.Handler) -> web.StreamResponse:
        seen.append(request.path)
        return await handler(request)

    return count


async def _general_token(request: web.Request) -> web.Response:
    return await http.answer_token(request.app, request)


@pytest.fixture
async def pair(tmp_path: Path) -> AsyncIterator[Pair]:
    settings = _settings()
    metrics = Metrics()
    source = FakeSource()
    cache = TokenCache(metrics, settings.cache_options(), redis=None, sealer=None)
    resolver = TenantResolver(
        CountingDiscovery({"contoso.com": CONTOSO}), cache, metrics, settings.tenant_options()
    )
    broker = TokenBroker(
        dict(settings.apps), settings.flight_options(), metrics, cache, source, tenants=resolver
    )
    callers = CallerRegistry(settings, None)
    runners: list[web.AppRunner] = []
    files = []
    served: list[Served] = []
    for name in ("flat", "general"):
        routed: list[str] = []
        if name == "flat":
            app = http.create_api(settings.max_body_bytes)
            app.middlewares.append(_routed_counter(routed))
        else:
            app = web.Application(
                middlewares=[http.error_middleware, _routed_counter(routed)],
                client_max_size=settings.max_body_bytes,
            )
            app.router.add_post("/v1/token", _general_token)
        audit_path = tmp_path / f"{name}-audit.log"
        files.append(audit_path.open("wb"))
        app[http.SETTINGS] = settings
        app[http.METRICS] = metrics
        app[http.AUDIT] = AuditLog(files[-1].fileno())
        app[http.CALLERS] = callers
        app[http.CACHE] = cache
        app[http.CREDENTIALS] = CredentialStore(settings, metrics, None)
        app[http.BROKER] = broker
        app[http.OPENAPI] = b"{}"
        app[http.DRAINING] = asyncio.Event()
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        if name == "flat":
            dispatch_token_requests_first(runner, app)
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        runners.append(runner)
        served.append(Served(f"http://127.0.0.1:{port}", audit_path, routed))
    yield Pair(served[0], served[1], metrics, source)
    for runner in runners:
        await runner.cleanup()
    await broker.close()
    for file in files:
        file.close()


def _body(**fields: Any) -> bytes:
    return json.dumps(fields).encode()


def _auth(key: str = CALLER_KEY, scheme: str = "Bearer ") -> dict[str, str]:
    return {"Authorization": f"{scheme}{key}", "Content-Type": "application/json"}


T0 = TENANTS[0]
# (name, path, headers, body): every case is sent to both apps with the same X-Request-ID.
CASES: list[tuple[str, str, dict[str, str], bytes]] = [
    ("hit by GUID", "/v1/token", _auth(), _body(tenant=T0, resource=DEFENDER)),
    ("hit by scope", "/v1/token", _auth(), _body(tenant=T0, scope=f"{DEFENDER}/.default")),
    ("hit, trailing slash", "/v1/token", _auth(), _body(tenant=T0, resource=f"{DEFENDER}/")),
    ("hit, upper-case GUID", "/v1/token", _auth(), _body(tenant=T0.upper(), resource=DEFENDER)),
    ("hit by domain", "/v1/token", _auth(), _body(tenant="Contoso.com", resource=DEFENDER)),
    ("hit naming the app", "/v1/token", _auth(), _body(tenant=T0, resource=DEFENDER, app="defender")),
    ("hit, min_ttl 0", "/v1/token", _auth(), _body(tenant=T0, resource=DEFENDER, min_ttl=0)),
    ("hit, min_ttl max", "/v1/token", _auth(), _body(tenant=T0, resource=DEFENDER, min_ttl=3000)),
    ("hit, empty roles", "/v1/token", _auth(), _body(tenant=T0, resource=DEFENDER, roles=[])),
    (
        "hit, charset parameter",
        "/v1/token",
        {**_auth(), "Content-Type": "application/json; charset=utf-8"},
        _body(tenant=T0, resource=DEFENDER),
    ),
    (
        "policy by domain, asked by GUID",
        "/v1/token",
        _auth(HUNTER_KEY),
        _body(tenant=CONTOSO, resource=DEFENDER),
    ),
    (
        "policy by domain, asked by domain",
        "/v1/token",
        _auth(HUNTER_KEY),
        _body(tenant="contoso.com", resource=DEFENDER),
    ),
    ("policy refuses", "/v1/token", _auth(HUNTER_KEY), _body(tenant=T0, resource=DEFENDER)),
    (
        "roles the token lacks",
        "/v1/token",
        _auth(),
        _body(tenant=T0, resource=DEFENDER, roles=["Machine.Isolate"]),
    ),
    ("unknown app", "/v1/token", _auth(), _body(tenant=T0, resource=DEFENDER, app="nope")),
    ("resource not allowed", "/v1/token", _auth(), _body(tenant=T0, resource="https://graph.microsoft.com")),
    ("unknown domain", "/v1/token", _auth(), _body(tenant="nobody.example", resource=DEFENDER)),
    ("unknown field", "/v1/token", _auth(), _body(tenant=T0, resource=DEFENDER, extra=1)),
    ("min_ttl too long", "/v1/token", _auth(), _body(tenant=T0, resource=DEFENDER, min_ttl=3001)),
    ("min_ttl a bool", "/v1/token", _auth(), _body(tenant=T0, resource=DEFENDER, min_ttl=True)),
    ("not JSON", "/v1/token", _auth(), b"{"),
    ("empty body", "/v1/token", _auth(), b""),
    (
        "NaN (json reads it, orjson does not)",
        "/v1/token",
        _auth(),
        b'{"tenant":"%s","resource":"%s","min_ttl":NaN}' % (T0.encode(), DEFENDER.encode()),
    ),
    (
        "UTF-8 BOM (json reads it, orjson does not)",
        "/v1/token",
        _auth(),
        b"\xef\xbb\xbf" + _body(tenant=T0, resource=DEFENDER),
    ),
    ("a JSON array", "/v1/token", _auth(), b"[]"),
    ("lower-case scheme", "/v1/token", _auth(scheme="bearer "), _body(tenant=T0, resource=DEFENDER)),
    ("two spaces after Bearer", "/v1/token", _auth(scheme="Bearer  "), _body(tenant=T0, resource=DEFENDER)),
    ("unknown key", "/v1/token", _auth(new_api_key()[0]), _body(tenant=T0, resource=DEFENDER)),
    (
        "no Authorization",
        "/v1/token",
        {"Content-Type": "application/json"},
        _body(tenant=T0, resource=DEFENDER),
    ),
    (
        "text/plain",
        "/v1/token",
        {**_auth(), "Content-Type": "text/plain"},
        _body(tenant=T0, resource=DEFENDER),
    ),
    ("too large", "/v1/token", _auth(), _body(tenant=T0, resource=DEFENDER, pad="x" * 5000)),
    ("with a query string", "/v1/token?x=1", _auth(), _body(tenant=T0, resource=DEFENDER)),
]

_VOLATILE_AUDIT = ("time", "latency_ms")


async def _send(
    session: aiohttp.ClientSession,
    served: Served,
    path: str,
    headers: dict[str, str],
    body: bytes,
    request_id: str,
) -> tuple[int, dict[str, str], Any]:
    async with session.post(
        f"{served.url}{path}", data=body, headers={**headers, "X-Request-ID": request_id}
    ) as response:
        raw = await response.read()
        kept = {k: v for k, v in response.headers.items() if k != "Date"}
        return response.status, kept, json.loads(raw)


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _counts(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample except the latency buckets and sums and the _created times (which differ by
    nature between two requests)."""
    found = {}
    for family in metrics.registry.collect():
        if not family.name.startswith("broker_"):
            continue
        for sample in family.samples:
            if sample.name.endswith(("_created", "_sum")) or (
                sample.name.startswith("broker_token_request_seconds_bucket")
            ):
                continue
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def _delta(before: dict[Any, float], after: dict[Any, float]) -> dict[Any, float]:
    return {k: v - before.get(k, 0.0) for k, v in after.items() if v != before.get(k, 0.0)}


async def test_the_flat_path_answers_exactly_as_the_general_path(pair: Pair) -> None:
    """Every case, sent once to each app after a first round (which fills the caches): the same
    status, headers, body (``expires_in`` within a second), audit line (but its time and latency)
    and metric changes, whether the flat path answered it or handed it over."""
    async with aiohttp.ClientSession() as session:
        for n, (_, path, headers, body) in enumerate(CASES):
            await _send(session, pair.general, path, headers, body, f"warm-{n}")
        flat_lines = len(_lines(pair.flat.audit))
        general_lines = len(_lines(pair.general.audit))
        for n, (name, path, headers, body) in enumerate(CASES):
            seen = []
            for served in (pair.flat, pair.general):
                before = _counts(pair.metrics)
                status, response_headers, answer = await _send(
                    session, served, path, headers, body, f"case-{n}"
                )
                changed = _delta(before, _counts(pair.metrics))
                seen.append((status, response_headers, answer, changed))
            (f_status, f_headers, f_body, f_metrics), (g_status, g_headers, g_body, g_metrics) = seen
            assert (name, f_status, f_headers) == (name, g_status, g_headers)
            if isinstance(f_body, dict) and "expires_in" in f_body:
                assert abs(f_body.pop("expires_in") - g_body.pop("expires_in")) <= 1, name
            assert (name, f_body) == (name, g_body)
            assert (name, f_metrics) == (name, g_metrics)
    flat_audit = _lines(pair.flat.audit)[flat_lines:]
    general_audit = _lines(pair.general.audit)[general_lines:]
    assert len(CASES) == len(flat_audit) == len(general_audit)  # every request audited, on both
    for name_case, flat, general in zip(CASES, flat_audit, general_audit, strict=True):
        for field in _VOLATILE_AUDIT:
            flat.pop(field), general.pop(field)
        assert (name_case[0], flat) == (name_case[0], general)


async def test_cache_hits_skip_the_router_and_everything_else_goes_through_it(pair: Pair) -> None:
    """On the served app, ``POST /v1/token`` never reaches the router (hits, misses and errors
    alike: the endpoint renders its own errors), while other paths and spellings do. This is the
    test that fails loudly if an aiohttp upgrade stops calling ``Server.request_handler``."""
    async with aiohttp.ClientSession() as session:
        for _, path, headers, body in CASES:
            await _send(session, pair.flat, path, headers, body, "r")
        async with session.get(f"{pair.flat.url}/healthz") as response:
            assert 200 == response.status
    assert ["/v1/token", "/healthz"] == pair.flat.routed  # the query-string case, then healthz


async def test_the_flat_path_serves_hits_and_records_them_as_l1(pair: Pair) -> None:
    """A hit on the served app: 200 from L1 (the audit's cache_layer), one request counted."""
    async with aiohttp.ClientSession() as session:
        await _send(session, pair.general, "/v1/token", _auth(), _body(tenant=T0, resource=DEFENDER), "warm")
        status, headers, body = await _send(
            session, pair.flat, "/v1/token", _auth(), _body(tenant=T0, resource=DEFENDER), "hit"
        )
    assert (200, "hit", "no-store") == (status, headers["X-Request-ID"], headers["Cache-Control"])
    assert re.fullmatch(r"token-\d+", body["access_token"])
    [line] = _lines(pair.flat.audit)
    assert ("ok", "l1", "hit", "soar") == (
        line["outcome"],
        line["cache_layer"],
        line["request_id"],
        line["caller"],
    )
    assert [] == pair.flat.routed
