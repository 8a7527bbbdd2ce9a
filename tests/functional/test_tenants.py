"""Tenants as managed things, against real processes: one identity per tenant however it is spelled,
the registry and its re-validation sweep, the admin API and CLI, offboarding."""

from __future__ import annotations

import asyncio
import importlib.resources
import json
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import requests
import yaml
from redis.asyncio import Redis

from broker.cache import TokenCache
from broker.callers import new_api_key
from broker.config import parse_settings
from broker.crypto import Sealer, parse_key
from broker.errors import ConsentRequiredError
from broker.metrics import Metrics
from broker.tenants import TenantRegistry
from broker.tokens import AccessToken, TokenKey
from emulator.world import DOMAIN_C2, TEST_WORLD
from tests.functional.conftest import (
    APP_ID,
    DEFENDER,
    DOMAIN_C,
    MDE,
    ROLES,
    TENANT_A,
    TENANT_B,
    TENANT_C,
    World,
    ask,
)
from tests.support import BrokerProcess, run_cli

StartBroker = Callable[..., BrokerProcess]
ROOT = Path(__file__).resolve().parents[2]
ALERTS_PATH = ROOT / "deploy" / "prometheus" / "token-broker-alerts.yaml"
NOWHERE = "nowhere.example.com"
DOCUMENT = json.loads(importlib.resources.files("broker").joinpath("openapi.json").read_bytes())


def _json_schema(node: Any) -> Any:
    """An OpenAPI 3.0 schema as JSON Schema: ``nullable: true`` also admits null."""
    if isinstance(node, list):
        return [_json_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    converted = {key: _json_schema(value) for key, value in node.items() if key != "nullable"}
    return {"anyOf": [converted, {"type": "null"}]} if node.get("nullable") else converted


COMPONENTS = _json_schema(DOCUMENT["components"])


def _conforms(body: Any, schema: str) -> None:
    jsonschema.validate(body, {**COMPONENTS["schemas"][schema], "components": COMPONENTS})


def _with_admin(world: World) -> str:
    """Add caller ``onboarding`` (admin: true) to the world's callers; its API key."""
    key, digest = new_api_key()
    world.callers["onboarding"] = {**TEST_WORLD.caller(digest), "admin": True}
    return key


def _admin(
    broker: BrokerProcess, key: str | None, method: str, path: str, **params: str
) -> requests.Response:
    headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
    return requests.request(method, f"{broker.url}{path}", headers=headers, params=params, timeout=30)


def _wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what} not seen within {timeout} s"
        time.sleep(0.2)


async def _redis_keys(url: str) -> list[str]:
    redis = Redis.from_url(url)
    try:
        return [key.decode() async for key in redis.scan_iter(match="*")]
    finally:
        await redis.aclose()


async def _index_members(url: str) -> list[str]:
    redis = Redis.from_url(url)
    try:
        members = await redis.zrange("tb:v1:reg-index", 0, -1)
        return [member.decode() if isinstance(member, bytes) else str(member) for member in members]
    finally:
        await redis.aclose()


def test_a_domain_a_second_domain_and_the_guid_share_one_token_across_replicas(
    world: World, start_broker: StartBroker, redis_url: str, tmp_path: Path
) -> None:
    """Tenant C asked for by its two domains and its GUID, on two replicas: one Entra token request,
    one cache entry keyed by the GUID, the same token everywhere; the second replica resolves the
    domain from Redis, not from Entra; audit lines carry the GUID and the spelling asked for; `cache
    purge` by a domain purges the tenant."""
    config = world.broker_config(redis_url)
    first = start_broker(config, world.env, name="r1")
    second = start_broker(config, world.env, name="r2")
    world.emulator.reset_counters()
    asked = [
        (first, DOMAIN_C),
        (second, DOMAIN_C2),
        (first, TENANT_C),
        (second, TENANT_C),
        (second, DOMAIN_C),
    ]
    bodies = []
    for broker, tenant in asked:
        response = ask(broker, world.soar_key, {"tenant": tenant, "resource": DEFENDER})
        assert 200 == response.status_code, response.text
        bodies.append(response.json())
    assert 1 == len({body["access_token"] for body in bodies})
    assert {TENANT_C} == {body["tenant_id"] for body in bodies}
    assert 1 == world.emulator.token_requests(tenant=TENANT_C, client_id=APP_ID)
    keys = asyncio.run(_redis_keys(redis_url))
    assert [f"tb:v1:tok:{{defender|{TENANT_C}}}:{DEFENDER}"] == [
        k for k in keys if k.startswith("tb:v1:tok:")
    ]
    assert not [k for k in keys if k.startswith("tb:v1:tok:") and "fabrikam" in k]
    assert 1.0 == second.metric_samples()['broker_tenant_resolutions_total{outcome="ok",source="redis"}']
    audit = [(line["tenant"], line["tenant_requested"]) for b in (first, second) for line in b.audit_lines()]
    assert sorted((TENANT_C, tenant) for _, tenant in asked) == sorted(audit)
    path = tmp_path / "purge.yaml"
    path.write_text(yaml.safe_dump(config))
    purged = run_cli("cache", "purge", "--config", str(path), "--tenant", DOMAIN_C2, env=first.env)
    assert 0 == purged.returncode, purged.stderr
    assert f"removed 1 shared cache entry for {TENANT_C} / {DOMAIN_C2}" in purged.stdout
    _wait_for(lambda: "purge broadcast received" in second.log_text(), 10, "the purge broadcast")
    assert 200 == ask(second, world.soar_key, {"tenant": DOMAIN_C, "resource": DEFENDER}).status_code
    assert 2 == world.emulator.token_requests(tenant=TENANT_C, client_id=APP_ID)


