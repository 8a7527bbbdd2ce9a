"""Each dependency's decided failure mode, produced by real faults: redis-server stopped or slow,
the emulator throttling or failing, Key Vault down, a rejected credential, SIGTERM mid-request."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import requests
import yaml

from tests.functional.conftest import (
    APP_ID,
    DEFENDER,
    MDE,
    TENANT_A,
    TENANT_B,
    TENANT_C,
    TENANT_UNCONSENTED,
    World,
    ask,
)
from tests.support import BrokerProcess, RedisServer, run_cli, wait_until

StartBroker = Callable[..., BrokerProcess]


def _ready(broker: BrokerProcess) -> requests.Response:
    return requests.get(f"{broker.url}/readyz", timeout=10)


def test_redis_down_fails_open_and_recovers(
    world: World, start_broker: StartBroker, redis_url: str, redis_server: RedisServer
) -> None:
    """With redis-server stopped, cached and new tokens are still served, /readyz names Redis as
    degraded and the errors are counted; once Redis is back the broker uses it again by itself."""
    broker = start_broker(world.broker_config(redis_url), world.env)
    cached = ask(broker, world.soar_key, {"tenant": TENANT_A, "resource": DEFENDER}).json()
    redis_server.stop()
    try:
        again = ask(broker, world.soar_key, {"tenant": TENANT_A, "resource": DEFENDER})
        assert cached["access_token"] == again.json()["access_token"]
        started = time.monotonic()
        fresh = ask(broker, world.soar_key, {"tenant": TENANT_B, "resource": DEFENDER})
        assert 200 == fresh.status_code, fresh.text
        assert time.monotonic() - started < 5
        ready = _ready(broker)
        # Degraded but still serving: readiness stays 200 (every replica shares Redis; pulling them
        # all would turn a degradation into an outage).
        assert 200 == ready.status_code
        assert "degraded" == ready.json()["status"]
        assert "degraded" == ready.json()["checks"]["redis"]["status"]
        assert broker.metric("broker_redis_errors_total") >= 1
    finally:
        redis_server.start()
    wait_until(
        lambda: "ok" == _ready(broker).json()["checks"]["redis"]["status"],
        10,
        "/readyz after Redis came back",
    )
    ask(broker, world.soar_key, {"tenant": TENANT_C, "resource": DEFENDER})
    keys = redis_server.command(b"KEYS", b"tb:v1:tok:*")
    assert TENANT_C.encode() in keys


def test_slow_redis_does_not_hold_requests(
    world: World, start_broker: StartBroker, redis_url: str, redis_server: RedisServer
) -> None:
    """Redis frozen for 3 s (CLIENT PAUSE: every client's commands held): a request completes well
    within that, from Entra."""
    broker = start_broker(world.broker_config(redis_url), world.env)
    assert b"+OK" in redis_server.command(b"CLIENT", b"PAUSE", b"3000")  # frozen from here on
    started = time.monotonic()
    response = ask(broker, world.soar_key, {"tenant": TENANT_A, "resource": DEFENDER})
    took = time.monotonic() - started
    assert b"PONG" in redis_server.command(b"PING", timeout=10)  # answered when the pause ends
    assert 200 == response.status_code, response.text
    assert took < 2.5


def test_throttling_is_retried_after_retry_after(world: World, start_broker: StartBroker) -> None:
    """A 429 with Retry-After (JSON, then plain text) is waited out and retried within the budget."""
    broker = start_broker(world.broker_config(), world.env)
    for kind, tenant in (("429", TENANT_A), ("429_text", TENANT_B)):
        world.emulator.add_fault("token", kind, tenant=tenant, count=1, retry_after=1)
        started = time.monotonic()
        response = ask(broker, world.soar_key, {"tenant": tenant, "resource": DEFENDER})
        assert 200 == response.status_code, (kind, response.text)
        assert time.monotonic() - started >= 1
        assert 2 == world.emulator.token_requests(tenant=tenant, client_id=APP_ID)


def test_5xx_is_retried_with_backoff(world: World, start_broker: StartBroker) -> None:
    """Two 503s in a row, then success: the caller sees only the success."""
    broker = start_broker(world.broker_config(), world.env)
    world.emulator.add_fault("token", "503", tenant=TENANT_A, count=2)
    response = ask(broker, world.soar_key, {"tenant": TENANT_A, "resource": DEFENDER})
    assert 200 == response.status_code, response.text
    assert 3 == world.emulator.token_requests(tenant=TENANT_A, client_id=APP_ID)


def test_outage_keeps_serving_valid_tokens(world: World, start_broker: StartBroker) -> None:
    """Entra failing hard: cached tokens are still handed out; an uncached key gets 503 + Retry-After."""
    broker = start_broker(world.broker_config(upstream_retry_seconds=1), world.env)
    cached = ask(broker, world.soar_key, {"tenant": TENANT_A, "resource": DEFENDER}).json()
    world.emulator.add_fault("token", "500", count=-1)
    again = ask(broker, world.soar_key, {"tenant": TENANT_A, "resource": DEFENDER})
    assert cached["access_token"] == again.json()["access_token"]
    missing = ask(broker, world.soar_key, {"tenant": TENANT_B, "resource": DEFENDER})
    assert 503 == missing.status_code
    assert "temporarily_unavailable" == missing.json()["error"]
    assert int(missing.headers["Retry-After"]) >= 1


def test_throttle_is_shared_across_replicas(world: World, start_broker: StartBroker, redis_url: str) -> None:
    """After Entra throttles replica 1 for 30 s, replica 2 does not ask Entra for that tenant either."""
    config = world.broker_config(redis_url)
    first = start_broker(config, world.env, name="r1")
    second = start_broker(config, world.env, name="r2")
    world.emulator.add_fault("token", "429", tenant=TENANT_A, count=1, retry_after=30)
    response = ask(first, world.soar_key, {"tenant": TENANT_A, "resource": DEFENDER})
    assert 503 == response.status_code
    assert 1 == world.emulator.token_requests(tenant=TENANT_A, client_id=APP_ID)
    other = ask(second, world.soar_key, {"tenant": TENANT_A, "resource": MDE})
    assert 503 == other.status_code
    assert 25 <= int(other.headers["Retry-After"]) <= 30
    assert 1 == world.emulator.token_requests(tenant=TENANT_A, client_id=APP_ID)


def test_permanent_failures_are_remembered_and_shared(
    world: World, start_broker: StartBroker, redis_url: str, tmp_path: Path
) -> None:
    """A tenant without consent is asked about once for all replicas and repeated requests; after
    consent is granted, `cache purge` makes the next request succeed at once."""
    config = world.broker_config(redis_url)
    first = start_broker(config, world.env, name="r1")
    second = start_broker(config, world.env, name="r2")
    body = {"tenant": TENANT_UNCONSENTED, "resource": DEFENDER}
    for broker in (first, first, second, second):
        response = ask(broker, world.soar_key, body)
        assert 403 == response.status_code
        assert "consent_required" == response.json()["error"]
    assert 1 == world.emulator.token_requests(tenant=TENANT_UNCONSENTED, client_id=APP_ID)
    assert second.metric("broker_negative_cache_hits_total") >= 1
    world.emulator.grant(TENANT_UNCONSENTED, APP_ID, DEFENDER, ["Incident.Read.All"])
    path = tmp_path / "purge.yaml"
    path.write_text(yaml.safe_dump(config))
    purge = run_cli("cache", "purge", "--config", str(path), "--tenant", TENANT_UNCONSENTED, env=first.env)
    assert 0 == purge.returncode, purge.stderr
    assert "removed 1" in purge.stdout
    for broker in (first, second):
        assert 200 == ask(broker, world.soar_key, body).status_code


def test_without_purge_consent_is_seen_after_negative_cache_seconds(
    world: World, start_broker: StartBroker
) -> None:
    """An in-process broker remembers the refusal for negative_cache_seconds, then asks again."""
    broker = start_broker(world.broker_config(negative_cache_seconds=1), world.env)
    body = {"tenant": TENANT_UNCONSENTED, "resource": DEFENDER}
    assert 403 == ask(broker, world.soar_key, body).status_code
    world.emulator.grant(TENANT_UNCONSENTED, APP_ID, DEFENDER, ["Incident.Read.All"])
    assert 403 == ask(broker, world.soar_key, body).status_code  # still remembered
    assert 1 == world.emulator.token_requests(tenant=TENANT_UNCONSENTED, client_id=APP_ID)
    # Asked again and again until the refusal is forgotten: only the first ask after that reaches Entra.
    wait_until(lambda: 200 == ask(broker, world.soar_key, body).status_code, 10, "the refusal forgotten")
    assert 2 == world.emulator.token_requests(tenant=TENANT_UNCONSENTED, client_id=APP_ID)


def test_rejected_credential_is_flagged(world: World, start_broker: StartBroker) -> None:
    """Entra refusing the app secret even after a reload: 502, counted, and /readyz says so."""
    broker = start_broker(world.broker_config(), world.env)
    world.emulator.rotate_app_secret(APP_ID)  # Key Vault still holds the old, now dead, secret
    response = ask(broker, world.soar_key, {"tenant": TENANT_A, "resource": DEFENDER})
    assert 502 == response.status_code
    assert 1 == broker.metric("broker_credential_failures_total")
    ready = _ready(broker)
    # Reported, not unready: every replica shares the app credential, and tokens already cached
    # keep being served.
    assert 200 == ready.status_code
    assert "degraded" == ready.json()["status"]
    assert {"defender": "AADSTS7000215"} == ready.json()["checks"]["credentials"]["rejected_by_entra"]


def test_key_vault_down_keeps_loaded_credentials_and_rotation_is_periodic(
    world: World, start_broker: StartBroker
) -> None:
    """Key Vault failing: periodic reloads fail and the loaded secret keeps working; once it is
    back, a rotated secret is picked up by the periodic reload without a restart."""
    broker = start_broker(world.broker_config(credential_refresh_seconds=1), world.env)
    world.emulator.add_fault("vault", "503", count=-1)
    wait_until(
        lambda: "credential reload failed, keeping the loaded value" in broker.log_text(),
        15,
        "a periodic reload failing",
    )
    assert 200 == ask(broker, world.soar_key, {"tenant": TENANT_A, "resource": DEFENDER}).status_code
    world.emulator.clear_faults()
    world.emulator.rotate_app_secret(APP_ID, vault_secret="defender-app-secret")

    def loads() -> int:
        return sum(
            1
            for line in broker.log_lines()
            if line["message"] == "credential loaded" and line.get("source") == "secret:defender-app-secret"
        )

    wait_until(lambda: 2 == loads(), 15, "the rotated secret loaded by the periodic reload")
    world.emulator.reset_counters()
    assert 200 == ask(broker, world.soar_key, {"tenant": TENANT_B, "resource": DEFENDER}).status_code
    # The new secret was already loaded: one token request, no rejected first attempt.
    assert 1 == world.emulator.token_requests(tenant=TENANT_B, client_id=APP_ID)


def test_sigterm_drains_in_flight_requests(world: World, start_broker: StartBroker) -> None:
    """SIGTERM while a request waits on a slow Entra: that request still gets its token, new
    connections are refused, and the process exits 0."""
    broker = start_broker(world.broker_config(), world.env)
    world.emulator.add_fault("token", "latency", latency_seconds=2, count=1)
    result: list[requests.Response] = []
    thread = threading.Thread(
        target=lambda: result.append(ask(broker, world.soar_key, {"tenant": TENANT_A, "resource": DEFENDER}))
    )
    thread.start()
    wait_until(lambda: not world.emulator.faults(), 10, "the request waiting on the slow Entra")
    assert broker.process is not None
    process = broker.process
    process.terminate()

    def refused() -> bool:
        try:
            requests.get(f"{broker.url}/healthz", timeout=2)
        except requests.ConnectionError:
            return True
        return False

    wait_until(refused, 10, "new connections refused")
    assert process.poll() is None  # refused while still draining, not because it exited
    thread.join(timeout=20)
    assert 0 == process.wait(timeout=20)
    assert 200 == result[0].status_code


def test_entra_timeout_is_retried(world: World, start_broker: StartBroker) -> None:
    """An Entra answer slower than upstream_timeout_seconds is abandoned and retried: the caller
    gets a token well before the slow answer would have come."""
    broker = start_broker(world.broker_config(upstream_timeout_seconds=1), world.env)
    world.emulator.add_fault("token", "latency", tenant=TENANT_A, latency_seconds=5, count=1)
    started = time.monotonic()
    response = ask(broker, world.soar_key, {"tenant": TENANT_A, "resource": DEFENDER})
    assert 200 == response.status_code, response.text
    assert time.monotonic() - started < 4
    # The emulator logs a request when it answers: the abandoned one lands 5 s after it was sent.
    # Wait for it here, so it is counted in this test and not in whichever runs next.
    wait_until(
        lambda: 2 == world.emulator.token_requests(tenant=TENANT_A, client_id=APP_ID),
        10,
        "the abandoned slow answer",
    )


def test_a_port_taken_before_the_broker_binds_it_is_picked_again(world: World, tmp_path: Path) -> None:
    """The harness picks free ports and the broker binds them a moment later; a socket that takes the
    port in between (any outgoing connection's ephemeral port) makes the broker exit with "address
    already in use": it is started again on other ports, with a fresh log of JSON lines only."""
    broker = BrokerProcess(tmp_path, world.broker_config(), world.env, "squatted")
    squatted = broker.port
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", squatted))
        squatter.listen()
        try:
            broker.start()
            assert squatted != broker.port
            assert 200 == requests.get(f"{broker.url}/healthz", timeout=5).status_code
            assert all(isinstance(line, dict) for line in broker.log_lines())
        finally:
            broker.stop()
