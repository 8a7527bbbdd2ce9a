"""What operators see: exact metric values after a scenario, JSON logs with one audit line per
request, request ids, /readyz, and every CLI command run against the emulator."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
from collections.abc import Callable
from pathlib import Path

import requests
import yaml

from tests.functional.conftest import APP_ID, DEFENDER, TENANT_A, TENANT_UNCONSENTED, World, ask
from tests.support import BrokerProcess, run_cli, wait_until

StartBroker = Callable[..., BrokerProcess]


def test_metrics_after_a_scenario(world: World, start_broker: StartBroker) -> None:
    """Two good requests (one from Entra, one from L1), a bad key and a tenant without consent give
    exactly these counter values."""
    broker = start_broker(world.broker_config(), world.env)
    ask(broker, world.soar_key, {"tenant": TENANT_A, "resource": DEFENDER})
    ask(broker, world.soar_key, {"tenant": TENANT_A, "resource": DEFENDER})
    ask(broker, "wrong-key", {"tenant": TENANT_A, "resource": DEFENDER})
    ask(broker, world.soar_key, {"tenant": TENANT_UNCONSENTED, "resource": DEFENDER})
    samples = broker.metric_samples()
    expected = {
        'broker_token_requests_total{caller="soar",outcome="ok"}': 2.0,
        'broker_token_requests_total{caller="-",outcome="invalid_client"}': 1.0,
        'broker_token_requests_total{caller="soar",outcome="consent_required"}': 1.0,
        'broker_cache_lookups_total{layer="l1",result="hit"}': 1.0,
        'broker_cache_lookups_total{layer="l1",result="miss"}': 2.0,
        'broker_upstream_requests_total{aadsts="",app="defender",outcome="ok"}': 1.0,
        'broker_upstream_requests_total{aadsts="AADSTS700016",app="defender",'
        'outcome="consent_required"}': 1.0,
        "broker_cached_tokens": 1.0,
        'broker_token_request_seconds_count{outcome="ok"}': 2.0,
        "broker_served_token_remaining_seconds_count": 2.0,
        'broker_keyvault_requests_total{outcome="ok"}': 1.0,
        'broker_build_info{version="0.1.0"}': 1.0,
    }
    assert expected == {name: samples.get(name) for name in expected}
    assert not any(TENANT_A in name for name in samples), "tenant ids must not be labels"


def test_logs_are_json_with_an_audit_line_per_request(world: World, start_broker: StartBroker) -> None:
    """Every log line is a JSON object; each token request has one audit line with its request id,
    caller, tenant, app, resource, outcome, cache layer, latency, fingerprint and uti."""
    broker = start_broker(world.broker_config(), world.env)
    first = ask(
        broker,
        world.soar_key,
        {"tenant": TENANT_A, "resource": DEFENDER},
        headers={"X-Request-ID": "req-123"},
    )
    second = ask(broker, world.soar_key, {"tenant": TENANT_A, "resource": DEFENDER})
    denied = ask(broker, world.hunter_key, {"tenant": TENANT_UNCONSENTED, "resource": DEFENDER})
    assert "req-123" == first.headers["X-Request-ID"]
    assert re.fullmatch(r"[0-9a-f]{16}", second.headers["X-Request-ID"])
    broker.log_lines()  # raises if any line is not JSON
    audit = broker.audit_lines()
    assert ["req-123", second.headers["X-Request-ID"], denied.headers["X-Request-ID"]] == [
        line["request_id"] for line in audit
    ]
    token = first.json()["access_token"]
    claims = world.emulator.verify_token(token, DEFENDER)
    assert {
        "caller": "soar",
        "tenant": TENANT_A,
        "app": "defender",
        "resource": DEFENDER,
        "outcome": "ok",
        "cache_layer": "entra",
        "token_fingerprint": hashlib.sha256(token.encode()).hexdigest()[:12],
        "uti": claims["uti"],
    } == {
        k: audit[0][k]
        for k in ("caller", "tenant", "app", "resource", "outcome", "cache_layer", "token_fingerprint", "uti")
    }
    assert "l1" == audit[1]["cache_layer"]
    assert ("hunter", "access_denied", None) == (
        audit[2]["caller"],
        audit[2]["outcome"],
        audit[2]["cache_layer"],
    )
    assert all(isinstance(line["latency_ms"], float) for line in audit)


def test_health_and_readiness(world: World, start_broker: StartBroker, redis_url: str) -> None:
    """/healthz is alive; /readyz names each dependency's state."""
    broker = start_broker(world.broker_config(redis_url), world.env)
    assert {"status": "ok"} == requests.get(f"{broker.url}/healthz", timeout=5).json()
    ready = requests.get(f"{broker.url}/readyz", timeout=5)
    assert 200 == ready.status_code
    assert {"config": "ok", "redis": "ok", "credentials": "ok"} == {
        name: check["status"] for name, check in ready.json()["checks"].items()
    }