def test_policy_by_domain_admits_the_guid_and_the_other_way_round(
    world: World, start_broker: StartBroker
) -> None:
    """A caller whose policy names tenant C by a domain gets it by GUID and by its other domain, and
    the reverse; other tenants are refused, and an unknown domain is refused too (403: a caller does
    not learn which domains exist), while a caller allowed every tenant gets 404 unknown_tenant."""
    by_domain, by_domain_hash = new_api_key()
    by_guid, by_guid_hash = new_api_key()
    world.callers["by_domain"] = TEST_WORLD.caller(by_domain_hash, tenants=[DOMAIN_C])
    world.callers["by_guid"] = TEST_WORLD.caller(by_guid_hash, tenants=[TENANT_C])
    broker = start_broker(world.broker_config(), world.env)

    def status(key: str, tenant: str) -> tuple[int, str]:
        response = ask(broker, key, {"tenant": tenant, "resource": DEFENDER})
        return response.status_code, response.json().get("error", "ok")

    for key in (by_domain, by_guid):
        for tenant in (TENANT_C, DOMAIN_C, DOMAIN_C2.upper()):
            assert (200, "ok") == status(key, tenant), tenant
        for tenant in (TENANT_A, TENANT_B, NOWHERE):
            assert (403, "access_denied") == status(key, tenant), tenant
    unknown = ask(broker, world.soar_key, {"tenant": NOWHERE, "resource": DEFENDER})
    assert (404, "unknown_tenant", "AADSTS90002") == (
        unknown.status_code,
        unknown.json()["error"],
        unknown.json()["aadsts"],
    )
    assert 1 == world.emulator.token_requests(tenant=TENANT_C, client_id=APP_ID)


def test_an_unknown_domain_is_404_and_asked_about_once(world: World, start_broker: StartBroker) -> None:
    """A domain Entra does not know (AADSTS90002 from its discovery document) is 404 unknown_tenant;
    asking again within negative_cache_seconds does not ask Entra again, and no token is requested."""
    broker = start_broker(world.broker_config(), world.env)
    world.emulator.reset_counters()
    for _ in range(3):
        response = ask(broker, world.soar_key, {"tenant": NOWHERE, "resource": DEFENDER})
        assert 404 == response.status_code
        assert "unknown_tenant" == response.json()["error"]
    assert 1 == len(world.emulator.requests("discovery", tenant=NOWHERE))
    assert 0 == world.emulator.token_requests(client_id=APP_ID)


def _promtool_fires(samples: dict[str, float], tmp_path: Path) -> dict[str, float]:
    """Evaluate the real alert file on the transitions counters a broker exported (absent for 5
    minutes, as a labelled counter is before its first increment, then these values): the firing
    TokenBrokerTenantLeftReady alerts by (app, to)."""
    promtool = shutil.which("promtool")
    assert promtool is not None, "promtool is installed by make install"
    target = 'job="token-broker", namespace="ns", instance="10.0.0.1:9090"'
    series = [
        {"series": name.replace("{", "{" + target + ",", 1), "values": f"_x5 {value:g}x20"}
        for name, value in samples.items()
    ]
    firing = {}
    for to in ("consent_required", "missing_roles"):
        test = {
            "rule_files": [str(ALERTS_PATH)],
            "evaluation_interval": "1m",
            "tests": [
                {
                    "interval": "1m",
                    "input_series": series,
                    "promql_expr_test": [
                        {
                            "expr": "count(ALERTS{alertname='TokenBrokerTenantLeftReady',"
                            f" alertstate='firing', app='defender', to='{to}'}}) or vector(0)",
                            "eval_time": "8m",
                            "exp_samples": [{"labels": "{}", "value": 1}],
                        }
                    ],
                }
            ],
        }
        path = tmp_path / f"alert-{to}.yaml"
        path.write_text(yaml.safe_dump(test))
        result = subprocess.run(
            [promtool, "test", "rules", str(path)], capture_output=True, text=True, check=False, timeout=60
        )
        firing[to] = 1.0 if result.returncode == 0 else 0.0
    return firing


def test_the_sweep_finds_revoked_consent_and_a_removed_role_in_idle_tenants(
    world: World, start_broker: StartBroker, redis_url: str, tmp_path: Path
) -> None:
    """Two replicas, a 3-second check interval, required roles configured. After one request each
    for tenants B and C nobody asks about them again; the customer revokes consent in B and removes a
    role in C. Within the interval the sweep (one replica) finds both: B consent_required, C
    missing_roles naming the role; each transition is counted once cluster-wide, the sweeper's gauge
    shows them, and the alert rule fires on the exported counters (promtool)."""
    admin_key = _with_admin(world)
    interval = 3.0
    config = world.broker_config(
        redis_url, tenant_check_interval_seconds=interval, tenant_check_rate=20, negative_cache_seconds=1
    )
    config["apps"]["defender"]["required_roles"] = {DEFENDER: ROLES}
    brokers = [start_broker(config, world.env, name=f"r{i}") for i in (1, 2)]
    for tenant in (TENANT_B, DOMAIN_C):
        assert 200 == ask(brokers[0], world.soar_key, {"tenant": tenant, "resource": DEFENDER}).status_code

    def states() -> dict[str, Any]:
        found = {}
        for tenant in (TENANT_B, TENANT_C):
            entry = _admin(brokers[1], admin_key, "GET", f"/v1/tenants/{tenant}").json()
            found[tenant] = entry["apps"]["defender"][DEFENDER]
        return found

    assert {"ready"} == {key["state"] for key in states().values()}
    world.emulator.revoke(TENANT_B, APP_ID)
    world.emulator.remove_role(TENANT_C, APP_ID, DEFENDER, "AdvancedHunting.Read.All")
    changed_at = time.monotonic()
    _wait_for(
        lambda: [s["state"] for s in states().values()] == ["consent_required", "missing_roles"],
        2 * interval + 5,
        "revoked consent and the removed role",
    )
    assert time.monotonic() - changed_at < 2 * interval + 5
    found = states()
    assert ["AdvancedHunting.Read.All"] == found[TENANT_C]["missing_roles"]
    assert ["Incident.Read.All"] == found[TENANT_C]["roles"]
    assert ("consent_required", "AADSTS700016") == (
        found[TENANT_B]["last_error"]["error"],
        found[TENANT_B]["last_error"]["aadsts"],
    )
    token_requests = [
        [line for line in broker.audit_lines() if line["message"] == "token request"] for broker in brokers
    ]
    assert [2, 0] == [len(lines) for lines in token_requests]  # nobody asked after the first two

    def transitions() -> dict[str, float]:
        total: dict[str, float] = {}
        for broker in brokers:
            for name, value in broker.metric_samples().items():
                if name.startswith("broker_tenant_transitions_total{"):
                    total[name] = total.get(name, 0.0) + value
        return total

    counted = transitions()
    left = 'broker_tenant_transitions_total{{app="defender",from="ready",to="{}"}}'
    assert [1.0, 1.0] == [counted[left.format(to)] for to in ("consent_required", "missing_roles")]

    def gauge(state: str) -> float:
        return max(
            b.metric_samples().get(f'broker_tenants{{app="defender",state="{state}"}}', 0) for b in brokers
        )

    _wait_for(lambda: gauge("consent_required") == 1 and gauge("missing_roles") == 1, 2 * interval, "gauge")
    sweepers = [b for b in brokers if "broker_tenants{" in b.metrics_text()]
    assert 1 == len(sweepers)
    assert {"consent_required": 1.0, "missing_roles": 1.0} == _promtool_fires(counted, tmp_path)