def _cli(world: World, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "cli.yaml"
    path.write_text(yaml.safe_dump(world.broker_config()))
    env = {**world.env, "PATH": "/usr/bin:/bin"}
    return run_cli(*args, "--config", str(path), env=env)


def test_probe_shows_claims_but_not_the_token(world: World, tmp_path: Path) -> None:
    """Probe prints tid, aud, roles and expiry; the token only with --show-token."""
    result = _cli(world, tmp_path, "probe", "--tenant", TENANT_A, "--resource", DEFENDER)
    assert 0 == result.returncode, result.stderr
    report = json.loads(result.stdout)
    assert (TENANT_A, DEFENDER, APP_ID) == (report["tenant_id"], report["audience"], report["app_id"])
    assert "Incident.Read.All" in report["roles"]
    assert "access_token" not in report
    assert "eyJ" not in result.stdout
    shown = _cli(world, tmp_path, "probe", "--tenant", TENANT_A, "--resource", DEFENDER, "--show-token")
    assert world.emulator.verify_token(json.loads(shown.stdout)["access_token"], DEFENDER)["tid"] == TENANT_A


def test_probe_fails_listing_missing_roles_and_entra_errors(world: World, tmp_path: Path) -> None:
    """Probe exits 1 naming the roles the token lacks, and with the error body for an Entra refusal."""
    result = _cli(
        world,
        tmp_path,
        "probe",
        "--tenant",
        TENANT_A,
        "--resource",
        DEFENDER,
        "--roles",
        "Incident.Read.All",
        "Machine.Isolate",
    )
    assert 1 == result.returncode
    assert "missing roles: Machine.Isolate" in result.stderr
    refused = _cli(world, tmp_path, "probe", "--tenant", TENANT_UNCONSENTED, "--resource", DEFENDER)
    assert 1 == refused.returncode
    assert "consent_required" == json.loads(refused.stderr)["error"]


def test_hash_key_prints_a_key_and_its_hash() -> None:
    """hash-key's hash is the SHA-256 of its key, in both output forms."""
    result = run_cli("hash-key", "--export", check=True)
    values = dict(line.removeprefix("export ").split("=", 1) for line in result.stdout.splitlines())
    assert (
        hashlib.sha256(values["BROKER_CALLER_KEY"].encode()).hexdigest() == values["BROKER_CALLER_KEY_SHA256"]
    )
    plain = run_cli("hash-key", check=True)
    assert "api_key_sha256" in plain.stdout


def test_every_command_has_help() -> None:
    """Each CLI command answers --help with a usage line."""
    for command in (
        ["serve"],
        ["check-config"],
        ["hash-key"],
        ["consent-url"],
        ["probe"],
        ["cache", "purge"],
    ):
        result = run_cli(*command, "--help")
        assert 0 == result.returncode
        assert result.stdout.startswith("usage: token-broker " + " ".join(command))


def test_cache_purge_reaches_every_replica(
    world: World, start_broker: StartBroker, redis_url: str, tmp_path: Path
) -> None:
    """After `cache purge --tenant T`, no replica serves its old token for T: the next request asks
    Entra once and the other replica takes that new token from Redis."""
    config = world.broker_config(redis_url)
    replicas = [start_broker(config, world.env, name=f"r{i}") for i in range(2)]
    body = {"tenant": TENANT_A, "resource": DEFENDER}
    old = {ask(replica, world.soar_key, body).json()["access_token"] for replica in replicas}
    assert 1 == len(old)
    path = tmp_path / "purge.yaml"
    path.write_text(yaml.safe_dump(config))
    result = run_cli("cache", "purge", "--config", str(path), "--tenant", TENANT_A)
    assert 0 == result.returncode, result.stderr
    assert "removed 1 shared cache entry" in result.stdout
    assert "2 replica(s)" in result.stdout
    wait_until(
        lambda: all("purge broadcast received" in r.log_text() for r in replicas), 5, "the purge broadcast"
    )
    new = {ask(replica, world.soar_key, body).json()["access_token"] for replica in replicas}
    assert 1 == len(new)
    assert old != new
    assert 2 == world.emulator.token_requests(tenant=TENANT_A, client_id=APP_ID)