def test_a_disabled_service_principal_is_a_tenant_state_not_a_credential_reload(
    world: World, start_broker: StartBroker
) -> None:
    """The customer disables the enterprise app in tenant B: an admin check and a token request get
    502 with AADSTS7000112, the registry says disabled, and the app credential is not re-read from
    Key Vault nor counted as rejected (readiness still reports it fine)."""
    admin_key = _with_admin(world)
    broker = start_broker(world.broker_config(), world.env)
    assert 200 == ask(broker, world.soar_key, {"tenant": TENANT_B, "resource": DEFENDER}).status_code
    vault_reads = world.emulator.counters()["vault"]
    world.emulator.set_service_principal_enabled(TENANT_B, APP_ID, enabled=False)

    checked = _admin(broker, admin_key, "POST", f"/v1/tenants/{TENANT_B}/check")
    assert 200 == checked.status_code, checked.text
    outcomes = {(c["resource"], c["outcome"], c["aadsts"]) for c in checked.json()["checks"]}
    assert {
        (DEFENDER, "upstream_error", "AADSTS7000112"),
        (MDE, "upstream_error", "AADSTS7000112"),
    } == outcomes
    entry = checked.json()["entry"]
    assert ("disabled", "disabled") == (entry["state"], entry["apps"]["defender"][DEFENDER]["state"])
    refused = ask(broker, world.soar_key, {"tenant": TENANT_B, "resource": MDE})
    assert (502, "AADSTS7000112") == (refused.status_code, refused.json()["aadsts"])
    assert "re-enable" in refused.json()["error_description"]
    assert vault_reads == world.emulator.counters()["vault"]
    assert 0 == broker.metric("broker_credential_failures_total")
    assert "reloading it once" not in broker.log_text()
    ready = requests.get(f"{broker.url}/readyz", timeout=5).json()
    assert {"status": "ok"} == ready["checks"]["credentials"]
    world.emulator.set_service_principal_enabled(TENANT_B, APP_ID, enabled=True)
    again = _admin(broker, admin_key, "POST", f"/v1/tenants/{TENANT_B}/check", app="defender")
    assert "ready" == again.json()["entry"]["state"]


def test_delete_removes_every_trace_on_every_replica(
    world: World, start_broker: StartBroker, redis_url: str
) -> None:
    """Tenant C, used by both domains and its GUID for two resources on two replicas, then offboarded
    by one of its domains: the answer says what went (2 tokens, 2 domain mappings, the registry
    entry), no Redis key names the tenant or its domains any more while tenant A's remain, both
    replicas heard it, and each asks Entra afresh for C (nothing was left in their memory: the
    replica that had acquired C's tokens discovers the tenant again, its MSAL client gone too)."""
    admin_key = _with_admin(world)
    config = world.broker_config(redis_url)
    brokers = [start_broker(config, world.env, name=f"r{i}") for i in (1, 2)]
    old: dict[str, str | None] = {}
    for broker in brokers:
        for tenant in (DOMAIN_C, DOMAIN_C2, TENANT_C, TENANT_A):
            for resource in (DEFENDER, MDE):
                response = ask(broker, world.soar_key, {"tenant": tenant, "resource": resource})
                assert 200 == response.status_code, response.text
                old[resource] = response.json()["access_token"] if tenant == TENANT_C else old.get(resource)
    assert 2 == world.emulator.token_requests(tenant=TENANT_C, client_id=APP_ID)
    discovered = _discoveries(world, TENANT_C)

    removed = _admin(brokers[0], admin_key, "DELETE", f"/v1/tenants/{DOMAIN_C2}")
    assert 200 == removed.status_code, removed.text
    body = removed.json()
    assert (TENANT_C, 2) == (body["tenant"], body["replicas_notified"])
    assert {
        "tokens": 2,
        "leases": 0,
        "remembered_failures": 0,
        "throttles": 0,
        "domain_mappings": 2,
        "registry_entry": 1,
        "domains": sorted([DOMAIN_C, DOMAIN_C2]),
    } == body["removed"]
    keys = asyncio.run(_redis_keys(redis_url))
    assert [] == [k for k in keys if TENANT_C in k or "fabrikam" in k]
    assert TENANT_C not in asyncio.run(_index_members(redis_url))
    assert any(TENANT_A in k for k in keys)
    _wait_for(
        lambda: all("offboarding broadcast received" in b.log_text() for b in brokers), 10, "the broadcast"
    )
    assert 404 == _admin(brokers[1], admin_key, "GET", f"/v1/tenants/{TENANT_C}").status_code
    for broker in brokers:  # r1 acquired C's tokens before: it acquires again, r2 finds it in Redis
        response = ask(broker, world.soar_key, {"tenant": DOMAIN_C, "resource": DEFENDER})
        assert 200 == response.status_code
        assert old[DEFENDER] != response.json()["access_token"]
    assert 3 == world.emulator.token_requests(tenant=TENANT_C, client_id=APP_ID)
    # Two more discovery requests for C: its domain again (the mapping was dropped), and the tenant
    # again for r1's new MSAL client (the old one was dropped with the rest).
    assert discovered + 2 == _discoveries(world, TENANT_C)
    assert [DOMAIN_C] == _admin(brokers[1], admin_key, "GET", f"/v1/tenants/{TENANT_C}").json()["domains"]


def _discoveries(world: World, tenant: str) -> int:
    """OpenID discovery requests for ``tenant``: MSAL's (once per client it builds) and the tenant
    resolver's for each of its domains (the emulator logs those under the GUID too)."""
    return sum(1 for r in world.emulator.requests("discovery") if r["tenant_id"] == tenant)


def test_the_admin_api_is_for_admin_callers_only_and_audited(world: World, start_broker: StartBroker) -> None:
    """Without a credential every admin endpoint is 401; a caller without admin: true gets 403
    access_denied on each (before anything is looked up), and each attempt is an audit line."""
    admin_key = _with_admin(world)
    broker = start_broker(world.broker_config(), world.env)
    endpoints = [
        ("GET", "/v1/tenants"),
        ("GET", f"/v1/tenants/{TENANT_A}"),
        ("POST", f"/v1/tenants/{TENANT_A}/check"),
        ("DELETE", f"/v1/tenants/{TENANT_A}"),
    ]
    for method, path in endpoints:
        assert 401 == _admin(broker, None, method, path).status_code
        refused = _admin(broker, world.soar_key, method, path)
        assert (403, "access_denied") == (refused.status_code, refused.json()["error"]), path
    assert 0 == world.emulator.token_requests(client_id=APP_ID)
    admin_lines = [line for line in broker.audit_lines() if line["message"] == "tenant admin request"]
    refusals = [(line["caller"], line["outcome"]) for line in admin_lines][1::2]
    assert [("soar", "access_denied")] * 4 == refusals
    assert 200 == _admin(broker, admin_key, "GET", "/v1/tenants").status_code
    assert ("onboarding", "list", "ok") == tuple(
        broker.audit_lines()[-1][field] for field in ("caller", "action", "outcome")
    )


def test_admin_answers_are_what_the_openapi_document_says(world: World, start_broker: StartBroker) -> None:
    """Each admin endpoint's 200 body and an error body validate against the committed document."""
    admin_key = _with_admin(world)
    broker = start_broker(world.broker_config(), world.env)
    assert 200 == ask(broker, world.soar_key, {"tenant": DOMAIN_C, "resource": DEFENDER}).status_code
    for method, path, schema in [
        ("GET", "/v1/tenants", "TenantPage"),
        ("GET", f"/v1/tenants/{DOMAIN_C}", "TenantEntry"),
        ("POST", f"/v1/tenants/{TENANT_C}/check", "TenantCheck"),
        ("POST", f"/v1/tenants/{TENANT_B}/check", "TenantCheck"),
        ("DELETE", f"/v1/tenants/{DOMAIN_C2}", "Offboarding"),
        ("GET", f"/v1/tenants/{TENANT_C}", "Error"),
    ]:
        response = _admin(broker, admin_key, method, path)
        assert (schema == "Error") == (response.status_code >= 400), response.text
        _conforms(response.json(), schema)


def test_a_thousand_registered_tenants_page_correctly(
    world: World, start_broker: StartBroker, redis_url: str
) -> None:
    """1,000 tenants in the registry (written by the broker's own registry code, through Redis, with
    the world's cache key; every tenth without consent): pages of 500, then 300, visit each exactly
    once in GUID order; the state filter pages over just the 100; a bad limit or cursor is 400."""
    admin_key = _with_admin(world)
    config = world.broker_config(redis_url)
    broker = start_broker(config, world.env)
    tenants = [f"{i:08x}-7777-4777-8777-{i:012x}" for i in range(1, 1001)]
    asyncio.run(_register(config, world.cache_key, tenants))

    def visit(limit: int, **filters: str) -> tuple[list[str], list[int]]:
        seen: list[str] = []
        sizes: list[int] = []
        cursor = ""
        while True:
            params = {"limit": str(limit), **filters, **({"cursor": cursor} if cursor else {})}
            page = _admin(broker, admin_key, "GET", "/v1/tenants", **params)
            assert 200 == page.status_code, page.text
            sizes.append(len(page.json()["tenants"]))
            seen += [entry["tenant"] for entry in page.json()["tenants"]]
            cursor = page.json()["next_cursor"]
            if cursor is None:
                return seen, sizes

    assert (tenants, [500, 500]) == visit(500)
    assert (tenants, [300, 300, 300, 100]) == visit(300)
    unconsented = tenants[::10]
    assert (unconsented, [40, 40, 20]) == visit(40, state="consent_required")
    assert ([], [0]) == visit(10, state="disabled")
    for params in ({"limit": "501"}, {"limit": "0"}, {"cursor": "x;y"}, {"state": "fine"}, {"app": "nope"}):
        assert 400 == _admin(broker, admin_key, "GET", "/v1/tenants", **params).status_code, params


async def _register(config: dict[str, Any], cache_key: str, tenants: list[str]) -> None:
    settings = parse_settings(config, environ={}, check_files=False)
    options = settings.redis_options()
    assert options is not None
    redis = Redis.from_url(options.url)
    metrics = Metrics()
    cache = TokenCache(metrics, settings.cache_options(), redis=redis, sealer=Sealer(parse_key(cache_key)))
    registry = TenantRegistry(cache, metrics, settings.tenant_options())
    try:
        for n, tenant in enumerate(tenants):
            key = TokenKey("defender", tenant, DEFENDER)
            outcome: AccessToken | ConsentRequiredError = (
                ConsentRequiredError("no consent", aadsts="AADSTS700016")
                if n % 10 == 0
                else AccessToken("t", time.time() + 3600, tenant, DEFENDER, tuple(ROLES))
            )
            await registry.record(key, outcome)
    finally:
        await cache.close()


@pytest.mark.parametrize("spelling", [TENANT_C, DOMAIN_C])
def test_the_tenants_commands(world: World, start_broker: StartBroker, tmp_path: Path, spelling: str) -> None:
    """token-broker tenants list|show|check|remove against a running broker, by GUID or domain: tables
    for people, --json for scripts, the admin key from the environment, exit 1 on a refusal."""
    admin_key = _with_admin(world)
    config = world.broker_config()
    broker = start_broker(config, world.env)
    assert 200 == ask(broker, world.soar_key, {"tenant": DOMAIN_C, "resource": DEFENDER}).status_code
    path = tmp_path / "cli.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**broker.env, "BROKER_ADMIN_KEY": admin_key}

    def cli(*args: str, key: str = admin_key) -> subprocess.CompletedProcess[str]:
        return run_cli(
            "tenants", *args, "--config", str(path), "--url", broker.url, env={**env, "BROKER_ADMIN_KEY": key}
        )

    listed = cli("list")
    assert 0 == listed.returncode, listed.stderr
    assert ["TENANT", "STATE", "DOMAINS", "APPS"] == listed.stdout.splitlines()[0].split()
    assert [TENANT_C, "ready", DOMAIN_C, "defender"] == listed.stdout.splitlines()[1].split()
    as_json = yaml.safe_load(cli("list", "--json", "--state", "ready").stdout)
    assert [TENANT_C] == [entry["tenant"] for entry in as_json["tenants"]]
    shown = cli("show", spelling)
    assert 0 == shown.returncode, shown.stderr
    assert f"tenant     {TENANT_C} (ready)" == shown.stdout.splitlines()[0]
    checked = cli("check", spelling, "--json")
    assert 0 == checked.returncode, checked.stderr
    assert {"ok"} == {check["outcome"] for check in yaml.safe_load(checked.stdout)["checks"]}
    refused = cli("show", spelling, key=world.soar_key)
    assert (1, "") == (refused.returncode, refused.stdout)
    assert "403 access_denied" in refused.stderr
    removed = cli("remove", spelling)
    assert 0 == removed.returncode, removed.stderr
    assert f"removed tenant {TENANT_C}: 2 tokens, 1 registry_entry" in removed.stdout  # check got both
    assert "404 unknown_tenant" in cli("show", TENANT_C).stderr
